"""The one place where exceptions become OpenAI-shaped HTTP errors.

`{"error": {"message", "type", "param", "code"}}` with the status each MergeserveError
subclass declares; request-validation failures are 400 `invalid_request_error` naming the
offending field, as OpenAI answers them; anything unexpected is a 500 that hides internals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mergeserve.errors import AuthenticationError, MergeserveError
from mergeserve.server.openai.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, err_type: str, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=err_type, param=param, code=code))


def from_exception(exc: MergeserveError) -> ErrorResponse:
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code)


def sse_error(exc: MergeserveError) -> str:
    """An error as a server-sent event, for failures after a stream has started."""
    return f"data: {json.dumps(from_exception(exc).model_dump())}\n\n"


def _json(status: int, body: ErrorResponse) -> JSONResponse:
    return JSONResponse(status_code=status, content=body.model_dump())


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "extra_forbidden":
        return f"unsupported parameter {param!r}", param
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MergeserveError)
    async def _mergeserve(_: Request, exc: MergeserveError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        response = _json(exc.status_code, from_exception(exc))
        if isinstance(exc, AuthenticationError):
            response.headers["WWW-Authenticate"] = "Bearer"
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(max(0, int(exc.retry_after)))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return _json(400, error_response(400, message, "invalid_request_error", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _json(exc.status_code, error_response(exc.status_code, str(exc.detail), err_type))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _json(500, error_response(500, "internal server error", "internal_error"))


class BodyLimit:
    """ASGI middleware: a size limit on every request body, before any of it is parsed.

    A declared Content-Length over the limit is answered 413 at once, without reading
    the body; a body without one (chunked) is counted as it arrives and refused (413,
    through the app's error handlers) when it passes the limit. `limit_for(scope)` gives
    each route its limit (expert uploads get theirs, chat bodies the server's)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            body = error_response(413, _too_large(limit), "invalid_request_error")
            await _json(413, body)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI re-raises it from its body parsing (any
                    # other error there becomes a generic 400), and the handler above
                    # answers it OpenAI-shaped.
                    raise StarletteHTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"
