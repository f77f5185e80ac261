"""Who is calling: the API key of a request, as FastAPI dependencies.

A key is sent as ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from chatsession.server.context import ServerContext
from chatsession.server.errors import APIError
from chatsession.server.keys import APIKey

__all__ = ["Admin", "Caller", "Context", "User", "get_context"]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def get_context(request: Request) -> ServerContext:
    """The app's shared objects.

    Raises:
        APIError: 503 while the app is starting or stopping.
    """
    context = getattr(request.app.state, "chatsession", None)
    if not isinstance(context, ServerContext):
        raise APIError(
            503, "not_ready", "the server is starting or stopping; retry", {"Retry-After": "1"}
        )
    return context


Context = Annotated[ServerContext, Depends(get_context)]


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


async def get_caller(request: Request, context: Context) -> APIKey:
    """The key of the request, checked.

    Raises:
        APIError: 401 without a key or with an unknown or revoked one.
        StoreUnavailableError: The key table cannot be read (503).
    """
    key = _presented(request)
    if key is None:
        raise APIError(
            401,
            "unauthorized",
            "send an API key: 'Authorization: Bearer <key>' (create one with "
            "'chatsession keys create --user USER')",
            _CHALLENGE,
        )
    if context.is_admin_key(key):
        return APIKey(
            key_id="admin",
            user_id=None,
            name="the admin key of the settings",
            admin=True,
            created_at=0.0,
        )
    entry = await context.keys.authenticate(key)
    if entry is None:
        raise APIError(401, "unauthorized", "the API key is unknown or revoked", _CHALLENGE)
    return entry


Caller = Annotated[APIKey, Depends(get_caller)]


async def get_user(caller: Caller) -> str:
    """The user the key acts as.

    Raises:
        APIError: 403 for an admin key without a user.
    """
    if caller.user_id is None:
        raise APIError(
            403,
            "forbidden",
            "this admin key has no user: use it for /v1/admin, and a user's key for sessions",
        )
    return caller.user_id


User = Annotated[str, Depends(get_user)]


async def get_admin(caller: Caller) -> APIKey:
    """The key, if it is an admin key.

    Raises:
        APIError: 403 for a key without admin rights.
    """
    if not caller.admin:
        raise APIError(403, "forbidden", "this needs an admin key")
    return caller


Admin = Annotated[APIKey, Depends(get_admin)]
