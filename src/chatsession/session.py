"""One durable conversation: :class:`ChatSession`.

A ``ChatSession`` runs an :class:`~chatsession.agent.Agent` turn by turn and
persists every step to a store as it happens:

1. ``turn_start`` and the user's message, before the model is called;
2. each assistant message (with its tool calls) and its usage, as the model
   finishes it; each tool result as the tool returns;
3. ``turn_end``, before :class:`StopEvent` is yielded.

If the turn is stopped (Ctrl+C, task cancellation, a timeout, an exception),
what was produced so far is recorded: the partial assistant text, an error
result for every tool call that has none (so the next model call is valid),
and ``turn_end`` with status ``interrupted``, ``cancelled``, ``timeout`` or
``error``. A process killed outright leaves a turn without ``turn_end``; it
reads back as interrupted and is repaired the same way on the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import math
import re
import time
import uuid
import warnings
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Self, TypeAlias, TypeVar

from chatsession.agent import Agent, ToolContext
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
    ConsistencyError,
    CorruptDataError,
    ModelError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    SessionTimeoutError,
    UnsupportedValueError,
    UsageError,
)
from chatsession.log import (
    Checkpoint,
    CheckpointEntry,
    Compaction,
    CompactionEntry,
    ConversationState,
    ImagePart,
    LogEvent,
    Message,
    MessageEntry,
    Metadata,
    MetadataEntry,
    Offload,
    OffloadEntry,
    Reset,
    ResetEntry,
    Rewind,
    RewindEntry,
    StateChange,
    StateEntry,
    TextPart,
    ToolCall,
    TurnEnd,
    TurnEndEntry,
    TurnStartEntry,
    TurnStatus,
    Usage,
    UsageEntry,
    UsageTotals,
    decode,
    decode_payloads,
    encode,
)
from chatsession.store import Store, open_store
from chatsession.store.base import SessionRecord, check_json_value, redact_text, validate_id
from chatsession.transfer import (
    IMPORTING,
    ExportFormat,
    ExportWriter,
    export_header,
    import_into_store,
    opened_for_writing,
)
from chatsession.values import STATE_DEPTH, AgentState, check_state

__all__ = [
    "ChatMessage",
    "ChatSession",
    "ContextInfo",
    "MessageSource",
    "ModelUsage",
    "UsageSummary",
]

ChatMessage: TypeAlias = str | Sequence[TextPart | ImagePart] | Message
"""What a user sends: text, a list of text and image parts, or a ``Message``."""

MessageSource: TypeAlias = (
    Iterable[ChatMessage] | Iterator[ChatMessage] | AsyncIterator[ChatMessage] | asyncio.Queue[Any]
)
"""Where ``events()`` takes messages from: a list, an iterator, an async
iterator or generator, or an ``asyncio.Queue`` (``None`` in the queue ends it)."""

Consistency = Literal["warn", "strict", "ignore"]

_logger = logging.getLogger("chatsession.session")

_END = object()  # the end of a turn's events, or of the incoming messages
_CLOSING = object()  # wakes a running turn when the session is closed
T = TypeVar("T")

#: Cancel a turn's task with this message (``task.cancel(INTERRUPTED)``) to have
#: the turn recorded as ``interrupted`` rather than ``cancelled``: what Ctrl+C does.
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class ModelUsage:
    """Token usage of one model or one level.

    ``estimated`` is True when any of the counted calls was a local estimate
    (the server reported no usage, or the call timed out or was cut off).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    calls: int = 0
    estimated: bool = False

    @classmethod
    def of(cls, totals: UsageTotals) -> ModelUsage:
        """Freeze running totals."""
        return cls(
            totals.prompt_tokens,
            totals.completion_tokens,
            totals.total_tokens,
            totals.cost,
            totals.calls,
            totals.estimated,
        )

    def minus(self, other: ModelUsage) -> ModelUsage:
        """This usage without ``other`` (for a fork's own figures; ``estimated`` is kept)."""
        return ModelUsage(
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.total_tokens - other.total_tokens,
            self.cost - other.cost,
            self.calls - other.calls,
            self.estimated,
        )


@dataclass(frozen=True)
class UsageSummary:
    """What a session's model calls used, from :meth:`ChatSession.get_usage`.

    For a fork, the main figures are the fork's own; ``inherited`` is what
    the shared history (before the fork point) used, and ``including_inherited``
    both together. Nothing is counted twice.

    Attributes:
        total_prompt_tokens: Prompt tokens of this session's own calls.
        total_completion_tokens: Completion tokens of this session's own calls.
        total_tokens: Both.
        total_cost: US dollars, from the price table (0 where unknown).
        calls: Model calls made.
        estimated: True when some of the own figures are local estimates
            (see :attr:`ModelUsage.estimated`).
        by_model: Own usage per model.
        by_level: Own usage per agent level (main, subagent, compaction, ...).
        inherited: Usage of the history shared with the parent (forks only).
        including_inherited: Own plus inherited.
    """

    total_prompt_tokens: int
    total_completion_tokens: int
    total_tokens: int
    total_cost: float
    calls: int
    estimated: bool
    by_model: dict[str, ModelUsage]
    by_level: dict[str, ModelUsage]
    inherited: ModelUsage = ModelUsage()
    including_inherited: ModelUsage = ModelUsage()


@dataclass(frozen=True)
class ContextInfo:
    """How full the model's context is, from :meth:`ChatSession.get_context_info`.

    Attributes:
        current_tokens: Tokens of the context the model would see now.
        budget_tokens: The context budget (the model's window or the setting).
        conversation_items: The messages in context.
        utilisation: ``current_tokens / budget_tokens``.
        method: ``provider`` (last reported prompt + completion, plus an
            estimate of newer messages), ``tokenizer`` (the model's own), or
            ``estimate`` (about four characters a token).
        estimated: True unless the figure is exact.
    """

    current_tokens: int
    budget_tokens: int
    conversation_items: list[Message]
    utilisation: float
    method: Literal["provider", "tokenizer", "estimate"]
    estimated: bool


@dataclass
class _Turn:
    """What one running turn has produced so far (for recording an interruption).

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
    final_text: str = ""
    call_open: bool = False
    finished: bool = False
    error: BaseException | None = None

    def release(self, *more: AgentEvent) -> list[AgentEvent]:
        """The held events (now stored) followed by ``more``."""
        out, self.held = self.held, []
        out.extend(more)
        return out


async def _read_ahead(batches: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yield batches while the next one is already being read (decode overlaps I/O)."""
    iterator = aiter(batches)
    pending: asyncio.Future[T] | None = asyncio.ensure_future(anext(iterator))
    try:
        while pending is not None:
            try:
                batch = await pending
            except StopAsyncIteration:
                # drop the finished task: its exception's traceback holds this frame
                # (a reference cycle keeping the last batch alive until a gc run)
                pending = None
                return
            pending = asyncio.ensure_future(anext(iterator))
            yield batch
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


class _SessionClosing(Exception):
    """Raised inside a running turn when :meth:`ChatSession.close` is called."""


#: Seconds ``close()`` waits for a running turn to record itself.
_CLOSE_WAIT = 10.0


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


_SURROGATES = re.compile("[\ud800-\udfff]")


def _strings(message: Message) -> Iterator[str]:
    """Every text field of a message (content, parts, tool calls, ids, names)."""
    if isinstance(message.content, str):
        yield message.content
    else:
        for part in message.content:
            yield from (v for v in vars(part).values() if isinstance(v, str))
    for call in message.tool_calls:
        yield from (call.id, call.name, call.arguments)
    yield from (v for v in (message.tool_call_id, message.name) if v is not None)


def _storable(message: Message) -> Message:
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
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return Message.model_validate(clean(message.model_dump()))


def _unfinished_call(call: ToolCall, turn_id: str | None, status: str) -> MessageEntry:
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


def _json_key(value: Any) -> str:
    """A value as JSON, to compare state values by type as well as by value."""
    return json.dumps(value, sort_keys=True)


def _user_message(message: ChatMessage) -> Message:
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


def estimate_tokens(messages: Iterable[Message]) -> int:
    """About four characters a token, plus a few tokens per message."""
    total = 0
    for message in messages:
        chars = len(message.text) + sum(len(c.name) + len(c.arguments) for c in message.tool_calls)
        total += 4 + math.ceil(chars / 4)
    return total


class ChatSession:
    """A durable conversation with an agent.

    Args:
        agent: The agent that answers.
        session_id: Open this session (created if it does not exist); None
            for a new session with a fresh id.
        store: A store URL or object; None for the default store.
        user_id: The owner recorded on a new session.
        agent_id: The agent id recorded on a new session.
        window_id: The client window recorded on a new session.
        title: A title for a new session.
        message_source: Where :meth:`events` takes messages from; without
            one, feed it with :meth:`send` and end it with :meth:`close`.
        timeout: Seconds a turn may take (None: no limit).
        consistency: On resume, how to treat an agent that differs from the
            one that wrote the session: ``warn`` (default), ``strict`` (raise
            :class:`ConsistencyError`) or ``ignore``.
        offload_threshold: Tool outputs longer than this many characters are
            kept as blobs; the context gets a preview and a reference.
        compaction_threshold: When the context passes this fraction of the
            budget, older turns are summarised (0 or None: never).
        budget_tokens: The context budget; default: the model's window.
        must_exist: Raise :class:`SessionNotFoundError` instead of creating
            the session (what :meth:`resume` does).
    """

    def __init__(
        self,
        agent: Agent,
        session_id: str | None = None,
        *,
        store: str | Store | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        window_id: str | None = None,
        title: str | None = None,
        message_source: MessageSource | None = None,
        timeout: float | None = None,
        consistency: Consistency = "warn",
        offload_threshold: int = 8000,
        compaction_threshold: float | None = 0.8,
        budget_tokens: int | None = None,
        must_exist: bool = False,
    ) -> None:
        if consistency not in ("warn", "strict", "ignore"):
            raise UsageError(
                f"consistency must be 'warn', 'strict' or 'ignore', not {consistency!r}"
            )
        if timeout is not None and timeout <= 0:
            raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.agent = agent
        self.session_id = validate_id(session_id) if session_id is not None else uuid.uuid4().hex
        self._owns_store = not (store is not None and not isinstance(store, str))
        # sessions sharing a store this session opened (its forks): the last to close it
        self._store_users = [1]
        self.store: Store = open_store(store) if isinstance(store, str) or store is None else store
        self._new_record = SessionRecord(
            id=self.session_id, user_id=user_id, agent_id=agent_id, window_id=window_id, title=title
        )
        self.timeout = timeout
        self.consistency: Consistency = consistency
        self.offload_threshold = offload_threshold
        self.compaction_threshold = compaction_threshold
        self._budget_tokens = budget_tokens
        self._must_exist = must_exist
        self._message_source = message_source
        self._inbox: asyncio.Queue[Any] | None = None
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._turn_lock: asyncio.Lock | None = None
        self._turn_task: asyncio.Task[Any] | None = None
        self._turn_queue: asyncio.Queue[Any] | None = None
        self._turn_abandoned = False
        self._close_store_after_turn = False
        self._closing: asyncio.Event | None = None
        self._closed = False
        self.record: SessionRecord | None = None
        self.conversation = ConversationState()
        self._inherited = UsageTotals()
        self._inherited_by_model: dict[str, UsageTotals] = {}
        self._inherited_by_level: dict[str, UsageTotals] = {}
        self._saved_state: dict[str, Any] = {}
        self._state = AgentState()
        self.consistency_warnings: list[str] = []
        self._last_usage_seq = 0
        self._last_usage: Usage | None = None
        self._inflight: asyncio.Future[None] | None = None
        self._fingerprint_synced = False

    # ------------------------------------------------------------------
    # opening

    @classmethod
    def resume(
        cls, agent: Agent, session_id: str, *, store: str | Store | None = None, **options: Any
    ) -> Self:
        """Open an existing session; it must exist (never silently starts a new one).

        Await the result to open it at once, so that a missing session is
        reported right there::

            try:
                session = await ChatSession.resume(agent, "chat-42", store=url)
            except SessionNotFoundError:
                session = await ChatSession(agent, "chat-42", store=url)

        Without ``await`` the session is opened (and a missing one reported)
        on first use. Options are those of :class:`ChatSession`.

        Raises:
            SessionNotFoundError: When awaited (or on first use), if there is no
                such visible session.
        """
        return cls(agent, session_id, store=store, must_exist=True, **options)

    def __await__(self) -> Generator[Any, None, Self]:
        """``await session``: open (load or create) it now and return it; see :meth:`open`."""
        return self.open().__await__()

    async def open(self) -> Self:
        """Load (or create) the session now instead of on first use. Idempotent.

        Raises:
            SessionNotFoundError: ``must_exist`` and the session is missing.
            ConsistencyError: ``consistency="strict"`` and the agent changed.
        """
        self._check_open()
        if self._opened:
            return self
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if not self._opened:
                await self._load()
                self._opened = True
        return self

    async def _get_or_create(self) -> SessionRecord | None:
        """The existing record, or None after creating the session (race-free).

        Two processes opening the same new id at once both succeed: the one
        whose ``create`` loses the race opens what the other created.
        """
        try:
            return await self.store.get(self.session_id)
        except SessionNotFoundError:
            if self._must_exist:
                raise
        fingerprint = self.agent.fingerprint()
        try:
            self.record = await self.store.create(
                self._new_record.model_copy(update={"fingerprint": fingerprint})
            )
            return None
        except SessionExistsError:
            pass  # created meanwhile by another writer: open it
        try:
            return await self.store.get(self.session_id)
        except SessionNotFoundError:
            # taken but invisible: a deleted session kept for its forks (or one that
            # expired or was deleted again in between)
            raise SessionExistsError(
                self.session_id,
                "it belonged to a session that was deleted or has expired, whose forks "
                "still read its history; open it under another id",
            ) from None

    async def _load(self) -> None:
        record = await self._get_or_create()
        if record is None:
            return
        if IMPORTING in record.metadata:
            raise CorruptDataError(
                f"session {self.session_id!r} is an import that did not finish; import the "
                "file again under the same id (that replaces it), or delete the session"
            )
        self.record = record
        fork_seq = record.parent.seq if record.parent else 0
        async for batch in _read_ahead(self.store.read(self.session_id, batch_size=5000)):
            payloads = decode_payloads(batch, self.session_id)
            if batch[0].seq <= fork_seq <= batch[-1].seq:
                cut = fork_seq - batch[0].seq + 1
                self.conversation.apply_stored(batch[:cut], payloads[:cut])
                self._snapshot_inherited()
                self.conversation.apply_stored(batch[cut:], payloads[cut:])
            else:
                self.conversation.apply_stored(batch, payloads)
        if fork_seq and not self._inherited.calls and self.conversation.head <= fork_seq:
            self._snapshot_inherited()
        self._reset_state()
        self._check_fingerprint(record)

    def _snapshot_inherited(self) -> None:
        c = self.conversation
        self._inherited = UsageTotals(**vars(c.usage))
        self._inherited_by_model = {k: UsageTotals(**vars(v)) for k, v in c.usage_by_model.items()}
        self._inherited_by_level = {k: UsageTotals(**vars(v)) for k, v in c.usage_by_level.items()}

    def _check_fingerprint(self, record: SessionRecord) -> None:
        if self.consistency == "ignore" or not record.fingerprint:
            return
        current = self.agent.fingerprint()
        changes = [
            f"{key}: {record.fingerprint.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(record.fingerprint) | set(current))
            if record.fingerprint.get(key) != current.get(key)
        ]
        if not changes:
            return
        if self.consistency == "strict":
            raise ConsistencyError(changes)
        self.consistency_warnings = changes
        warnings.warn(
            f"session {self.session_id!r} was written by a different agent: " + "; ".join(changes),
            UserWarning,
            stacklevel=3,
        )

    def _loaded_record(self) -> SessionRecord:
        """The record read or made by :meth:`open` (call after opening)."""
        if self.record is None:
            raise ChatSessionClosedError(
                f"session {self.session_id!r} is not open: await session.open() first"
            )
        return self.record

    def _check_open(self) -> None:
        if self._closed:
            raise ChatSessionClosedError(
                f"session {self.session_id!r} is closed; open a new ChatSession to continue it"
            )

    # ------------------------------------------------------------------
    # writing events

    async def _append(self, events: Sequence[LogEvent]) -> None:
        """Append events at our head, shielded from cancellation.

        A cancelled caller stops waiting, but the write itself completes and
        is folded in, so the in-memory state never lags behind the store.
        """
        await self._settle()
        task = asyncio.ensure_future(self._append_now(events))
        self._inflight = task
        await asyncio.shield(task)

    async def _settle(self) -> None:
        """Wait for a write that a cancelled caller left running."""
        task = self._inflight
        if task is not None and not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)

    async def _append_now(self, events: Sequence[LogEvent]) -> None:
        """Append at our head; on a conflict, catch up with the log and append after it."""
        rows = [encode(e) for e in events]
        for _ in range(20):
            head = self.conversation.head
            try:
                new_head = await self.store.append(self.session_id, rows, head)
            except ConflictError:
                await self._catch_up()
                continue
            if new_head != head + len(rows):
                raise CorruptDataError(
                    f"session {self.session_id!r}: the store acknowledged {len(rows)} events "
                    f"after seq {head} but reports head {new_head}"
                )
            for offset, event in enumerate(events, start=head + 1):
                stamped = event.model_copy(update={"seq": offset, "ts": rows[offset - head - 1].ts})
                self.conversation.apply(stamped)
                if isinstance(stamped, UsageEntry):
                    self._last_usage_seq, self._last_usage = stamped.seq, stamped.data
            return
        raise SessionBusyError(self.session_id, "other writers (20 conflicts in a row)")

    async def _catch_up(self) -> None:
        async for batch in self.store.read(self.session_id, after_seq=self.conversation.head):
            for event in decode(batch, self.session_id):
                self.conversation.apply(event)

    @property
    def state(self) -> AgentState:
        """The agent's own key-values, saved with each turn (and by :meth:`save_state`).

        A ``dict`` of JSON values; assigning a value no store can keep exactly
        raises :class:`UnsupportedValueError` at once (see :class:`AgentState`).
        """
        return self._state

    @state.setter
    def state(self, values: Mapping[str, Any]) -> None:
        self._state = AgentState(values)

    def _reset_state(self) -> None:
        """Make :attr:`state` and the saved copy what the log says now."""
        self._saved_state = copy.deepcopy(self.conversation.state)
        self._state = AgentState()
        self._state.restore(self._saved_state)

    def _state_changes(self) -> StateEntry | None:
        """The state event that saves :attr:`state`, or None when nothing changed.

        Raises:
            UnsupportedValueError: A value changed in place cannot be stored;
                nothing is saved (fix the value, or it is undone at turn end).
        """
        check_state(self._state)
        saved = self._saved_state
        # compared as JSON: 1, 1.0 and True are equal in Python but not when stored
        changed = {
            key: value
            for key, value in self._state.items()
            if key not in saved or _json_key(saved[key]) != _json_key(value)
        }
        removed = tuple(key for key in saved if key not in self._state)
        if not changed and not removed:
            return None
        self._saved_state = self._state.snapshot()
        return StateEntry(data=StateChange(values=copy.deepcopy(changed), removed=removed))

    # ------------------------------------------------------------------
    # turns

    async def query_stream(
        self, message: ChatMessage, *, timeout: float | None = None
    ) -> AsyncGenerator[AgentEvent, None]:
        """Run one turn and yield its events as they happen.

        Yields :class:`TextEvent` deltas, :class:`AssistantMessageEvent`,
        :class:`ToolCallEvent`, :class:`ToolResultEvent`, :class:`UsageEvent`,
        :class:`ErrorEvent` and finally :class:`StopEvent`. Every step is
        persisted before it is yielded.

        Args:
            message: The user's message.
            timeout: Seconds for this turn (default: the session's ``timeout``).

        Raises:
            SessionTimeoutError: The turn ran past its timeout (the partial
                turn is kept with status ``timeout``).
            SessionBusyError: Another turn of this session object is running.
            ChatSessionClosedError: The session is closed.
        """
        user = _user_message(message)
        await self.open()
        if self._turn_lock is None:
            self._turn_lock = asyncio.Lock()
        lock = self._turn_lock
        if lock.locked() and not await self._previous_turn_closing():
            raise SessionBusyError(self.session_id, "another turn of this ChatSession")
        async with lock:
            self._check_open()
            self._turn_abandoned = False
            self._turn_task = asyncio.current_task()
            try:
                turn = self._run_turn(user, self.timeout if timeout is None else timeout)
                async with contextlib.aclosing(turn):
                    async for event in turn:
                        yield event
            finally:
                self._turn_task = None
                if self._closed and self._close_store_after_turn:
                    self._close_store_after_turn = False
                    await self._release_store()

    async def _previous_turn_closing(self) -> bool:
        """True when the running turn's consumer abandoned it and it is being closed.

        A ``query_stream`` left early (``break``) is closed when Python
        finalizes it, a few loop iterations later; a new turn waits for that
        rather than reporting the session busy.
        """
        lock = self._turn_lock
        for _ in range(5):
            if lock is None or not lock.locked() or self._turn_abandoned:
                return True
            await asyncio.sleep(0)
        return lock is None or not lock.locked() or self._turn_abandoned

    async def query(self, message: ChatMessage, *, timeout: float | None = None) -> str:
        """Run one turn and return the final text (see :meth:`query_stream`).

        Raises:
            ModelError: The model call failed (the turn is recorded as ``error``
                with what was produced; the session can continue).
            SessionTimeoutError: The turn ran past its timeout.
            SessionBusyError: Another turn of this session object is running.
        """
        text = ""
        failure: BaseException | None = None
        async with contextlib.aclosing(self.query_stream(message, timeout=timeout)) as stream:
            async for event in stream:
                if isinstance(event, ErrorEvent):
                    failure = event.exception or ModelError(event.error)
                elif isinstance(event, StopEvent):
                    text = event.text
                    if event.reason == "error":
                        failure = failure or ModelError(
                            f"session {self.session_id!r}: the model call failed"
                        )
        if failure is not None:
            raise failure
        return text

    async def _run_turn(
        self, user: Message, timeout: float | None
    ) -> AsyncGenerator[AgentEvent, None]:
        turn = _Turn(turn_id=uuid.uuid4().hex, started=time.monotonic())
        await self._repair_interrupted()
        turn.start_seq = self.conversation.head
        await self._append(
            [TurnStartEntry(turn_id=turn.turn_id), MessageEntry(turn_id=turn.turn_id, data=user)]
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._turn_queue = queue
        producer: asyncio.Task[None] | None = None
        status: TurnStatus = "completed"
        error: str | None = None

        def timed_out() -> SessionTimeoutError:
            return SessionTimeoutError(
                f"session {self.session_id!r}: the turn took longer than {timeout} s; "
                "the partial answer is kept (status 'timeout') and the session can continue"
            )

        try:
            if self.compaction_threshold:
                try:
                    await asyncio.wait_for(self._maybe_compact(turn), _remaining(deadline))
                except TimeoutError:
                    raise timed_out() from None
            context = self.conversation.messages
            turn.call_open = True
            producer = asyncio.create_task(self._produce(turn, context, queue))
            while True:
                if self._closed:
                    raise _SessionClosing
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise timed_out()
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    raise timed_out() from None
                if item is _END:
                    break
                if item is _CLOSING:
                    raise _SessionClosing
                if isinstance(item, BaseException):
                    raise item
                event: AgentEvent = item
                if isinstance(event, StopEvent):
                    if _SURROGATES.search(event.text):  # the text as it is stored
                        event = StopEvent(event.reason, _SURROGATES.sub("\ufffd", event.text))
                    if event.reason == "error":
                        status = "error"
                        error = error or "the model call failed"
                    await self._finish(turn, status, error)
                    for ready in turn.release(event):
                        yield ready
                    return
                if isinstance(event, ErrorEvent):
                    error = event.error
                    turn.error = event.exception
                for ready in await self._record(turn, event):
                    yield ready
            # the agent ended without a StopEvent: end the turn all the same
            await self._finish(turn, status, error)
            for ready in turn.release():
                yield ready
        except SessionTimeoutError:
            await self._stop_producer(producer)
            await self._finish(turn, "timeout", f"the turn ran past its timeout of {timeout} s")
            raise
        except _SessionClosing:
            await self._stop_producer(producer)
            await self._finish(turn, "cancelled", "the session was closed during the turn")
            raise ChatSessionClosedError(
                f"session {self.session_id!r} was closed during the turn; what the turn "
                "produced is kept (status 'cancelled')"
            ) from None
        except asyncio.CancelledError as exc:
            await self._stop_producer(producer)
            if INTERRUPTED in exc.args:
                await self._finish(turn, "interrupted", "the turn was interrupted (Ctrl+C)")
            else:
                await self._finish(turn, "cancelled", "the task running the turn was cancelled")
            raise
        except GeneratorExit:
            self._turn_abandoned = True
            await self._stop_producer(producer)
            await self._finish(turn, "interrupted", "the caller stopped reading the turn's events")
            raise
        except KeyboardInterrupt:
            await self._stop_producer(producer)
            await self._finish(turn, "interrupted", "the turn was interrupted")
            raise
        except BaseException as exc:
            await self._stop_producer(producer)
            await self._finish(turn, "error", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._turn_queue = None
            if producer is not None and not producer.done():
                producer.cancel()

    async def _produce(
        self, turn: _Turn, context: list[Message], queue: asyncio.Queue[Any]
    ) -> None:
        state = self._state
        last_good = state.snapshot()

        async def on_tool_result(message: Message) -> Message:
            # a value changed in place by the tool is checked as the tool returns:
            # refused, the tool's state changes are undone and the model is told
            nonlocal last_good
            try:
                check_state(state)
            except UnsupportedValueError as exc:
                state.restore(last_good)
                message = message.model_copy(
                    update={
                        "content": f"Error: UnsupportedValueError: {exc} (the tool's changes "
                        "to the session state were undone)",
                        "is_error": True,
                    }
                )
            else:
                last_good = state.snapshot()
            return await self._maybe_offload(turn, _storable(message))

        try:
            tool_context = ToolContext(
                state=state, session_id=self.session_id, turn_id=turn.turn_id
            )
            async for event in self.agent.run(
                context, on_tool_result=on_tool_result, tool_context=tool_context
            ):
                await queue.put(event)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer
            await queue.put(exc)
            return
        await queue.put(_END)

    @staticmethod
    async def _stop_producer(producer: asyncio.Task[None] | None) -> None:
        if producer is None:
            return
        producer.cancel()
        with contextlib.suppress(BaseException):
            await producer

    async def _record(self, turn: _Turn, event: AgentEvent) -> list[AgentEvent]:
        """Persist what ``event`` completes; return the events now safe to yield.

        An event that describes a step is yielded only once that step is
        stored: an assistant message and its usage wait for each other (and,
        for the final answer, for the turn's end, written in one append).
        """
        tid = turn.turn_id
        if isinstance(event, TextEvent):
            turn.partial_text.append(event.content)
            return [event]
        if isinstance(event, AssistantMessageEvent):
            message = _storable(event.message)
            if message is not event.message:
                event = AssistantMessageEvent(message)
            turn.partial_text.clear()
            turn.call_open = False
            turn.steps += 1
            turn.final_text = event.message.text
            turn.pending.append(MessageEntry(turn_id=tid, data=event.message))
            turn.held.append(event)
            return []
        if isinstance(event, UsageEvent):
            turn.pending.append(UsageEntry(turn_id=tid, data=event.usage))
            turn.held.append(event)
            if any(isinstance(e, MessageEntry) and e.data.tool_calls for e in turn.pending):
                await self._flush(turn)
                return turn.release()
            return []  # the final answer: stored with the turn's end
        if isinstance(event, ErrorEvent):
            turn.held.append(event)  # yielded once the turn's end records it
            return []
        if isinstance(event, ToolCallEvent):
            await self._flush(turn)
            return turn.release(event)
        if isinstance(event, ToolResultEvent):
            turn.pending.append(MessageEntry(turn_id=tid, data=event.message))
            await self._flush(turn)
            turn.call_open = True  # the agent calls the model again next
            return turn.release(event)
        await self._flush(turn)
        return turn.release(event)

    async def _flush(self, turn: _Turn) -> None:
        if turn.pending:
            pending, turn.pending = turn.pending, []
            await self._append(pending)

    async def _finish(self, turn: _Turn, status: TurnStatus, error: str | None) -> None:
        """Write everything the turn still holds, repairs, state changes and ``turn_end``.

        Runs once per turn: a consumer that stops reading after the end was
        written does not end the turn twice.
        """
        if turn.finished:
            return
        turn.finished = True
        await self._settle()
        tid = turn.turn_id
        if error:
            error = redact_text(error)  # a model server's URL may carry a password
        events: list[LogEvent] = list(turn.pending)
        turn.pending = []
        partial = "".join(turn.partial_text)
        if turn.call_open and (status in ("timeout", "cancelled", "interrupted") or partial):
            # the model was answering when the turn stopped: its tokens were spent
            sent = [*self.conversation.messages]
            sent.extend(e.data for e in events if isinstance(e, MessageEntry))
            usage = self.agent.estimated_usage(sent, partial)
            events.append(UsageEntry(turn_id=tid, data=usage))
        if status != "completed" and partial:
            events.append(
                MessageEntry(
                    turn_id=tid, data=Message(role="assistant", content=partial, partial=True)
                )
            )
        events.extend(self._answers_for_dangling(tid, events, status, turn.start_seq))
        try:
            state = self._state_changes()
        except UnsupportedValueError as exc:
            # changed in place outside a tool (tools are checked as they return):
            # keep the turn, undo the change
            _logger.warning(
                "session %r: %s; the state is back to its last saved value", self.session_id, exc
            )
            self._state.restore(self._saved_state)
            state = None
        if state is not None:
            events.append(state.model_copy(update={"turn_id": tid}))
        duration = time.monotonic() - turn.started
        events.append(
            TurnEndEntry(
                turn_id=tid,
                data=TurnEnd(status=status, error=error, duration=duration, steps=turn.steps),
            )
        )
        await self._append(events)
        if not self._fingerprint_synced:
            fingerprint = self.agent.fingerprint()
            if self.record is not None and self.record.fingerprint != fingerprint:
                await self._update_record(fingerprint=fingerprint)
            self._fingerprint_synced = True

    def _answers_for_dangling(
        self,
        turn_id: str | None,
        pending: Sequence[LogEvent],
        status: str,
        since_seq: int = 0,
    ) -> list[LogEvent]:
        """Error results for tool calls without one, among messages after ``since_seq``."""
        recent: list[Message] = []
        for seq, message in reversed(self.conversation.context):
            if seq <= since_seq:
                break
            recent.append(message)
        recent.reverse()
        recent.extend(e.data for e in pending if isinstance(e, MessageEntry))
        answered = {m.tool_call_id for m in recent if m.role == "tool"}
        return [
            _unfinished_call(call, turn_id, status)
            for m in recent
            if m.role == "assistant"
            for call in m.tool_calls
            if call.id not in answered
        ]

    async def _repair_interrupted(self) -> None:
        """Make the context valid for the next model call before a turn starts.

        Closes a turn left open by a crashed process (recorded as interrupted)
        and answers, with an error result, every tool call in the context that
        has none (a crash, a rewind to the middle of a turn, an imported log),
        so the model is never sent a tool call without its result.
        """
        open_turn = self.conversation.open_turn
        dangling = self.conversation.dangling_tool_calls()
        if open_turn is None and not dangling:
            return
        status = "interrupted" if open_turn is not None else "not answered"
        events: list[LogEvent] = [_unfinished_call(call, open_turn, status) for call in dangling]
        if open_turn is not None:
            events.append(
                TurnEndEntry(
                    turn_id=open_turn,
                    data=TurnEnd(status="interrupted", error="the process stopped during the turn"),
                )
            )
        await self._append(events)

    async def _maybe_offload(self, turn: _Turn, message: Message) -> Message:
        text = message.text
        if self.offload_threshold <= 0 or len(text) <= self.offload_threshold:
            return message
        blob_id = await self.store.put_blob(self.session_id, text.encode(), "text/plain")
        preview = text[: min(1000, self.offload_threshold // 2)]
        turn.pending.append(
            OffloadEntry(
                turn_id=turn.turn_id,
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
        return message.model_copy(update={"content": note})

    async def read_blob(self, blob_id: str) -> bytes:
        """The full bytes of an offloaded tool output (or any blob of this session)."""
        await self.open()
        return await self.store.get_blob(self.session_id, blob_id)

    # ------------------------------------------------------------------
    # compaction

    async def _maybe_compact(self, turn: _Turn) -> None:
        if not self.compaction_threshold:
            return
        info = await self.get_context_info()
        if info.utilisation < self.compaction_threshold:
            return
        await self.compact(turn_id=turn.turn_id)

    async def compact(self, *, keep_messages: int = 4, turn_id: str | None = None) -> bool:
        """Summarise older messages into one, in the model's context only.

        The summary is made by the agent's model and recorded as a
        ``compaction`` event with its usage (level ``compaction``). Nothing
        is deleted: the record keeps every message.

        Args:
            keep_messages: How many of the newest messages stay verbatim.

        Returns:
            False when there was too little to compact.
        """
        await self.open()
        context = self.conversation.context
        if len(context) <= keep_messages:
            return False
        cut = len(context) - keep_messages
        # never split a tool call from its results
        while cut > 0 and context[cut][1].role == "tool":
            cut -= 1
        if cut <= 0:
            return False
        older = [m for _, m in context[:cut]]
        upto_seq = context[cut - 1][0]
        summary, usage = await self.agent.summarize(older)
        events: list[LogEvent] = [
            CompactionEntry(
                turn_id=turn_id,
                data=Compaction(summary=summary, upto_seq=upto_seq, model=usage.model),
            ),
            UsageEntry(turn_id=turn_id, data=usage),
        ]
        await self._append(events)
        return True

    # ------------------------------------------------------------------
    # streaming input

    async def send(self, message: ChatMessage) -> None:
        """Queue a message for :meth:`events` (only without a ``message_source``).

        Raises:
            UsageError: The session was given a ``message_source``.
            ChatSessionClosedError: The session is closed.
        """
        self._check_open()
        if self._message_source is not None:
            raise UsageError(
                "this session reads messages from its message_source; send() is only for "
                "sessions created without one"
            )
        _user_message(message)  # validate now, not when the turn runs
        self._queue().put_nowait(message)

    def _queue(self) -> asyncio.Queue[Any]:
        if self._inbox is None:
            self._inbox = asyncio.Queue()
        return self._inbox

    async def _incoming(self) -> AsyncGenerator[ChatMessage, None]:
        # without a message_source, send() feeds the session's own queue
        source = self._message_source if self._message_source is not None else self._queue()
        if isinstance(source, asyncio.Queue):
            while True:
                item = await self._unless_closed(source.get())
                if item is None or item is _END:
                    return
                yield item
        elif hasattr(source, "__anext__"):
            iterator: Any = source
            while True:
                try:
                    item = await self._unless_closed(anext(iterator))
                except StopAsyncIteration:
                    return
                if item is _END:
                    return
                yield item
        else:
            blocking = iter(source)
            done = object()
            while True:
                # a blocking iterator must not block the event loop
                item = await self._unless_closed(asyncio.to_thread(next, blocking, done))
                if item is done or item is _END:
                    return
                yield item

    async def _unless_closed(self, step: Awaitable[Any]) -> Any:
        """Await ``step``, or return ``_END`` as soon as :meth:`close` is called."""
        if self._closed:
            if asyncio.iscoroutine(step):
                step.close()
            return _END
        if self._closing is None:
            self._closing = asyncio.Event()
        task = asyncio.ensure_future(step)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.done() and not task.cancelled():
            return task.result()  # a message that arrived with close() is still read
        return _END

    async def events(self) -> AsyncGenerator[AgentEvent, None]:
        """Run one turn per incoming message and yield all their events.

        Messages come from ``message_source`` or from :meth:`send`; the
        iteration ends when the source is exhausted or :meth:`close` is called.
        """
        self._check_open()
        async with contextlib.aclosing(self._incoming()) as incoming:
            async for message in incoming:
                if self._closed:
                    return
                try:
                    async with contextlib.aclosing(self.query_stream(message)) as turn:
                        async for event in turn:
                            yield event
                except ChatSessionClosedError:
                    if self._closed:  # close() during the turn ends the iteration
                        return
                    raise

    # ------------------------------------------------------------------
    # fork, checkpoints, rewind, clear

    async def _resolve_seq(self, at: int | str | None) -> int:
        """A seq from a seq, a checkpoint name or a turn id (None: the head)."""
        await self.open()
        head = self.conversation.head
        if at is None:
            return head
        if isinstance(at, bool):
            raise UsageError(f"not a seq, checkpoint or turn: {at!r}")
        if isinstance(at, int):
            if not 0 <= at <= head:
                raise UsageError(f"seq {at} is outside this session's events 0..{head}")
            return at
        checkpoint = self.conversation.checkpoints.get(at)
        if checkpoint is not None:
            return checkpoint[0]
        seq = await self._turn_end_seq(at)
        if seq is None:
            names = ", ".join(sorted(self.conversation.checkpoints)) or "none"
            raise UsageError(f"no checkpoint or turn named {at!r} (checkpoints: {names})")
        return seq

    async def _turn_end_seq(self, turn_id: str) -> int | None:
        ended = self.conversation.turn_ends.get(turn_id)
        if ended is not None:
            return ended
        if turn_id != self.conversation.open_turn:
            return None
        last = None  # the open turn: its last event so far
        async for batch in self.store.read(self.session_id):  # rare: a turn still open
            for row in batch:
                if row.turn_id == turn_id:
                    last = row.seq
        return last

    async def fork_session(
        self, at: int | str | None = None, *, session_id: str | None = None
    ) -> ChatSession:
        """A new, independent session sharing this one's history up to ``at``.

        O(1): the store records the fork point and copies nothing.

        Args:
            at: A seq, a checkpoint name or a turn id; None for now.
            session_id: The fork's id (default: a fresh one).

        Returns:
            The fork, with the same agent and store, ready to use.
        """
        self._check_open()
        seq = await self._resolve_seq(at)
        fork_id = session_id or uuid.uuid4().hex
        new = self._loaded_record().model_copy(
            update={"id": fork_id, "created_at": 0.0, "updated_at": 0.0}
        )
        await self.store.fork(self.session_id, seq, new)
        fork = type(self)(
            self.agent,
            fork_id,
            store=self.store,
            timeout=self.timeout,
            consistency=self.consistency,
            offload_threshold=self.offload_threshold,
            compaction_threshold=self.compaction_threshold,
            budget_tokens=self._budget_tokens,
            must_exist=True,
        )
        if self._owns_store:  # the fork shares the store: whichever closes last releases it
            fork._owns_store = True
            fork._store_users = self._store_users
            self._store_users[0] += 1
        await fork.open()
        return fork

    async def checkpoint(self, name: str, data: Any = None) -> int:
        """Mark the current point with a name; returns its seq.

        A later checkpoint with the same name moves the name.
        """
        if not isinstance(name, str) or not name.strip():
            raise UsageError("a checkpoint needs a non-empty name")
        check_json_value(name, "checkpoint name")
        check_json_value(data, "checkpoint data", max_depth=STATE_DEPTH)
        await self.open()
        await self._append([CheckpointEntry(data=Checkpoint(name=name, data=data))])
        return self.conversation.head

    async def rewind(self, to: int | str) -> int:
        """Return the context (and the agent state) to a seq, checkpoint or turn.

        The record keeps everything: the rewind is an event. Usage totals are
        not rewound (those tokens were spent).

        Returns:
            The seq rewound to.
        """
        seq = await self._resolve_seq(to)
        name = to if isinstance(to, str) else None
        await self._append([RewindEntry(data=Rewind(to_seq=seq, checkpoint=name))])
        self._reset_state()
        return seq

    async def clear_history(self, *, clear_state: bool = False) -> None:
        """Empty the model's context with a ``reset`` event; exports keep the past."""
        await self.open()
        await self._append([ResetEntry(data=Reset(clear_state=clear_state))])
        if clear_state:
            self._reset_state()

    async def save_state(self) -> None:
        """Persist changes to :attr:`state` made outside a turn."""
        await self.open()
        change = self._state_changes()
        if change is not None:
            await self._append([change])

    async def set_metadata(self, **values: Any) -> None:
        """Record session key-values (None deletes a key).

        Raises:
            UnsupportedValueError: A value cannot be stored exactly (nothing is written).
        """
        check_state(values, "metadata")
        await self.open()
        await self._append([MetadataEntry(data=Metadata(values=values))])

    async def _update_record(self, **changes: Any) -> None:
        for _ in range(5):
            current = await self.store.get(self.session_id)
            try:
                self.record = await self.store.update(
                    current.model_copy(update=changes), current.version
                )
                return
            except ConflictError:
                continue

    # ------------------------------------------------------------------
    # reading

    @property
    def messages(self) -> list[Message]:
        """The messages the model sees now (a copy)."""
        return list(self.conversation.messages)

    @property
    def history(self) -> list[Message]:
        """Every message ever recorded, including cleared and rewound ones."""
        return [m for _, m in self.conversation.history]

    async def get_usage(self) -> UsageSummary:
        """Token usage and cost; correct through resume, fork, clear and rewind."""
        await self._open_for_reading()
        c = self.conversation
        # usages are in log order: the inherited ones (a fork's) come first
        own_usages = c.usages[self._inherited.calls :]
        estimated_models = {u.model for u in own_usages if u.estimated}
        estimated_levels = {u.level for u in own_usages if u.estimated}

        def own(totals: UsageTotals, inherited: UsageTotals | None, estimated: bool) -> ModelUsage:
            mine = ModelUsage.of(totals).minus(ModelUsage.of(inherited or UsageTotals()))
            return dataclasses.replace(mine, estimated=estimated)

        own_by_model = {
            k: own(v, self._inherited_by_model.get(k), k in estimated_models)
            for k, v in c.usage_by_model.items()
        }
        own_by_level = {
            k: own(v, self._inherited_by_level.get(k), k in estimated_levels)
            for k, v in c.usage_by_level.items()
        }
        total = ModelUsage.of(c.usage)
        inherited = ModelUsage.of(self._inherited)
        own_total = own(c.usage, self._inherited, bool(estimated_models))
        return UsageSummary(
            total_prompt_tokens=own_total.prompt_tokens,
            total_completion_tokens=own_total.completion_tokens,
            total_tokens=own_total.total_tokens,
            total_cost=own_total.cost,
            calls=own_total.calls,
            estimated=own_total.estimated,
            by_model={k: v for k, v in own_by_model.items() if v.calls},
            by_level={k: v for k, v in own_by_level.items() if v.calls},
            inherited=inherited,
            including_inherited=total,
        )

    async def get_context_info(self) -> ContextInfo:
        """How many tokens the model's context holds, against the budget."""
        await self._open_for_reading()
        context = self.conversation.context
        messages = self.conversation.messages
        budget = self._budget_tokens or await self.agent.get_context_window()
        exact = await self.agent.acount_tokens(messages)
        method: Literal["provider", "tokenizer", "estimate"]
        if exact is not None:
            current, method = exact, "tokenizer"
        elif (
            self._last_usage is not None
            and not self._last_usage.estimated
            and context
            and self._last_usage_seq > context[0][0]
        ):
            newer = [m for s, m in context if s > self._last_usage_seq]
            current = (
                self._last_usage.prompt_tokens
                + self._last_usage.completion_tokens
                + estimate_tokens(newer)
            )
            method = "provider"
        else:
            current, method = estimate_tokens(messages), "estimate"
        return ContextInfo(
            current_tokens=current,
            budget_tokens=budget,
            conversation_items=messages,
            utilisation=current / budget if budget else 0.0,
            method=method,
            estimated=method != "tokenizer",
        )

    async def _open_for_reading(self) -> None:
        if not self._opened:
            await self.open()

    async def read_events(self) -> list[LogEvent]:
        """The whole log of this session (inherited events first, for a fork)."""
        await self._open_for_reading()
        out: list[LogEvent] = []
        async for batch in self.store.read(self.session_id):
            out.extend(decode(batch, self.session_id))
        return out

    # ------------------------------------------------------------------
    # export and import

    async def export(self, dest: str | Path | IO[str], format: ExportFormat = "json") -> None:
        """Write the whole session (every event, even cleared ones) to a file.

        The events are streamed from the store batch by batch: memory does not
        grow with the session's length.

        Args:
            dest: A path or a writable text file.
            format: ``json`` (a snapshot: history, agent config, tool schema
                hash, state, metadata), ``jsonl`` or ``markdown``.

        The snapshot holds the state as saved (changes since the last turn or
        :meth:`save_state` are not in it) and the fingerprint of the agent
        recorded on the session.

        Raises:
            UsageError: An unknown format.
        """
        await self._open_for_reading()
        record = await self.store.get(self.session_id)
        if record.head > self.conversation.head:
            await self._catch_up()  # another writer added events: the summary covers them
        head = self.conversation.head
        # the agent that wrote the session (its recorded fingerprint), and the
        # saved state: what an import rebuilds from the events
        agent = dict(record.fingerprint or self.agent.fingerprint())
        header = export_header(record, self.conversation, agent=agent)
        with opened_for_writing(dest) as out:
            writer = ExportWriter(out, format)
            writer.begin(header)
            async for batch in self.store.read(self.session_id, upto_seq=head, batch_size=500):
                writer.write(decode(batch, self.session_id))
            writer.end()

    @classmethod
    async def import_session(
        cls,
        source: str | Path | IO[str],
        agent: Agent,
        *,
        store: str | Store | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        **options: Any,
    ) -> Self:
        """Create a session from a JSON or JSONL export, in any store.

        All or nothing, and streamed (see :func:`chatsession.transfer.import_into_store`);
        the session is then opened, holding its history as any open session does.

        Args:
            source: A path or a readable text file made by :meth:`export`.
            agent: The agent for the imported session.
            store: Where to create it (default store when None).
            session_id: Its id (default: a fresh id, so nothing is overwritten).
            user_id: Its owner (default: the exported owner).

        Raises:
            CorruptDataError: The file is not a chatsession export, is damaged,
                or holds values no store could keep (it names the line).
            SessionExistsError: ``session_id`` is taken by a complete session.
        """
        new_id = validate_id(session_id) if session_id else uuid.uuid4().hex
        session = cls(agent, new_id, store=store, must_exist=True, **options)
        try:
            await import_into_store(source, session.store, session_id=new_id, user_id=user_id)
            await session.open()
        except BaseException:
            await session.close()
            raise
        return session

    # ------------------------------------------------------------------
    # closing

    async def close(self) -> None:
        """End :meth:`events`, and release the store if this session opened it.

        Usage and context information stay readable after closing.
        """
        if self._closed:
            return
        self._closed = True
        if self._closing is not None:  # ends events(), whatever feeds it
            self._closing.set()
        lock = self._turn_lock
        if lock is not None and lock.locked():
            # a turn is running: it records itself as cancelled, then releases the lock
            if self._turn_queue is not None:
                self._turn_queue.put_nowait(_CLOSING)
            if self._turn_task is asyncio.current_task() or self._turn_abandoned:
                self._close_store_after_turn = self._owns_store
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_WAIT):
                    await lock.acquire()
                    lock.release()
            if lock.locked():  # its consumer holds it but does not iterate it
                self._close_store_after_turn = self._owns_store
                return
        if self._owns_store:
            await self._release_store()

    async def _release_store(self) -> None:
        self._store_users[0] -= 1
        if self._store_users[0] == 0:
            await self.store.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
