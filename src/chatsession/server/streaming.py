"""A running turn as a server-sent events response (sse-starlette)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent

from chatsession.server.context import ServerContext
from chatsession.server.turns import RunningTurn

__all__ = ["sse_response"]

#: Seconds between keep-alive comments on a quiet stream.
PING_SECONDS = 15


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
