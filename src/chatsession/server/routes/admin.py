"""``/v1/admin``: API keys, users and every user's sessions (admin keys only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from chatsession.manager import Session
from chatsession.server.auth import Admin, Context
from chatsession.server.errors import APIError
from chatsession.server.keys import APIKey, is_system_session
from chatsession.server.models import (
    ErrorOut,
    KeyCreatedOut,
    KeyCreateIn,
    KeyList,
    KeyOut,
    SessionList,
    UserList,
    UserOut,
)

__all__ = ["router"]

_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "no or bad API key"},
    403: {"model": ErrorOut, "description": "not an admin key"},
    404: {"model": ErrorOut, "description": "no such key or user"},
    503: {"model": ErrorOut, "description": "the store cannot be reached"},
}

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=_ERRORS)

UserId = Annotated[str, Path(min_length=1, max_length=1024)]


def _out(entry: APIKey) -> KeyOut:
    return KeyOut(
        key_id=entry.key_id,
        hint=entry.hint,
        user_id=entry.user_id,
        name=entry.name,
        admin=entry.admin,
        created_at=entry.created_at,
        revoked_at=entry.revoked_at,
    )


@router.get("/keys", response_model=KeyList)
async def list_keys(
    context: Context,
    admin: Admin,
    user_id: Annotated[str | None, Query(max_length=1024)] = None,
) -> KeyList:
    """Every API key (revoked ones too), oldest first; never the keys or their hashes."""
    return KeyList(keys=[_out(k) for k in await context.keys.list_keys(user_id=user_id)])


@router.post("/keys", status_code=201, response_model=KeyCreatedOut)
async def create_key(
    context: Context, admin: Admin, body: KeyCreateIn, response: Response
) -> KeyCreatedOut:
    """Make a key for a user (a user exists once they have a key); the key is shown once."""
    response.headers["Cache-Control"] = "no-store"  # the answer holds the secret
    entry, key = await context.keys.create_key(body.user_id, name=body.name, admin=body.admin)
    return KeyCreatedOut(**_out(entry).model_dump(), key=key)


@router.delete("/keys/{key_id}", response_model=KeyOut)
async def revoke_key(
    context: Context, admin: Admin, key_id: Annotated[str, Path(max_length=64)]
) -> KeyOut:
    """Revoke a key (other workers stop accepting it within the key cache time)."""
    entry = await context.keys.revoke_key(key_id)
    if entry is None:
        raise APIError(404, "not_found", f"no API key {key_id!r}")
    return _out(entry)


@router.get("/users", response_model=UserList)
async def list_users(context: Context, admin: Admin) -> UserList:
    """The users that have keys, with how many (and how many still valid)."""
    users: dict[str, list[APIKey]] = {}
    for entry in await context.keys.list_keys():
        if entry.user_id is not None:
            users.setdefault(entry.user_id, []).append(entry)
    return UserList(
        users=[
            UserOut(
                user_id=user,
                keys=len(keys),
                active_keys=sum(1 for k in keys if k.revoked_at is None),
            )
            for user, keys in sorted(users.items())
        ]
    )


@router.delete("/users/{user_id}", response_model=UserOut)
async def remove_user(
    context: Context,
    admin: Admin,
    user_id: UserId,
    delete_sessions: Annotated[bool, Query(description="also delete their sessions")] = False,
) -> UserOut:
    """Revoke every key of the user (and delete their sessions with ``delete_sessions``)."""
    keys = await context.keys.list_keys(user_id=user_id)
    if not keys:
        raise APIError(404, "not_found", f"no user {user_id!r} (no key was made for them)")
    for entry in keys:
        await context.keys.revoke_key(entry.key_id)
    if delete_sessions:
        await context.manager.delete_user_sessions(user_id)
    return UserOut(user_id=user_id, keys=len(keys), active_keys=0)


@router.get("/sessions", response_model=SessionList)
async def all_sessions(
    context: Context,
    admin: Admin,
    user_id: Annotated[str | None, Query(max_length=1024)] = None,
    cursor: Annotated[str | None, Query(max_length=4096)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> SessionList:
    """Everyone's sessions (or one user's), newest first; chatsession's own are left out."""
    page = await context.manager.get_sessions_by_user(user_id, cursor=cursor, limit=limit)
    sessions: list[Session] = [s for s in page.sessions if not is_system_session(s.session_id)]
    return SessionList(sessions=sessions, next_cursor=page.next_cursor)


@router.delete("/sessions/{session_id}", status_code=204)
async def delete_any_session(
    context: Context, admin: Admin, session_id: Annotated[str, Path(max_length=128)]
) -> Response:
    """Delete any user's session."""
    if is_system_session(session_id):
        raise APIError(403, "forbidden", "chatsession's own sessions cannot be deleted here")
    await context.manager.delete_session(session_id, None)
    return Response(status_code=204)
