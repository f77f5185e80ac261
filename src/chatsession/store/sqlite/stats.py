"""The SQLite store's figures: per-session counters kept by appends, summed by SQL for ``stats()``.

Every append adds :func:`~chatsession.store.types.count_events` of its events
to its session's ``messages``, ``tokens`` and ``bytes`` columns (migration
004), in the append's own transaction. ``stats()`` is a handful of aggregate
queries over the ``sessions`` table, run in one read transaction: SQLite
streams them (``GROUP BY`` over an index, a bounded sorter for the top N), so
neither Python's memory nor the time spent depends on the events stored, and
no event row is read.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from chatsession.store.base import EventCounts, SessionState, StoreStats
from chatsession.store.sqlite.schema import MAX_COUNTER

__all__ = ["ADD_COUNTS_SQL", "clamped", "store_stats"]

logger = logging.getLogger("chatsession.store.sqlite")

#: What an append does to its session's row (parameters: head, updated_at,
#: messages, tokens, bytes, pk). ``tokens`` saturates at ``MAX_COUNTER``.
ADD_COUNTS_SQL = (
    "UPDATE sessions SET head = ?, updated_at = ?, messages = messages + ?, "
    f"tokens = min(tokens + ?, {MAX_COUNTER}), bytes = bytes + ? WHERE pk = ?"
)

_STATES = frozenset(state.value for state in SessionState)
_VISIBLE = "deleted = 0 AND (expires_at IS NULL OR expires_at > :at)"

_BY_STATE_SQL = (
    "SELECT state, count(*), sum(state = 'active' AND updated_at < :idle), "
    f"total(messages), total(tokens), total(bytes) FROM sessions WHERE {_VISIBLE} GROUP BY state"
)
_EXPIRED_SQL = (
    "SELECT count(*) FROM sessions WHERE deleted = 0 AND expires_at IS NOT NULL "
    "AND expires_at <= :at"
)


def _distinct_sql(column: str) -> str:
    return (
        f"SELECT count(*) FROM (SELECT 1 FROM sessions WHERE {_VISIBLE} "
        f"AND typeof({column}) = 'text' GROUP BY {column})"
    )


def _top_sql(column: str) -> str:
    return (
        f"SELECT {column}, count(*) AS n FROM sessions WHERE {_VISIBLE} "
        f"AND typeof({column}) = 'text' GROUP BY {column} ORDER BY n DESC, {column} LIMIT :top"
    )


def clamped(counts: EventCounts) -> tuple[int, int, int]:
    """An append's figures as the counters take them (``tokens`` at most ``MAX_COUNTER``)."""
    return counts.messages, min(counts.tokens, MAX_COUNTER), counts.bytes


def _whole(value: Any) -> int:
    """An aggregate's value as an int (``total()`` gives floats; exact below 2**53)."""
    return int(value) if isinstance(value, int | float) else 0


def store_stats(
    path: str, at: float, idle_before: float | None, top: int, db: sqlite3.Connection
) -> StoreStats:
    """The store's figures (see ``Store.stats``); run it in one read transaction.

    A visible session whose ``state`` column holds no known state is left out
    and logged (a hand edit or a bad restore).
    """
    params = {"at": at, "idle": idle_before, "top": top}
    stats = StoreStats()
    skipped = 0
    for state, count, idle, messages, tokens, size in db.execute(_BY_STATE_SQL, params):
        if type(state) is not str or state not in _STATES:
            skipped += count
            continue
        idle = _whole(idle)
        stats.sessions += count
        stats.by_state[state] += count - idle
        stats.by_state["idle"] += idle
        stats.messages += _whole(messages)
        stats.tokens += _whole(tokens)
        stats.bytes += _whole(size)
    if skipped:
        logger.warning(
            "stats leaves out %d session(s) of the SQLite file %r whose state column is damaged",
            skipped,
            path,
        )
    stats.by_state["expired"] += db.execute(_EXPIRED_SQL, params).fetchone()[0]
    stats.users = db.execute(_distinct_sql("user_id"), params).fetchone()[0]
    stats.agents = db.execute(_distinct_sql("agent_id"), params).fetchone()[0]
    stats.by_user = dict(db.execute(_top_sql("user_id"), params).fetchall())
    stats.by_agent = dict(db.execute(_top_sql("agent_id"), params).fetchall())
    return stats
