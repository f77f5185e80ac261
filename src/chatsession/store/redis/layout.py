"""The layout of the Redis store's data, and the upgrade of data written by earlier versions.

The layout is a number kept in ``PREFIX{idx}:meta`` (field ``layout``):

1. What versions before the session limits and ``stats()`` wrote (no
   ``meta`` key at all): records, events, listing indexes, ``where``,
   ``due``, ``expiry``.
2. (:data:`~.index.LAYOUT`, this code) adds the users' *live sets*
   ``PREFIX{idx}:live:U`` (a user's sessions that are not archived, by
   ``expires_at``: what ``create(max_per_user=)`` counts) and each record's
   figures ``messages``, ``tokens``, ``bytes`` and ``counted`` (what
   ``stats()`` sums).

A new store is layout 2 from its first ``create`` (``intent.lua`` writes the
number when the index slot is still empty). A store written by an earlier
version is upgraded *lazily, once*: the first call that needs the new
structures (``create`` with ``max_per_user``, ``stats()``) in any process
finds no layout number, and walks the ``all`` index in batches of 200
(memory flat in the number of sessions):

- a visible record without ``counted`` gets its figures counted from its own
  events (read 1,000 at a time) by :func:`~chatsession.store.types.count_events`,
  set by ``recount.lua`` only if its head did not move meanwhile (else it is
  counted again), and never over figures a record already has;
- a visible session of a user that is not archived joins its user's live set
  (``adopt.lua``), unless a change is under way for it (that change's last
  step places it, with the live set) or its entry names another version.

Then the layout number is written, and the other processes skip the walk
from then on (each store object checks the number once). Sessions written
meanwhile by this version are placed by their own writes, and appends add to
the figures of records not yet counted (the count then replaces them), so an
upgrade can run while the store is in use, and two processes upgrading at
once do the same steps twice and agree. Run only this version (or later)
once upgraded: earlier versions do not keep the live sets and figures.
Until the upgrade, a limit counts only the sessions the live sets hold, which
is why the first limited ``create`` upgrades before it counts. A damaged
record or event list is logged and skipped (its figures stay as its appends
made them).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import redis.asyncio as aioredis

from chatsession.errors import CorruptDataError
from chatsession.store.types import NewEvent, count_events, now

from . import index
from .connection import RedisConnection
from .events import decode_items
from .records import damaged_record, who_field
from .scripts import FIGURE_MAX, split_member

__all__ = ["ensure", "upgrade"]

log = logging.getLogger("chatsession.store")

_BATCH = 200  # index members per batch
_EVENTS = 1000  # events read per call while counting
_TRIES = 5  # counts of one session whose head keeps moving
_FIELDS = ("stamp", "deleted", "expires_at", "state", "user_id", "unset", "version", "counted")


async def ensure(conn: RedisConnection) -> None:
    """Make sure the store's data is of :data:`~.index.LAYOUT`, upgrading it if not (once).

    Raises:
        StoreUnavailableError: As every call.
    """
    if conn.layout_ready:
        return
    meta, where = conn.index("meta"), conn.index("where")

    async def look(r: aioredis.Redis) -> tuple[Any, int]:
        pipe = r.pipeline(transaction=False)
        pipe.hget(meta, "layout")
        pipe.exists(where)
        got = await pipe.execute()
        return got[0], int(got[1])

    layout, listed = await conn.run(look, keys=[meta, where])
    try:
        number = int(layout) if layout is not None else 1 if listed else 0
    except ValueError:
        number = 1  # a damaged number: upgrading again is harmless
    if number < index.LAYOUT:
        if number:
            await upgrade(conn)
        await _mark(conn)
    conn.layout_ready = True


async def _mark(conn: RedisConnection) -> None:
    meta = conn.index("meta")

    async def work(r: aioredis.Redis) -> None:
        await r.hset(meta, "layout", str(index.LAYOUT))

    await conn.run(work, write=True, keys=[meta])


async def upgrade(conn: RedisConnection) -> int:
    """Bring records and live sets of an earlier layout up to this one (see the module docstring).

    Returns:
        How many sessions it changed (counted, or put in a live set).
    """
    changed = 0
    at = now()
    async for batch in index.walk(conn, conn.index(), _BATCH):
        members = [split_member(member) for member, _ in batch]

        async def work(
            r: aioredis.Redis, m: list[tuple[str, str]] = members
        ) -> list[dict[str, bytes | None]]:
            return await _fields(conn, r, m)

        raws = await conn.run(work)
        for (session_id, stamp), (member, _), raw in zip(members, batch, raws, strict=True):
            try:
                changed += await _upgrade_one(conn, session_id, stamp, member, raw, at)
            except CorruptDataError as exc:
                log.warning("upgrading the store: left session %r as it was: %s", session_id, exc)
    return changed


async def _fields(
    conn: RedisConnection, r: aioredis.Redis, members: list[tuple[str, str]]
) -> list[dict[str, bytes | None]]:
    pipe = r.pipeline(transaction=False)
    for session_id, _ in members:
        pipe.hmget(conn.session_keys(session_id).rec, _FIELDS)
    rows = await pipe.execute()
    return [dict(zip(_FIELDS, row, strict=True)) for row in rows]


async def _upgrade_one(
    conn: RedisConnection,
    session_id: str,
    stamp: str,
    member: str,
    raw: dict[str, bytes | None],
    at: float,
) -> int:
    """Upgrade one listed incarnation; 1 if anything changed."""
    if raw["stamp"] != stamp.encode() or raw["deleted"] == b"1":
        return 0  # gone, another incarnation, or a tombstone (none of them counts)
    try:
        expires = float(raw["expires_at"]) if raw["expires_at"] else None
        user = who_field("user_id", raw["user_id"], raw["unset"])
        version = int(raw["version"] or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged_record(conn, session_id, f"a field is unreadable ({exc})"[:300]) from exc
    if expires is not None and expires <= at:
        return 0  # invisible: purged in time
    changed = 0
    if raw["counted"] is None:
        changed = await _recount(conn, session_id, stamp)
    if user is not None and raw["state"] != b"archived":
        score = "+inf" if expires is None else repr(expires)
        keys = [*conn.fixed, conn.index("live", user)]
        got = await conn.script("adopt", [member, version, score], keys)
        changed = max(changed, int(got[0]))
    return changed


async def _recount(conn: RedisConnection, session_id: str, stamp: str) -> int:
    """Set the figures of a record that has none from its own events; 1 if set."""
    keys = conn.session_keys(session_id)
    for _ in range(_TRIES):

        async def look(r: aioredis.Redis) -> list[Any]:
            return cast(list[Any], await r.hmget(keys.rec, ["head", "parent_seq"]))

        head_raw, base_raw = await conn.run(look, keys=[keys.rec])
        try:
            head, base = int(head_raw), int(base_raw or b"0")
        except (TypeError, ValueError):
            return 0  # gone meanwhile (or damaged: every read of it says so)
        totals = [0, 0, 0]
        start = 0
        while start < head - base:
            stop = min(head - base, start + _EVENTS)

            async def work(r: aioredis.Redis, lo: int = start, hi: int = stop) -> list[bytes]:
                return cast(list[bytes], await r.lrange(keys.ev, lo, hi - 1))

            items = await conn.run(work, keys=[keys.ev])
            if len(items) != stop - start:  # deleted meanwhile, or a damaged list
                log.warning("upgrading the store: could not count session %r", session_id)
                return 0
            events = decode_items(conn, session_id, session_id, base + start, items)
            counts = count_events([NewEvent(e.type, e.data, e.ts) for e in events])
            totals = [a + b for a, b in zip(totals, counts, strict=True)]
            start += len(items)
        figures = [min(n, FIGURE_MAX) for n in totals]
        got = await conn.script("recount", [stamp, head, *figures], keys)
        if int(got[0]) != -3:
            return int(got[0])
    log.warning(
        "upgrading the store: session %r kept moving while its events were counted; its "
        "figures count only the events appended since the upgrade",
        session_id,
    )
    return 0
