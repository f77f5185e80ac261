"""``/v1/sessions`` (create, list mine, get, update metadata, delete, archive,
restore) and ``/v1/windows/{window_id}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Response

from chatsession.errors import InvalidArgumentError
from chatsession.manager import Session
from chatsession.server.auth import Context, User
from chatsession.server.errors import APIError
from chatsession.server.models import (
    ID_PATTERN,
    CreateSessionIn,
    ErrorOut,
    MetadataPatch,
    SessionList,
    WindowIn,
)
from chatsession.store import SessionState

__all__ = ["SessionId", "router"]

_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "no or bad API key"},
    404: {"model": ErrorOut, "description": "no such session (or another user's)"},
    422: {"model": ErrorOut, "description": "a bad argument; `field` names it"},
    503: {"model": ErrorOut, "description": "the store cannot be reached"},
}

router = APIRouter(prefix="/v1", tags=["sessions"], responses=_ERRORS)

SessionId = Annotated[str, Path(pattern=ID_PATTERN, description="the session id")]
WindowId = Annotated[str, Path(min_length=1, max_length=1024, description="the window id")]


@router.post("/sessions", status_code=201, response_model=Session)
async def create_session(context: Context, user: User, body: CreateSessionIn) -> Session:
    """Create a session owned by the caller."""
    return await context.manager.create_session(
        user,
        body.agent_id or context.settings.agent_id,
        window_id=body.window_id,
        metadata=body.metadata,
        ttl=body.ttl,
        title=body.title,
    )


@router.get("/sessions", response_model=SessionList)
async def list_sessions(
    context: Context,
    user: User,
    agent_id: Annotated[str | None, Query(max_length=1024)] = None,
    window_id: Annotated[str | None, Query(max_length=1024)] = None,
    state: Annotated[SessionState | None, Query(description="active, idle or archived")] = None,
    cursor: Annotated[str | None, Query(max_length=4096)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> SessionList:
    """The caller's sessions, newest first; pass ``next_cursor`` as ``cursor`` for more."""
    try:
        page = await context.manager.get_sessions_by_user(
            user, agent_id=agent_id, window_id=window_id, state=state, cursor=cursor, limit=limit
        )
    except InvalidArgumentError as exc:
        field = next(
            (name for name in ("cursor", "agent_id", "window_id", "state") if name in str(exc)),
            None,
        )
        raise APIError(422, "validation_error", str(exc), field=field) from exc
    return SessionList(sessions=page.sessions, next_cursor=page.next_cursor)


@router.get("/sessions/{session_id}", response_model=Session)
async def get_session(context: Context, user: User, session_id: SessionId) -> Session:
    """One of the caller's sessions."""
    return await context.manager.get_session(session_id, user)


@router.patch("/sessions/{session_id}", response_model=Session)
async def update_metadata(
    context: Context, user: User, session_id: SessionId, body: MetadataPatch
) -> Session:
    """Merge metadata into the session's (a null value deletes the key)."""
    return await context.manager.update_session_metadata(session_id, user, body.metadata)


@router.delete("/sessions/{session_id}", status_code=204)
async def delete_session(context: Context, user: User, session_id: SessionId) -> Response:
    """Delete the session (its forks keep working)."""
    await context.manager.delete_session(session_id, user)
    return Response(status_code=204)


@router.post("/sessions/{session_id}/archive", response_model=Session)
async def archive_session(context: Context, user: User, session_id: SessionId) -> Session:
    """Make the session read-only (turns answer 409 until it is restored)."""
    return await context.manager.archive_session(session_id, user, reason="archived over HTTP")


@router.post("/sessions/{session_id}/restore", response_model=Session)
async def restore_session(context: Context, user: User, session_id: SessionId) -> Session:
    """Make an archived session writable again."""
    return await context.manager.restore_session(session_id, user, reason="restored over HTTP")


@router.get("/windows/{window_id}", response_model=Session, tags=["windows"])
async def get_window(
    context: Context,
    user: User,
    window_id: WindowId,
    agent_id: Annotated[str | None, Query(max_length=1024)] = None,
) -> Session:
    """The window's current session, created when missing (windows are per user)."""
    return await context.manager.open_window(user, window_id, agent_id or context.settings.agent_id)


@router.put("/windows/{window_id}", response_model=Session, tags=["windows"])
async def put_window(
    context: Context,
    user: User,
    window_id: WindowId,
    body: Annotated[WindowIn | None, Body()] = None,
) -> Session:
    """The window's current session, created with these options when missing."""
    options = body or WindowIn()
    return await context.manager.open_window(
        user,
        window_id,
        options.agent_id or context.settings.agent_id,
        metadata=options.metadata,
    )
