"""Event types: what each event of the log says.

Payloads and events are frozen ``msgspec`` structs: decoding a long log into
them costs a fraction of a microsecond per event, where a validating model
class costs several. Build them with keywords (``Message(role="user",
content="hi")``); change one with :func:`replace` (or ``msgspec.structs.replace``);
turn one into plain data with :func:`to_builtins`. What is stored is checked
when it is encoded (:func:`chatsession.log.encode`), so an invalid value is
refused before anything is written.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, TypeVar

import msgspec

__all__ = [
    "EVENT_TYPES",
    "Checkpoint",
    "CheckpointEntry",
    "Compaction",
    "CompactionEntry",
    "ContentPart",
    "EventType",
    "ImagePart",
    "Lifecycle",
    "LifecycleEntry",
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
    "replace",
    "to_builtins",
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
    "lifecycle",
]
Role = Literal["system", "user", "assistant", "tool"]
TurnStatus = Literal["completed", "interrupted", "timeout", "error", "cancelled"]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]

S = TypeVar("S", bound=msgspec.Struct)


def replace(value: S, /, **changes: Any) -> S:
    """A copy of a payload or event with some fields changed (like ``dataclasses.replace``)."""
    return msgspec.structs.replace(value, **changes)


def to_builtins(value: Any) -> Any:
    """Plain JSON-ready data (dicts, lists, str, numbers) of a payload, event or list of them."""
    return msgspec.to_builtins(value)


class _Payload(
    msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True, gc=False
):
    """What every payload shares: frozen, defaults left out when stored, no unknown keys.

    ``gc=False``: payloads cannot be part of a reference cycle (they hold
    values, never themselves), so the garbage collector need not track the
    many thousands a long log decodes into.
    """


# --------------------------------------------------------------------------
# payloads


class TextPart(_Payload, frozen=True, tag_field="type", tag="text"):
    """A piece of text in a message."""

    text: str

    @property
    def type(self) -> Literal["text"]:
        """Always ``text``."""
        return "text"


class ImagePart(_Payload, frozen=True, tag_field="type", tag="image"):
    """An image in a message: a URL (``https:`` or ``data:``) or a stored blob."""

    url: str | None = None
    blob_id: str | None = None
    media_type: str | None = None

    @property
    def type(self) -> Literal["image"]:
        """Always ``image``."""
        return "image"


ContentPart: TypeAlias = TextPart | ImagePart


class ToolCall(_Payload, frozen=True):
    """A tool call requested by the assistant.

    ``arguments`` is the JSON text the model produced, kept as is (it may be
    invalid JSON; :meth:`parsed_arguments` says so).
    """

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


class Message(_Payload, frozen=True):
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
        content = self.content
        if type(content) is str:
            return content
        return "".join(p.text for p in content if isinstance(p, TextPart))


class Usage(_Payload, frozen=True):
    """Tokens used by one model call.

    Attributes:
        model: The model that answered.
        level: The agent's level tag (``main``, ``subagent``, ``compaction``, ...).
        cost: Cost in US dollars, when the price is known.
        estimated: True when the counts are a local estimate, not the provider's.
    """

    model: str = "unknown"
    level: str = "main"
    prompt_tokens: NonNegative = 0
    completion_tokens: NonNegative = 0
    total_tokens: NonNegative = 0
    cost: float | None = None
    estimated: bool = False


class TurnStart(_Payload, frozen=True):
    """A turn began (the user's message follows in the same turn)."""

    source: str | None = None


class TurnEnd(_Payload, frozen=True):
    """A turn ended, with how."""

    status: TurnStatus = "completed"
    error: str | None = None
    duration: float | None = None
    steps: int | None = None


class Reset(_Payload, frozen=True):
    """Clear history: the model's context becomes empty; the record keeps all."""

    reason: str | None = None
    clear_state: bool = False


class Rewind(_Payload, frozen=True):
    """Return the context (and the agent's state) to how it was right after ``to_seq``."""

    to_seq: NonNegative
    checkpoint: str | None = None


class Checkpoint(_Payload, frozen=True):
    """A named point in the conversation; it marks the seq of its own event.

    With ``deleted`` it removes the checkpoint of that name instead (the
    record keeps both events).
    """

    name: str
    data: Any = None
    deleted: bool = False


class Lifecycle(_Payload, frozen=True):
    """The session's state changed: ``active`` (restored), ``archived`` or ``expired``.

    Written by :class:`~chatsession.manager.SessionManager`; it changes
    nothing the model sees.

    Attributes:
        state: The new state.
        reason: Why, when given.
        by: Who changed it (a user id), when known.
    """

    state: Literal["active", "archived", "expired"]
    reason: str | None = None
    by: str | None = None


class Metadata(_Payload, frozen=True):
    """Key-values about the session, merged in; a None value deletes the key."""

    values: dict[str, Any]


class StateChange(_Payload, frozen=True):
    """The agent's own key-values (todo lists, caches): ``values`` are set
    (None included), then the keys in ``removed`` are deleted."""

    values: dict[str, Any] = msgspec.field(default_factory=dict)
    removed: tuple[str, ...] = ()


class Offload(_Payload, frozen=True):
    """A large tool output stored as a blob; the context keeps ``preview``."""

    blob_id: str
    size: NonNegative
    media_type: str = "text/plain"
    preview: str = ""
    tool_call_id: str | None = None


class Compaction(_Payload, frozen=True):
    """A summary that replaces, in the model's context only, the messages up to ``upto_seq``."""

    summary: str
    upto_seq: NonNegative
    model: str | None = None


# --------------------------------------------------------------------------
# events


class _Entry(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """What every event shares: its place in the log and, per subclass, its ``type``.

    ``seq`` and ``ts`` are 0 until the store gives the event its place.
    """

    kind: ClassVar[str]
    seq: int = 0
    ts: float = 0.0
    turn_id: str | None = None

    @property
    def type(self) -> str:
        """The event type (``message``, ``usage``, ...)."""
        return self.kind


class MessageEntry(_Entry, frozen=True, tag="message"):
    """A ``message`` event in the log."""

    kind: ClassVar[str] = "message"
    data: Message


class UsageEntry(_Entry, frozen=True, tag="usage"):
    """A ``usage`` event."""

    kind: ClassVar[str] = "usage"
    data: Usage


class TurnStartEntry(_Entry, frozen=True, tag="turn_start"):
    """A ``turn_start`` event."""

    kind: ClassVar[str] = "turn_start"
    data: TurnStart = TurnStart()


class TurnEndEntry(_Entry, frozen=True, tag="turn_end"):
    """A ``turn_end`` event."""

    kind: ClassVar[str] = "turn_end"
    data: TurnEnd = TurnEnd()


class ResetEntry(_Entry, frozen=True, tag="reset"):
    """A ``reset`` event."""

    kind: ClassVar[str] = "reset"
    data: Reset = Reset()


class RewindEntry(_Entry, frozen=True, tag="rewind"):
    """A ``rewind`` event."""

    kind: ClassVar[str] = "rewind"
    data: Rewind


class CheckpointEntry(_Entry, frozen=True, tag="checkpoint"):
    """A ``checkpoint`` event."""

    kind: ClassVar[str] = "checkpoint"
    data: Checkpoint


class MetadataEntry(_Entry, frozen=True, tag="metadata"):
    """A ``metadata`` event."""

    kind: ClassVar[str] = "metadata"
    data: Metadata


class StateEntry(_Entry, frozen=True, tag="state"):
    """A ``state`` event."""

    kind: ClassVar[str] = "state"
    data: StateChange


class OffloadEntry(_Entry, frozen=True, tag="offload"):
    """An ``offload`` event."""

    kind: ClassVar[str] = "offload"
    data: Offload


class LifecycleEntry(_Entry, frozen=True, tag="lifecycle"):
    """A ``lifecycle`` event."""

    kind: ClassVar[str] = "lifecycle"
    data: Lifecycle


class CompactionEntry(_Entry, frozen=True, tag="compaction"):
    """A ``compaction`` event."""

    kind: ClassVar[str] = "compaction"
    data: Compaction


LogEvent: TypeAlias = (
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
    | CompactionEntry
    | LifecycleEntry
)
"""Any event; ``event.type`` tells which."""

#: event type -> (its entry class, its payload class)
EVENT_TYPES: dict[str, tuple[type[_Entry], type[_Payload]]] = {
    "message": (MessageEntry, Message),
    "usage": (UsageEntry, Usage),
    "turn_start": (TurnStartEntry, TurnStart),
    "turn_end": (TurnEndEntry, TurnEnd),
    "reset": (ResetEntry, Reset),
    "rewind": (RewindEntry, Rewind),
    "checkpoint": (CheckpointEntry, Checkpoint),
    "metadata": (MetadataEntry, Metadata),
    "state": (StateEntry, StateChange),
    "offload": (OffloadEntry, Offload),
    "compaction": (CompactionEntry, Compaction),
    "lifecycle": (LifecycleEntry, Lifecycle),
}
