"""One turn: run the agent, store each step before it is yielded, end the turn once.

:class:`TurnStream` is what ``async with session.stream(message) as events``
gives: entering it takes the session (its in-process lock and its store
lease), repairs what a dead writer left open, and stores the user's message;
iterating it yields the agent's events, each step stored first; leaving it
ends the turn on one path whatever happened: completed, cancelled,
interrupted (Ctrl+C, or the caller stopped reading), timeout or error. What
the turn produced is kept, and every tool call left without a result is
answered, so the next model call is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from chatsession.agent import ToolContext
from chatsession.agent.events import (
    AgentEvent,
    AssistantMessageEvent,
    ErrorEvent,
    StopEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
    UsageEvent,
)
from chatsession.errors import (
    ChatSessionClosedError,
    ConflictError,
    SessionBusyError,
    SessionTimeoutError,
    UnsupportedValueError,
)
from chatsession.log import (
    LogEvent,
    Message,
    MessageEntry,
    Offload,
    OffloadEntry,
    ToolCall,
    TurnEnd,
    TurnEndEntry,
    TurnStartEntry,
    TurnStatus,
    UsageEntry,
    replace,
)
from chatsession.store.base import redact_text
from chatsession.values import check_state

if TYPE_CHECKING:
    from chatsession.session.chat import ChatSession

__all__ = ["INTERRUPTED", "TurnStream", "storable", "unfinished_call", "user_message"]

#: Cancel a turn's task with this message (``task.cancel(INTERRUPTED)``) to have
#: the turn recorded as ``interrupted`` rather than ``cancelled``: what Ctrl+C does.
INTERRUPTED = "interrupted"

_logger = logging.getLogger("chatsession.session")

_END = object()  # the agent ended
_CLOSING = object()  # the session is being closed
_SURROGATES = re.compile("[\ud800-\udfff]")


class _SessionClosing(Exception):
    """Raised inside a running turn when the session is closed."""


def _strings(message: Message) -> Iterator[str]:
    """Every text field of a message (content, parts, tool calls, ids, names)."""
    if isinstance(message.content, str):
        yield message.content
    else:
        for part in message.content:
            yield from (getattr(part, name) or "" for name in part.__struct_fields__)
    for call in message.tool_calls:
        yield from (call.id, call.name, call.arguments)
    yield from (v for v in (message.tool_call_id, message.name) if v is not None)


def storable(message: Message) -> Message:
    """``message`` with lone surrogates replaced by U+FFFD.

    Models and tools can produce them (a JSON ``\\ud800`` escape, a file name
    decoded with ``surrogateescape``); they are not valid unicode, so no store
    keeps them.
    """
    if not any(_SURROGATES.search(text) for text in _strings(message)):
        return message

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return _SURROGATES.sub("\ufffd", value)
        if isinstance(value, tuple | list):
            return type(value)(clean(v) for v in value)
        if hasattr(value, "__struct_fields__"):
            return replace(value, **{f: clean(getattr(value, f)) for f in value.__struct_fields__})
        return value

    cleaned: Message = clean(message)
    return cleaned


def user_message(message: Any) -> Message:
    """A user's message from what they sent: text, parts, or a ``Message``.

    Raises:
        UsageError: Not a user message.
        UnsupportedValueError: It holds a lone surrogate.
    """
    from chatsession.errors import UsageError
    from chatsession.log import ImagePart, TextPart

    if isinstance(message, Message):
        if message.role != "user":
            raise UsageError(f"send user messages, not {message.role!r} messages")
        user = message
    elif isinstance(message, str):
        user = Message(role="user", content=message)
    else:
        parts = list(message)
        if not parts or not all(isinstance(p, TextPart | ImagePart) for p in parts):
            raise UsageError(
                "a message is a str, a Message, or a non-empty list of TextPart/ImagePart"
            )
        user = Message(role="user", content=parts)
    if any(_SURROGATES.search(text) for text in _strings(user)):
        raise UnsupportedValueError(
            "the message cannot be stored exactly: it holds a lone UTF-16 surrogate "
            "(not valid unicode); decode the text properly before sending it"
        )
    return user


def unfinished_call(call: ToolCall, turn_id: str | None, status: str) -> MessageEntry:
    """The error result that answers a tool call whose turn ended before it returned."""
    return MessageEntry(
        turn_id=turn_id,
        data=Message(
            role="tool",
            tool_call_id=call.id,
            name=call.name,
            is_error=True,
            content=f"tool call not completed: the turn ended ({status}) before it returned",
        ),
    )


@dataclass
class _Progress:
    """What the turn has produced so far (for recording how it ended).

    ``pending`` holds log events not yet stored; ``held`` the agent events
    that describe them, yielded only once they are stored. ``call_open`` is
    True while a model call is running (its usage is not known yet).
    """

    turn_id: str
    started: float
    start_seq: int = 0
    pending: list[LogEvent] = field(default_factory=list)
    held: list[AgentEvent] = field(default_factory=list)
    partial_text: list[str] = field(default_factory=list)
    steps: int = 0
    call_open: bool = False

    def release(self, *more: AgentEvent) -> list[AgentEvent]:
        """The held events (now stored) followed by ``more``."""
        out, self.held = self.held, []
        out.extend(more)
        return out


class TurnStream:
    """One turn, as an async context manager that iterates its events.

    Made by :meth:`ChatSession.stream`; see the module docstring.
    """

    def __init__(self, session: ChatSession, message: Any, timeout: float | None) -> None:
        self._session = session
        self._user = user_message(message)
        self._timeout = timeout
        self._progress = _Progress(turn_id=uuid.uuid4().hex, started=time.monotonic())
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._producer: asyncio.Task[None] | None = None
        self._ready: list[AgentEvent] = []
        self._deadline: float | None = None
        self._status: TurnStatus = "completed"
        self._error: str | None = None
        self._entered = False
        self._finished = False
        self._stopped = False  # the StopEvent (or the end) was reached

    # -- entering --------------------------------------------------------------------

    async def __aenter__(self) -> TurnStream:
        session = self._session
        await session.open()
        await session._take_turn(self)
        self._task = asyncio.current_task()
        try:
            self._lease = await session._lease.acquire()
        except BaseException:
            session._give_turn(self)
            raise
        self._entered = True
        try:
            await self._begin()
        except BaseException:
            await self._leave()
            raise
        return self

    async def _begin(self) -> None:
        session = self._session
        progress = self._progress
        start: list[LogEvent] = [
            TurnStartEntry(turn_id=progress.turn_id),
            MessageEntry(turn_id=progress.turn_id, data=self._user),
        ]
        for _ in range(20):
            # the repairs are computed from the state: when another writer got there
            # first, they are computed again from what it wrote
            try:
                await session._keeper.append(self._repairs() + start, self._lease, catch_up=False)
                break
            except ConflictError as exc:
                if type(exc) is not ConflictError:
                    raise
        else:
            raise SessionBusyError(session.session_id, "other writers (20 conflicts in a row)")
        progress.start_seq = session.conversation.head - len(start)
        if session._on_turn is not None:
            try:
                await session._on_turn(session)
            except Exception as exc:  # a hook's failure does not cost the turn
                _logger.warning("session %r: the on_turn hook failed: %r", session.session_id, exc)
        if self._timeout is not None:
            self._deadline = time.monotonic() + self._timeout
        try:
            if session.compaction_threshold:
                async with asyncio.timeout_at(self._loop_deadline()):
                    await session._maybe_compact(progress.turn_id, self._lease)
        except TimeoutError:
            await self._end("timeout", self._timeout_text())
            raise self._timed_out() from None
        except BaseException as exc:
            await self._end_for(exc)
            raise
        progress.call_open = True
        self._producer = asyncio.get_running_loop().create_task(
            self._produce(), name=f"chatsession-turn-{progress.turn_id}"
        )

    def _repairs(self) -> list[LogEvent]:
        """What makes the context valid for the model before the turn starts.

        Closes a turn left open by a writer whose lease ran out (we hold the
        lease now, so that writer is gone), recorded as interrupted, and answers
        every tool call in the context that has no result (a crash, a rewind
        into the middle of a turn, an imported log) with an error result.
        """
        conversation = self._session.conversation
        open_turn = conversation.open_turn
        dangling = conversation.dangling_tool_calls()
        if open_turn is None and not dangling:
            return []
        status = "interrupted" if open_turn is not None else "not answered"
        events: list[LogEvent] = [unfinished_call(c, open_turn, status) for c in dangling]
        if open_turn is not None:
            events.append(
                TurnEndEntry(
                    turn_id=open_turn,
                    data=TurnEnd(status="interrupted", error="the process stopped during the turn"),
                )
            )
        return events

    # -- producing -------------------------------------------------------------------

    async def _produce(self) -> None:
        session = self._session
        queue = self._queue
        state = session.state
        last_good = state.snapshot()

        async def on_tool_result(message: Message) -> Message:
            # a value changed in place by the tool is checked as the tool returns:
            # refused, the tool's state changes are undone and the model is told
            nonlocal last_good
            try:
                check_state(state)
            except UnsupportedValueError as exc:
                state.restore(last_good)
                message = replace(
                    message,
                    content=f"Error: UnsupportedValueError: {exc} (the tool's changes "
                    "to the session state were undone)",
                    is_error=True,
                )
            else:
                last_good = state.snapshot()
            return await self._maybe_offload(storable(message))

        try:
            tool_context = ToolContext(
                state=state, session_id=session.session_id, turn_id=self._progress.turn_id
            )
            async for event in session.agent.run(
                session.conversation.messages,
                on_tool_result=on_tool_result,
                tool_context=tool_context,
            ):
                queue.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer
            queue.put_nowait(exc)
            return
        queue.put_nowait(_END)

    async def _maybe_offload(self, message: Message) -> Message:
        session = self._session
        text = message.text
        threshold = session.offload_threshold
        if threshold <= 0 or len(text) <= threshold:
            return message
        redactor = session._keeper.redact
        if redactor is not None:  # the blob is stored as is: rewrite its secrets first
            text = redactor.redact_text(text)
        blob_id = await session.store.put_blob(session.session_id, text.encode(), "text/plain")
        preview = text[: min(1000, threshold // 2)]
        self._progress.pending.append(
            OffloadEntry(
                turn_id=self._progress.turn_id,
                data=Offload(
                    blob_id=blob_id,
                    size=len(text),
                    preview=preview,
                    tool_call_id=message.tool_call_id,
                ),
            )
        )
        note = (
            f"{preview}\n[... output truncated: {len(text)} characters in total, "
            f"kept as blob {blob_id}]"
        )
        return replace(message, content=note)

    # -- iterating -------------------------------------------------------------------

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> AgentEvent:
        while not self._ready:
            if self._stopped:
                raise StopAsyncIteration
            if not self._entered:
                raise ChatSessionClosedError("use the turn inside `async with session.stream(...)`")
            await self._step()
        return self._ready.pop(0)

    def _loop_deadline(self) -> float | None:
        if self._deadline is None:
            return None
        return asyncio.get_running_loop().time() + (self._deadline - time.monotonic())

    def _timeout_text(self) -> str:
        return f"the turn ran past its timeout of {self._timeout} s"

    def _timed_out(self) -> SessionTimeoutError:
        return SessionTimeoutError(
            f"session {self._session.session_id!r}: the turn took longer than {self._timeout} s; "
            "the partial answer is kept (status 'timeout') and the session can continue"
        )

    async def _step(self) -> None:
        """Take the agent's next event, store what it completes, queue what may be yielded."""
        try:
            if self._session._closed:
                raise _SessionClosing
            if self._deadline is not None and time.monotonic() >= self._deadline:
                raise self._timed_out()  # it passed while the caller handled an event
            queue = self._queue
            if queue.empty():
                try:
                    async with asyncio.timeout_at(self._loop_deadline()):
                        item = await queue.get()
                except TimeoutError:
                    raise self._timed_out() from None
            else:
                item = queue.get_nowait()
            if item is _CLOSING:
                raise _SessionClosing
            if item is _END:  # the agent ended without a StopEvent: end the turn all the same
                await self._end(self._status, self._error)
                self._ready.extend(self._progress.release())
                self._stopped = True
                return
            if isinstance(item, BaseException):
                raise item
            event: AgentEvent = item
            if isinstance(event, StopEvent):
                if _SURROGATES.search(event.text):  # the text as it is stored
                    event = StopEvent(event.reason, _SURROGATES.sub("\ufffd", event.text))
                if event.reason == "error":
                    self._status = "error"
                    self._error = self._error or "the model call failed"
                await self._end(self._status, self._error)
                self._ready.extend(self._progress.release(event))
                self._stopped = True
                return
            if isinstance(event, ErrorEvent):
                self._error = event.error
            self._ready.extend(await self._record(event))
        except SessionTimeoutError:
            await self._end("timeout", self._timeout_text())
            raise
        except _SessionClosing:
            await self._end("cancelled", "the session was closed during the turn")
            raise ChatSessionClosedError(
                f"session {self._session.session_id!r} was closed during the turn; what the "
                "turn produced is kept (status 'cancelled')"
            ) from None
        except BaseException as exc:
            await self._end_for(exc)
            raise

    async def _record(self, event: AgentEvent) -> list[AgentEvent]:
        """Persist what ``event`` completes; return the events now safe to yield.

        An event that describes a step is yielded only once that step is
        stored: an assistant message and its usage wait for each other (and,
        for the final answer, for the turn's end, written in one append).
        """
        progress = self._progress
        tid = progress.turn_id
        if isinstance(event, TextEvent):
            progress.partial_text.append(event.content)
            return [event]
        if isinstance(event, AssistantMessageEvent):
            message = storable(event.message)
            if message is not event.message:
                event = AssistantMessageEvent(message)
            progress.partial_text.clear()
            progress.call_open = False
            progress.steps += 1
            progress.pending.append(MessageEntry(turn_id=tid, data=event.message))
            progress.held.append(event)
            return []
        if isinstance(event, UsageEvent):
            progress.pending.append(UsageEntry(turn_id=tid, data=event.usage))
            progress.held.append(event)
            if any(isinstance(e, MessageEntry) and e.data.tool_calls for e in progress.pending):
                await self._flush()
                return progress.release()
            return []  # the final answer: stored with the turn's end
        if isinstance(event, ErrorEvent):
            progress.held.append(event)  # yielded once the turn's end records it
            return []
        if isinstance(event, ToolCallEvent):
            await self._flush()
            return progress.release(event)
        if isinstance(event, ToolResultEvent):
            progress.pending.append(MessageEntry(turn_id=tid, data=event.message))
            await self._flush()
            progress.call_open = True  # the agent calls the model again next
            return progress.release(event)
        await self._flush()
        return progress.release(event)

    async def _flush(self) -> None:
        progress = self._progress
        if progress.pending:
            pending, progress.pending = progress.pending, []
            await self._session._keeper.append(pending, self._lease)

    # -- ending ------------------------------------------------------------------------

    async def _end_for(self, exc: BaseException) -> None:
        """End the turn for an exception that stopped it."""
        if isinstance(exc, asyncio.CancelledError):
            if INTERRUPTED in exc.args:
                await self._end("interrupted", "the turn was interrupted (Ctrl+C)")
            else:
                await self._end("cancelled", "the task running the turn was cancelled")
        elif isinstance(exc, GeneratorExit):
            await self._end("interrupted", "the caller stopped reading the turn's events")
        elif isinstance(exc, KeyboardInterrupt):
            await self._end("interrupted", "the turn was interrupted")
        else:
            await self._end("error", f"{type(exc).__name__}: {exc}")

    async def _stop_producer(self) -> None:
        producer = self._producer
        if producer is not None and not producer.done():
            producer.cancel()
            with contextlib.suppress(BaseException):
                await producer

    async def _end(self, status: TurnStatus, error: str | None) -> None:
        """Write everything the turn still holds, repairs, state changes and ``turn_end``.

        Runs once per turn, on every path.
        """
        if self._finished:
            return
        self._finished = True
        self._stopped = True
        await self._stop_producer()
        session = self._session
        keeper = session._keeper
        await keeper.settle()
        progress = self._progress
        tid = progress.turn_id
        if error:
            error = redact_text(error)  # a model server's URL may carry a password
        events: list[LogEvent] = list(progress.pending)
        progress.pending = []
        partial = "".join(progress.partial_text)
        if progress.call_open and (status in ("timeout", "cancelled", "interrupted") or partial):
            # the model was answering when the turn stopped: its tokens were spent
            sent = [*session.conversation.messages]
            sent.extend(e.data for e in events if isinstance(e, MessageEntry))
            events.append(
                UsageEntry(turn_id=tid, data=session.agent.estimated_usage(sent, partial))
            )
        if status != "completed" and partial:
            events.append(
                MessageEntry(
                    turn_id=tid, data=Message(role="assistant", content=partial, partial=True)
                )
            )
        events.extend(self._answers_for_dangling(events, status))
        change = session._state_change(tid)
        if change is not None:
            events.append(change)
        events.append(
            TurnEndEntry(
                turn_id=tid,
                data=TurnEnd(
                    status=status,
                    error=error,
                    duration=time.monotonic() - progress.started,
                    steps=progress.steps,
                ),
            )
        )
        await keeper.append(events, self._lease)
        await session._sync_fingerprint()

    def _answers_for_dangling(self, pending: list[LogEvent], status: str) -> list[LogEvent]:
        """Error results for this turn's tool calls that have none."""
        recent: list[Message] = []
        since = self._progress.start_seq
        for seq, message in reversed(self._session.conversation.context):
            if seq <= since:
                break
            recent.append(message)
        recent.reverse()
        recent.extend(e.data for e in pending if isinstance(e, MessageEntry))
        answered = {m.tool_call_id for m in recent if m.role == "tool"}
        return [
            unfinished_call(call, self._progress.turn_id, status)
            for m in recent
            if m.role == "assistant"
            for call in m.tool_calls
            if call.id not in answered
        ]

    def close_requested(self) -> None:
        """Wake a consumer waiting for the agent: the session is being closed."""
        self._queue.put_nowait(_CLOSING)

    # -- leaving ---------------------------------------------------------------------

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._finished:
                if exc is None:
                    await self._end("interrupted", "the caller stopped reading the turn's events")
                else:
                    await self._end_for(exc)
        finally:
            await self._leave()

    async def _leave(self) -> None:
        session = self._session
        try:
            with contextlib.suppress(BaseException):
                await self._stop_producer()
            with contextlib.suppress(Exception):
                await asyncio.shield(session._lease.done())
        finally:
            session._give_turn(self)
