"""One turn behind HTTP: run in its own task, streamed as server-sent events.

The turn runs in a task of its own, not in the request's, so that whatever
ends the request (the client went away, the server is shutting down) ends
the turn by one plain ``task.cancel()``: the session then records the turn
as ``cancelled``, with what it had produced, before the task ends.

Event ids: each event carries as ``id`` the seq of the last event stored in
the session's log when it was sent (``usage``, ``tool_call``,
``tool_result``, ``stop`` and ``error`` are stored at or before that seq).
Text deltas are not stored one by one (the whole answer is, at the end):
they carry ``<seq>-<n>``, the seq of the last stored event and their
number since it (1, 2, ...). A client that reconnects with a
``Last-Event-ID`` of either form has seen the log up to that seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from chatsession.agent.events import (
    AgentEvent,
    ErrorEvent,
    StopEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
    UsageEvent,
)
from chatsession.errors import ChatSessionError, ModelError, SessionTimeoutError
from chatsession.log import to_builtins
from chatsession.server.context import ServerContext
from chatsession.server.errors import status_of
from chatsession.server.live import TurnFeed
from chatsession.session import ChatSession

__all__ = ["RunningTurn", "TurnEvent"]

_END = object()


@dataclass(frozen=True)
class TurnEvent:
    """One server-sent event of a turn.

    Attributes:
        event: ``text``, ``tool_call``, ``tool_result``, ``usage``, ``stop`` or ``error``.
        data: Its JSON payload.
        id: Its id (see the module docstring).
    """

    event: str
    data: dict[str, Any]
    id: str


@dataclass
class _Outcome:
    text: str = ""
    stop_reason: str | None = None
    usage: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    failure: BaseException | None = None
    seq: int = 0


class RunningTurn:
    """A turn of ``session_id`` for ``user_id``, run in its own task.

    Args:
        context: The app's shared objects.
        session_id: The session.
        user_id: The caller (another user's session is not found).
        message: The user's message.
    """

    def __init__(self, context: ServerContext, session_id: str, user_id: str, message: str) -> None:
        self.context = context
        self.session_id = session_id
        self.user_id = user_id
        self.message = message
        self.task: asyncio.Task[None] | None = None
        self.outcome = _Outcome()
        self.started_at = time.monotonic()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._entered: asyncio.Future[None] | None = None
        self._counted = False

    async def start(self) -> None:
        """Open the session, take its lease and store the user's message.

        Raises:
            SessionNotFoundError: No such session (or another user's).
            SessionBusyError: Another turn held it past the busy timeout.
            SessionArchivedError: The session is read-only.
            StoreUnavailableError: The store cannot be reached.
        """
        loop = asyncio.get_running_loop()
        self._entered = loop.create_future()
        self.task = loop.create_task(self._run(), name=f"chatsession-http-turn-{self.session_id}")
        self.context.turns.add(self)
        self.task.add_done_callback(lambda _: self.context.turns.discard(self))
        try:
            await asyncio.shield(self._entered)
        except asyncio.CancelledError:
            self.cancel()
            raise
        except ChatSessionError as exc:
            self._count("busy" if status_of(exc)[1] == "session_busy" else "refused")
            raise

    async def _run(self) -> None:
        entered = self._entered
        assert entered is not None
        manager = self.context.manager
        chat: ChatSession | None = None
        feed: TurnFeed | None = None
        try:
            chat = await manager.chat(
                self.session_id,
                self.user_id,
                self.context.agent,
                **self.context.chat_options(),
            )
            async with chat.stream(self.message) as turn:
                entered.set_result(None)
                live = self.context.live
                feed = live.feed(self.session_id) if live is not None else None
                if feed is not None:
                    feed.stored(chat.conversation.head)  # the turn's start and the message
                counter = [0, -1]  # deltas since the last stored seq, that seq
                async for event in turn:
                    head = chat.conversation.head
                    for item in self._convert(event, head, counter):
                        self._queue.put_nowait(item)
                        if feed is not None:
                            if item.event == "text":
                                feed.delta(head, counter[0], item.data["text"])
                            else:
                                feed.stored(head)
        except asyncio.CancelledError:
            if not entered.done():
                entered.cancel()
            self._count("cancelled")
            raise
        except BaseException as exc:
            if not entered.done():
                entered.set_exception(exc)
            else:
                self.outcome.failure = exc
                head = chat.conversation.head if chat is not None else 0
                _status, kind, _ = (
                    status_of(exc)
                    if isinstance(exc, ChatSessionError)
                    else (500, "internal_error", {})
                )
                reason = "timeout" if isinstance(exc, SessionTimeoutError) else "error"
                self._queue.put_nowait(
                    TurnEvent("error", {"type": kind, "message": str(exc)}, str(head))
                )
                self._queue.put_nowait(
                    TurnEvent(
                        "stop",
                        {"reason": reason, "text": "", "session_id": self.session_id, "seq": head},
                        str(head),
                    )
                )
                self._count(reason)
            if not isinstance(exc, Exception):
                raise
        finally:
            if feed is not None:
                feed.end(chat.conversation.head if chat is not None else None)
            if chat is not None:
                await chat.close()
            self._queue.put_nowait(_END)

    def _count(self, outcome: str) -> None:
        if self._counted:
            return
        self._counted = True
        metrics = self.context.metrics
        metrics.turns.labels(outcome=outcome).inc()
        if outcome not in ("busy", "refused"):
            metrics.turn_seconds.observe(time.monotonic() - self.started_at)

    def _convert(self, event: AgentEvent, head: int, counter: list[int]) -> list[TurnEvent]:
        outcome = self.outcome
        outcome.seq = head
        if isinstance(event, TextEvent):
            if counter[1] != head:
                counter[0], counter[1] = 0, head
            counter[0] += 1
            return [TurnEvent("text", {"text": event.content}, f"{head}-{counter[0]}")]
        if isinstance(event, ToolCallEvent):
            call = {
                "id": event.call.id,
                "name": event.call.name,
                "arguments": event.call.arguments,
            }
            outcome.tool_calls.append(call)
            return [TurnEvent("tool_call", call, str(head))]
        if isinstance(event, ToolResultEvent):
            data = {
                "call_id": event.call_id,
                "name": event.name,
                "content": event.content,
                "is_error": event.is_error,
            }
            return [TurnEvent("tool_result", data, str(head))]
        if isinstance(event, UsageEvent):
            usage = to_builtins(event.usage)
            outcome.usage.append(usage)
            return [TurnEvent("usage", usage, str(head))]
        if isinstance(event, ErrorEvent):
            outcome.failure = event.exception or ModelError(event.error)
            return [TurnEvent("error", {"type": "model_error", "message": event.error}, str(head))]
        if isinstance(event, StopEvent):
            outcome.text = event.text
            outcome.stop_reason = event.reason
            self._count("error" if event.reason == "error" else "completed")
            data = {
                "reason": event.reason,
                "text": event.text,
                "session_id": self.session_id,
                "seq": head,
            }
            return [TurnEvent("stop", data, str(head))]
        return []  # AssistantMessageEvent: its text came as deltas, its calls as tool_call

    async def events(self) -> AsyncIterator[TurnEvent]:
        """The turn's events until it ends (call after :meth:`start`)."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            yield item

    def cancel(self) -> None:
        """Stop the turn (the model call too); it is recorded ``cancelled``."""
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def wait(self, timeout: float = 30.0) -> None:
        """Wait until the turn has ended and been recorded (at most ``timeout`` seconds)."""
        if self.task is None:
            return
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def result(self) -> _Outcome:
        """Run the turn to its end and return what it produced (non-streamed replies)."""
        async for _ in self.events():
            pass
        await self.wait()
        return self.outcome
