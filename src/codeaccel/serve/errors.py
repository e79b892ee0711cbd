"""Every error the server answers, mapped in one place to an OpenAI-style body:
``{"error": {"message", "type", "param", "code"}}``.

Bad input (unparsable JSON, a body not sent as JSON (415), bad UTF-8, wrong types, values out of range,
a prompt too long, an unknown model, an oversized body) is a 4xx; a full queue, a model still loading, a
stopped decoding thread or a shutdown a 503 (with ``Retry-After`` when full); only a bug is a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from codeaccel.errors import CodeaccelError, InternalError, SetupError, UserError
from codeaccel.serve.scheduler import QueueFull

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its result was ready (its choices are cancelled): nginx's 499."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def to_api_error(exc: Exception) -> APIError:
    """The one mapping from codeaccel's errors to HTTP."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientGone):
        return APIError(499, "the client closed the connection", code="client_closed")
    if isinstance(exc, QueueFull):
        return APIError(503, str(exc), "server_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, UserError):
        return APIError(400, str(exc))
    if isinstance(exc, SetupError):
        return APIError(503, str(exc), "server_error", code="unavailable")
    if isinstance(exc, InternalError):
        log.error("internal error", exc_info=exc)
        return APIError(500, f"internal error: {exc}", "server_error")
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})  # a union member's name in a location


def _path(loc: list) -> str:
    """Where in the body, as a client writes it: ``messages[0].role`` (a union's member types dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not ("[" in part or "(" in part or part in _TYPE_TAGS):
            out += f".{part}" if out else part
    return out


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = str(loc[0]) if loc else None  # the top-level field, as OpenAI names it
    message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    path = _path(loc)
    return (f"{path}: {message}" if path else message), param


def _not_json(exc: RequestValidationError) -> bool:
    """FastAPI hands the raw bytes to validation when the body's Content-Type is not JSON (form, text, none):
    the body was never read as JSON, so "not a valid dictionary" would be the wrong complaint."""
    return isinstance(exc.body, bytes | bytearray)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if _not_json(exc):
            given = request.headers.get("content-type") or "none"
            return _response(APIError(415, f"the body must be JSON, sent with Content-Type: application/json (got "
                                           f"{given})", code="unsupported_media_type"))  # fmt: skip
        message, param = _validation_message(exc)
        return _response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _response(APIError(exc.status_code, str(exc.detail), kind))

    for kind in (APIError, CodeaccelError, QueueFull, ClientGone):
        app.add_exception_handler(kind, _mapped)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):  # a bug: 500 with a body, and the traceback logged
        return _response(to_api_error(exc))


async def _mapped(request: Request, exc: Exception):
    return _response(to_api_error(exc))
