"""Leases and snapshots in Redis.

The lease is the key ``PREFIX{ID}:lease`` holding ``TOKEN OWNER``, set with
the lease's time to live (``PX``: the server's clock decides expiry, never
the client's). The fencing token comes from the record's ``fence`` field,
moved on (``HINCRBY``) for every new holder and on every release, so it
grows with every holder and a released lease cannot be renewed. Every
decision is one script on the session's slot; ``append`` checks the lease in
its own script, in the same atomic step as the head.

The snapshot is the hash ``PREFIX{ID}:snap`` (``seq``, ``data``): kept only
when its seq is not below the kept one's, with the session's native expiry,
and removed with the session (also when a tombstone is kept for its forks).
"""

from __future__ import annotations

import logging
import math

from chatsession.errors import InvalidArgumentError, LeaseLostError
from chatsession.store.checks import check_lease, check_lease_request, check_snapshot
from chatsession.store.types import Lease, now, validate_id

from .connection import RedisConnection
from .events import busy, damaged_lease, holding
from .records import check_status
from .scripts import text

__all__ = ["acquire", "get_snapshot", "put_snapshot", "release", "renew"]

log = logging.getLogger("chatsession.store")


def _ms(ttl: float) -> int:
    """A ttl in whole milliseconds for ``PX`` (at least 1)."""
    return max(1, math.ceil(ttl * 1000))


def _lease(session_id: str, owner: str, result: list[object]) -> Lease:
    return Lease(session_id, owner, int(text(result[0])), int(text(result[1])) / 1000)


async def acquire(conn: RedisConnection, session_id: str, owner: str, ttl: float) -> Lease:
    """See :meth:`Store.acquire_lease`."""
    check_lease_request(session_id, owner, ttl)
    args = [owner, _ms(ttl), repr(now())]
    result = await conn.script("acquire_lease", args, conn.session_keys(session_id))
    code = int(result[0])
    if code == -9:
        raise busy(session_id, result)
    if code == -11:
        raise damaged_lease(conn, session_id)
    check_status(conn, result, session_id)
    return _lease(session_id, owner, result)


async def renew(conn: RedisConnection, lease: Lease, ttl: float) -> Lease:
    """See :meth:`Store.renew_lease`."""
    check_lease(lease)
    check_lease_request(lease.session_id, lease.owner, ttl)
    args = [lease.token, holding(lease), lease.owner, _ms(ttl), repr(now())]
    result = await conn.script("renew_lease", args, conn.session_keys(lease.session_id))
    if int(result[0]) == -10:
        raise LeaseLostError(lease.session_id, lease.token, text(result[1]))
    check_status(conn, result, lease.session_id)
    return _lease(lease.session_id, lease.owner, result)


async def release(conn: RedisConnection, lease: Lease) -> None:
    """See :meth:`Store.release_lease` (idempotent: a lease no longer held changes nothing)."""
    check_lease(lease)
    args = [lease.token, holding(lease)]
    await conn.script("release_lease", args, conn.session_keys(lease.session_id))


async def put_snapshot(conn: RedisConnection, session_id: str, seq: int, data: bytes) -> None:
    """See :meth:`Store.put_snapshot`."""
    validate_id(session_id)
    check_snapshot(seq, data)
    args = [repr(now()), seq, bytes(data)]
    result = await conn.script("put_snapshot", args, conn.session_keys(session_id))
    if int(result[0]) == -4:
        raise InvalidArgumentError(
            f"a snapshot of session {session_id!r} at seq {seq} is past its head {text(result[1])}"
        )
    check_status(conn, result, session_id)


async def get_snapshot(conn: RedisConnection, session_id: str) -> tuple[int, bytes] | None:
    """See :meth:`Store.get_snapshot`.

    A damaged snapshot (its seq not a number, its data missing, its seq past
    the head) is derived data gone bad: it is logged as a warning on the
    ``chatsession.store`` logger and reads as None, so the session rebuilds it
    from the log.
    """
    validate_id(session_id)
    keys = conn.session_keys(session_id)
    result = await conn.script("get_snapshot", [repr(now())], keys, write=False)
    if check_status(conn, result, session_id) == 0:
        return None
    seq, data, head = text(result[1]), result[2], int(text(result[3]))
    if not (seq.isascii() and seq.isdigit()) or data is None or int(seq) > head:
        log.warning(
            "session %r: its snapshot %s is damaged (seq %r, head %d); it is ignored and "
            "will be rebuilt from the log",
            session_id,
            keys.snap,
            seq[:40],
            head,
        )
        return None
    return int(seq), bytes(data)
