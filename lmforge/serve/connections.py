"""Connection-level limits uvicorn lacks: a header read timeout (slowloris) and a cap on open connections.

`guarded_protocol` returns a subclass of uvicorn's httptools protocol (when httptools is installed: its C parser and
leaner response writer cost a fraction of h11's per streamed chunk) or of its h11 one, for `uvicorn.Config(http=...)`.
A connection over the cap is answered with a JSON 503 and closed before its request is read; a connection that has
not sent complete headers within `header_timeout` (counted from the connection, or from the first bytes of a later
request on a keep-alive connection) gets a 408 and is closed. Body read timeouts are lmforge.serve.limits' (ASGI level).
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("lmforge.serve")


def _raw_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()  # fmt: skip
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


class _HeaderDeadline:
    """The header deadline and connection cap shared by both protocols: `_arm` starts the deadline (once), `_disarm`
    stops it, `_headers_pending` says whether a deadline that fires still finds headers missing (then 408, close)."""

    header_timeout: float | None = None
    max_connections: int | None = None

    def _guard(self, transport: asyncio.Transport) -> None:  # from connection_made, after the base class's
        self._header_timer: asyncio.TimerHandle | None = None
        if not _refuse_over_cap(self, transport):
            self._arm()

    def _arm(self) -> None:
        if self.header_timeout is not None and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_pending(self) -> bool:
        raise NotImplementedError

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._headers_pending():
            return
        self.transport.write(
            _raw_response(
                408,
                "Request Timeout",
                f"Request headers not received within {self.header_timeout:g} s; see --request-header-timeout.",
                "request_timeout",
            )
        )
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard(transport)

    def _headers_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Headers are complete once h11 has moved the client past IDLE. A later request on a keep-alive connection
        # gets its deadline from its first bytes (uvicorn's keep-alive timeout closes a silent one).
        if self.conn.their_state is h11.IDLE:
            self._arm()
        else:
            self._disarm()


def _refuse_over_cap(protocol, transport: asyncio.Transport) -> bool:
    if protocol.max_connections is None or len(protocol.connections) <= protocol.max_connections:
        return False
    logger.warning("refused a connection: %d are open (--max-connections)", len(protocol.connections) - 1)
    transport.write(
        _raw_response(
            503,
            "Service Unavailable",
            f"Too many open connections: this server holds at most {protocol.max_connections}. Retry shortly.",
            "too_many_connections",
            "retry-after: 1\r\n",
        )
    )
    transport.close()
    return True


def _httptools_protocol():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        """The same limits on uvicorn's httptools protocol: the header deadline runs from the connection (and from
        each later request's first bytes) to the parser's headers-complete callback."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._headers_done = False
            self._guard(transport)

        def _headers_pending(self) -> bool:
            return not self._headers_done

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_done = False
            self._arm()

        def on_headers_complete(self) -> None:
            self._headers_done = True
            self._disarm()
            super().on_headers_complete()

    return GuardedHttpToolsProtocol


def guarded_protocol(header_timeout: float | None, max_connections: int | None, impl: str = "auto") -> type:
    """`impl`: 'httptools', 'h11', or 'auto' (httptools when it is installed)."""
    if impl not in ("auto", "httptools", "h11"):
        raise ValueError(f"impl must be 'auto', 'httptools' or 'h11', got {impl!r}")
    base: type = GuardedH11Protocol
    if impl != "h11":
        try:
            import httptools  # noqa: F401
        except ImportError:
            if impl == "httptools":
                raise ValueError("impl='httptools' needs httptools: pip install httptools") from None
        else:
            base = _httptools_protocol()
    return type(
        "Lmforge" + base.__name__.removeprefix("Guarded"),
        (base,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
