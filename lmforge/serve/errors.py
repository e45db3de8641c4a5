"""OpenAI-style errors: every failure leaves the server as {"error": {"message", "type", "param", "code"}}.

Handlers raise APIError; the exception handlers registered by `install_error_handlers` turn request validation
errors, HTTP errors (404/405) and anything unexpected into the same shape with the right status.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("lmforge.serve")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        # Messages may quote client text (a model name, a path) holding lone surrogates; escape them so the error
        # response itself can always be encoded.
        message, param = _encodable(message), None if param is None else _encodable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def context_length_error(num_prompt: int, num_completion: int, max_len: int, param: str) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {max_len} tokens. However, you requested "
        f"{num_prompt + num_completion} tokens ({num_prompt} in the {param}, {num_completion} in the completion). "
        f"Please reduce the length of the {param} or completion.",
        "invalid_request_error",
        param,
        "context_length_exceeded",
    )


def model_not_found(name: str, served: list[str]) -> APIError:
    return APIError(
        404,
        f"The model '{name}' does not exist. This server serves: {', '.join(served)}.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return invalid(
            f"We could not parse the JSON body of your request: {first.get('msg', 'invalid JSON')}", code="invalid_json"
        ).response()
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if param:
        msg = f"Invalid value for '{param}': {msg}"
        if "input" in first and len(errors) == 1:
            msg += f" (got {_short(first['input'])})"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return invalid(msg, param, "invalid_value").response()


def _short(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}.get(
        exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error"
    )
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"Unknown endpoint {request.method} {request.url.path}"
    return APIError(exc.status_code, message, kind, headers=getattr(exc, "headers", None)).response()


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", "server_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
