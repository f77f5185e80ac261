"""One durable conversation: :class:`ChatSession`.

A ``ChatSession`` runs an :class:`~chatsession.agent.Agent` turn by turn and
persists every step to a store as it happens:

1. ``turn_start`` and the user's message, before the model is called;
2. each assistant message (with its tool calls) and its usage, as the model
   finishes it; each tool result as the tool returns;
3. ``turn_end``, before :class:`StopEvent` is yielded.

One writer at a time: each write holds the session's lease in the store, so
two processes (or windows, or objects) on one session never interleave; the
second waits up to ``busy_timeout``. If the turn is stopped (Ctrl+C, task
cancellation, a timeout, an exception), what was produced so far is recorded:
the partial assistant text, an error result for every tool call that has none
(so the next model call is valid), and ``turn_end`` with status
``interrupted``, ``cancelled``, ``timeout`` or ``error``. A process killed
outright leaves a turn without ``turn_end``; once its lease runs out, the
next writer closes it as interrupted.

Modules: :mod:`.chat` (the class), :mod:`.turn` (one turn), :mod:`.keeper`
(the folded state and the log), :mod:`.lease` (one writer at a time),
:mod:`.inbox` (incoming messages), :mod:`.accounting` (usage and context).
"""

from __future__ import annotations

from chatsession.session.accounting import ContextInfo, ModelUsage, UsageSummary
from chatsession.session.chat import ChatSession, Consistency
from chatsession.session.inbox import ChatMessage, MessageSource
from chatsession.session.turn import INTERRUPTED, TurnStream

__all__ = [
    "INTERRUPTED",
    "ChatMessage",
    "ChatSession",
    "Consistency",
    "ContextInfo",
    "MessageSource",
    "ModelUsage",
    "TurnStream",
    "UsageSummary",
]
