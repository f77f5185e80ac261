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
``lifecycle``    :class:`Lifecycle`: the session was archived, restored or expired
===============  ==============================================================

:func:`fold` turns events into a :class:`ConversationState`. It is pure and
incremental: ``fold(b, fold(a)) == fold(a + b)``. Clear, rewind and
compaction change what the model sees (``state.context``), never the record
(``state.history``). :func:`fold_rows` does the same from stored rows.

Modules: :mod:`~chatsession.log.events` (the types), :mod:`~chatsession.log.codec`
(the stored form and upgrades of older versions), :mod:`~chatsession.log.state`
(the fold and snapshots).
"""

from __future__ import annotations

from chatsession.log.codec import decode, decode_payloads, encode, upgrade_payload
from chatsession.log.events import (
    Checkpoint,
    CheckpointEntry,
    Compaction,
    CompactionEntry,
    ContentPart,
    EventType,
    ImagePart,
    Lifecycle,
    LifecycleEntry,
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
    Role,
    StateChange,
    StateEntry,
    TextPart,
    ToolCall,
    TurnEnd,
    TurnEndEntry,
    TurnStart,
    TurnStartEntry,
    TurnStatus,
    Usage,
    UsageEntry,
    replace,
    to_builtins,
)
from chatsession.log.state import (
    ConversationState,
    PastResolver,
    Snapshot,
    UsageTotals,
    fold,
    fold_rows,
)
from chatsession.store.base import EVENT_SCHEMA_VERSION

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "Checkpoint",
    "CheckpointEntry",
    "Compaction",
    "CompactionEntry",
    "ContentPart",
    "ConversationState",
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
    "PastResolver",
    "Reset",
    "ResetEntry",
    "Rewind",
    "RewindEntry",
    "Role",
    "Snapshot",
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
    "replace",
    "to_builtins",
    "upgrade_payload",
]
