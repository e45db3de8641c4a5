"""Responses that notice a client leaving: the request is aborted (and its KV blocks freed) at once, not at the
next token write. Works on the raw ASGI channel so it does not depend on the server's ASGI spec version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("lmforge.serve")
T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_done(main: asyncio.Task, watcher: asyncio.Task) -> None:
    try:
        await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (main, watcher):
            t.cancel()
        await asyncio.gather(main, watcher, return_exceptions=True)


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then ClientDisconnected is raised)."""
    main = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    await _first_done(main, watcher)
    if main.cancelled():
        raise ClientDisconnected()
    return main.result()


class EventStreamResponse(Response):
    """Server-sent events from an async iterator of already framed strings ("data: ...\\n\\n").

    `on_close` runs exactly once however the stream ends (finished, client gone, server shutdown), even when the
    iterator never started.
    """

    def __init__(
        self,
        events: AsyncIterator[str],
        on_close: Callable[[], None] | None = None,
        headers: dict[str, str] | None = None,
    ):
        # Response.__init__ would render a body; only the attributes FastAPI and Starlette read are set.
        self.status_code = 200
        self.background = None
        self.events = events
        self.on_close = on_close
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        main = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await _first_done(main, watcher)
        finally:
            try:
                await self.events.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
        self.disconnected = main.cancelled()
        if not main.cancelled() and main.exception() is not None and not isinstance(main.exception(), OSError):
            logger.error("event stream failed", exc_info=main.exception())
