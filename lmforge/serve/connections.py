"""Connection-level limits uvicorn lacks: a header read timeout (slowloris) and a cap on open connections.

`guarded_protocol` returns a subclass of uvicorn's h11 protocol for `uvicorn.Config(http=...)`. A connection over
the cap is answered with a JSON 503 and closed before its request is read; a connection that has not sent complete
headers within `header_timeout` (counted from the connection, or from the first bytes of a later request on a
keep-alive connection) gets a 408 and is closed. Body read timeouts are lmforge.serve.limits' (ASGI level).
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


class GuardedH11Protocol(H11Protocol):
    header_timeout: float | None = None
    max_connections: int | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            logger.warning("refused a connection: %d are open (--max-connections)", len(self.connections) - 1)
            transport.write(
                _raw_response(
                    503,
                    "Service Unavailable",
                    f"Too many open connections: this server holds at most {self.max_connections}. Retry shortly.",
                    "too_many_connections",
                    "retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self.header_timeout is not None and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
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

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Headers are complete once h11 has moved the client past IDLE. A later request on a keep-alive connection
        # gets its deadline from its first bytes (uvicorn's keep-alive timeout closes a silent one).
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def guarded_protocol(header_timeout: float | None, max_connections: int | None) -> type[H11Protocol]:
    return type(
        "LmforgeH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
