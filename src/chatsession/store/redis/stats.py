"""``stats()`` over Redis: from the ``all`` index and the figures each record keeps.

The ``all`` index is walked newest first in batches of 500 members (keyset
paging, :func:`.index.walk`), and for each batch one pipeline reads the
fields ``stats()`` needs of each record (``HMGET``: state, times, owner,
agent, and the figures ``messages``, ``tokens``, ``bytes`` that every append
adds to). No event is read back.

Per user and per agent, the visible sessions are tallied in two sorted sets
of the index slot kept only for the call (``PREFIX{idx}:tally:RANDOM:user``
and ``...:agent``, one ``tally.lua`` call per batch, expiring after 10
minutes should the call stop half way, removed at its end): their sizes are
``users`` and ``agents``, and ``by_user``/``by_agent`` are read from them
(the top ``top``, ties by name). So the client's memory stays flat in the
number of sessions, users and agents; the server holds the tallies briefly
(``stats()`` therefore needs a server that takes writes). A tally is never
sent twice: when its connection drops before the reply, ``stats()`` raises
:class:`~chatsession.errors.StoreUnavailableError` (call it again) rather
than risk counting a batch twice.

Expiry: Redis removes a session's keys itself at its ``expires_at`` (native
expiry), so an expired session is usually gone before ``stats()`` sees it.
``by_state["expired"]`` counts only the expired sessions whose record Redis
still holds: a parent kept for its forks (it has no native expiry), or one
expiring past the year 10000. It is 0 in most stores, and 0 after
``purge_expired``.

A member whose record is another incarnation, or is missing, is not
counted; a damaged record is logged (``chatsession.store``) and not counted.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import Any

import redis.asyncio as aioredis

from chatsession.errors import StoreError
from chatsession.store.checks import check_stats
from chatsession.store.types import SessionState, StoreStats, now

from . import index, layout
from .connection import RedisConnection
from .records import who_field
from .scripts import split_member, text

__all__ = ["stats"]

log = logging.getLogger("chatsession.store")

_BATCH = 500  # index members per batch
_TALLY_TTL = 600  # seconds a tally outlives a call that stopped half way
_FIELDS = (
    "stamp",
    "deleted",
    "expires_at",
    "state",
    "updated_at",
    "user_id",
    "agent_id",
    "unset",
    "messages",
    "tokens",
    "bytes",
)
_STATES = frozenset(state.value for state in SessionState)


async def stats(
    conn: RedisConnection, idle_before: float | None = None, top: int = 100
) -> StoreStats:
    """See :meth:`Store.stats` (and the module docstring)."""
    check_stats(idle_before, top)
    await layout.ensure(conn)
    at = now()
    result = StoreStats()
    tag = secrets.token_hex(8)
    users, agents = conn.index("tally", f"{tag}:user"), conn.index("tally", f"{tag}:agent")
    try:
        async for batch in index.walk(conn, conn.index(), _BATCH):
            members = [split_member(member) for member, _ in batch]

            async def read(
                r: aioredis.Redis, m: list[tuple[str, str]] = members
            ) -> list[list[bytes | None]]:
                pipe = r.pipeline(transaction=False)
                for session_id, _ in m:
                    pipe.hmget(conn.session_keys(session_id).rec, _FIELDS)
                rows: list[list[bytes | None]] = await pipe.execute()
                return rows

            rows = await conn.run(read)
            users_seen: list[str] = []
            agents_seen: list[str] = []
            for (session_id, stamp), row in zip(members, rows, strict=True):
                raw = dict(zip(_FIELDS, row, strict=True))
                who = _count(result, session_id, stamp, raw, at, idle_before)
                if who is not None:
                    if who[0] is not None:
                        users_seen.append(who[0])
                    if who[1] is not None:
                        agents_seen.append(who[1])
            if users_seen or agents_seen:
                args = [_TALLY_TTL, len(users_seen), *users_seen, *agents_seen]
                # never re-sent: a lost reply may have counted; the call fails instead
                await conn.script("tally", args, [users, agents], resend=False)
        result.users, result.by_user = await _ranked(conn, users, top)
        result.agents, result.by_agent = await _ranked(conn, agents, top)
    finally:
        with contextlib.suppress(StoreError):  # else they expire on their own
            await conn.run(lambda r: r.unlink(users, agents), write=True, keys=[users, agents])
    return result


def _count(
    result: StoreStats,
    session_id: str,
    stamp: str,
    raw: dict[str, bytes | None],
    at: float,
    idle_before: float | None,
) -> tuple[str | None, str | None] | None:
    """Add one member's session to ``result``; its ``(user, agent)`` if visible, else None."""
    if raw["stamp"] != stamp.encode() or raw["deleted"] == b"1":
        return None  # gone (evicted or purged), another incarnation, or a tombstone
    try:
        expires = float(raw["expires_at"]) if raw["expires_at"] else None
        state = (raw["state"] or b"").decode()
        if state not in _STATES:
            raise ValueError(f"its state is {state[:40]!r}")
        updated = float(raw["updated_at"] or b"")
        user = who_field("user_id", raw["user_id"], raw["unset"])
        agent = who_field("agent_id", raw["agent_id"], raw["unset"])
        figures = [int(raw[name] or b"0") for name in ("messages", "tokens", "bytes")]
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("stats: left out session %r: its record is damaged (%s)", session_id, exc)
        return None
    if expires is not None and expires <= at:
        result.by_state[SessionState.EXPIRED.value] += 1
        return None
    result.sessions += 1
    if state == SessionState.ACTIVE and idle_before is not None and updated < idle_before:
        state = SessionState.IDLE.value
    result.by_state[state] += 1
    result.messages += figures[0]
    result.tokens += figures[1]
    result.bytes += figures[2]
    return user, agent


async def _ranked(conn: RedisConnection, key: str, top: int) -> tuple[int, dict[str, int]]:
    """How many names ``key`` tallies, and the ``top`` with the most (ties by name)."""

    async def work(r: aioredis.Redis) -> tuple[int, list[tuple[Any, float]]]:
        distinct = int(await r.zcard(key))
        if top == 0 or distinct == 0:
            return distinct, []
        kth = await r.zrange(key, top - 1, top - 1, desc=True, withscores=True)
        if not kth:  # fewer names than top: the lowest score is the cut
            kth = await r.zrange(key, 0, 0, withscores=True)
        cut = kth[0][1]
        above = await r.zrangebyscore(key, f"({cut!r}", "+inf", withscores=True)
        ties = await r.zrangebyscore(key, cut, cut, start=0, num=top - len(above), withscores=True)
        return distinct, [*above, *ties]

    distinct, pairs = await conn.run(work, keys=[key])
    counts = {text(name): int(score) for name, score in pairs}
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return distinct, dict(ranked[:top])
