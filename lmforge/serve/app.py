"""build_app: the FastAPI application of `lmforge serve` (OpenAI endpoints, /health, /metrics, the chat page).

The app takes a ready engine; lmforge.serve.server runs it under uvicorn and owns the engine's lifetime.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

import lmforge

from .chat import create_chat_completion
from .completions import create_completion
from .context import ServeContext, ServingEngine
from .errors import APIError, install_error_handlers, model_not_found
from .generation import RequestRecord
from .limits import AllowedHostsMiddleware, BodyLimitMiddleware, ServeLimits
from .metrics import ServerMetrics
from .middleware import AuthMiddleware, RequestLogMiddleware
from .parsers import resolve_parsers
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from .streaming import ClientDisconnected
from .text_safety import check_text_fields

STATIC_DIR = Path(__file__).parent / "static"

_ERRORS = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    408: {"model": ErrorResponse, "description": "request body not received in time"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    429: {"model": ErrorResponse, "description": "too many concurrent requests"},
}
_STREAM = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON body, or server-sent events when stream is true",
    }
}


def _record(request: Request, user: str | None = None) -> RequestRecord:
    record = request.scope.get("lmforge_record") or RequestRecord()
    record.user = user
    return record


def build_app(
    engine: ServingEngine,
    served_model_name: str | list[str] | None = None,
    api_keys: list[str] | None = None,
    max_concurrent_requests: int | None = None,
    tool_call_parser: str = "auto",
    reasoning_parser: str = "auto",
    limits: ServeLimits | None = None,
    metrics_key: str | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """`engine`: an AsyncEngine, or anything with the ServingEngine protocol (tests use a fake one).

    `served_model_name`: the name(s) clients must send as `model` (default: the engine's model name).
    `api_keys`: when given, /v1/* needs `Authorization: Bearer <one of them>`.
    `max_concurrent_requests`: generation requests beyond this many in flight get a 429.
    `tool_call_parser`: how replies write tool calls (lmforge.serve.tool_parsers), "auto": from the chat template.
    `reasoning_parser`: "auto" (split <think> replies when the chat template writes the tags), "none", or a name.
    `limits`: the body size and body read time (ServeLimits; its connection limits are the server's to apply).
    `metrics_key`: the key /metrics takes instead of the API keys. `allowed_hosts`: Host header names accepted.
    """
    if isinstance(served_model_name, str):
        names = [served_model_name]
    else:
        names = list(served_model_name or []) or [engine.model_name]
    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
    metrics = ServerMetrics(engine.stats)
    ctx = ServeContext(engine, names, metrics, max_concurrent_requests)
    ctx.tool_call_parser, ctx.reasoning_parser = resolve_parsers(engine.tokenizer, tool_call_parser, reasoning_parser)
    app = FastAPI(
        title="lmforge",
        version=lmforge.__version__,
        description="OpenAI-compatible API of the lmforge inference engine.",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, lambda request, exc: Response(status_code=499))
    limits = limits or ServeLimits()
    # Added first = innermost: hosts, then keys are checked before a byte of the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_bytes, timeout=limits.body_timeout)
    if api_keys or metrics_key:
        app.add_middleware(AuthMiddleware, api_keys=list(api_keys or []), metrics_key=metrics_key)
    if allowed_hosts:
        app.add_middleware(AllowedHostsMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(RequestLogMiddleware, metrics=metrics)  # added last = outermost, so it also logs 401s

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, max_model_len=engine.session_len, generation_defaults=ctx.generation_defaults)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[card(n) for n in names])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
    async def retrieve_model(model: str) -> ModelCard:
        if model not in names:
            raise model_not_found(model, names)
        return card(model)

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**_STREAM, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        check_text_fields(body)
        return await create_completion(body, ctx, request, _record(request, body.user))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_STREAM, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_text_fields(body)
        return await create_chat_completion(body, ctx, request, _record(request, body.user))

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
    async def health() -> HealthResponse:
        # An engine may report a dead loop (optional `is_healthy()`); load balancers then stop sending traffic.
        is_healthy = getattr(engine, "is_healthy", None)
        if callable(is_healthy) and not is_healthy():
            raise APIError(503, "the engine loop is not running", "server_error", code="engine_dead")
        return HealthResponse()

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
