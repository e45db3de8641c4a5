"""Pure ASGI middleware (no BaseHTTPMiddleware, which would hide client disconnects from the endpoints):
API-key checks on /v1/*, the docs and /metrics, and the one log line per request with its id, tokens in/out
and latency.
"""

from __future__ import annotations

import logging
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError
from .generation import RequestRecord
from .metrics import ServerMetrics

logger = logging.getLogger("lmforge.serve")
QUIET_PATHS = ("/health", "/metrics")  # probes: logged at DEBUG so they do not drown the request log


DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # they describe every route: keyed too


class AuthMiddleware:
    """Bearer keys on /v1/*, the API docs and /metrics; /health and the chat page (static files) stay open.

    `api_keys` guard the API and the docs; /metrics takes `metrics_key` when one is given (so a scraper needs
    no API key), else the API keys. Runs before body parsing, so a bad key is a 401 even when the body is malformed.
    """

    def __init__(self, app: ASGIApp, api_keys: list[str], metrics_key: str | None = None):
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        self.metrics_keys = [metrics_key.encode()] if metrics_key else self.api_keys

    def _keys_for(self, path: str) -> list[bytes] | None:
        """The keys that open `path`, or None when it is open to everyone."""
        if path == "/metrics":
            return self.metrics_keys or None
        if path.startswith("/v1/") or path in DOC_PATHS:
            return self.api_keys or None
        return None

    @staticmethod
    def _authorized(scope: Scope, keys: list[bytes]) -> str | None:
        """None when the key is good, else the reason."""
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, key = header.partition(b" ")
        if not header:
            return (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        if scheme.lower() != b"bearer" or not any(secrets.compare_digest(key.strip(), k) for k in keys):
            return "Incorrect API key provided."
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self._keys_for(scope["path"]) if scope["type"] == "http" else None
        if keys is not None:
            reason = self._authorized(scope, keys)
            if reason is not None:
                code = "invalid_api_key" if reason.startswith("Incorrect") else "missing_api_key"
                error = APIError(
                    401, reason, "invalid_request_error", code=code, headers={"WWW-Authenticate": "Bearer"}
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        record = RequestRecord()
        scope["lmforge_record"] = record
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        outcome = ""
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as e:
            outcome = f" ({type(e).__name__})"
            raise
        finally:
            path = scope["path"]
            endpoint = path if path.startswith("/v1/") or path in QUIET_PATHS else "other"
            self.metrics.http_requests.labels(endpoint, str(status or 500)).inc()
            finish = ",".join(sorted(set(record.finish_reasons))) or "-"
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            logger.log(
                level,
                "%s %s %s %d in=%d out=%d finish=%s %.3fs%s%s",
                record.request_id,
                scope["method"],
                path,
                status,
                record.prompt_tokens,
                record.completion_tokens,
                finish,
                time.perf_counter() - start,
                outcome,
                "" if record.user is None else f" user={record.user[:256]!r}",
            )
