"""One JSON error shape for every service, and the handlers that produce it.

Every error answers `{"error": {"code", "message", "details": [{"field", "message"}]}}`, so a
client can always tell which field was wrong; nothing escapes as an HTML page or a bare 500.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[FieldError] = []


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorBody


class ApiError(Exception):
    """Raise from domain or API code to answer with `status` and a machine-readable `code`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = [FieldError(field=field, message=message)] if field else []
        self.headers = headers


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def error_json(
    status: int,
    code: str,
    message: str,
    details: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details or []))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


async def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_json(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        FieldError(field=_field_name(tuple(e["loc"])), message=e["msg"]) for e in exc.errors()
    ]
    message = "; ".join(f"{d.field}: {d.message}" for d in details[:3]) or "invalid request"
    return error_json(422, "validation_error", message, details)


async def _on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "error")
    headers = dict(exc.headers) if exc.headers else None
    return error_json(exc.status_code, code, str(exc.detail), headers=headers)


_NUL = "\x00"
_NUL_MESSAGE = "must not contain NUL (U+0000) characters"


def _nul_path(value: Any, path: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    """Where in a parsed JSON document a string (or a key) holds NUL, depth first."""
    if isinstance(value, str):
        return path if _NUL in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _NUL in str(key):
                return (*path, str(key))
            if (found := _nul_path(item, (*path, str(key)))) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if (found := _nul_path(item, (*path, index))) is not None:
                return found
    return None


def _nul_field(request: Request) -> str:
    """The request field that carried the NUL: a path or query parameter, else in the body."""
    for name, value in [*request.path_params.items(), *request.query_params.multi_items()]:
        if _NUL in str(name) or _NUL in str(value):
            return str(name)
    # Only a body the route already read (cached on the request) is looked at: reading it
    # here, after the route consumed the stream, would wait for a client that sent everything.
    raw = getattr(request, "_body", None)
    if isinstance(raw, bytes):
        try:
            found = _nul_path(orjson.loads(raw), ())
        except (orjson.JSONDecodeError, RecursionError):  # not JSON, or absurdly deep
            found = None
        if found:
            return _field_name(found)
    return "body"


async def _on_unstorable_text(request: Request, exc: Exception) -> JSONResponse:
    # PostgreSQL text cannot hold NUL; no field of ours needs it, so it is bad input, not a bug.
    field = _nul_field(request)
    details = [FieldError(field=field, message=_NUL_MESSAGE)]
    return error_json(422, "invalid_text", f"{field}: {_NUL_MESSAGE}", details)


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_json(500, "internal_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the one JSON shape."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(asyncpg.CharacterNotInRepertoireError, _on_unstorable_text)
    app.add_exception_handler(asyncpg.UntranslatableCharacterError, _on_unstorable_text)
    app.add_exception_handler(Exception, _on_unexpected)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": name.replace("_", " ")}
    for code, name in _STATUS_CODES.items()
    if code in (401, 403, 404, 409, 422, 429)
}
