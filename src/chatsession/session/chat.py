""":class:`ChatSession`: one durable conversation with an agent.

The class is thin: the log keeper (:mod:`.keeper`) holds the folded state in
step with the store, the turn (:mod:`.turn`) runs the agent and stores each
step before it is yielded, the lease holder (:mod:`.lease`) keeps one writer
at a time, the inbox (:mod:`.inbox`) feeds :meth:`ChatSession.events`, and
accounting (:mod:`.accounting`) answers for usage and the context.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import uuid
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Mapping
from pathlib import Path
from typing import IO, Any, Literal, Self

from chatsession.agent import Agent
from chatsession.agent.events import AgentEvent, ErrorEvent, StopEvent
from chatsession.errors import (
    ChatSessionClosedError,
    ConflictError,
    ConsistencyError,
    CorruptDataError,
    ModelError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    UnsupportedValueError,
    UsageError,
)
from chatsession.log import (
    Checkpoint,
    CheckpointEntry,
    Compaction,
    CompactionEntry,
    ConversationState,
    LogEvent,
    Message,
    Metadata,
    MetadataEntry,
    Reset,
    ResetEntry,
    Rewind,
    RewindEntry,
    StateChange,
    StateEntry,
    UsageEntry,
    decode,
)
from chatsession.session.accounting import ContextInfo, UsageSummary, context_info, usage_summary
from chatsession.session.inbox import ChatMessage, Inbox, MessageSource
from chatsession.session.keeper import EventRedactor, LogKeeper, bounded
from chatsession.session.lease import LeaseHolder
from chatsession.session.turn import TurnStream, user_message
from chatsession.settings import get_settings
from chatsession.store import Lease, Store, open_store
from chatsession.store.base import SessionRecord, SessionState, check_json_value, validate_id
from chatsession.transfer import (
    IMPORTING,
    ExportFormat,
    ExportWriter,
    export_header,
    import_into_store,
    opened_for_writing,
)
from chatsession.values import STATE_DEPTH, AgentState, check_state

__all__ = ["ChatSession", "Consistency"]

Consistency = Literal["warn", "strict", "ignore"]

_logger = logging.getLogger("chatsession.session")

#: Seconds ``close()`` waits for a running turn to record itself.
_CLOSE_WAIT = 10.0
#: Seconds a second turn of the same session object waits at least (the first
#: one's stream may be a few loop iterations from being closed).
_TURN_GRACE = 0.5


def _json_key(value: Any) -> str:
    """A value as JSON, to compare state values by type as well as by value."""
    return json.dumps(value, sort_keys=True)


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
        timeout: Seconds a turn may take (None: ``CHATSESSION_TIMEOUT``, else no limit).
        consistency: On resume, how to treat an agent that differs from the
            one that wrote the session: ``warn`` (default), ``strict`` (raise
            :class:`ConsistencyError`) or ``ignore``.
        offload_threshold: Tool outputs longer than this many characters are
            kept as blobs; the context gets a preview and a reference.
        compaction_threshold: When the context passes this fraction of the
            budget, older turns are summarised (0 or None: never).
        budget_tokens: The context budget; default: the model's window.
        busy_timeout: Seconds to wait while another writer (another process,
            window or object) holds the session; 0 fails at once with
            :class:`SessionBusyError`. Default ``CHATSESSION_BUSY_TIMEOUT`` (10).
        lease_ttl: Seconds the session's lease lasts unrenewed: how long a
            crashed writer keeps the session. Default ``CHATSESSION_LEASE_TTL`` (30).
        lease_linger: Seconds the lease is kept after a write, so turns in
            quick succession take it once (other writers wait that long more).
            Default ``CHATSESSION_LEASE_LINGER`` (0).
        snapshot_every: Store a snapshot of the folded state every this many
            events (resume reads it and the events after it). Default
            ``CHATSESSION_SNAPSHOT_EVERY`` (1000).
        must_exist: Raise :class:`SessionNotFoundError` instead of creating
            the session (what :meth:`resume` does).
        redact: Rewrites every event before it is stored, e.g. a
            :class:`chatsession.privacy.Redactor` (the session then holds,
            and the model then sees, the rewritten text too).
        on_turn: Awaited once each turn has started (its user message is
            stored), with the session; an exception it raises is logged, not
            raised. :class:`~chatsession.manager.SessionManager` uses it to
            slide the session's expiry.
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
        busy_timeout: float | None = None,
        lease_ttl: float | None = None,
        lease_linger: float | None = None,
        snapshot_every: int | None = None,
        must_exist: bool = False,
        redact: EventRedactor | None = None,
        on_turn: Callable[[ChatSession], Awaitable[None]] | None = None,
    ) -> None:
        if consistency not in ("warn", "strict", "ignore"):
            raise UsageError(
                f"consistency must be 'warn', 'strict' or 'ignore', not {consistency!r}"
            )
        settings = get_settings()
        timeout = settings.timeout if timeout is None else timeout
        if timeout is not None and not timeout > 0:
            raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
        busy_timeout = settings.busy_timeout if busy_timeout is None else busy_timeout
        lease_ttl = settings.lease_ttl if lease_ttl is None else lease_ttl
        lease_linger = settings.lease_linger if lease_linger is None else lease_linger
        snapshot_every = settings.snapshot_every if snapshot_every is None else snapshot_every
        for name, value in (("busy_timeout", busy_timeout), ("lease_linger", lease_linger)):
            if not 0 <= value <= 86400:
                raise UsageError(f"{name} must be 0 to 86400 seconds, not {value!r}")
        if not 0 < lease_ttl <= 86400:
            raise UsageError(f"lease_ttl must be above 0 and at most 86400, not {lease_ttl!r}")
        if (
            isinstance(snapshot_every, bool)
            or not isinstance(snapshot_every, int)
            or snapshot_every < 0
        ):
            raise UsageError(f"snapshot_every must be an int >= 0, not {snapshot_every!r}")
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
        self.busy_timeout = busy_timeout
        self._budget_tokens = budget_tokens
        self._must_exist = must_exist
        self._keeper = LogKeeper(
            self.store, self.session_id, snapshot_every=snapshot_every, redact=redact
        )
        self._on_turn = on_turn
        self._lease = LeaseHolder(
            self.store,
            self.session_id,
            ttl=lease_ttl,
            busy_timeout=busy_timeout,
            linger=lease_linger,
        )
        self._inbox = Inbox(message_source)
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._turn_lock: asyncio.Lock | None = None
        self._turn: TurnStream | None = None
        self._close_after_turn = False
        self._closing_task: asyncio.Task[None] | None = None
        self._closed = False
        self.record: SessionRecord | None = None
        self._saved_state: dict[str, Any] = {}
        self._state = AgentState()
        self.consistency_warnings: list[str] = []
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

        Loading reads the session's latest snapshot and the events after it
        (or, without a usable snapshot, the whole log).

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
        await self._keeper.load(record)
        self._reset_state()
        self._check_fingerprint(record)

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
            stacklevel=4,
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
    # the folded state and the agent's own state

    @property
    def conversation(self) -> ConversationState:
        """The folded state of the log (bounded: the context, not the whole history)."""
        return self._keeper.state

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

    def _state_change(self, turn_id: str) -> StateEntry | None:
        """The state change a turn saves with its end (an unstorable one is undone)."""
        try:
            change = self._state_changes()
        except UnsupportedValueError as exc:
            # changed in place outside a tool (tools are checked as they return):
            # keep the turn, undo the change
            _logger.warning(
                "session %r: %s; the state is back to its last saved value", self.session_id, exc
            )
            self._state.restore(self._saved_state)
            return None
        if change is None:
            return None
        return StateEntry(turn_id=turn_id, data=change.data)

    async def _sync_fingerprint(self) -> None:
        """Record the agent's fingerprint on the session once, after its first turn."""
        if self._fingerprint_synced:
            return
        fingerprint = self.agent.fingerprint()
        if self.record is not None and self.record.fingerprint != fingerprint:
            await self._update_record(fingerprint=fingerprint)
        self._fingerprint_synced = True

    # ------------------------------------------------------------------
    # writing outside a turn

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[Lease]:
        """Hold the session's lease for a write (waiting up to ``busy_timeout``)."""
        await self.open()
        lease = await self._lease.acquire()
        try:
            yield lease
        finally:
            await self._lease.done()

    # ------------------------------------------------------------------
    # turns

    async def _take_turn(self, turn: TurnStream) -> None:
        """Let one turn of this object run at a time (another waits, then is busy)."""
        self._check_open()
        if self._turn_lock is None:
            self._turn_lock = asyncio.Lock()
        try:
            async with asyncio.timeout(max(self.busy_timeout, _TURN_GRACE)):
                await self._turn_lock.acquire()
        except TimeoutError:
            raise SessionBusyError(self.session_id, "another turn of this ChatSession") from None
        if self._closed:
            self._turn_lock.release()
            self._check_open()
        self._turn = turn

    def _give_turn(self, turn: TurnStream) -> None:
        if self._turn is turn:
            self._turn = None
            if self._turn_lock is not None and self._turn_lock.locked():
                self._turn_lock.release()
            if self._closed and self._close_after_turn:
                self._close_after_turn = False
                task = asyncio.get_running_loop().create_task(self._finish_close())
                self._closing_task = task  # kept referenced until it is done

    def stream(self, message: ChatMessage, *, timeout: float | None = None) -> TurnStream:
        """One turn, streamed: ``async with session.stream(message) as events:``.

        Entering takes the session (waiting up to ``busy_timeout`` for another
        writer) and stores the user's message; iterating yields
        :class:`TextEvent` deltas, :class:`AssistantMessageEvent`,
        :class:`ToolCallEvent`, :class:`ToolResultEvent`, :class:`UsageEvent`,
        :class:`ErrorEvent` and finally :class:`StopEvent`, each step stored
        before its event; leaving ends the turn, recorded as ``interrupted``
        when the events were not read to the end.

        Args:
            message: The user's message.
            timeout: Seconds for this turn (default: the session's ``timeout``).

        Raises:
            SessionTimeoutError: The turn ran past its timeout (kept as ``timeout``).
            SessionBusyError: Another writer held the session past ``busy_timeout``.
            LeaseLostError: The session's lease was lost mid-turn (the process
                was paused past ``lease_ttl`` and another writer took over).
            ChatSessionClosedError: The session is (or was) closed.
            UnsupportedValueError: The message cannot be stored.
        """
        self._check_open()
        return TurnStream(self, message, self.timeout if timeout is None else timeout)

    async def query_stream(
        self, message: ChatMessage, *, timeout: float | None = None
    ) -> AsyncGenerator[AgentEvent, None]:
        """Run one turn and yield its events as they happen (see :meth:`stream`)."""
        async with self.stream(message, timeout=timeout) as events:
            async for event in events:
                yield event

    async def query(self, message: ChatMessage, *, timeout: float | None = None) -> str:
        """Run one turn and return the final text (see :meth:`stream`).

        Raises:
            ModelError: The model call failed (the turn is recorded as ``error``
                with what was produced; the session can continue).
            SessionTimeoutError: The turn ran past its timeout.
            SessionBusyError: Another writer held the session past ``busy_timeout``.
        """
        text = ""
        failure: BaseException | None = None
        async with self.stream(message, timeout=timeout) as events:
            async for event in events:
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

    # ------------------------------------------------------------------
    # compaction

    async def _maybe_compact(self, turn_id: str, lease: Lease) -> None:
        if not self.compaction_threshold:
            return
        info = await self.get_context_info()
        if info.utilisation < self.compaction_threshold:
            return
        await self._compact(4, turn_id, lease)

    async def compact(self, *, keep_messages: int = 4) -> bool:
        """Summarise older messages into one, in the model's context only.

        The summary is made by the agent's model and recorded as a
        ``compaction`` event with its usage (level ``compaction``). Nothing
        is deleted: the record keeps every message.

        Args:
            keep_messages: How many of the newest messages stay verbatim.

        Returns:
            False when there was too little to compact.
        """
        async with self._writing() as lease:
            return await self._compact(keep_messages, None, lease)

    async def _compact(self, keep_messages: int, turn_id: str | None, lease: Lease) -> bool:
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
        await self._keeper.append(events, lease)
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
        if self._inbox.source is not None:
            raise UsageError(
                "this session reads messages from its message_source; send() is only for "
                "sessions created without one"
            )
        user_message(message)  # validate now, not when the turn runs
        self._inbox.put(message)

    async def events(self) -> AsyncGenerator[AgentEvent, None]:
        """Run one turn per incoming message and yield all their events.

        Messages come from ``message_source`` or from :meth:`send`; the
        iteration ends when the source is exhausted or :meth:`close` is called.
        """
        self._check_open()
        async with contextlib.aclosing(self._inbox.messages()) as incoming:
            async for message in incoming:
                if self._closed:
                    return
                try:
                    async with self.stream(message) as turn:
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
        seq = await self._keeper.turn_seq(at) if isinstance(at, str) else None
        if seq is None:
            names = ", ".join(sorted(self.conversation.checkpoints)) or "none"
            raise UsageError(f"no checkpoint or turn named {at!r} (checkpoints: {names})")
        return seq

    async def fork_session(
        self, at: int | str | None = None, *, session_id: str | None = None
    ) -> ChatSession:
        """A new, independent session sharing this one's history up to ``at``.

        O(1) at the head: the store records the fork point and copies nothing,
        and the fork starts from this session's folded state (a snapshot is
        stored for it) without reading the shared history. A fork at an
        earlier point reads the log up to there once.

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
            update={
                "id": fork_id,
                "created_at": 0.0,
                "updated_at": 0.0,
                "state": SessionState.ACTIVE,  # a fork of an archived session is writable
            }
        )
        if seq == self.conversation.head:
            fork_state = self.conversation.copy()
        else:
            fork_state = bounded(await self._keeper.state_at(seq))
        record = await self.store.fork(self.session_id, seq, new)
        fork = type(self)(
            self.agent,
            fork_id,
            store=self.store,
            timeout=self.timeout,
            consistency=self.consistency,
            offload_threshold=self.offload_threshold,
            compaction_threshold=self.compaction_threshold,
            budget_tokens=self._budget_tokens,
            busy_timeout=self.busy_timeout,
            lease_ttl=self._lease.ttl,
            lease_linger=self._lease.linger,
            snapshot_every=self._keeper.snapshot_every,
            must_exist=True,
            redact=self._keeper.redact,
            on_turn=self._on_turn,
        )
        if self._owns_store:  # the fork shares the store: whichever closes last releases it
            fork._owns_store = True
            fork._store_users = self._store_users
            self._store_users[0] += 1
        fork.record = record
        fork._keeper.adopt(fork_state, {k: v.copy() for k, v in fork_state.usage_groups.items()})
        fork._keeper.snapshot_seq = 0
        if seq:
            await fork._keeper.write_snapshot()
        fork._reset_state()
        fork._opened = True
        return fork

    async def checkpoint(self, name: str, data: Any = None) -> int:
        """Mark the current point with a name; returns its seq.

        A later checkpoint with the same name moves the name.

        Raises:
            UnsupportedValueError: ``data`` cannot be stored exactly.
        """
        if not isinstance(name, str) or not name.strip():
            raise UsageError("a checkpoint needs a non-empty name")
        check_json_value(name, "checkpoint name")
        check_json_value(data, "checkpoint data", max_depth=STATE_DEPTH)
        async with self._writing() as lease:
            await self._keeper.append(
                [CheckpointEntry(data=Checkpoint(name=name, data=data))], lease
            )
        return self.conversation.head

    async def rewind(self, to: int | str) -> int:
        """Return the context (and the agent state) to a seq, checkpoint or turn.

        The record keeps everything: the rewind is an event. Usage totals are
        not rewound (those tokens were spent). Reads the log up to that point.

        Returns:
            The seq rewound to.
        """
        seq = await self._resolve_seq(to)
        name = to if isinstance(to, str) else None
        async with self._writing() as lease:
            past = await self._keeper.state_at(seq)
            await self._keeper.append(
                [RewindEntry(data=Rewind(to_seq=seq, checkpoint=name))], lease, past=past
            )
        self._reset_state()
        return seq

    async def clear_history(self, *, clear_state: bool = False) -> None:
        """Empty the model's context with a ``reset`` event; exports keep the past."""
        async with self._writing() as lease:
            await self._keeper.append([ResetEntry(data=Reset(clear_state=clear_state))], lease)
        if clear_state:
            self._reset_state()

    async def save_state(self) -> None:
        """Persist changes to :attr:`state` made outside a turn.

        Raises:
            UnsupportedValueError: A value cannot be stored exactly (nothing is written).
        """
        await self.open()
        check_state(self._state)
        async with self._writing() as lease:
            change = self._state_changes()
            if change is not None:
                await self._keeper.append([change], lease)

    async def set_metadata(self, **values: Any) -> None:
        """Record session key-values (None deletes a key).

        Raises:
            UnsupportedValueError: A value cannot be stored exactly (nothing is written).
        """
        check_state(values, "metadata")
        async with self._writing() as lease:
            await self._keeper.append([MetadataEntry(data=Metadata(values=values))], lease)

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
    def message_count(self) -> int:
        """How many messages were ever recorded (cleared and rewound ones included)."""
        return self.conversation.message_count

    async def read_history(self) -> list[Message]:
        """Every message ever recorded, cleared and rewound ones included (reads the log)."""
        await self.open()
        return await self._keeper.read_history()

    async def get_usage(self) -> UsageSummary:
        """Token usage and cost; correct through resume, fork, clear and rewind."""
        await self.open_for_reading()
        return usage_summary(self.conversation, self._keeper.inherited)

    async def get_context_info(self) -> ContextInfo:
        """How many tokens the model's context holds, against the budget."""
        await self.open_for_reading()
        return await context_info(self.conversation, self.agent, self._budget_tokens)

    async def open_for_reading(self) -> None:
        """Open the session unless it is open (reading still works after :meth:`close`)."""
        if not self._opened:
            await self.open()

    async def read_events(self) -> list[LogEvent]:
        """The whole log of this session (inherited events first, for a fork)."""
        await self.open_for_reading()
        return await self._keeper.read_events()

    async def read_blob(self, blob_id: str) -> bytes:
        """The full bytes of an offloaded tool output (or any blob of this session)."""
        await self.open()
        return await self.store.get_blob(self.session_id, blob_id)

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
        await self.open_for_reading()
        record = await self.store.get(self.session_id)
        if record.head > self.conversation.head:
            await self._keeper.catch_up()  # another writer added events: the summary covers them
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
        the session is then opened.

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
        """End :meth:`events`, stop a running turn (recorded ``cancelled``), give up
        the session's lease, store a snapshot, and release the store if this
        session opened it. Usage and context information stay readable.
        """
        if self._closed:
            return
        self._closed = True
        self._inbox.close()
        lock = self._turn_lock
        turn = self._turn
        if turn is not None and lock is not None and lock.locked():
            # a turn is running: it records itself as cancelled, then releases the lock
            turn.close_requested()
            if getattr(turn, "_task", None) is asyncio.current_task():
                self._close_after_turn = True
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_WAIT):
                    await lock.acquire()
                    lock.release()
            if lock.locked():  # its consumer holds it but does not iterate it
                self._close_after_turn = True
                return
        await self._finish_close()

    async def _finish_close(self) -> None:
        """Store a snapshot, give up the lease, release the store if ours."""
        with contextlib.suppress(Exception):
            if self._opened and self._keeper.snapshot_every:
                await self._keeper.write_snapshot()
        await self._lease.release()
        if self._owns_store:
            self._store_users[0] -= 1
            if self._store_users[0] == 0:
                await self.store.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
