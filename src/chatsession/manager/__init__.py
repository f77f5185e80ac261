"""Many users' and windows' sessions on one store: :class:`SessionManager`.

See :mod:`chatsession.manager.manager` for the rules (ownership, states, TTL,
limits, checkpoints, locks) and ``docs/manager.md`` for a guide.
"""

from __future__ import annotations

from chatsession.manager.locks import SessionLock
from chatsession.manager.manager import SessionManager, ValueRedactor
from chatsession.manager.models import (
    CheckpointInfo,
    LimitPolicy,
    Session,
    SessionPage,
    SessionTemplate,
)
from chatsession.store import SessionState, StoreStats

__all__ = [
    "CheckpointInfo",
    "LimitPolicy",
    "Session",
    "SessionLock",
    "SessionManager",
    "SessionPage",
    "SessionState",
    "SessionTemplate",
    "StoreStats",
    "ValueRedactor",
]
