"""Cleanup: ``purge_expired``, and finishing changes across slots that were cut short.

``purge_expired`` works through the ``expiry`` set up to ``before`` in
batches of 200. Each batch is first *claimed* in one script on the index
slot: its members leave ``expiry`` and get a mark on ``due``, so when several
processes purge at once each member is handled, and counted, by the one that
claimed it. Then, per session, one script on its slot deletes it (or makes a
tombstone of one with forks; a session Redis already evicted has nothing
left there), and the index entries go and its parent is released. A purger
that stops half way leaves the claim's mark: it falls due after the grace,
and cleanup finishes it from the record (puts it back on ``expiry``, or
removes what is left). Members a change is under way for are left alone.
A claim whose reply is lost is sent again and claims the next members; the
ones the lost reply named wait for their marks to fall due the same way
(later, never twice). Each removal also drops the session from every index
its ``where`` entry names, its user's live set among them, so nothing of a
purged session is left in the index slot.

Then it finishes the changes whose marks are due (a crash or a lost reply
between steps; see the package docstring) and checks the forks of
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

__all__ = ["purge_expired", "settle", "settle_marks"]

log = logging.getLogger("chatsession.store")

_PURGE_BATCH = 200  # expiry-set members, or due marks, per batch
_DUE_BATCHES = 50  # batches of due marks finished per purge_expired call, at most
_FORK_CHECK = 100  # forks of one tombstone checked per look


async def purge_expired(conn: RedisConnection, before: float | None = None) -> int:
    """See :meth:`Store.purge_expired` (and the module docstring)."""
    check_before(before)
    at = now() if before is None else before
    count = left = 0
    while True:
        args = [repr(at), _PURGE_BATCH, left, conn.grace]
        got = await conn.script("claim", args, conn.fixed)
        t, due, read = text(got[0]), text(got[1]), int(got[2])
        left += int(got[3])  # members a change is under way for stay: read past them
        for i in range(4, len(got), 3):
            member, where = text(got[i]), text(got[i + 2])
            try:
                count += await _expire(conn, member, where, t, due, at)
            except CorruptDataError as exc:  # reported by every read of it: its mark stays
                log.warning(
                    "purge_expired: left session %r alone: %s", split_member(member)[0], exc
                )
        if read < _PURGE_BATCH:
            break
    await _settle_due(conn)
    return count


async def _expire(
    conn: RedisConnection, member: str, where: str, t: str, due: str, at: float
) -> int:
    """Purge one claimed member of the expiry set; how many sessions went (0 or 1)."""
    session_id, stamp = split_member(member)
    parent, known = where_entry(where)
    args = [stamp, repr(at), t, conn.grace / 2]
    result = await conn.script("expire", args, conn.session_keys(session_id))
    code = check_status(conn, result, session_id)
    if code == -6:  # too late: the claim's mark is due, cleanup finishes it
        return 0
    if code == 0:  # evicted by Redis: only its index entries and its parent's hold are left
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
    await conn.script("unclaim", [member, due, text(result[1])], conn.fixed)
    return 0


async def _settle_due(conn: RedisConnection) -> None:
    for _ in range(_DUE_BATCHES):
        flat = await conn.script("due_batch", [_PURGE_BATCH], conn.fixed, write=False)
        marks = [
            (text(flat[i]), text(flat[i + 1]), text(flat[i + 2])) for i in range(0, len(flat), 3)
        ]
        await settle_marks(conn, marks)
        if len(flat) < 3 * _PURGE_BATCH:
            return


async def settle_marks(conn: RedisConnection, marks: list[tuple[str, str, str]]) -> None:
    """Finish the changes of due marks ``(member, score, where entry)``.

    A damaged record is logged and looked at again after ``recheck``.
    """
    for member, score, where in marks:
        try:
            await settle(conn, member, score, where)
        except CorruptDataError as exc:  # reported by every read of it; look again later
            log.warning("purge_expired: left session %r alone: %s", split_member(member)[0], exc)
            await conn.script("requeue", [member, score, conn.recheck], conn.fixed)


async def settle(conn: RedisConnection, member: str, score: str, where: str) -> None:
    """Finish the change marked on ``member`` (its mark due), from what its record says now."""
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
