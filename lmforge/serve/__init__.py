"""OpenAI-compatible HTTP server: `build_app(engine)` gives the FastAPI app, `run_server` runs it under uvicorn.

Request path: app.py (routes) -> completions.py / chat.py (OpenAI params -> GenerationConfig, prompts -> ids)
-> generation.py (n engine streams merged, metrics) -> AsyncEngine.generate; streaming.py turns the deltas into
server-sent events and aborts the engine request when the client leaves.
"""

from .app import build_app
from .server import run_server

__all__ = ["build_app", "run_server"]
