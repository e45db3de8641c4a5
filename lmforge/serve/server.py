"""run_server: `lmforge serve` under uvicorn, with a clean exit on SIGINT/SIGTERM.

On a signal the server stops accepting and lets in-flight requests finish for `shutdown_timeout` seconds; then it
aborts the rest in the engine, so their streams still end properly (finish_reason 'abort', then [DONE]). uvicorn
cancels whatever is left a little later, and the engine is closed last, in the event loop that used it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator

import uvicorn

from .app import build_app
from .connections import guarded_protocol
from .limits import ServeLimits

logger = logging.getLogger("lmforge.serve")


_ABORT_GRACE_S = 2.0  # after the abort, time for streams to write their last chunk before uvicorn cancels them


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx, shutdown_timeout: float, on_ready=None):
        super().__init__(config)
        self.ctx, self.shutdown_timeout, self.on_ready = ctx, shutdown_timeout, on_ready
        self.num_in_flight_at_signal: int | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    def handle_exit(self, sig, frame) -> None:
        # Counted when the signal arrives (this handler runs on the event loop's thread, between its callbacks),
        # not when uvicorn's main loop next polls should_exit: a request finishing in between was not cut short.
        if self.num_in_flight_at_signal is None:
            self.num_in_flight_at_signal = self.ctx.num_in_flight
        super().handle_exit(sig, frame)

    async def _abort_in_flight(self) -> None:
        await asyncio.sleep(self.shutdown_timeout)
        num = await self.ctx.abort_all()
        if num:
            logger.info("shutdown: aborted %d request(s) still running after %.1f s", num, self.shutdown_timeout)

    async def shutdown(self, sockets=None) -> None:
        num = self.ctx.num_in_flight if self.num_in_flight_at_signal is None else self.num_in_flight_at_signal
        if num:
            logger.info("shutdown: waiting up to %.1f s for %d request(s) in flight", self.shutdown_timeout, num)
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


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, taken before the model loads so a busy port fails at once, not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # listening now: a second bind to this port fails even with SO_REUSEADDR
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(host: str, api_keys: list[str] | None) -> str | None:
    """The warning for a server reachable from other machines that anyone may use, or None."""
    if api_keys or is_loopback(host):
        return None
    return (
        f"!!! SECURITY WARNING: serving on {host}, reachable from other machines, WITHOUT API keys: anyone who can "
        "reach this port can run the model, read /metrics and the docs. Pass --api-keys KEY (or bind 127.0.0.1). !!!"
    )


async def serve_async(
    engine_factory: Callable[[], object],
    host: str = "127.0.0.1",
    port: int = 23333,
    served_model_name: list[str] | None = None,
    api_keys: list[str] | None = None,
    max_concurrent_requests: int | None = None,
    shutdown_timeout: float = 10.0,
    log_level: str = "info",
    tool_call_parser: str = "auto",
    reasoning_parser: str = "auto",
    limits: ServeLimits | None = None,
    metrics_key: str | None = None,
    allowed_hosts: list[str] | None = None,
    sock: socket.socket | None = None,
    stats_interval: float | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Build the engine inside the serving loop (its streams bind to this loop), serve until a signal, close.

    The port is taken first: a busy one fails before the model loads (`sock`: a socket already listening, as
    `lmforge serve`'s launcher takes it before its engine cores start). `engine_factory` may be a coroutine
    function; given a parameter, it gets a callback to call with a reason when the engine dies under the server
    (then the server stops and this returns 1). Returns the exit status: 0 after a signal.
    `stats_interval`: log the generation rate every that many seconds (when tokens were generated).
    `on_ready`: called once the server accepts requests."""
    limits = limits or ServeLimits()
    if sock is None:
        sock = bind_socket(host, port)
    warning = exposure_warning(host, api_keys)
    if warning:
        logger.warning(warning)
    died: list[str] = []
    server: _Server | None = None

    def on_engine_death(reason: str) -> None:
        if server is not None and server.should_exit:  # already shutting down on a signal: not a failure
            logger.info("%s during shutdown", reason)
            return
        died.append(reason)
        if server is not None:
            server.should_exit = True

    try:
        engine = engine_factory(on_engine_death) if _takes_callback(engine_factory) else engine_factory()
        if inspect.isawaitable(engine):
            engine = await engine
    except BaseException:
        sock.close()
        raise
    app = None
    stats_task = asyncio.create_task(_log_speed(engine, stats_interval)) if stats_interval else None
    try:
        app = build_app(
            engine,
            served_model_name,
            api_keys,
            max_concurrent_requests,
            tool_call_parser=tool_call_parser,
            reasoning_parser=reasoning_parser,
            limits=limits,
            metrics_key=metrics_key,
            allowed_hosts=allowed_hosts,
        )
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
            http=guarded_protocol(limits.header_timeout, limits.max_connections),
        )
        server = _Server(config, app.state.ctx, shutdown_timeout, on_ready)
        logger.info(
            "serving %s on http://%s:%d (chat page at /, API at /v1, docs at /docs)%s",
            app.state.ctx.served_model_names[0],
            host,
            sock.getsockname()[1] if sock is not None else port,
            ", API keys required" if api_keys else "",
        )
        if not died:
            await server.serve(sockets=[sock])
    finally:
        if stats_task is not None:
            stats_task.cancel()
        sock.close()
        if app is not None:
            app.state.ctx.workers.close()
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


async def _log_speed(engine, interval: float) -> None:
    """Every `interval` seconds in which tokens were generated, one line: generated tokens/s, prompt tokens/s,
    requests running and waiting."""
    last = engine.stats()
    last_t = time.perf_counter()
    while True:
        await asyncio.sleep(interval)
        now, now_t = engine.stats(), time.perf_counter()
        generated = now.generation_tokens_total - last.generation_tokens_total
        if generated or now.num_running:
            span = now_t - last_t
            logger.info(
                "stats: %.1f generated tok/s, %.1f prompt tok/s over %.1f s; %d running, %d waiting",
                generated / span,
                (now.prompt_tokens_total - last.prompt_tokens_total) / span,
                span,
                now.num_running,
                now.num_waiting,
            )
        last, last_t = now, now_t


def run_event_loop(coro) -> int:
    """Run the server's coroutine on uvloop when it is installed (a faster event loop for many streams), else on
    asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def run_server(engine_factory: Callable[[], object], **kwargs) -> int:
    return run_event_loop(serve_async(engine_factory, **kwargs))
