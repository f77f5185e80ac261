"""``stats()`` over Redis: from the ``all`` index and the figures each record keeps.

The ``all`` index is walked newest first in batches of 2,000 members (keyset
paging, :func:`.index.pages`: a batch's members in one reply item). For each
batch, one round trip
(:meth:`~.connection.RedisConnection.script_each`) runs ``count_one.lua``
once per member, on the member's own slot: it reads the fields ``stats()``
needs of the record (state, times, owner, agent, and the figures
``messages``, ``tokens``, ``bytes`` that every append adds to), decides
whether and how the session counts, and answers in one short string (state,
figures, user, agent), so the client parses one reply item per session. The
next batch's calls run on the server while the client counts the replies of
this one. No event is read back. (The cost is the client's handling of one
reply per session, and the server's running of one script per session: a
record lives in its session's slot, so no single call may read several.)

Per user and per agent, the visible sessions are counted in the client, in
two dictionaries of at most 5,000 names together (plus one batch's). When
they grow past that, their counts are added to two sorted sets of the index
slot kept only for the call (``PREFIX{idx}:tally:RANDOM:user`` and
``...:agent``, by ``tally.lua``, one ``ZINCRBY`` per name and batch of
names, expiring after 10 minutes should the call stop half way, removed at
its end), and the dictionaries start again; ``users``/``agents`` and
``by_user``/``by_agent`` then come from the sorted sets (their sizes, and
the top ``top``, ties by name). A store of up to 5,000 users and agents
together never writes: its ranks come from the dictionaries. So the client's
memory stays flat in the number of sessions, users and agents. A tally is
never sent twice: when its connection drops before the reply, ``stats()``
raises :class:`~chatsession.errors.StoreUnavailableError` (call it again)
rather than risk counting names twice.

Expiry: Redis removes a session's keys itself at its ``expires_at`` (native
expiry), so an expired session is usually gone before ``stats()`` sees it.
``by_state["expired"]`` counts only the expired sessions whose record Redis
still holds: a parent kept for its forks (it has no native expiry), or one
expiring past the year 10000. It is 0 in most stores, and 0 after
``purge_expired``.

A member whose record is another incarnation, or is missing, is not
counted; a damaged record (a field missing or unreadable, a user or agent
that is not UTF-8) is logged (``chatsession.store``) and not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis

from chatsession.errors import StoreError
from chatsession.store.checks import check_stats
from chatsession.store.types import SessionState, StoreStats, now, top_counts

from . import index, layout
from .connection import RedisConnection
from .scripts import MARK, text

__all__ = ["stats"]

log = logging.getLogger("chatsession.store")

_BATCH = 2000  # index members per batch
_NAMES = 5000  # distinct users and agents counted in the client before they go to the server
_PAIRS = 1000  # name/count pairs per tally.lua call
_TALLY_TTL = 600  # seconds a tally outlives a call that stopped half way
_NONE = b"-"  # count_one.lua's length of a user or agent that is None
_MARK = MARK.encode()


async def stats(
    conn: RedisConnection, idle_before: float | None = None, top: int = 100
) -> StoreStats:
    """See :meth:`Store.stats` (and the module docstring)."""
    check_stats(idle_before, top)
    await layout.ensure(conn)
    shared = (repr(now()).encode(), b"" if idle_before is None else repr(idle_before).encode())
    result = StoreStats()
    states: dict[bytes, int] = {}
    messages = tokens = size = expired = 0
    tally = _Tally(conn)
    try:
        async with contextlib.aclosing(_batches(conn, shared)) as batches:
            async for members, replies in batches:
                users, agents = tally.users, tally.agents
                for member, reply in zip(members, replies, strict=True):
                    if reply.__class__ is int:
                        expired += reply  # 1: expired and still held; 0: not counted
                        continue
                    if reply.__class__ is list:
                        why = f"its field {text(reply[1])!r} is missing or unreadable"
                        _damaged(member, why)
                        continue
                    state, m, t, b, user_len, agent_len, names = reply.split(b" ", 6)
                    if user_len == _NONE:
                        user, agent = None, None if agent_len == _NONE else names
                    else:
                        cut = int(user_len)
                        user, agent = names[:cut], None if agent_len == _NONE else names[cut:]
                    try:  # a name is checked once while the client counts it
                        if user is not None and user not in users:
                            user.decode()
                        if agent is not None and agent not in agents:
                            agent.decode()
                    except UnicodeDecodeError as exc:
                        _damaged(member, f"its user or agent is not UTF-8 ({exc})")
                        continue
                    states[state] = states.get(state, 0) + 1
                    if m != b"0":
                        messages += int(m)
                    if t != b"0":
                        tokens += int(t)
                    if b != b"0":
                        size += int(b)
                    if user is not None:
                        users[user] = users.get(user, 0) + 1
                    if agent is not None:
                        agents[agent] = agents.get(agent, 0) + 1
                if len(users) + len(agents) > _NAMES:
                    await tally.flush()
        for state, n in states.items():
            result.by_state[state.decode()] += n
        result.by_state[SessionState.EXPIRED.value] += expired
        result.sessions = sum(states.values())
        result.messages, result.tokens, result.bytes = messages, tokens, size
        result.users, result.by_user = await tally.ranked(0, top)
        result.agents, result.by_agent = await tally.ranked(1, top)
    finally:
        await tally.drop()
    return result


async def _batches(
    conn: RedisConnection, shared: tuple[bytes, bytes]
) -> AsyncGenerator[tuple[list[bytes], list[Any]], None]:
    """The ``all`` index's members, batch by batch, with ``count_one.lua``'s replies for them.

    One batch ahead: the next batch's calls run on the server while the
    caller counts this one's replies.
    """
    prefix = conn.prefix.encode()
    ahead: tuple[list[bytes], asyncio.Task[list[Any]]] | None = None
    try:
        async for members in index.pages(conn, conn.index(), _BATCH):
            calls = []
            for member in members:
                session_id, _, stamp = member.partition(_MARK)
                calls.append((prefix + b"{" + session_id + b"}:rec", (stamp,)))
            task = asyncio.ensure_future(conn.script_each("count_one", calls, shared))
            if ahead is not None:
                done, ahead = ahead, None
                yield done[0], await done[1]
            ahead = members, task
        if ahead is not None:
            done, ahead = ahead, None
            yield done[0], await done[1]
    finally:
        if ahead is not None:
            ahead[1].cancel()
            with contextlib.suppress(BaseException):
                await ahead[1]


def _damaged(member: bytes, why: str) -> None:
    session_id = member.partition(_MARK)[0].decode(errors="replace")
    log.warning("stats: left out session %r: its record is damaged (%s)", session_id, why)


class _Tally:
    """Visible sessions per user and per agent: in the client, then in the server if many."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self.users: dict[bytes, int] = {}
        self.agents: dict[bytes, int] = {}
        self.keys: list[str] | None = None  # the server's tallies, once used

    async def flush(self) -> None:
        """Add the client's counts to the server's tallies, and start the client's again."""
        if self.keys is None:
            tag = secrets.token_hex(8)
            self.keys = [self.conn.index("tally", f"{tag}:{kind}") for kind in ("user", "agent")]
        for which, counts in enumerate((self.users, self.agents)):
            pairs = list(counts.items())
            for start in range(0, len(pairs), _PAIRS):
                chunk = pairs[start : start + _PAIRS]
                args: list[Any] = [_TALLY_TTL, 0 if which else len(chunk)]
                args += [item for pair in chunk for item in pair]
                # never re-sent: a lost reply may have counted; the call fails instead
                await self.conn.script("tally", args, self.keys, resend=False)
            counts.clear()

    async def ranked(self, which: int, top: int) -> tuple[int, dict[str, int]]:
        """How many users (``which`` 0) or agents (1) were counted, and the ``top`` with the most."""
        counts = (self.users, self.agents)[which]
        if self.keys is None:
            return len(counts), top_counts({text(k): n for k, n in counts.items()}, top)
        if counts:
            await self.flush()
        return await _ranked(self.conn, self.keys[which], top)

    async def drop(self) -> None:
        """Remove the server's tallies, if any (else they expire on their own)."""
        keys = self.keys
        if keys is None:
            return
        with contextlib.suppress(StoreError):
            await self.conn.run(lambda r: r.unlink(*keys), write=True, keys=keys)


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
    return distinct, top_counts(counts, top)
