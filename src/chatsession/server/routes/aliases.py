"""Seed 003's routes, kept working as aliases of ``/v1``.

They take the user in the body or the path, as seed 003's clients send it;
it must be the key's own user (an admin key may name any user), else 403
(the same 403 whether or not that user exists).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from chatsession.manager import Session
from chatsession.server.auth import Caller, Context
from chatsession.server.errors import APIError
from chatsession.server.keys import APIKey
from chatsession.server.models import (
    AliasChatIn,
    AliasChatOut,
    AliasSessionIn,
    AliasSessionOut,
    ErrorOut,
    ReplyOut,
)
from chatsession.server.routes.conversation import reply_or_stream

__all__ = ["router"]

_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "no or bad API key"},
    403: {"model": ErrorOut, "description": "user_id is not the key's user"},
    404: {"model": ErrorOut, "description": "no such session (or another user's)"},
    409: {"model": ErrorOut, "description": "busy (see Retry-After) or archived"},
    422: {"model": ErrorOut, "description": "a bad argument; `field` names it"},
    503: {"model": ErrorOut, "description": "the store cannot be reached"},
}

router = APIRouter(tags=["seed 003 aliases"], responses=_ERRORS)

#: The most sessions ``GET /users/{user_id}/sessions`` returns.
MAX_LISTED = 1000


def _acting_as(caller: APIKey, user_id: str) -> str:
    if caller.user_id == user_id or caller.admin:
        return user_id
    raise APIError(403, "forbidden", "user_id must be the API key's own user")


@router.post("/sessions", response_model=AliasSessionOut)
async def create_session(context: Context, caller: Caller, body: AliasSessionIn) -> AliasSessionOut:
    """Create a session (alias of ``POST /v1/sessions``)."""
    user = _acting_as(caller, body.user_id)
    session = await context.manager.create_session(
        user,
        body.agent_id or context.settings.agent_id,
        window_id=body.window_id,
        metadata=body.metadata,
    )
    return AliasSessionOut(
        session_id=session.session_id,
        user_id=user,
        window_id=session.window_id,
        created_at=session.created_at,
    )


@router.post(
    "/chat",
    response_model=AliasChatOut,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat(context: Context, caller: Caller, body: AliasChatIn) -> Response | AliasChatOut:
    """Send a message (alias of ``POST /v1/sessions/{id}/messages``).

    The session is ``session_id``; without it, the window's session
    (created when missing); without either, a new session.
    """
    user = _acting_as(caller, body.user_id)
    manager = context.manager
    agent_id = context.settings.agent_id
    if body.session_id is not None:
        session_id = body.session_id
    elif body.window_id is not None:
        session_id = (await manager.open_window(user, body.window_id, agent_id)).session_id
    else:
        session_id = (await manager.create_session(user, agent_id)).session_id
    answer = await reply_or_stream(context, user, session_id, body.message, body.stream)
    if not isinstance(answer, ReplyOut):
        return answer
    return AliasChatOut(
        session_id=session_id,
        response=answer.text,
        stop_reason=answer.stop_reason,
        usage=answer.usage,
    )


@router.get("/users/{user_id}/sessions", response_model=list[Session])
async def user_sessions(
    context: Context,
    caller: Caller,
    user_id: Annotated[str, Path(min_length=1, max_length=1024)],
) -> list[Session]:
    """The user's sessions, newest first (at most 1000; ``/v1/sessions`` pages)."""
    user = _acting_as(caller, user_id)
    found: list[Session] = []
    cursor: str | None = None
    while len(found) < MAX_LISTED:
        page = await context.manager.get_sessions_by_user(user, cursor=cursor, limit=200)
        found.extend(page.sessions)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return found[:MAX_LISTED]
