"""Errors as HTTP answers, in one place.

Every answer that is not a success has the body
``{"error": {"type": ..., "message": ..., "field": ...}}`` (``field`` only
for validation errors). The mapping:

==============================  ======  ==========================================
error                           status  note
==============================  ======  ==========================================
request validation (pydantic)   422     ``type`` ``validation_error``, ``field`` names it
InvalidArgumentError, other     422     ``invalid_argument`` / ``usage_error``
UsageError
missing or unknown API key      401     ``WWW-Authenticate: Bearer``
not allowed (not admin, a       403
user id that is not the key's)
SessionNotFoundError            404     another user's session exactly like a missing one
SessionBusyError                409     ``Retry-After`` (seconds)
SessionArchivedError            409     ``session_archived``
SessionLimitError               409     ``session_limit``
SessionExistsError, Conflict    409
body larger than the limit      413
StoreUnavailableError           503     ``Retry-After: 1``
CorruptDataError                503     stored data this server cannot read
ChatSessionClosedError          503     the server is shutting down
ModelError, ToolError           502     the model (or a tool) failed
SessionTimeoutError             504     the turn ran past its timeout
==============================  ======  ==========================================

Anything else is a bug and answers 500 (logged with its traceback).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatsession.errors import (
    AgentError,
    ChatSessionClosedError,
    ChatSessionError,
    ConflictError,
    CorruptDataError,
    InvalidArgumentError,
    InvalidIdError,
    SessionArchivedError,
    SessionBusyError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    SessionTimeoutError,
    StoreUnavailableError,
    UnsupportedValueError,
    UsageError,
)

__all__ = ["APIError", "error_body", "install_error_handlers", "status_of"]

_logger = logging.getLogger("chatsession.server")


class APIError(Exception):
    """An HTTP error the server raises itself (auth, permissions).

    Attributes:
        status: The HTTP status.
        type: A short machine-readable name.
        message: What went wrong and what to do.
        headers: Extra response headers.
        field: The request field at fault, when one is.
    """

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        headers: dict[str, str] | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers or {}
        self.field = field


def error_body(type: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The JSON body of an error answer."""
    error: dict[str, Any] = {"type": type, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def status_of(exc: ChatSessionError) -> tuple[int, str, dict[str, str]]:
    """The status, error type and headers a chatsession error answers with."""
    if isinstance(exc, SessionNotFoundError):
        return 404, "not_found", {}
    if isinstance(exc, SessionBusyError):
        wait = exc.retry_after if exc.retry_after and exc.retry_after > 0 else 1.0
        return 409, "session_busy", {"Retry-After": str(max(1, math.ceil(wait)))}
    if isinstance(exc, SessionArchivedError):
        return 409, "session_archived", {}
    if isinstance(exc, SessionLimitError):
        return 409, "session_limit", {}
    if isinstance(exc, SessionExistsError):
        return 409, "session_exists", {}
    if isinstance(exc, ConflictError):
        return 409, "conflict", {"Retry-After": "1"}
    if isinstance(exc, StoreUnavailableError):
        return 503, "store_unavailable", {"Retry-After": "1"}
    if isinstance(exc, CorruptDataError):
        return 503, "corrupt_data", {}
    if isinstance(exc, ChatSessionClosedError):
        return 503, "shutting_down", {"Retry-After": "1"}
    if isinstance(exc, InvalidIdError):
        return 422, "invalid_id", {}
    if isinstance(exc, UnsupportedValueError):
        return 422, "unsupported_value", {}
    if isinstance(exc, InvalidArgumentError):
        return 422, "invalid_argument", {}
    if isinstance(exc, UsageError):
        return 422, "usage_error", {}
    if isinstance(exc, SessionTimeoutError):
        return 504, "turn_timeout", {}
    if isinstance(exc, AgentError):
        return 502, "model_error", {}
    return 500, "internal_error", {}


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI, on_error: Callable[[str], None] | None = None) -> None:
    """Register the mapping above on ``app``; ``on_error(type)`` is told each error answered."""

    def told(kind: str) -> None:
        if on_error is not None:
            on_error(kind)

    async def on_chatsession(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ChatSessionError)
        status, kind, headers = status_of(exc)
        told(kind)
        if status >= 500 and status != 503:
            _logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(error_body(kind, str(exc)), status_code=status, headers=headers)

    async def on_api(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        told(exc.type)
        return JSONResponse(
            error_body(exc.type, exc.message, exc.field),
            status_code=exc.status,
            headers=exc.headers,
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = "body" if first.get("type") == "json_invalid" else _field(first.get("loc", ()))
        told("validation_error")
        message = "; ".join(
            f"{'body' if e.get('type') == 'json_invalid' else _field(e.get('loc', ()))}: "
            f"{e.get('msg', '')}"
            for e in errors
        )
        return JSONResponse(
            error_body("validation_error", message or "invalid request", field), status_code=422
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # a body the parser gave up on (too deep, huge numbers)
            told("validation_error")
            return JSONResponse(
                error_body("validation_error", f"body: {exc.detail}", "body"), status_code=422
            )
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        told(kinds.get(exc.status_code, "http_error"))
        return JSONResponse(
            error_body(kinds.get(exc.status_code, "http_error"), str(exc.detail)),
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        told("internal_error")
        _logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body("internal_error", "an unexpected failure (a bug in chatsession)"),
            status_code=500,
        )

    app.add_exception_handler(ChatSessionError, on_chatsession)
    app.add_exception_handler(APIError, on_api)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_bug)
