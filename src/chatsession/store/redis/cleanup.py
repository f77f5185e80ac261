"""Cleanup: ``purge_expired``, and finishing changes across slots that were cut short.

``purge_expired`` reads the ``expiry`` set up to ``before`` in batches of
200: deletes expired sessions (or makes tombstones of those with forks),
drops the entries of sessions Redis already evicted, and releases their
parents. Then it finishes the changes whose marks are due (a crash or a lost
reply between steps; see the package docstring) and checks the forks of
tombstones. Each step is one script on one slot.
"""

from __future__ import annotations

import logging
from functools import partial

import redis.asyncio as aioredis

from chatsession.errors import CorruptDataError
from chatsession.store.checks import check_before
from chatsession.store.types import now

from . import index
from .connection import RedisConnection
from .records import check_status, decode, read_raw
from .scripts import split_member, text, where_entry

__all__ = ["purge_expired"]

log = logging.getLogger("chatsession.store")

_PURGE_BATCH = 200  # expiry-set members, or due marks, per batch
_DUE_BATCHES = 50  # batches of due marks finished per purge_expired call, at most
_FORK_CHECK = 100  # forks of one tombstone checked per look


async def purge_expired(conn: RedisConnection, before: float | None = None) -> int:
    """See :meth:`Store.purge_expired` (and the module docstring)."""
    check_before(before)
    at = now() if before is None else before
    count = skipped = 0
    while True:
        args = [repr(at), _PURGE_BATCH, skipped]
        flat = await conn.script("expiry_batch", args, conn.fixed, write=False)
        for i in range(0, len(flat), 4):
            member, score, where = text(flat[i]), text(flat[i + 1]), text(flat[i + 2])
            try:
                done = await _expire(conn, member, score, where, bool(flat[i + 3]), at)
            except CorruptDataError as exc:  # reported by every read of it: skip it
                log.warning(
                    "purge_expired: left session %r alone: %s", split_member(member)[0], exc
                )
                done = None
            if done is None:
                skipped += 1
            else:
                count += done
        if len(flat) < 4 * _PURGE_BATCH:
            break
    await _settle_due(conn)
    return count


async def _expire(
    conn: RedisConnection, member: str, score: str, where: str, changing: bool, at: float
) -> int | None:
    """Purge one member of the expiry set; how many sessions went (None: left for later)."""
    session_id, stamp = split_member(member)
    parent, known = where_entry(where)
    result = await conn.script("expire", [stamp, repr(at)], conn.session_keys(session_id))
    code = check_status(conn, result, session_id)
    if code == 0:  # evicted by Redis, or a create still under way
        if changing:
            return None  # its mark settles it once due
        await index.release(conn, parent, member)
        await index.forget(conn, member, known=known)
        return 1 if where else 0
    if code == 1:
        await index.release(conn, text(result[1]), member)
        await index.forget(conn, member, known=known)
        return 1
    if code in (2, 3):
        await index.index_call(conn, "bury", member, [], [parent], known)
        return 1 if code == 2 else 0
    await conn.script("reschedule", [member, score, text(result[1])], conn.fixed)
    return 0


async def _settle_due(conn: RedisConnection) -> None:
    for _ in range(_DUE_BATCHES):
        flat = await conn.script("due_batch", [_PURGE_BATCH], conn.fixed, write=False)
        for i in range(0, len(flat), 3):
            member, score = text(flat[i]), text(flat[i + 1])
            try:
                await _settle(conn, member, score, text(flat[i + 2]))
            except CorruptDataError as exc:  # reported by every read of it; look again later
                log.warning(
                    "purge_expired: left session %r alone: %s", split_member(member)[0], exc
                )
                await conn.script("requeue", [member, score, conn.recheck], conn.fixed)
        if len(flat) < 3 * _PURGE_BATCH:
            return


async def _settle(conn: RedisConnection, member: str, score: str, where: str) -> None:
    """Finish the change marked on ``member``, from what its record says now."""
    session_id, stamp = split_member(member)
    parent, known = where_entry(where)
    raw = await read_raw(conn, session_id)
    if not raw or text(raw.get(b"stamp", b"")) != stamp:
        # never committed, and never will be (the grace is over), or gone since
        await index.release(conn, parent, member)
        await index.forget(conn, member, known=known)
    elif raw.get(b"deleted") == b"1":
        await _check_forks(conn, session_id, member, score)
    else:
        await index.place(conn, member, score, decode(conn, raw, session_id), known)


async def _check_forks(conn: RedisConnection, session_id: str, member: str, score: str) -> None:
    """Drop a tombstone's forks that have no record; the tombstone goes with the last."""
    got = await conn.script("old_forks", [conn.grace, _FORK_CHECK], conn.session_keys(session_id))
    if int(got[0]) == 0 and await index.release(conn, session_id, ""):
        return
    pairs = [text(got[i]) for i in range(1, len(got), 2)]
    if pairs:
        ids = [split_member(child)[0] for child in pairs]
        stamps = await conn.run(partial(_stamps, conn, ids=ids))
        for child, stamp in zip(pairs, stamps, strict=True):
            if stamp != split_member(child)[1] and await index.release(conn, session_id, child):
                return
    delay = 0.0 if len(pairs) == _FORK_CHECK else conn.recheck
    await conn.script("requeue", [member, score, delay], conn.fixed)


async def _stamps(conn: RedisConnection, r: aioredis.Redis, ids: list[str]) -> list[str]:
    pipe = r.pipeline(transaction=False)
    for sid in ids:
        pipe.hget(conn.session_keys(sid).rec, "stamp")
    return [text(x) if x is not None else "" for x in await pipe.execute()]
