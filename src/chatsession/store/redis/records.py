"""Records in Redis: how a record is kept in its hash, read back, and what scripts answer.

The record's ``user_id``/``agent_id``/``window_id`` are hash fields as given,
and its ``unset`` field names those that are None (so ``""`` and None each
read back as themselves); ``title``, ``metadata`` and ``fingerprint`` are the
shared JSON *body* (:func:`chatsession.store.records.encode_body`). The hash
also holds what the store maintains: ``head``, ``version``, ``stamp``,
``parent_id``, ``parent_seq``, ``deleted`` (a tombstone), ``fence`` (the last
lease token handed out), ``change`` (the id of the last update or delete,
so a re-sent one is recognised), and the figures of its own events for
``stats()``: ``messages``, ``tokens``, ``bytes`` (added to by every append)
and ``counted`` (``1``: they cover every event; a record written by an
earlier version gets them from :mod:`.layout`). Records written by earlier versions (no
``unset``) still read.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import redis.asyncio as aioredis

from chatsession.errors import (
    ConflictError,
    CorruptDataError,
    InvalidArgumentError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
)
from chatsession.store.checks import (
    check_create,
    check_filters,
    check_limit,
    check_record,
    check_version,
    describe_failure,
    initial_record,
    updated_record,
)
from chatsession.store.records import (
    check_visible,
    damaged,
    decode_body,
    decode_record,
    encode_body,
    is_visible,
)
from chatsession.store.types import (
    Page,
    SessionRecord,
    SessionState,
    decode_cursor,
    encode_cursor,
    now,
    validate_id,
)

from . import index
from .connection import RedisConnection
from .scripts import MARK, member_of, split_member, text

__all__ = [
    "check_status",
    "commit_record",
    "create",
    "decode",
    "delete",
    "expires",
    "get",
    "list_sessions",
    "read_raw",
    "record_fields",
    "stored_id",
    "update",
    "visible",
    "who_field",
]

log = logging.getLogger("chatsession.store")

_SCAN_FACTOR, _SCAN_MIN = 10, 100  # a listing reads at most max(10 * limit, 100) members
_DELETE_TRIES = 4  # reads of a session replaced between a delete's read and its commit

#: The record fields that may be None; the ``unset`` field names those that are.
WHO = ("user_id", "agent_id", "window_id")


def record_fields(record: SessionRecord) -> dict[str, str]:
    """The record's own fields as hash fields (the store adds head, version, stamp, parent)."""
    return {
        "id": record.id,
        "user_id": record.user_id or "",
        "agent_id": record.agent_id or "",
        "window_id": record.window_id or "",
        "unset": " ".join(name for name in WHO if getattr(record, name) is None),
        "state": record.state,
        "created_at": repr(record.created_at),
        "updated_at": repr(record.updated_at),
        "expires_at": "" if record.expires_at is None else repr(record.expires_at),
        "body": encode_body(record),
    }


def who_field(name: str, value: bytes | None, unset: bytes | None) -> str | None:
    """``user_id``, ``agent_id`` or ``window_id`` as :func:`decode` reads it, from raw fields.

    Args:
        name: The field's name.
        value: Its value in the hash (None: missing).
        unset: The hash's ``unset`` field (None: a record written before it,
            where ``""`` meant None).

    Raises:
        UnicodeDecodeError: A value that is not UTF-8.
    """
    if value is None:
        return None
    if unset is None:
        return value.decode() or None
    return None if name in unset.decode().split() else value.decode()


def place_of(conn: RedisConnection, session_id: str) -> str:
    """Where a session's record is, for messages."""
    return f"its Redis record {conn.session_keys(session_id).rec}"


def stored_id(value: str) -> str:
    """An id read back from Redis (a parent id): a bad one is damage, not a caller's mistake."""
    try:
        return validate_id(value, "parent id")
    except InvalidArgumentError as exc:
        raise ValueError(str(exc)) from None


def decode(conn: RedisConnection, raw: dict[bytes, bytes], session_id: str) -> SessionRecord:
    """The record from its hash fields.

    Raises:
        CorruptDataError: A field is missing, not UTF-8, or unreadable.
    """
    place = place_of(conn, session_id)
    try:
        f = {k.decode(): v.decode() for k, v in raw.items()}
        body = f["body"]
        if f["id"] != session_id:
            raise ValueError(f"its id field says {f['id'][:140]!r}")
        head, version, fork_seq = int(f["head"]), int(f["version"]), int(f["parent_seq"])
        if min(head, version, fork_seq) < 0:
            raise ValueError(
                f"head, version and parent_seq must be >= 0: {f['head']}, "
                f"{f['version']}, {f['parent_seq']}"
            )
        unset = f.get("unset")
        fields: dict[str, Any] = {
            name: (f[name] or None)  # written before ``unset``: "" was None
            if unset is None
            else (None if name in unset.split() else f[name])
            for name in WHO
        }
        fields.update(
            id=session_id,
            state=f["state"],
            created_at=float(f["created_at"]),
            updated_at=float(f["updated_at"]),
            expires_at=float(f["expires_at"]) if f["expires_at"] else None,
            parent={"session_id": stored_id(f["parent_id"]), "seq": fork_seq}
            if f.get("parent_id")
            else None,
            head=head,
            version=version,
        )
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise damaged(session_id, place, describe_failure(exc)) from exc
    fields.update(decode_body(body, session_id, f"{place}, field body"))
    return decode_record(fields, session_id, place)


def expires(conn: RedisConnection, raw: dict[bytes, bytes], session_id: str) -> float | None:
    """The record's ``expires_at`` (None: never).

    Raises:
        CorruptDataError: It is not a number.
    """
    value = raw.get(b"expires_at")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise damaged(
            session_id, place_of(conn, session_id), f"expires_at is {value[:40]!r}"
        ) from None


def visible(
    conn: RedisConnection, raw: dict[bytes, bytes], session_id: str, at: float | None = None
) -> None:
    """Raise unless the record read (``HGETALL``) is of a visible session.

    Raises:
        SessionNotFoundError: Missing, deleted (a tombstone) or expired.
    """
    if not raw:
        raise SessionNotFoundError(session_id)
    check_visible(session_id, raw.get(b"deleted") == b"1", expires(conn, raw, session_id), at)


def check_status(
    conn: RedisConnection,
    result: list[Any],
    session_id: str,
    expected: int = 0,
    what: str = "head seq",
) -> int:
    """The code of a session script's answer; raises for the answers every script shares.

    Raises:
        SessionNotFoundError: ``-1`` (missing or deleted), ``-2`` (expired).
        ConflictError: ``-3`` (the head or version is not ``expected``).
        CorruptDataError: ``-8`` (a record field is missing or bad).
    """
    code = int(result[0])
    if code == -1:
        raise SessionNotFoundError(session_id)
    if code == -2:
        raise SessionNotFoundError(session_id, "expired")
    if code == -3:
        raise ConflictError(session_id, expected, int(result[1]), what)
    if code == -8:
        raise damaged(
            session_id,
            place_of(conn, session_id),
            f"its field {text(result[1])!r} is missing or bad",
        )
    return code


def damaged_record(conn: RedisConnection, session_id: str, why: str) -> CorruptDataError:
    """The error for an unreadable record of ``session_id``."""
    return damaged(session_id, place_of(conn, session_id), why)


async def read_raw(conn: RedisConnection, session_id: str) -> dict[bytes, bytes]:
    """The session's record hash as stored (empty when there is none)."""
    rec = conn.session_keys(session_id).rec

    async def work(r: aioredis.Redis) -> dict[bytes, bytes]:
        return cast(dict[bytes, bytes], await r.hgetall(rec))

    return await conn.run(work, keys=[rec])


async def commit_record(conn: RedisConnection, stored: SessionRecord, stamp: str, t: str) -> int:
    """Create and fork, commit: 1 written (also when a re-sent call finds its own record),
    0 the id is taken, -6 too late."""
    fields = record_fields(stored)
    fields.update(
        {
            "head": str(stored.head),
            "version": "1",
            "deleted": "0",
            "stamp": stamp,
            "parent_id": stored.parent.session_id if stored.parent else "",
            "parent_seq": str(stored.parent.seq) if stored.parent else "0",
            # its own figures, for stats(): append adds to them
            "messages": "0",
            "tokens": "0",
            "bytes": "0",
            "counted": "1",
        }
    )
    _, expires_ms = index.expiry(stored)
    args = [t, conn.grace / 2, expires_ms, stamp, *(x for pair in fields.items() for x in pair)]
    return int((await conn.script("create_record", args, conn.session_keys(stored.id)))[0])


#: Settles the changes cut short that a refused create found past due (``cleanup.settle_marks``).
Settle = Callable[[RedisConnection, list[tuple[str, str, str]]], Awaitable[None]]


async def create(
    conn: RedisConnection,
    record: SessionRecord,
    max_per_user: int | None = None,
    settle: Settle | None = None,
) -> SessionRecord:
    """See :meth:`Store.create`: index (list it, mark it due), record (commit), index (clear the mark).

    With ``max_per_user``, the index step counts the user's live set and lists
    the new session only below the limit (one script: atomic against every
    other create). A session half made (listed, not committed: a crash, or a
    create still under way) counts until it commits or cleanup removes it;
    when the limit refuses and some of the user's sessions have changes past
    due, ``settle`` finishes those first and the count is taken once more.
    """
    check_create(record, max_per_user)
    stored = initial_record(record)
    stamp = secrets.token_hex(8)
    for attempt in range(2):
        reply = await conn.script(*index.intent_call(conn, stored, stamp, max_per_user))
        if reply[0] != -12:
            break
        if await _taken(conn, stored.id):
            raise SessionExistsError(stored.id)
        late = [
            (text(reply[i]), text(reply[i + 1]), text(reply[i + 2]))
            for i in range(2, len(reply) - 2, 3)
        ]
        if attempt or not late or settle is None:
            raise SessionLimitError(
                cast(str, stored.user_id), cast(int, max_per_user), int(reply[1])
            )
        await settle(conn, late)
    change = index.changed(stored, stamp, reply)
    code = await commit_record(conn, stored, stamp, change.t)
    if code != 1:
        await index.forget(conn, change.member, index.index_keys(conn, stored))
        if code == -6:
            raise conn.too_late(f"creating session {stored.id!r}")
        raise SessionExistsError(stored.id)
    await index.disarm(conn, change)
    return stored


async def _taken(conn: RedisConnection, session_id: str) -> bool:
    """Whether the id is taken (a record is there: live, expired or a tombstone)."""
    rec = conn.session_keys(session_id).rec

    async def work(r: aioredis.Redis) -> bool:
        return bool(await r.exists(rec))

    return await conn.run(work, keys=[rec])


async def get(conn: RedisConnection, session_id: str) -> SessionRecord:
    """See :meth:`Store.get`."""
    validate_id(session_id)
    raw = await read_raw(conn, session_id)
    visible(conn, raw, session_id)
    return decode(conn, raw, session_id)


async def update(
    conn: RedisConnection, record: SessionRecord, expected_version: int
) -> SessionRecord:
    """See :meth:`Store.update`: index (mark, add new indexes), record (commit), index (place)."""
    check_record(record)
    check_version(expected_version)
    raw = await read_raw(conn, record.id)
    visible(conn, raw, record.id)
    current = decode(conn, raw, record.id)
    if current.version != expected_version:
        raise ConflictError(record.id, expected_version, current.version, "version")
    stamp = text(raw.get(b"stamp", b""))
    new = updated_record(current, record)
    old_keys, new_keys = index.index_keys(conn, current), index.index_keys(conn, new)
    expires_at, expires_ms = index.expiry(new)
    member = member_of(record.id, stamp)
    placed = index.placement(conn, new)
    args: list[Any] = [member, expires_at, conn.grace, *(score for _, score in placed)]
    t, due = await conn.script("widen", args, [*conn.fixed, *new_keys])
    fields = record_fields(new)
    del fields["id"], fields["created_at"]
    change = secrets.token_hex(8)  # lets a re-sent commit recognise itself
    args = [repr(now()), expected_version, stamp, text(t), conn.grace / 2, expires_ms, change]
    args.extend(x for pair in fields.items() for x in pair)
    result = await conn.script("update_record", args, conn.session_keys(record.id))
    code = int(result[0])
    if code < 0:  # nothing was written: put the index entry back as it was
        await index.place(conn, member, text(due), current, new_keys)
        if code == -6:
            raise conn.too_late(f"updating session {record.id!r}")
        check_status(conn, result, record.id, expected_version, "version")
    await index.place(conn, member, text(due), new, old_keys)
    return new.model_copy(update={"head": current.head})


async def delete(conn: RedisConnection, session_id: str) -> None:
    """See :meth:`Store.delete`: index (mark), record (commit), parent (release), index."""
    validate_id(session_id)
    change = secrets.token_hex(8)  # lets a re-sent commit recognise the tombstone it made
    for _ in range(_DELETE_TRIES):  # -7: the session read was replaced before the delete ran
        raw = await read_raw(conn, session_id)
        visible(conn, raw, session_id)
        record = decode(conn, raw, session_id)
        stamp = text(raw.get(b"stamp", b""))
        member = member_of(session_id, stamp)
        t, _ = await conn.script("widen", [member, "", conn.grace], conn.fixed)
        args = [repr(now()), stamp, text(t), conn.grace / 2, change]
        sent: list[int] = []
        result = await conn.script("delete_record", args, conn.session_keys(session_id), sent=sent)
        code = int(result[0])
        if code == -1 and len(sent) > 1:
            # the first send's reply was lost, and the session is gone now: that
            # send removed it (or a delete racing this one did; either way, it is
            # deleted, and the steps below are the same)
            code = await _deleted_since(conn, session_id, stamp)
            result = [code, record.parent.session_id if record.parent else ""]
        if code != -7:
            break
    if code == -7:
        raise SessionNotFoundError(session_id)
    if code == -6:
        raise conn.too_late(f"deleting session {session_id!r}")
    check_status(conn, result, session_id)
    listing = index.index_keys(conn, record)
    if code == 1:  # a tombstone, kept for its forks
        parent = record.parent.session_id if record.parent else ""
        await index.index_call(conn, "bury", member, listing, [parent])
    else:
        await index.release(conn, text(result[1]), member)
        await index.forget(conn, member, listing)


async def _deleted_since(conn: RedisConnection, session_id: str, stamp: str) -> int:
    """What became of the incarnation ``stamp``: 1 a tombstone now, 0 removed."""
    raw = await read_raw(conn, session_id)
    tombstone = raw.get(b"stamp") == stamp.encode() and raw.get(b"deleted") == b"1"
    return 1 if tombstone else 0


async def list_sessions(
    conn: RedisConnection,
    *,
    user_id: str | None = None,
    agent_id: str | None = None,
    window_id: str | None = None,
    state: SessionState | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """See :meth:`Store.list_sessions`.

    Reads at most ``max(10 * limit, 100)`` index members: when filters or
    expired sessions reject many, the page is shorter than ``limit`` but
    ``next_cursor`` still moves past everything read.
    """
    check_limit(limit)
    check_filters(user_id, agent_id, window_id, state)
    if cursor is not None and not isinstance(cursor, str):
        raise InvalidArgumentError(
            f"cursor must be a next_cursor from list_sessions, not {type(cursor).__name__}"
        )
    position = decode_cursor(cursor) if cursor else None
    if user_id is not None:
        key = conn.index("user", user_id)
    elif agent_id is not None:
        key = conn.index("agent", agent_id)
    elif window_id is not None:
        key = conn.index("window", window_id)
    else:
        key = conn.index()
    at = now()
    budget = max(_SCAN_FACTOR * limit, _SCAN_MIN)
    found: list[SessionRecord] = []
    scanned = 0
    exhausted = False
    # the index key already is the only filter (a user's, an agent's, a window's or
    # every session): nearly every member matches, so read what the page needs and
    # one more (to tell the last page), not a fixed 50 records
    filters = sum(v is not None for v in (user_id, agent_id, window_id, state))
    only_index = filters <= 1 and state is None
    while len(found) < limit and scanned < budget:
        left = limit - len(found)
        want = min(budget - scanned, left + 1 if only_index else max(2 * left, 50))
        args = (
            ["+inf", "", want]
            if position is None
            else [repr(position[0]), position[1] + MARK, want]
        )
        flat = await conn.script("page", args, [key], write=False)
        members = [(split_member(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]
        ids = [sid for (sid, _), _ in members]
        raws = await conn.run(partial(_hgetall_many, conn, ids=ids))
        taken = 0
        for ((sid, stamp), score), raw in zip(members, raws, strict=True):
            taken += 1
            position = (score, sid)
            record = _listed(conn, sid, stamp, raw, at)
            if record is None or (
                (user_id is not None and record.user_id != user_id)
                or (agent_id is not None and record.agent_id != agent_id)
                or (window_id is not None and record.window_id != window_id)
                or (state is not None and record.state != state)
            ):
                continue
            found.append(record)
            if len(found) == limit:
                break
        scanned += taken
        if len(members) < want and taken == len(members):
            exhausted = True
            break
    if exhausted or position is None:
        return Page(found, None)
    score, sid = position
    return Page(found, encode_cursor(SessionRecord(id=sid, created_at=score)))


def _listed(
    conn: RedisConnection,
    session_id: str,
    stamp: str,
    raw: dict[bytes, bytes] | Exception,
    at: float,
) -> SessionRecord | None:
    """The record a listing shows for the member ``ID#STAMP``, or None.

    None for a half-made, removed or expired session (or one Redis evicted
    and cleanup has not purged yet), and for a damaged one, which is
    logged as a warning and left out so that the rest of the listing works.
    """
    try:
        if isinstance(raw, Exception):
            raise conn.translate(raw, False, [conn.session_keys(session_id).rec])
        if not raw:
            return None
        if b"stamp" not in raw:
            raise damaged_record(conn, session_id, "the field 'stamp' is missing")
        if raw[b"stamp"] != stamp.encode():
            return None  # another incarnation of the id
        if not is_visible(raw.get(b"deleted") == b"1", expires(conn, raw, session_id), at):
            return None
        return decode(conn, raw, session_id)
    except CorruptDataError as exc:
        log.warning("listing sessions: left out session %r: %s", session_id, exc)
        return None


async def _hgetall_many(
    conn: RedisConnection, r: aioredis.Redis, ids: list[str]
) -> list[dict[bytes, bytes] | Exception]:
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for sid in ids:
        pipe.hgetall(conn.session_keys(sid).rec)
    raws: list[dict[bytes, bytes] | Exception] = await pipe.execute(raise_on_error=False)
    return raws
