"""What a log means: :class:`ConversationState`, :func:`fold`, and snapshots of it.

A state keeps what is needed to go on from where the log stands: the context
the model sees, the agent's state, usage totals, checkpoints, the open turn.
Its memory follows the context, not the history. A *full* state (what
:func:`fold` builds from a list of events) also keeps every message ever
recorded (``history``), so it can replay any earlier point for a rewind; a
*bounded* state (what ``ChatSession`` keeps) does not, and is handed the
earlier point by whoever folds a rewind into it.

A :class:`Snapshot` is the bounded state as stored data: everything but the
context's messages, which it names by where they lie in the log (segments of
seqs), so a resume reads the snapshot and the few rows it needs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from chatsession.errors import CorruptDataError
from chatsession.log.codec import decode_payloads
from chatsession.log.events import (
    Checkpoint,
    LogEvent,
    Message,
    Offload,
    Rewind,
    ToolCall,
    Usage,
)
from chatsession.store.base import StoredEvent

__all__ = [
    "SNAPSHOT_VERSION",
    "ConversationState",
    "PastResolver",
    "Snapshot",
    "UsageTotals",
    "fold",
    "fold_rows",
    "sum_totals",
]

#: The snapshot format this code writes and reads (others are rebuilt from the log).
SNAPSHOT_VERSION = 1

SUMMARY_PREFIX = "Summary of the earlier conversation:\n"


class UsageTotals(msgspec.Struct):
    """Summed token usage (of a session, a model, a level, or a fork's inherited part).

    Attributes:
        estimated_calls: How many of the calls were local estimates.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    calls: int = 0
    estimated_calls: int = 0

    @property
    def estimated(self) -> bool:
        """Whether any of the counted calls was a local estimate."""
        return self.estimated_calls > 0

    def add(self, usage: Usage) -> None:
        """Add one model call's usage."""
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.total_tokens += usage.total_tokens
        self.cost += usage.cost or 0.0
        self.calls += 1
        if usage.estimated:
            self.estimated_calls += 1

    def merge(self, other: UsageTotals) -> None:
        """Add another set of totals."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.cost += other.cost
        self.calls += other.calls
        self.estimated_calls += other.estimated_calls

    def minus(self, other: UsageTotals) -> UsageTotals:
        """These totals without ``other`` (a fork's own part of its totals)."""
        return UsageTotals(
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.total_tokens - other.total_tokens,
            self.cost - other.cost,
            self.calls - other.calls,
            self.estimated_calls - other.estimated_calls,
        )

    def copy(self) -> UsageTotals:
        """An independent copy."""
        return msgspec.structs.replace(self)


def sum_totals(groups: Iterable[UsageTotals]) -> UsageTotals:
    """The sum of several totals (a new object)."""
    total = UsageTotals()
    for group in groups:
        total.merge(group)
    return total


#: ``(seq) -> the state right after that seq`` (its context, agent state and
#: segments are used): how a bounded state learns the point a rewind returns to.
PastResolver = Callable[[int], "ConversationState"]


@dataclass
class ConversationState:
    """What a log means; built by :func:`fold` (full) or kept by a session (bounded).

    Attributes:
        head: The seq of the last event folded in.
        context: The messages the model sees now, as ``(seq, message)``; a
            compaction summary has the compaction's seq.
        history: Every message ever recorded, as ``(seq, message)`` (clear,
            rewind and compaction remove nothing from it); None in a bounded
            state, which does not keep it.
        message_count: How many messages were ever recorded.
        usage_groups: Usage totals per ``(model, level)``; ``usage``,
            ``usage_by_model`` and ``usage_by_level`` sum them.
        last_usage: ``(seq, usage)`` of the latest model call.
        checkpoints: Name → ``(seq, Checkpoint)``; a later checkpoint of the
            same name replaces the earlier one.
        state: The agent's key-values as of the current context.
        metadata: Session key-values.
        turns: How many turns ended, by status.
        steps: Model calls made by the turns that ended (their ``steps``).
        turn_seconds: Time those turns took, summed.
        open_turn: The id of a turn that started and has not ended (after a
            crash it reads as interrupted), else None.
        offloads: Blob id → :class:`Offload` (full states only).
        resets, rewinds, compactions: How many of each were folded in.
        segments: Where the context's messages lie in the log: each ``[lo,
            hi]`` stands for every message event with ``lo <= seq <= hi``.
        summary_seq: The seq of the compaction whose summary opens the
            context, if any.
    """

    head: int = 0
    context: list[tuple[int, Message]] = field(default_factory=list)
    history: list[tuple[int, Message]] | None = field(default_factory=list)
    message_count: int = 0
    usage_groups: dict[tuple[str, str], UsageTotals] = field(default_factory=dict)
    last_usage: tuple[int, Usage] | None = None
    checkpoints: dict[str, tuple[int, Checkpoint]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    turns: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    turn_seconds: float = 0.0
    open_turn: str | None = None
    offloads: dict[str, Offload] = field(default_factory=dict)
    resets: int = 0
    rewinds: int = 0
    compactions: int = 0
    segments: list[list[int]] = field(default_factory=list)
    summary_seq: int | None = None
    last_message_seq: int = 0
    # (seq, type, data) of every event besides messages that shapes context or
    # state, for replaying an earlier point (full states only)
    _timeline: list[tuple[int, str, Any]] = field(default_factory=list, repr=False)
    # tool calls in the context without a result yet
    _unanswered: dict[str, ToolCall] = field(default_factory=dict, repr=False)
    _messages: tuple[list[tuple[int, Message]], int, list[Message]] | None = field(
        default=None, repr=False, compare=False
    )
    # the context list is shared with a copy (copied on the first append to it)
    _shared_context: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def bounded(cls) -> ConversationState:
        """An empty state that keeps no history (see the module docstring)."""
        return cls(history=None)

    @property
    def is_bounded(self) -> bool:
        """True when the state keeps no history."""
        return self.history is None

    @property
    def messages(self) -> list[Message]:
        """The messages the model sees now (``context`` without seqs).

        Kept up to date incrementally while the context only grows, so reading
        it each turn costs nothing that grows with the history. Do not modify
        the returned list.
        """
        cached = self._messages
        context = self.context
        if cached is None or cached[0] is not context or cached[1] > len(context):
            cached = (context, 0, [])
        _, done, out = cached
        if done < len(context):
            out.extend(m for _, m in context[done:])
        self._messages = (context, len(context), out)
        return out

    @property
    def usage(self) -> UsageTotals:
        """Usage totals over every model call (a new object)."""
        return sum_totals(self.usage_groups.values())

    @property
    def usage_by_model(self) -> dict[str, UsageTotals]:
        """Usage totals per model (new objects)."""
        out: dict[str, UsageTotals] = {}
        for (model, _), group in self.usage_groups.items():
            out.setdefault(model, UsageTotals()).merge(group)
        return out

    @property
    def usage_by_level(self) -> dict[str, UsageTotals]:
        """Usage totals per agent level (new objects)."""
        out: dict[str, UsageTotals] = {}
        for (_, level), group in self.usage_groups.items():
            out.setdefault(level, UsageTotals()).merge(group)
        return out

    def copy(self) -> ConversationState:
        """An independent copy: containers and JSON values copied, frozen events shared.

        The context list is shared until either side appends to it (then that
        side copies it), so copying a bounded state takes time independent of
        its context. The history (of a full state) is copied.
        """
        self._shared_context = True
        return ConversationState(
            head=self.head,
            context=self.context,
            _shared_context=True,
            history=None if self.history is None else list(self.history),
            message_count=self.message_count,
            usage_groups={k: v.copy() for k, v in self.usage_groups.items()},
            last_usage=self.last_usage,
            checkpoints=dict(self.checkpoints),
            state=copy.deepcopy(self.state),
            metadata=copy.deepcopy(self.metadata),
            turns=dict(self.turns),
            steps=self.steps,
            turn_seconds=self.turn_seconds,
            open_turn=self.open_turn,
            offloads=dict(self.offloads),
            resets=self.resets,
            rewinds=self.rewinds,
            compactions=self.compactions,
            segments=[list(s) for s in self.segments],
            summary_seq=self.summary_seq,
            last_message_seq=self.last_message_seq,
            _timeline=list(self._timeline),
            _unanswered=dict(self._unanswered),
        )

    def dangling_tool_calls(self) -> list[ToolCall]:
        """Tool calls in the context that have no tool result after them.

        Kept up to date as events are folded in: the cost does not grow with
        the context.
        """
        return list(self._unanswered.values())

    def _recount_unanswered(self) -> None:
        """Rebuild the unanswered tool calls from the context (after it was replaced)."""
        unanswered: dict[str, ToolCall] = {}
        for _, message in self.context:
            _track_tool_calls(unanswered, message)
        self._unanswered = unanswered

    # -- folding ----------------------------------------------------------------

    def apply(self, event: LogEvent, past: PastResolver | None = None) -> None:
        """Fold one event in, in place (what :func:`fold` does for each event).

        Args:
            event: The event.
            past: For a bounded state and a ``rewind`` event: how to learn the
                point it returns to.
        """
        self._fold_items([(event.seq, event.type, event.turn_id, event.data)], past)

    def apply_stored(
        self, rows: Sequence[StoredEvent], payloads: Sequence[Any], past: PastResolver | None = None
    ) -> None:
        """Fold in stored rows whose payloads :func:`decode_payloads` decoded.

        The same as :meth:`apply` for each row, without building events.
        """
        self._fold_items(
            ((row[0], row[1], row[3], p) for row, p in zip(rows, payloads, strict=True)), past
        )

    def _fold_items(
        self,
        items: Iterable[tuple[int, str, str | None, Any]],
        past: PastResolver | None = None,
    ) -> None:
        """Fold in ``(seq, type, turn_id, payload)`` items, the commonest kinds inlined
        (a resume folds every event after its snapshot)."""
        history = self.history
        turns = self.turns
        groups = self.usage_groups
        head = self.head
        for seq, kind, turn_id, payload in items:
            if seq:
                head = seq
            if kind == "message":
                self._add_message(seq, payload, history)
            elif kind == "turn_start":
                self.open_turn = turn_id or f"seq-{seq}"
            elif kind == "turn_end":
                status = payload.status
                turns[status] = turns.get(status, 0) + 1
                self.open_turn = None
                self.steps += payload.steps or 0
                self.turn_seconds += payload.duration or 0.0
            elif kind == "usage":
                key = (payload.model, payload.level)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = UsageTotals()
                group.add(payload)
                self.last_usage = (seq, payload)
            else:
                self.head = head
                _APPLY[kind](self, seq, turn_id, payload, past)
        self.head = head

    def _add_message(
        self, seq: int, message: Message, history: list[tuple[int, Message]] | None
    ) -> None:
        item = (seq, message)
        if history is not None:
            history.append(item)
        if self._shared_context:  # copy on the first write
            self.context = list(self.context)
            self._shared_context = False
        self.context.append(item)
        self.message_count += 1
        segments = self.segments
        if segments and segments[-1][1] == self.last_message_seq:
            segments[-1][1] = seq
        else:
            segments.append([seq, seq])
        self.last_message_seq = seq
        if message.tool_calls or message.tool_call_id is not None:
            _track_tool_calls(self._unanswered, message)

    def replay(self, upto: int) -> ConversationState:
        """The context, agent state and segments as they were right after seq ``upto``.

        For full states: replays messages (from ``history``) and the other
        context-shaping events merged in seq order. Only those parts of the
        result are meaningful.

        Raises:
            CorruptDataError: The state is bounded (it keeps no history).
        """
        if self.history is None:
            raise CorruptDataError(
                "a bounded conversation state cannot replay an earlier point by itself"
            )
        past = ConversationState()
        controls = iter(self._timeline)
        control = next(controls, None)
        for seq, message in self.history:
            if seq > upto:
                break
            while control is not None and control[0] < seq:
                _APPLY[control[1]](past, control[0], None, control[2], None)
                control = next(controls, None)
            past._add_message(seq, message, past.history)
        while control is not None and control[0] <= upto:
            _APPLY[control[1]](past, control[0], None, control[2], None)
            control = next(controls, None)
        return past

    # -- snapshots -------------------------------------------------------------

    def snapshot(self, **extra: Any) -> bytes:
        """This state as a :class:`Snapshot`, encoded (the context named by segments).

        Args:
            **extra: Fields of :class:`Snapshot` the caller adds (``inherited``).
        """
        return _SNAPSHOT_ENCODER.encode(
            Snapshot(
                version=SNAPSHOT_VERSION,
                head=self.head,
                segments=[list(s) for s in self.segments],
                summary_seq=self.summary_seq,
                last_message_seq=self.last_message_seq,
                message_count=self.message_count,
                context_size=len(self.context),
                usage=[_Group(m, lv, t) for (m, lv), t in self.usage_groups.items()],
                last_usage=None if self.last_usage is None else list(self.last_usage),
                checkpoints=[[n, s, c] for n, (s, c) in self.checkpoints.items()],
                state=self.state,
                metadata=self.metadata,
                turns=self.turns,
                steps=self.steps,
                turn_seconds=self.turn_seconds,
                open_turn=self.open_turn,
                counts=[self.resets, self.rewinds, self.compactions],
                unanswered=list(self._unanswered.values()),
                **extra,
            )
        )


def _track_tool_calls(unanswered: dict[str, ToolCall], message: Message) -> None:
    if message.role == "assistant":
        for call in message.tool_calls:
            unanswered[call.id] = call
    elif message.role == "tool" and message.tool_call_id is not None:
        unanswered.pop(message.tool_call_id, None)


def _apply_reset(
    state: ConversationState, seq: int, turn_id: str | None, data: Any, past: PastResolver | None
) -> None:
    state.resets += 1
    state.context = []
    state.segments = []
    state.summary_seq = None
    state._unanswered = {}
    if data.clear_state:
        state.state = {}
    if state.history is not None:
        state._timeline.append((seq, "reset", data))


def _apply_rewind(
    state: ConversationState, seq: int, turn_id: str | None, data: Rewind, past: PastResolver | None
) -> None:
    state.rewinds += 1
    upto = min(data.to_seq, seq - 1)
    if state.history is not None:
        earlier = state.replay(upto)
        state._timeline.append((seq, "rewind", data))
    elif past is not None:
        earlier = past(upto)
    else:
        raise CorruptDataError(
            f"seq {seq}: a rewind to seq {upto} needs the earlier point, which a bounded "
            "state does not keep (fold it with a resolver)"
        )
    state.context = list(earlier.context)
    state.state = copy.deepcopy(earlier.state)
    # the segments of that point; last_message_seq stays where the log is, so
    # a new message never extends a segment over the messages rewound away
    state.segments = [list(seg) for seg in earlier.segments]
    state.summary_seq = earlier.summary_seq
    state._recount_unanswered()


def _apply_checkpoint(
    state: ConversationState, seq: int, turn_id: str | None, data: Any, past: PastResolver | None
) -> None:
    if data.deleted:
        state.checkpoints.pop(data.name, None)
    else:
        state.checkpoints[data.name] = (seq, data)


def _apply_lifecycle(
    state: ConversationState, seq: int, turn_id: str | None, data: Any, past: PastResolver | None
) -> None:
    """The session's lifecycle changes nothing the model sees (the record keeps the event)."""


def _apply_metadata(
    state: ConversationState, seq: int, turn_id: str | None, data: Any, past: PastResolver | None
) -> None:
    for key, value in data.values.items():
        if value is None:
            state.metadata.pop(key, None)
        else:
            state.metadata[key] = copy.deepcopy(value)


def _apply_state(
    state: ConversationState, seq: int, turn_id: str | None, data: Any, past: PastResolver | None
) -> None:
    for key, value in data.values.items():
        state.state[key] = copy.deepcopy(value)
    for key in data.removed:
        state.state.pop(key, None)
    if state.history is not None:
        state._timeline.append((seq, "state", data))


def _apply_offload(
    state: ConversationState, seq: int, turn_id: str | None, data: Any, past: PastResolver | None
) -> None:
    if state.history is not None:
        state.offloads[data.blob_id] = data


def _apply_compaction(
    state: ConversationState, seq: int, turn_id: str | None, data: Any, past: PastResolver | None
) -> None:
    state.compactions += 1
    summary = summary_message(data.summary)
    kept = [(s, m) for s, m in state.context if s > data.upto_seq]
    state.context = [(seq, summary), *kept]
    state.summary_seq = seq
    state.segments = [
        [max(lo, data.upto_seq + 1), hi] for lo, hi in state.segments if hi > data.upto_seq
    ]
    state._recount_unanswered()
    if state.history is not None:
        state._timeline.append((seq, "compaction", data))


def summary_message(summary: str) -> Message:
    """The message a compaction's summary stands as in the context."""
    return Message(role="user", content=SUMMARY_PREFIX + summary)


_APPLY: dict[
    str, Callable[[ConversationState, int, str | None, Any, PastResolver | None], None]
] = {
    "reset": _apply_reset,
    "rewind": _apply_rewind,
    "checkpoint": _apply_checkpoint,
    "metadata": _apply_metadata,
    "state": _apply_state,
    "offload": _apply_offload,
    "compaction": _apply_compaction,
    "lifecycle": _apply_lifecycle,
}


def fold(
    events: Iterable[LogEvent],
    initial: ConversationState | None = None,
    *,
    past: PastResolver | None = None,
) -> ConversationState:
    """Fold events into a conversation state. Pure: ``initial`` is not changed.

    Args:
        events: Events in seq order.
        initial: The state to continue from (``fold(b, fold(a)) == fold(a + b)``);
            a full state when None.
        past: For a bounded ``initial``: how to learn the point a rewind returns to.

    Returns:
        A new :class:`ConversationState`.
    """
    state = initial.copy() if initial is not None else ConversationState()
    state._fold_items(((e.seq, e.type, e.turn_id, e.data) for e in events), past)
    return state


def fold_rows(
    rows: Sequence[StoredEvent],
    initial: ConversationState | None = None,
    *,
    session_id: str = "?",
    past: PastResolver | None = None,
) -> ConversationState:
    """Fold stored rows (as a store's ``read`` yields them) into a conversation state.

    The same result as ``fold(decode(rows), initial)``, the way ``ChatSession``
    resumes: payloads are decoded one event type at a time and no event
    objects are built. Pure: ``initial`` is not changed.

    Raises:
        CorruptDataError: A row's type is unknown or its payload is invalid.
    """
    state = initial.copy() if initial is not None else ConversationState()
    state.apply_stored(rows, decode_payloads(rows, session_id), past)
    return state


# --------------------------------------------------------------------------
# snapshots


class _Group(msgspec.Struct, array_like=True):
    model: str
    level: str
    totals: UsageTotals


class Snapshot(msgspec.Struct, kw_only=True):
    """A bounded state as stored data (see :meth:`ConversationState.snapshot`).

    The context's messages are not in it: ``segments`` and ``summary_seq`` say
    where in the log they are, and ``context_size`` how many there are (a
    check when they are read back).
    """

    version: int
    head: int
    segments: list[list[int]]
    summary_seq: int | None
    last_message_seq: int
    message_count: int
    context_size: int
    usage: list[_Group]
    last_usage: list[Any] | None
    checkpoints: list[list[Any]]
    state: dict[str, Any]
    metadata: dict[str, Any]
    turns: dict[str, int]
    steps: int
    turn_seconds: float
    open_turn: str | None
    counts: list[int]
    unanswered: list[ToolCall]
    inherited: list[_Group] | None = None

    def restore(self, context: list[tuple[int, Message]]) -> ConversationState:
        """The bounded state this snapshot stands for, given its context's messages.

        Raises:
            CorruptDataError: The context does not match the snapshot.
        """
        if len(context) != self.context_size:
            raise CorruptDataError(
                f"snapshot at seq {self.head}: its context should hold {self.context_size} "
                f"messages, the log gives {len(context)}"
            )
        resets, rewinds, compactions = self.counts
        last_usage = None
        if self.last_usage is not None:
            seq, usage = self.last_usage
            last_usage = (int(seq), msgspec.convert(usage, Usage))
        return ConversationState(
            head=self.head,
            context=context,
            history=None,
            message_count=self.message_count,
            usage_groups={(g.model, g.level): g.totals for g in self.usage},
            last_usage=last_usage,
            checkpoints={
                name: (int(seq), msgspec.convert(cp, Checkpoint))
                for name, seq, cp in self.checkpoints
            },
            state=self.state,
            metadata=self.metadata,
            turns=self.turns,
            steps=self.steps,
            turn_seconds=self.turn_seconds,
            open_turn=self.open_turn,
            resets=resets,
            rewinds=rewinds,
            compactions=compactions,
            segments=[list(s) for s in self.segments],
            summary_seq=self.summary_seq,
            last_message_seq=self.last_message_seq,
            _unanswered={call.id: call for call in self.unanswered},
        )

    def inherited_usage(self) -> dict[tuple[str, str], UsageTotals] | None:
        """A fork's usage at its fork point, per ``(model, level)``, when the snapshot has it."""
        if self.inherited is None:
            return None
        return {(g.model, g.level): g.totals for g in self.inherited}


_SNAPSHOT_ENCODER = msgspec.json.Encoder()
_SNAPSHOT_DECODER = msgspec.json.Decoder(Snapshot)


def read_snapshot(data: bytes) -> Snapshot | None:
    """Decode a stored snapshot; None when it is damaged or of another format version.

    A snapshot is derived data: a bad one is rebuilt from the log, never trusted.
    """
    try:
        snap = _SNAPSHOT_DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    if snap.version != SNAPSHOT_VERSION or len(snap.counts) != 3:
        return None
    if any(len(s) != 2 or s[0] > s[1] for s in snap.segments):
        return None
    return snap


def group_snapshot(groups: dict[tuple[str, str], UsageTotals]) -> list[_Group]:
    """Usage groups as a snapshot stores them (for ``Snapshot.inherited``)."""
    return [_Group(m, lv, t.copy()) for (m, lv), t in groups.items()]
