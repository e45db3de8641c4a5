"""Request limits enforced before any endpoint runs: the body size (checked before the body is parsed), the time a
client may take to send its body, and the Host header (`--allowed-hosts`). Pure ASGI, like the other middleware.

Header read timeouts and the connection cap live one layer lower, in lmforge.serve.connections (uvicorn's protocol).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # 8 MiB: a 128k-token prompt as JSON text or as an id list is well below


@dataclass(frozen=True)
class ServeLimits:
    """The `lmforge serve` limits; None disables one (tests and trusted deployments)."""

    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES
    header_timeout: float | None = 10.0  # seconds from connection (or end of the previous response) to full headers
    body_timeout: float | None = 60.0  # seconds from full headers to the end of the body
    max_connections: int | None = 1024  # open connections; the next one gets a 503 and is closed

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_connections"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")


def _close(error: APIError) -> APIError:
    # The rest of the body is never read, so the connection cannot be reused: say so instead of keeping it alive.
    error.headers = {**(error.headers or {}), "Connection": "close"}
    return error


def too_large(limit: int, size: int | None = None) -> APIError:
    got = f" (this one has {size} bytes)" if size is not None else ""
    return _close(
        APIError(
            413,
            f"Request body too large: this server accepts at most {limit} bytes{got}; see --max-request-bytes.",
            "invalid_request_error",
            code="request_too_large",
        )
    )


def body_timeout_error(timeout: float) -> APIError:
    return _close(
        APIError(
            408,
            f"Request body not received within {timeout:g} s; see --request-body-timeout.",
            "invalid_request_error",
            code="request_timeout",
        )
    )


class BodyLimitMiddleware:
    """Reads the whole request body up front, bounded in size and time, then replays it to the app.

    A declared Content-Length over the limit is refused before a byte of the body is read; a chunked body is
    refused as soon as it passes the limit. Once the body is replayed, later receive() calls go to the server
    (the endpoints listen there for the client hanging up).
    """

    def __init__(self, app: ASGIApp, max_bytes: int | None, timeout: float | None):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.max_bytes is None and self.timeout is None):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and self.max_bytes is not None:
            try:
                size = int(declared)
            except ValueError:
                size = None
            if size is not None and size > self.max_bytes:
                await too_large(self.max_bytes, size).response()(scope, receive, send)
                return
        try:
            body, early = await self._read(receive)
        except APIError as e:
            await e.response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            if early is not None:
                return early
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> tuple[bytes, Message | None]:
        """(body, the disconnect message if the client left while sending)."""
        chunks: list[bytes] = []
        size = 0
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            if deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    raise body_timeout_error(self.timeout) from None
            if message["type"] == "http.disconnect":
                return b"".join(chunks), message
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.max_bytes is not None and size > self.max_bytes:
                raise too_large(self.max_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _host_of(header: bytes) -> str:
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class AllowedHostsMiddleware:
    """`--allowed-hosts`: a request whose Host header names none of them gets a 400 (DNS-rebinding defence).

    Entries are host names without port; '*.example.com' matches any subdomain, '*' matches everything.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.allowed = [h.strip().lower() for h in allowed_hosts if h.strip()]
        if not self.allowed:
            raise ValueError("allowed_hosts must name at least one host")

    def is_allowed(self, host: str) -> bool:
        for pattern in self.allowed:
            if pattern == "*" or host == pattern:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"host", b"")
            host = _host_of(header)
            if not self.is_allowed(host):
                shown = header.decode("latin-1")[:100]
                error = APIError(
                    400, f"Invalid Host header {shown!r}: not in this server's --allowed-hosts.", code="invalid_host"
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
