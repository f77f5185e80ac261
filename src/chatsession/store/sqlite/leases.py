"""The SQLite store's write leases and snapshots, each one ``BEGIN IMMEDIATE`` transaction.

The lease lives in the session's row (``lease_owner``, ``lease_token``,
``lease_expires``), read and written in the same transactions as the head, so
a fenced append checks it atomically; the rules are
:mod:`chatsession.store.leases`'s, judged by this machine's wall clock.
Snapshots live in the ``snapshots`` table, one row per session (the highest
seq), deleted with the session (and when it is only kept for its forks).
"""

from __future__ import annotations

import logging
import sqlite3

from chatsession.errors import InvalidArgumentError
from chatsession.store.base import (
    Lease,
    now,
)
from chatsession.store.leases import granted, renewed
from chatsession.store.sqlite.rows import HEAD, PK, Row, held_lease, visible_row

__all__ = [
    "acquire",
    "get_snapshot",
    "put_snapshot",
    "release",
    "renew",
]

logger = logging.getLogger("chatsession.store.sqlite")

_SET_LEASE = "UPDATE sessions SET lease_owner = ?, lease_token = ?, lease_expires = ? WHERE pk = ?"


def _held(path: str, row: Row, session_id: str) -> Lease | None:
    return held_lease(path, session_id, row[17], row[18], row[19])


def acquire(path: str, session_id: str, owner: str, ttl: float, db: sqlite3.Connection) -> Lease:
    """``acquire_lease`` in one transaction (see ``Store.acquire_lease``); arguments checked."""
    db.execute("BEGIN IMMEDIATE")
    row = visible_row(db, path, session_id)
    held = _held(path, row, session_id)
    lease = granted(session_id, held, row[18], owner, ttl, now())
    db.execute(_SET_LEASE, (lease.owner, lease.token, lease.expires_at, row[PK]))
    db.execute("COMMIT")
    return lease


def renew(path: str, lease: Lease, ttl: float, db: sqlite3.Connection) -> Lease:
    """``renew_lease`` in one transaction (see ``Store.renew_lease``); arguments checked."""
    db.execute("BEGIN IMMEDIATE")
    row = visible_row(db, path, lease.session_id)
    new = renewed(lease, _held(path, row, lease.session_id), ttl, now())
    db.execute(_SET_LEASE, (new.owner, new.token, new.expires_at, row[PK]))
    db.execute("COMMIT")
    return new


def release(lease: Lease, db: sqlite3.Connection) -> None:
    """``release_lease``: clear the lease if it is still this token (the token stays counted)."""
    db.execute(
        "UPDATE sessions SET lease_owner = NULL, lease_expires = NULL "
        "WHERE id = ? AND lease_token = ? AND lease_owner IS NOT NULL",
        (lease.session_id, lease.token),
    )


def put_snapshot(path: str, session_id: str, seq: int, data: bytes, db: sqlite3.Connection) -> None:
    """Keep ``data`` as the snapshot at ``seq`` unless one at a higher seq is kept."""
    db.execute("BEGIN IMMEDIATE")
    row = visible_row(db, path, session_id)
    if seq > row[HEAD]:
        raise InvalidArgumentError(
            f"a snapshot of session {session_id!r} at seq {seq} is past its head {row[HEAD]}"
        )
    db.execute(
        "INSERT INTO snapshots (session_pk, seq, data) VALUES (?, ?, ?) "
        "ON CONFLICT (session_pk) DO UPDATE SET seq = excluded.seq, data = excluded.data "
        "WHERE excluded.seq >= snapshots.seq OR typeof(snapshots.seq) <> 'integer' "
        "OR typeof(snapshots.data) <> 'blob'",  # a damaged one never wins
        (row[PK], seq, bytes(data)),
    )
    db.execute("COMMIT")


def get_snapshot(path: str, session_id: str, db: sqlite3.Connection) -> tuple[int, bytes] | None:
    """The kept snapshot; a damaged row is derived data lost: None, with a warning."""
    row = visible_row(db, path, session_id)
    found = db.execute(
        "SELECT seq, data FROM snapshots WHERE session_pk = ?", (row[PK],)
    ).fetchone()
    if found is None:
        return None
    seq, data = found
    if type(seq) is not int or not 0 <= seq <= row[HEAD] or type(data) is not bytes:
        logger.warning(
            "session %r in the SQLite file %r: its snapshot row is damaged (seq %r, data a %s); "
            "ignored: the session layer rebuilds it from the log",
            session_id,
            path,
            seq,
            type(data).__name__,
        )
        return None
    return seq, data
