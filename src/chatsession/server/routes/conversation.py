"""A session's conversation: messages (JSON or server-sent events), history,
fork, rewind, checkpoints, clear, usage and context."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response

from chatsession.errors import ModelError, SessionNotFoundError
from chatsession.log import decode, to_builtins
from chatsession.manager import CheckpointInfo, Session
from chatsession.server.auth import Context, User
from chatsession.server.context import ServerContext
from chatsession.server.live import parse_event_id
from chatsession.server.models import (
    CheckpointIn,
    CheckpointList,
    ClearIn,
    ContextOut,
    ErrorOut,
    EventOut,
    ForkIn,
    HistoryOut,
    MessageIn,
    ReplyOut,
    RewindIn,
    RewindOut,
    UsageOut,
)
from chatsession.server.routes.sessions import SessionId
from chatsession.server.streaming import live_response, sse_response
from chatsession.server.turns import RunningTurn
from chatsession.session import ChatSession

__all__ = ["open_chat", "reply_or_stream", "router"]

_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "no or bad API key"},
    404: {"model": ErrorOut, "description": "no such session (or another user's)"},
    409: {"model": ErrorOut, "description": "busy (see Retry-After) or archived"},
    422: {"model": ErrorOut, "description": "a bad argument; `field` names it"},
    503: {"model": ErrorOut, "description": "the store cannot be reached"},
}

router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["conversation"], responses=_ERRORS)

CheckpointId = Annotated[str, Path(min_length=1, max_length=1024)]

_EVENT_ID = r"^[0-9]{1,18}(-[0-9]{1,18})?$"


@contextlib.asynccontextmanager
async def open_chat(
    context: ServerContext, user: str, session_id: str
) -> AsyncIterator[ChatSession]:
    """The caller's session, opened for reading or a write outside a turn."""
    chat = await context.manager.chat(
        session_id,
        user,
        context.agent,
        **context.chat_options(),
    )
    try:
        yield chat
    finally:
        await chat.close()


async def reply_or_stream(
    context: ServerContext, user: str, session_id: str, message: str, stream: bool
) -> Response | ReplyOut:
    """Run a turn: server-sent events when ``stream``, else the JSON reply.

    Raises:
        ModelError: The model call failed (502), for a JSON reply.
    """
    turn = RunningTurn(context, session_id, user, message)
    await turn.start()
    if stream:
        return sse_response(turn, context)
    outcome = await turn.result()
    if outcome.failure is not None:
        failure = outcome.failure
        if isinstance(failure, Exception) and not isinstance(failure, ModelError):
            raise failure
        raise ModelError(str(failure))
    return ReplyOut(
        session_id=session_id,
        text=outcome.text,
        stop_reason=outcome.stop_reason,
        usage=outcome.usage,
        tool_calls=outcome.tool_calls,
        seq=outcome.seq,
    )


@router.post(
    "/messages",
    response_model=ReplyOut,
    responses={
        200: {
            "description": "the reply; with `stream: true`, `text/event-stream` events "
            "`text`, `tool_call`, `tool_result`, `usage`, `error`, `stop`",
            "content": {"text/event-stream": {}},
        },
        502: {"model": ErrorOut, "description": "the model failed"},
        504: {"model": ErrorOut, "description": "the turn ran past its timeout"},
    },
)
async def post_message(
    context: Context, user: User, session_id: SessionId, body: MessageIn
) -> Response | ReplyOut:
    """Send a message; the answer comes as JSON, or streamed with ``stream: true``."""
    return await reply_or_stream(context, user, session_id, body.message, body.stream)


@router.get(
    "/events",
    response_class=Response,
    responses={
        200: {
            "description": "`text/event-stream`: the session's events after `Last-Event-ID` "
            "(replayed from the log), then live: `message`, `text`, `tool_call`, "
            "`tool_result`, `usage`, `error`, `stop`, and `reconnect` when the client "
            "fell behind",
            "content": {"text/event-stream": {}},
        },
    },
)
async def events(
    context: Context,
    user: User,
    session_id: SessionId,
    after: Annotated[
        str | None,
        Query(pattern=_EVENT_ID, description="an event id, for clients that cannot set headers"),
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", pattern=_EVENT_ID)] = None,
) -> Response:
    """Watch the session: its events after ``Last-Event-ID`` (or ``?after=``), then live.

    Any window or device of the session's owner may watch, on any worker:
    a reload or a second tab gets the answer in progress.
    """
    await context.manager.get_session(session_id, user)
    seq, n = parse_event_id(last_event_id if last_event_id is not None else after)
    try:
        head = (await context.manager.store.get(session_id)).head
    except SessionNotFoundError:
        raise SessionNotFoundError(session_id) from None
    if seq > head:  # an id from the future: from the head
        seq, n = head, None
    return live_response(context, session_id, seq, n)


@router.get("/history", response_model=HistoryOut)
async def history(
    context: Context,
    user: User,
    session_id: SessionId,
    after_seq: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> HistoryOut:
    """The session's log (every event, cleared and rewound ones too), oldest first."""
    await context.manager.get_session(session_id, user)
    store = context.manager.store
    try:
        head = (await store.get(session_id)).head
    except SessionNotFoundError:
        raise SessionNotFoundError(session_id) from None
    events: list[EventOut] = []
    upto = min(after_seq + limit, head)
    if after_seq < upto:
        async for batch in store.read(session_id, after_seq=after_seq, upto_seq=upto):
            for event in decode(batch, session_id):
                value: dict[str, Any] = to_builtins(event)
                events.append(
                    EventOut(
                        seq=event.seq,
                        type=event.type,
                        ts=event.ts,
                        turn_id=event.turn_id,
                        data=value.get("data"),
                    )
                )
    return HistoryOut(
        session_id=session_id,
        events=events,
        head=head,
        next_after_seq=upto if upto < head else None,
    )


@router.post("/fork", status_code=201, response_model=Session)
async def fork(context: Context, user: User, session_id: SessionId, body: ForkIn) -> Session:
    """A new session sharing this one's history up to ``at`` (a seq, checkpoint or turn)."""
    async with open_chat(context, user, session_id) as chat:
        forked = await chat.fork_session(body.at, session_id=body.session_id)
        await forked.close()
    return await context.manager.get_session(forked.session_id, user)


@router.post("/rewind", response_model=RewindOut)
async def rewind(context: Context, user: User, session_id: SessionId, body: RewindIn) -> RewindOut:
    """Return the model's context to a seq, checkpoint or turn (the record keeps all)."""
    async with open_chat(context, user, session_id) as chat:
        seq = await chat.rewind(body.to)
    return RewindOut(session_id=session_id, seq=seq)


@router.post("/checkpoints", status_code=201, response_model=CheckpointInfo)
async def create_checkpoint(
    context: Context, user: User, session_id: SessionId, body: CheckpointIn
) -> CheckpointInfo:
    """Save a checkpoint of the session's current point (a name saved again moves)."""
    manager = context.manager
    checkpoint_id = await manager.save_checkpoint(session_id, user, body.data, name=body.name)
    info = await manager.get_checkpoint(session_id, user, checkpoint_id)
    if info is None:  # deleted in between
        raise SessionNotFoundError(session_id, f"checkpoint {checkpoint_id!r} is gone")
    return info


@router.get("/checkpoints", response_model=CheckpointList)
async def list_checkpoints(context: Context, user: User, session_id: SessionId) -> CheckpointList:
    """The session's checkpoints, in save order."""
    return CheckpointList(checkpoints=await context.manager.list_checkpoints(session_id, user))


@router.get("/checkpoints/{checkpoint_id}", response_model=CheckpointInfo)
async def get_checkpoint(
    context: Context, user: User, session_id: SessionId, checkpoint_id: CheckpointId
) -> CheckpointInfo:
    """One checkpoint."""
    info = await context.manager.get_checkpoint(session_id, user, checkpoint_id)
    if info is None:
        raise SessionNotFoundError(session_id, f"no checkpoint {checkpoint_id!r}")
    return info


@router.delete("/checkpoints/{checkpoint_id}", status_code=204)
async def delete_checkpoint(
    context: Context, user: User, session_id: SessionId, checkpoint_id: CheckpointId
) -> Response:
    """Remove a checkpoint (the log keeps that it existed)."""
    if not await context.manager.delete_checkpoint(session_id, user, checkpoint_id):
        raise SessionNotFoundError(session_id, f"no checkpoint {checkpoint_id!r}")
    return Response(status_code=204)


@router.post("/clear", response_model=Session)
async def clear(
    context: Context, user: User, session_id: SessionId, body: ClearIn | None = None
) -> Session:
    """Empty the model's context (a ``reset`` event: the record keeps everything)."""
    async with open_chat(context, user, session_id) as chat:
        await chat.clear_history(clear_state=body.clear_state if body else False)
    return await context.manager.get_session(session_id, user)


def _totals(value: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": value.prompt_tokens,
        "completion_tokens": value.completion_tokens,
        "total_tokens": value.total_tokens,
        "cost": value.cost,
        "calls": value.calls,
        "estimated": value.estimated,
    }


@router.get("/usage", response_model=UsageOut)
async def usage(context: Context, user: User, session_id: SessionId) -> UsageOut:
    """Tokens and cost of the session's model calls (a fork's inherited part apart)."""
    async with open_chat(context, user, session_id) as chat:
        summary = await chat.get_usage()
    return UsageOut.model_validate(
        {
            "total_prompt_tokens": summary.total_prompt_tokens,
            "total_completion_tokens": summary.total_completion_tokens,
            "total_tokens": summary.total_tokens,
            "total_cost": summary.total_cost,
            "calls": summary.calls,
            "estimated": summary.estimated,
            "by_model": {k: _totals(v) for k, v in summary.by_model.items()},
            "by_level": {k: _totals(v) for k, v in summary.by_level.items()},
            "inherited": _totals(summary.inherited),
            "including_inherited": _totals(summary.including_inherited),
        }
    )


@router.get("/context", response_model=ContextOut)
async def context_info(context: Context, user: User, session_id: SessionId) -> ContextOut:
    """How many tokens the model's context holds, against its budget."""
    async with open_chat(context, user, session_id) as chat:
        info = await chat.get_context_info()
    return ContextOut(
        current_tokens=info.current_tokens,
        budget_tokens=info.budget_tokens,
        messages=len(info.conversation_items),
        utilisation=info.utilisation,
        method=info.method,
        estimated=info.estimated,
    )
