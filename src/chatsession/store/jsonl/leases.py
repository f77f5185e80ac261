"""The ``file://`` store's write lease (``lease.json``) and snapshot (``snapshot.bin``).

Both are files in the session's folder, replaced atomically (a temporary file
renamed over the old one) under the session's cross-process lock, which every
append also holds: a fenced append reads the lease in the same step as it
checks the head. The rules are :mod:`chatsession.store.leases`'s, judged by
this machine's wall clock.

``lease.json`` is ``{"owner", "token", "expires_at"}``; a released lease keeps
its token (owner and expiry null), so tokens only grow. ``snapshot.bin`` is
one line ``chatsession-snapshot seq=N size=B`` and then the B bytes. A
damaged lease file is :class:`~chatsession.errors.CorruptDataError` (fencing
depends on it); a damaged snapshot counts as none (derived data, logged).
"""

from __future__ import annotations

import json
import logging
import re

from chatsession.errors import InvalidArgumentError
from chatsession.store.base import Lease, describe_failure
from chatsession.store.jsonl.files import LEASE, SNAPSHOT, Folder
from chatsession.store.jsonl.lines import loads
from chatsession.store.jsonl.log import Locked
from chatsession.store.records import damaged

__all__ = ["get_snapshot", "held_lease", "put_snapshot", "write_lease"]

logger = logging.getLogger("chatsession.store.jsonl")

_SNAPSHOT_HEAD = re.compile(rb"chatsession-snapshot seq=(0|[1-9][0-9]{0,18}) size=([0-9]{1,12})\n")


def held_lease(folder: Folder, session_id: str) -> tuple[Lease | None, int]:
    """The session's lease (expired or not; None when released or never taken) and its
    last token. Call under the session's lock.

    Raises:
        CorruptDataError: ``lease.json`` is damaged (names the session and file).
    """
    path = folder.dir(session_id) / LEASE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, 0
    try:
        obj = loads(raw)
        if type(obj) is not dict:
            raise TypeError(f"a JSON {type(obj).__name__}, not an object")
        owner, token, expires_at = obj["owner"], obj["token"], obj["expires_at"]
        if type(token) is not int or token < 0:
            raise TypeError(f"token {token!r} is not an int >= 0")
        if owner is not None and (type(owner) is not str or type(expires_at) not in (int, float)):
            raise TypeError(f"owner {owner!r} and expires_at {expires_at!r} do not go together")
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise damaged(
            session_id,
            str(path),
            describe_failure(exc),
            "remove the file if no process writes to the session (its writers then take the "
            "lease again), or restore it from a backup",
        ) from exc
    if owner is None:
        return None, token
    return Lease(session_id, owner, token, float(expires_at)), token


def write_lease(folder: Folder, lease: Lease | None, session_id: str, token: int) -> None:
    """Keep ``lease`` (or, None, a released one with ``token``). Call under the session's lock."""
    body = (
        {"owner": None, "token": token, "expires_at": None}
        if lease is None
        else {"owner": lease.owner, "token": lease.token, "expires_at": lease.expires_at}
    )
    folder.write_atomic(folder.dir(session_id) / LEASE, json.dumps(body).encode())


def _read_snapshot(folder: Folder, session_id: str, head: int) -> tuple[int, bytes] | None:
    path = folder.dir(session_id) / SNAPSHOT
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    first = _SNAPSHOT_HEAD.match(raw)
    if first is not None:
        seq, size = int(first[1]), int(first[2])
        data = raw[first.end() :]
        if len(data) == size and seq <= head:
            return seq, data
    logger.warning(
        "session %r: %s is damaged (not a snapshot of this log); ignored: the session layer "
        "rebuilds it from the log",
        session_id,
        path,
    )
    return None


def put_snapshot(folder: Folder, session: Locked, session_id: str, seq: int, data: bytes) -> None:
    """Keep ``data`` as the snapshot at ``seq`` unless one at a higher seq is kept."""
    if seq > session.tail.head:
        raise InvalidArgumentError(
            f"a snapshot of session {session_id!r} at seq {seq} is past its head "
            f"{session.tail.head}"
        )
    try:
        with open(folder.dir(session_id) / SNAPSHOT, "rb") as file:
            first = _SNAPSHOT_HEAD.match(file.readline(80))
    except FileNotFoundError:
        first = None
    if first is not None and seq < int(first[1]) <= session.tail.head:
        return  # a snapshot at a higher seq is kept (its bytes are checked when read)
    head = f"chatsession-snapshot seq={seq} size={len(data)}\n".encode()
    folder.write_atomic(folder.dir(session_id) / SNAPSHOT, head + bytes(data))


def get_snapshot(folder: Folder, session: Locked, session_id: str) -> tuple[int, bytes] | None:
    """The kept snapshot, or None (none kept, or a damaged one: logged)."""
    return _read_snapshot(folder, session_id, session.tail.head)
