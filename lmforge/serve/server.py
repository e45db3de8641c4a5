"""run_server: `lmforge serve` under uvicorn, with a clean exit on SIGINT/SIGTERM.

On a signal the server stops accepting and lets in-flight requests finish for `shutdown_timeout` seconds; then it
aborts the rest in the engine, so their streams still end properly (finish_reason 'abort', then [DONE]). uvicorn
cancels whatever is left a little later, and the engine is closed last, in the event loop that used it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import socket
import threading
from collections.abc import Callable, Generator

import uvicorn

from .app import build_app

logger = logging.getLogger("lmforge.serve")


_ABORT_GRACE_S = 2.0  # after the abort, time for streams to write their last chunk before uvicorn cancels them


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx, shutdown_timeout: float):
        super().__init__(config)
        self.ctx, self.shutdown_timeout = ctx, shutdown_timeout

    async def _abort_in_flight(self) -> None:
        await asyncio.sleep(self.shutdown_timeout)
        num = await self.ctx.abort_all()
        if num:
            logger.info("shutdown: aborted %d request(s) still running after %.1f s", num, self.shutdown_timeout)

    async def shutdown(self, sockets=None) -> None:
        if self.ctx.num_in_flight:
            logger.info(
                "shutdown: waiting up to %.1f s for %d request(s) in flight",
                self.shutdown_timeout,
                self.ctx.num_in_flight,
            )
        watchdog = asyncio.create_task(self._abort_in_flight())
        try:
            await super().shutdown(sockets)
        finally:
            watchdog.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the captured signal after shutdown, so SIGTERM would still kill the process with
        # status 143 after a clean shutdown; here a handled signal means a normal exit (status 0).
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def serve_async(
    engine_factory: Callable[[], object],
    host: str = "127.0.0.1",
    port: int = 23333,
    served_model_name: list[str] | None = None,
    api_keys: list[str] | None = None,
    max_concurrent_requests: int | None = None,
    shutdown_timeout: float = 10.0,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> int:
    """Build the engine inside the serving loop (its streams bind to this loop), serve until a signal, close.

    `engine_factory` may be a coroutine function; it gets a callback to call with a reason when the engine dies
    under the server (then the server stops and this returns 1). Returns the exit status: 0 after a signal."""
    died: list[str] = []
    server: _Server | None = None

    def on_engine_death(reason: str) -> None:
        died.append(reason)
        if server is not None:
            server.should_exit = True

    engine = engine_factory(on_engine_death) if _takes_callback(engine_factory) else engine_factory()
    if inspect.isawaitable(engine):
        engine = await engine
    try:
        app = build_app(engine, served_model_name, api_keys, max_concurrent_requests)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            log_config=None,
            lifespan="off",
            timeout_graceful_shutdown=shutdown_timeout + _ABORT_GRACE_S,
            timeout_keep_alive=5,
        )
        server = _Server(config, app.state.ctx, shutdown_timeout)
        logger.info(
            "serving %s on http://%s:%d (chat page at /, API at /v1, docs at /docs)%s",
            app.state.ctx.served_model_names[0],
            host,
            port,
            ", API keys required" if api_keys else "",
        )
        if not died:
            await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        await engine.close()
        logger.info("shut down")
    if died:
        logger.error("stopped: %s", died[0])
        return 1
    return 0


def _takes_callback(factory) -> bool:
    try:
        return len(inspect.signature(factory).parameters) >= 1
    except (TypeError, ValueError):
        return False


def run_server(engine_factory: Callable[[], object], **kwargs) -> int:
    return asyncio.run(serve_async(engine_factory, **kwargs))
