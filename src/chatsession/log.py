"""The event log: event types, their stored form, and ``fold``.

A conversation is an append-only sequence of events numbered ``1..n``. Each
event is ``{seq, type, ts, turn_id, data}``; ``data`` depends on ``type``:

===============  ==============================================================
type             data
===============  ==============================================================
``message``      :class:`Message`: a user, assistant, system or tool message
``usage``        :class:`Usage`: tokens (and cost) of one model call
``turn_start``   :class:`TurnStart`: a turn began
``turn_end``     :class:`TurnEnd`: completed, interrupted, timeout, error, cancelled
``reset``        :class:`Reset`: clear history (the model's context empties)
``rewind``       :class:`Rewind`: the context returns to an earlier seq
``checkpoint``   :class:`Checkpoint`: a named point with optional data
``metadata``     :class:`Metadata`: key-values about the session (None deletes)
``state``        :class:`StateChange`: the agent's key-values (set or removed)
``offload``      :class:`Offload`: a large tool output kept as a blob
``compaction``   :class:`Compaction`: a summary replacing older turns in context
===============  ==============================================================

:func:`fold` turns events into a :class:`ConversationState`. It is pure and
incremental: ``fold(b, fold(a)) == fold(a + b)``. Clear, rewind and
compaction change what the model sees (``state.context``), never the record
(``state.history``).

Stored events carry a ``schema_version``; :func:`decode` upgrades older
versions in one place (:func:`upgrade_payload`) when they are read.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from chatsession.errors import CorruptDataError, UnsupportedValueError
from chatsession.store.base import EVENT_SCHEMA_VERSION, NewEvent, StoredEvent, now

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "Checkpoint",
    "CheckpointEntry",
    "Compaction",
    "CompactionEntry",
    "ConversationState",
    "EventType",
    "ImagePart",
    "LogEvent",
    "Message",
    "MessageEntry",
    "Metadata",
    "MetadataEntry",
    "Offload",
    "OffloadEntry",
    "Reset",
    "ResetEntry",
    "Rewind",
    "RewindEntry",
    "Role",
    "StateChange",
    "StateEntry",
    "TextPart",
    "ToolCall",
    "TurnEnd",
    "TurnEndEntry",
    "TurnStart",
    "TurnStartEntry",
    "TurnStatus",
    "Usage",
    "UsageEntry",
    "UsageTotals",
    "decode",
    "decode_payloads",
    "encode",
    "fold",
    "fold_rows",
    "upgrade_payload",
]

EventType = Literal[
    "message",
    "usage",
    "turn_start",
    "turn_end",
    "reset",
    "rewind",
    "checkpoint",
    "metadata",
    "state",
    "offload",
    "compaction",
]
Role = Literal["system", "user", "assistant", "tool"]
TurnStatus = Literal["completed", "interrupted", "timeout", "error", "cancelled"]

# a non-finite float is written as NaN/Infinity, which is not JSON, so the store
# refuses the event (instead of pydantic's default: null, a silent change)
_FROZEN = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

# --------------------------------------------------------------------------
# payloads


class TextPart(BaseModel):
    """A piece of text in a message."""

    model_config = _FROZEN
    type: Literal["text"] = "text"
    text: str


class ImagePart(BaseModel):
    """An image in a message: a URL (``https:`` or ``data:``) or a stored blob."""

    model_config = _FROZEN
    type: Literal["image"] = "image"
    url: str | None = None
    blob_id: str | None = None
    media_type: str | None = None


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ToolCall(BaseModel):
    """A tool call requested by the assistant.

    ``arguments`` is the JSON text the model produced, kept as is (it may be
    invalid JSON; :meth:`parsed_arguments` says so).
    """

    model_config = _FROZEN
    id: str
    name: str
    arguments: str = "{}"

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a dict.

        Raises:
            ValueError: The model produced arguments that are not a JSON object.
        """
        value = json.loads(self.arguments or "{}")
        if not isinstance(value, dict):
            raise ValueError(f"arguments of tool call {self.id!r} are not a JSON object")
        return value


class Message(BaseModel):
    """One message of the conversation.

    Attributes:
        role: ``system``, ``user``, ``assistant`` or ``tool``.
        content: Text, or a list of text and image parts.
        tool_calls: For an assistant message, the tools it asked to call.
        tool_call_id: For a tool message, the call it answers.
        name: For a tool message, the tool's name.
        is_error: For a tool message, whether the tool failed.
        partial: For an assistant message, whether it was cut short
            (interrupted, timeout, error) before the model finished.
        truncated: For an assistant message, whether the model stopped at
            its output limit (``finish_reason="length"``): complete as sent,
            but not the whole answer.
    """

    model_config = _FROZEN
    role: Role
    content: str | list[ContentPart] = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool = False
    partial: bool = False
    truncated: bool = False

    @property
    def text(self) -> str:
        """The message's text, with image parts left out."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


class Usage(BaseModel):
    """Tokens used by one model call.

    Attributes:
        model: The model that answered.
        level: The agent's level tag (``main``, ``subagent``, ``compaction``, ...).
        cost: Cost in US dollars, when the price is known.
        estimated: True when the counts are a local estimate, not the provider's.
    """

    model_config = _FROZEN
    model: str = "unknown"
    level: str = "main"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float | None = None
    estimated: bool = False


class TurnStart(BaseModel):
    """A turn began (the user's message follows in the same turn)."""

    model_config = _FROZEN
    source: str | None = None


class TurnEnd(BaseModel):
    """A turn ended, with how."""

    model_config = _FROZEN
    status: TurnStatus = "completed"
    error: str | None = None
    duration: float | None = None
    steps: int | None = None


class Reset(BaseModel):
    """Clear history: the model's context becomes empty; the record keeps all."""

    model_config = _FROZEN
    reason: str | None = None
    clear_state: bool = False


class Rewind(BaseModel):
    """Return the context (and the agent's state) to how it was right after ``to_seq``."""

    model_config = _FROZEN
    to_seq: int = Field(ge=0)
    checkpoint: str | None = None


class Checkpoint(BaseModel):
    """A named point in the conversation; it marks the seq of its own event."""

    model_config = _FROZEN
    name: str
    data: Any = None


class Metadata(BaseModel):
    """Key-values about the session, merged in; a None value deletes the key."""

    model_config = _FROZEN
    values: dict[str, Any]


class StateChange(BaseModel):
    """The agent's own key-values (todo lists, caches): ``values`` are set
    (None included), then the keys in ``removed`` are deleted."""

    model_config = _FROZEN
    values: dict[str, Any] = Field(default_factory=dict)
    removed: tuple[str, ...] = ()


class Offload(BaseModel):
    """A large tool output stored as a blob; the context keeps ``preview``."""

    model_config = _FROZEN
    blob_id: str
    size: int
    media_type: str = "text/plain"
    preview: str = ""
    tool_call_id: str | None = None


class Compaction(BaseModel):
    """A summary that replaces, in the model's context only, the messages up to ``upto_seq``."""

    model_config = _FROZEN
    summary: str
    upto_seq: int = Field(ge=0)
    model: str | None = None


# --------------------------------------------------------------------------
# events


class _EventBase(BaseModel):
    # the stored form carries "v" (the schema version), already handled by decode()
    model_config = ConfigDict(frozen=True, extra="ignore")
    seq: int = 0
    ts: float = 0.0
    turn_id: str | None = None


class MessageEntry(_EventBase):
    """A ``message`` event in the log."""

    type: Literal["message"] = "message"
    data: Message


class UsageEntry(_EventBase):
    """A ``usage`` event."""

    type: Literal["usage"] = "usage"
    data: Usage


class TurnStartEntry(_EventBase):
    """A ``turn_start`` event."""

    type: Literal["turn_start"] = "turn_start"
    data: TurnStart = TurnStart()


class TurnEndEntry(_EventBase):
    """A ``turn_end`` event."""

    type: Literal["turn_end"] = "turn_end"
    data: TurnEnd = TurnEnd()


class ResetEntry(_EventBase):
    """A ``reset`` event."""

    type: Literal["reset"] = "reset"
    data: Reset = Reset()


class RewindEntry(_EventBase):
    """A ``rewind`` event."""

    type: Literal["rewind"] = "rewind"
    data: Rewind


class CheckpointEntry(_EventBase):
    """A ``checkpoint`` event."""

    type: Literal["checkpoint"] = "checkpoint"
    data: Checkpoint


class MetadataEntry(_EventBase):
    """A ``metadata`` event."""

    type: Literal["metadata"] = "metadata"
    data: Metadata


class StateEntry(_EventBase):
    """A ``state`` event."""

    type: Literal["state"] = "state"
    data: StateChange


class OffloadEntry(_EventBase):
    """An ``offload`` event."""

    type: Literal["offload"] = "offload"
    data: Offload


class CompactionEntry(_EventBase):
    """A ``compaction`` event."""

    type: Literal["compaction"] = "compaction"
    data: Compaction


LogEvent: TypeAlias = Annotated[
    MessageEntry
    | UsageEntry
    | TurnStartEntry
    | TurnEndEntry
    | ResetEntry
    | RewindEntry
    | CheckpointEntry
    | MetadataEntry
    | StateEntry
    | OffloadEntry
    | CompactionEntry,
    Field(discriminator="type"),
]
"""Any event; ``event.type`` tells which."""

#: event type -> its entry class
_ENTRIES: dict[str, type[_EventBase]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        MessageEntry,
        UsageEntry,
        TurnStartEntry,
        TurnEndEntry,
        ResetEntry,
        RewindEntry,
        CheckpointEntry,
        MetadataEntry,
        StateEntry,
        OffloadEntry,
        CompactionEntry,
    )
}
_KNOWN_TYPES = frozenset(EventType.__args__)  # type: ignore[attr-defined]

# --------------------------------------------------------------------------
# stored form and upgrades


def encode(event: LogEvent) -> NewEvent:
    """The stored form of an event (its seq is given by the store on append).

    Default-valued fields are left out of the JSON to keep the log small.

    Raises:
        UnsupportedValueError: The payload holds a value JSON cannot carry
            (the store refuses non-finite numbers and lone surrogates too).
    """
    try:
        data = event.data.model_dump_json(exclude_defaults=True)
    except (PydanticSerializationError, ValueError, TypeError, RecursionError) as exc:
        raise UnsupportedValueError(
            f"a {event.type} event cannot be stored: its data is not JSON ({exc})"
        ) from None
    return NewEvent(
        type=event.type,
        data=data,
        ts=event.ts or now(),
        turn_id=event.turn_id,
        schema_version=EVENT_SCHEMA_VERSION,
    )


def _upgrade_v0(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    # 0.0 pre-releases wrote message text as "text" (not "content"), usage as
    # input/output tokens, and turn ends as {"ok": bool}.
    data = dict(data)
    if event_type == "message" and "text" in data and "content" not in data:
        data["content"] = data.pop("text")
    elif event_type == "usage":
        if "input_tokens" in data:
            data["prompt_tokens"] = data.pop("input_tokens")
        if "output_tokens" in data:
            data["completion_tokens"] = data.pop("output_tokens")
        data.setdefault(
            "total_tokens", data.get("prompt_tokens", 0) + data.get("completion_tokens", 0)
        )
    elif event_type == "turn_end" and "ok" in data:
        data["status"] = "completed" if data.pop("ok") else "error"
    return data


def _upgrade_v1(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    # version 1 wrote a removed state key as a None value, so a key set to None
    # could not be kept; version 2 lists removed keys in "removed"
    if event_type != "state":
        return data
    values = data.get("values", {})
    if not isinstance(values, dict):
        return data  # invalid either way: validation reports it
    return {
        **data,
        "values": {k: v for k, v in values.items() if v is not None},
        "removed": [k for k, v in values.items() if v is None],
    }


#: ``version -> function(type, data) -> data`` upgrading that version to the next.
_UPGRADES: dict[int, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    0: _upgrade_v0,
    1: _upgrade_v1,
}
#: ``version -> the event types its upgrade changes`` (None: any type).
_UPGRADED_TYPES: dict[int, frozenset[str] | None] = {0: None, 1: frozenset({"state"})}


def _changed_by_upgrade(event_type: str, version: int) -> bool:
    """Whether a payload of this type and version differs from the current format."""
    if version == EVENT_SCHEMA_VERSION:
        return False
    if not 0 <= version < EVENT_SCHEMA_VERSION:
        return True  # upgrade_payload reports it
    for step in range(version, EVENT_SCHEMA_VERSION):
        kinds = _UPGRADED_TYPES.get(step)
        if kinds is None or event_type in kinds:
            return True
    return False


def upgrade_payload(event_type: str, data: dict[str, Any], version: int) -> dict[str, Any]:
    """Upgrade an event payload written with ``version`` to the current version.

    This is the only place that knows older stored formats.

    Raises:
        CorruptDataError: The version is newer than this code, or unknown.
    """
    if version > EVENT_SCHEMA_VERSION:
        raise CorruptDataError(
            f"event payload has schema version {version}, newer than this chatsession "
            f"understands ({EVENT_SCHEMA_VERSION}); upgrade chatsession to read it"
        )
    while version < EVENT_SCHEMA_VERSION:
        step = _UPGRADES.get(version)
        if step is None:
            raise CorruptDataError(f"no upgrade known from event schema version {version}")
        data = step(event_type, data)
        version += 1
    return data


def _upgraded_text(row: StoredEvent, session_id: str) -> str:
    """The payload text of an older row, upgraded to the current format."""
    where = f"session {session_id!r}, seq {row[0]}"
    try:
        raw = json.loads(row[4])
    except (ValueError, RecursionError) as exc:
        raise CorruptDataError(f"{where}: payload is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CorruptDataError(f"{where}: payload is a {type(raw).__name__}, not an object")
    try:
        upgraded = upgrade_payload(row[1], raw, row[5])
    except CorruptDataError as exc:
        raise CorruptDataError(f"{where}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CorruptDataError(f"{where}: cannot upgrade the payload ({exc})") from None
    return json.dumps(upgraded)


_PAYLOADS: dict[str, TypeAdapter[list[Any]]] = {
    "message": TypeAdapter(list[Message]),
    "usage": TypeAdapter(list[Usage]),
    "turn_start": TypeAdapter(list[TurnStart]),
    "turn_end": TypeAdapter(list[TurnEnd]),
    "reset": TypeAdapter(list[Reset]),
    "rewind": TypeAdapter(list[Rewind]),
    "checkpoint": TypeAdapter(list[Checkpoint]),
    "metadata": TypeAdapter(list[Metadata]),
    "state": TypeAdapter(list[StateChange]),
    "offload": TypeAdapter(list[Offload]),
    "compaction": TypeAdapter(list[Compaction]),
}
# payloads that are often all defaults ("{}"): one shared frozen instance each
_EMPTY: dict[str, Any] = {"turn_start": TurnStart(), "turn_end": TurnEnd(), "reset": Reset()}


def decode_payloads(rows: Sequence[StoredEvent], session_id: str = "?") -> list[Any]:
    """The typed payloads of stored rows, in order, without building event envelopes.

    Payloads of each type are validated in one call. Older schema versions
    are upgraded.

    Raises:
        CorruptDataError: A row's type is unknown or its payload is invalid.
    """
    out: list[Any] = [None] * len(rows)
    groups: dict[str, tuple[list[int], list[str]]] = {}
    current = EVENT_SCHEMA_VERSION
    for i, row in enumerate(rows):
        kind, data = row[1], row[4]
        group = groups.get(kind)
        if group is None:
            if kind not in _KNOWN_TYPES:
                raise CorruptDataError(
                    f"session {session_id!r}, seq {row[0]}: unknown event type {kind!r}"
                )
            group = groups[kind] = ([], [])
        if row[5] != current and _changed_by_upgrade(kind, row[5]):
            data = _upgraded_text(row, session_id)
        elif data == "{}" and kind in _EMPTY:
            out[i] = _EMPTY[kind]
            continue
        group[0].append(i)
        group[1].append(data)
    for kind, (indexes, texts) in groups.items():
        if not indexes:
            continue
        try:
            values = _PAYLOADS[kind].validate_json("[" + ",".join(texts) + "]")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = first["loc"][0] if first["loc"] else 0
            seq = rows[indexes[where]].seq if isinstance(where, int) else "?"
            raise CorruptDataError(
                f"session {session_id!r}, seq {seq}: stored event is invalid: "
                f"{first['msg']} at {'.'.join(map(str, first['loc'][1:])) or 'data'}"
            ) from exc
        for i, value in zip(indexes, values, strict=True):
            out[i] = value
    return out


def decode(rows: Sequence[StoredEvent], session_id: str = "?") -> list[LogEvent]:
    """Turn stored rows into events, upgrading old schema versions.

    The payloads are validated by :func:`decode_payloads` (one call per event
    type); the envelopes come from the rows as the store gave them.

    Args:
        rows: Rows as a store's ``read`` yields them.
        session_id: For error messages.

    Raises:
        CorruptDataError: A row's type is unknown or its payload is invalid.
    """
    payloads = decode_payloads(rows, session_id)
    return [
        _entry(row[1], row[0], row[2], row[3], payload)
        for row, payload in zip(rows, payloads, strict=True)
    ]


_ENVELOPE_FIELDS = frozenset({"seq", "ts", "turn_id", "data"})
_new_object = object.__new__
_set = object.__setattr__


def _entry(kind: str, seq: int, ts: float, turn_id: str | None, payload: Any) -> LogEvent:
    """An event from a checked row and its validated payload, without validating again.

    What ``model_construct`` does, four times faster (a resume of a long log
    builds one per event); ``tests/test_log.py`` checks the result equals a
    validated event.
    """
    cls = _ENTRIES[kind]
    event = _new_object(cls)
    _set(
        event, "__dict__", {"seq": seq, "ts": ts, "turn_id": turn_id, "type": kind, "data": payload}
    )
    _set(event, "__pydantic_fields_set__", _ENVELOPE_FIELDS)
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event  # type: ignore[return-value]


# --------------------------------------------------------------------------
# fold


@dataclass
class UsageTotals:
    """Summed token usage."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    calls: int = 0
    estimated: bool = False

    def add(self, usage: Usage) -> None:
        """Add one model call's usage."""
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.total_tokens += usage.total_tokens
        self.cost += usage.cost or 0.0
        self.calls += 1
        self.estimated = self.estimated or usage.estimated

    def merge(self, other: UsageTotals) -> None:
        """Add another set of totals."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.cost += other.cost
        self.calls += other.calls
        self.estimated = self.estimated or other.estimated


@dataclass
class ConversationState:
    """What a log means; built by :func:`fold`.

    Attributes:
        head: The seq of the last event folded in.
        context: The messages the model sees now, as ``(seq, message)``; a
            compaction summary has the compaction's seq.
        history: Every message ever recorded, as ``(seq, message)``: clear,
            rewind and compaction do not remove anything from it.
        usages: Every model call's usage, in order. ``usage`` sums them;
            ``usage_by_model`` and ``usage_by_level`` split the sums (all three
            kept up to date incrementally, when read).
        checkpoints: Name → ``(seq, Checkpoint)``; a later checkpoint of the
            same name replaces the earlier one.
        state: The agent's key-values as of the current context.
        metadata: Session key-values.
        turns: How many turns ended, by status.
        steps: Model calls made by the turns that ended (their ``steps``).
        turn_seconds: Time those turns took, summed.
        turn_ends: Turn id → the seq of its ``turn_end`` (for forks and
            rewinds to a turn).
        open_turn: The id of a turn that started and has not ended (after a
            crash it reads as interrupted), else None.
        offloads: Blob id → :class:`Offload`.
        resets, rewinds, compactions: How many of each were folded in.
    """

    head: int = 0
    context: list[tuple[int, Message]] = field(default_factory=list)
    history: list[tuple[int, Message]] = field(default_factory=list)
    usages: list[Usage] = field(default_factory=list)
    checkpoints: dict[str, tuple[int, Checkpoint]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    turns: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    turn_seconds: float = 0.0
    turn_ends: dict[str, int] = field(default_factory=dict)
    open_turn: str | None = None
    offloads: dict[str, Offload] = field(default_factory=dict)
    resets: int = 0
    rewinds: int = 0
    compactions: int = 0
    # (seq, type, data) of every event besides messages that shapes context or
    # state, for rewind (messages are replayed from ``history``)
    _timeline: list[tuple[int, str, Any]] = field(default_factory=list, repr=False)
    # tool calls in the context without a result yet (kept as messages are folded in)
    _unanswered: dict[str, ToolCall] = field(default_factory=dict, repr=False)
    _messages: tuple[list[tuple[int, Message]], int, list[Message]] | None = field(
        default=None, repr=False, compare=False
    )
    _usage_cache: (
        tuple[list[Usage], int, UsageTotals, dict[str, UsageTotals], dict[str, UsageTotals]] | None
    ) = field(default=None, repr=False, compare=False)

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
        """Usage totals over every model call (do not modify)."""
        return self._usage_totals()[0]

    @property
    def usage_by_model(self) -> dict[str, UsageTotals]:
        """Usage totals per model (do not modify)."""
        return self._usage_totals()[1]

    @property
    def usage_by_level(self) -> dict[str, UsageTotals]:
        """Usage totals per agent level (do not modify)."""
        return self._usage_totals()[2]

    def _usage_totals(self) -> tuple[UsageTotals, dict[str, UsageTotals], dict[str, UsageTotals]]:
        usages = self.usages
        cache = self._usage_cache
        if cache is None or cache[0] is not usages or cache[1] > len(usages):
            cache = (usages, 0, UsageTotals(), {}, {})
        _, done, total, by_model, by_level = cache
        if done < len(usages):
            # group first, then sum attribute by attribute: a resume sums thousands
            groups: dict[tuple[str, str], list[Usage]] = {}
            for usage in usages[done:] if done else usages:
                key = (usage.model, usage.level)
                group = groups.get(key)
                if group is None:
                    groups[key] = [usage]
                else:
                    group.append(usage)
            for (model, level), items in groups.items():
                part = UsageTotals(
                    prompt_tokens=sum([u.prompt_tokens for u in items]),
                    completion_tokens=sum([u.completion_tokens for u in items]),
                    total_tokens=sum([u.total_tokens for u in items]),
                    cost=sum([u.cost for u in items if u.cost]),
                    calls=len(items),
                    estimated=any([u.estimated for u in items]),
                )
                total.merge(part)
                by_model.setdefault(model, UsageTotals()).merge(part)
                by_level.setdefault(level, UsageTotals()).merge(part)
            cache = (usages, len(usages), total, by_model, by_level)
            self._usage_cache = cache
        return total, by_model, by_level

    def copy(self) -> ConversationState:
        """An independent copy: containers and JSON values copied, frozen events shared."""
        return ConversationState(
            head=self.head,
            context=list(self.context),
            history=list(self.history),
            usages=list(self.usages),
            checkpoints=dict(self.checkpoints),
            state=copy.deepcopy(self.state),
            metadata=copy.deepcopy(self.metadata),
            turns=dict(self.turns),
            steps=self.steps,
            turn_seconds=self.turn_seconds,
            turn_ends=dict(self.turn_ends),
            open_turn=self.open_turn,
            offloads=dict(self.offloads),
            resets=self.resets,
            rewinds=self.rewinds,
            compactions=self.compactions,
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

    def apply(self, event: LogEvent) -> None:
        """Fold one event in, in place (what :func:`fold` does for each event)."""
        if event.seq:
            self.head = event.seq
        _APPLY[event.type](self, event.seq, event.turn_id, event.data)

    def apply_stored(self, rows: Sequence[StoredEvent], payloads: Sequence[Any]) -> None:
        """Fold in stored rows whose payloads :func:`decode_payloads` decoded.

        The same as :meth:`apply` for each row, without building events.
        """
        self._fold_items((row[0], row[1], row[3], p) for row, p in zip(rows, payloads, strict=True))

    def _fold_items(self, items: Iterable[tuple[int, str, str | None, Any]]) -> None:
        """Fold in ``(seq, type, turn_id, payload)`` items: :meth:`apply`, with the
        commonest kinds inlined, since a resume folds every event of the log."""
        handlers = _APPLY
        history = self.history
        turns = self.turns
        turn_ends = self.turn_ends
        usages = self.usages
        head = self.head
        for seq, kind, turn_id, payload in items:
            if seq:
                head = seq
            if kind == "message":
                item = (seq, payload)
                history.append(item)
                self.context.append(item)
                if payload.tool_calls or payload.tool_call_id is not None:
                    _track_tool_calls(self._unanswered, payload)
            elif kind == "turn_start":
                self.open_turn = turn_id or f"seq-{seq}"
            elif kind == "turn_end":
                status = payload.status
                turns[status] = turns.get(status, 0) + 1
                if turn_id is not None:
                    turn_ends[turn_id] = seq
                self.open_turn = None
                self.steps += payload.steps or 0
                self.turn_seconds += payload.duration or 0.0
            elif kind == "usage":
                usages.append(payload)
            else:
                self.head = head  # handlers may read it
                handlers[kind](self, seq, turn_id, payload)
        self.head = head

    def _replay(self, upto: int) -> tuple[list[tuple[int, Message]], dict[str, Any]]:
        """Context and agent state as they were right after seq ``upto``.

        Replays messages (from ``history``) and the other context-shaping
        events (from ``_timeline``) merged in seq order.
        """
        past = ConversationState()
        controls = iter(self._timeline)
        control = next(controls, None)
        for seq, message in self.history:
            if seq > upto:
                break
            while control is not None and control[0] < seq:
                _APPLY[control[1]](past, control[0], None, control[2])
                control = next(controls, None)
            _apply_message(past, seq, None, message)
        while control is not None and control[0] <= upto:
            _APPLY[control[1]](past, control[0], None, control[2])
            control = next(controls, None)
        return past.context, past.state


def _track_tool_calls(unanswered: dict[str, ToolCall], message: Message) -> None:
    if message.role == "assistant":
        for call in message.tool_calls:
            unanswered[call.id] = call
    elif message.role == "tool" and message.tool_call_id is not None:
        unanswered.pop(message.tool_call_id, None)


def _apply_message(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    item = (seq, data)
    state.history.append(item)
    state.context.append(item)
    if data.tool_calls or data.tool_call_id is not None:
        _track_tool_calls(state._unanswered, data)


def _apply_usage(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    state.usages.append(data)


def _apply_turn_start(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    state.open_turn = turn_id or f"seq-{seq}"


def _apply_turn_end(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    state.turns[data.status] = state.turns.get(data.status, 0) + 1
    if turn_id is not None:
        state.turn_ends[turn_id] = seq
    state.open_turn = None
    state.steps += data.steps or 0
    state.turn_seconds += data.duration or 0.0


def _apply_reset(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    state.resets += 1
    state.context = []
    state._unanswered = {}
    if data.clear_state:
        state.state = {}
    state._timeline.append((seq, "reset", data))


def _apply_rewind(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    state.rewinds += 1
    state.context, state.state = state._replay(min(data.to_seq, seq - 1))
    state._recount_unanswered()
    state._timeline.append((seq, "rewind", data))


def _apply_checkpoint(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    state.checkpoints[data.name] = (seq, data)


def _apply_metadata(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    _merge(state.metadata, data.values)


def _apply_state(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    for key, value in data.values.items():
        state.state[key] = copy.deepcopy(value)
    for key in data.removed:
        state.state.pop(key, None)
    state._timeline.append((seq, "state", data))


def _apply_offload(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    state.offloads[data.blob_id] = data


def _apply_compaction(state: ConversationState, seq: int, turn_id: str | None, data: Any) -> None:
    state.compactions += 1
    summary = Message(role="user", content="Summary of the earlier conversation:\n" + data.summary)
    kept = [(s, m) for s, m in state.context if s > data.upto_seq]
    state.context = [(seq, summary), *kept]
    state._recount_unanswered()
    state._timeline.append((seq, "compaction", data))


_APPLY: dict[str, Callable[[ConversationState, int, str | None, Any], None]] = {
    "message": _apply_message,
    "usage": _apply_usage,
    "turn_start": _apply_turn_start,
    "turn_end": _apply_turn_end,
    "reset": _apply_reset,
    "rewind": _apply_rewind,
    "checkpoint": _apply_checkpoint,
    "metadata": _apply_metadata,
    "state": _apply_state,
    "offload": _apply_offload,
    "compaction": _apply_compaction,
}


def _merge(target: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = copy.deepcopy(value)


def fold(events: Iterable[LogEvent], initial: ConversationState | None = None) -> ConversationState:
    """Fold events into a conversation state. Pure: ``initial`` is not changed.

    Args:
        events: Events in seq order.
        initial: The state to continue from (``fold(b, fold(a)) == fold(a + b)``).

    Returns:
        A new :class:`ConversationState`.
    """
    state = initial.copy() if initial is not None else ConversationState()
    state._fold_items((e.seq, e.type, e.turn_id, e.data) for e in events)
    return state


def fold_rows(
    rows: Sequence[StoredEvent],
    initial: ConversationState | None = None,
    *,
    session_id: str = "?",
) -> ConversationState:
    """Fold stored rows (as a store's ``read`` yields them) into a conversation state.

    The same result as ``fold(decode(rows), initial)``, the way ``ChatSession``
    resumes: payloads are validated one event type at a time and no event
    objects are built. Pure: ``initial`` is not changed.

    Raises:
        CorruptDataError: A row's type is unknown or its payload is invalid.
    """
    state = initial.copy() if initial is not None else ConversationState()
    state.apply_stored(rows, decode_payloads(rows, session_id))
    return state
