"""Server-sent events responses (sse-starlette): a running turn, and a live watch."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent

from chatsession.server.context import ServerContext
from chatsession.server.live import watch
from chatsession.server.turns import RunningTurn

__all__ = ["live_response", "sse_response"]

#: Seconds between keep-alive comments (``: ping``) on a quiet stream (read per response).
PING_SECONDS: float = 15


def sse_response(turn: RunningTurn, context: ServerContext) -> EventSourceResponse:
    """Stream ``turn`` (already started) as ``text``, ``tool_call``, ``tool_result``,
    ``usage``, ``error`` and ``stop`` events.

    When the client goes away (or the server stops the stream), the turn is
    cancelled and recorded ``cancelled`` before the response ends.
    """
    metrics = context.metrics

    async def stream() -> AsyncIterator[ServerSentEvent]:
        metrics.active_streams.inc()
        first = True
        try:
            async for event in turn.events():
                if first:
                    metrics.first_event_seconds.observe(time.monotonic() - turn.started_at)
                    first = False
                yield ServerSentEvent(
                    data=json.dumps(event.data, ensure_ascii=False),
                    event=event.event,
                    id=event.id,
                )
        finally:
            metrics.active_streams.dec()
            turn.cancel()  # a no-op when it ended
            with anyio.CancelScope(shield=True):
                await turn.wait()

    return EventSourceResponse(
        stream(),
        ping=PING_SECONDS,
        headers={"X-Session-Id": turn.session_id, "Cache-Control": "no-store"},
    )


def live_response(
    context: ServerContext, session_id: str, after: int, n: int | None
) -> EventSourceResponse:
    """Stream the session's events after ``after`` (delta ``n`` of it), then live.

    The events of :func:`chatsession.server.live.watch`; the watch ends when
    the client goes away, at shutdown, or with a ``reconnect`` event when the
    client fell more than ``live_queue_size`` events behind.
    """
    metrics = context.metrics
    hub = context.live
    assert hub is not None

    async def stream() -> AsyncIterator[ServerSentEvent]:
        metrics.active_streams.inc()
        try:
            async for event in watch(hub, session_id, after, n):
                yield ServerSentEvent(
                    data=json.dumps(event.data, ensure_ascii=False),
                    event=event.event,
                    id=event.id,
                )
        finally:
            metrics.active_streams.dec()

    return EventSourceResponse(
        stream(),
        ping=PING_SECONDS,
        headers={"X-Session-Id": session_id, "Cache-Control": "no-store"},
    )
