"""Events in Redis: how an event is kept in its session's list, appended, read and forked.

Each event is one list item: a compact JSON header
``[seq,type,ts,turn_id,schema_version]`` (with the event id as a sixth item
when it has one), a line break, then the payload text exactly as given. The
header is ASCII JSON, so the first line break ends it whatever the payload
or the strings hold. Events written before the header format (fields joined
by ``\\x1f``) still read. No script decodes a payload (cjson would change
numbers); the append script reads only the end of one header: the event id.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple, cast

import redis.asyncio as aioredis

from chatsession.errors import (
    BlobNotFoundError,
    CorruptDataError,
    LeaseLostError,
    SessionArchivedError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    StoreError,
)
from chatsession.store.checks import (
    check_append,
    check_blob,
    check_fork_at,
    check_fork_point,
    check_read,
    fork_loop,
    initial_record,
)
from chatsession.store.leases import check_lease_for
from chatsession.store.types import (
    DEFAULT_READ_BATCH,
    Lease,
    NewEvent,
    ParentRef,
    SessionRecord,
    StoredEvent,
    count_events,
    fork_segments,
    now,
    validate_id,
)

from . import index
from .connection import RedisConnection
from .records import (
    check_status,
    commit_record,
    damaged_record,
    decode,
    read_raw,
    stored_id,
    visible,
)
from .scripts import FIGURE_MAX, member_of, text

__all__ = [
    "append",
    "busy",
    "damaged_lease",
    "decode_items",
    "entry",
    "fork",
    "get_blob",
    "holding",
    "lineage",
    "put_blob",
    "read",
]

LEGACY_SEP = "\x1f"  # between the fields of an event written before the header format
#: What a read needs of each ancestor's record.
_CHAIN_FIELDS = ("head", "parent_seq", "parent_id", "stamp")
_CHAIN_KEYS = tuple(name.encode() for name in _CHAIN_FIELDS)
_header = json.JSONEncoder(separators=(",", ":")).encode


class Node(NamedTuple):
    """One session of a fork chain as read for a read: its own events are ``base+1..head``."""

    session_id: str
    head: int
    base: int  # parent_seq: the last seq it inherits
    parent: str  # '' for a root
    stamp: str


def entry(seq: int, event: NewEvent) -> str:
    """One event as a list item: its header, a line break, its payload as given."""
    ts = float(event.ts)  # read back as a float on every backend
    fields: list[Any] = [seq, event.type, ts, event.turn_id, event.schema_version]
    if event.event_id is not None:
        fields.append(event.event_id)  # last: the append script looks for it there
    return f"{_header(fields)}\n{event.data}"


def _event(seq: int, header: Any, data: str) -> StoredEvent:
    """The event ``seq`` from its list item's header and payload (see :func:`entry`)."""
    if len(header) == 6:
        got, kind, ts, turn, version, event_id = header
        if type(event_id) is not str:
            raise TypeError(f"the event id is not text: {event_id!r}"[:200])
    else:
        got, kind, ts, turn, version = header
        event_id = None
    if got != seq or type(got) is not int:
        raise ValueError(f"the item at seq {seq} says it is seq {got!r}")
    if (
        type(kind) is not str
        or type(ts) not in (int, float)
        or not (turn is None or type(turn) is str)
        or type(version) is not int
    ):
        raise TypeError(f"a header field has the wrong type: {header!r}"[:200])
    return StoredEvent(seq, kind, float(ts), turn, data, version, event_id)


def stray(
    conn: RedisConnection,
    session_id: str,
    head: int,
    length: int,
    base: int = 0,
    *,
    reading: str = "",
) -> CorruptDataError:
    """The session's event list does not end at its head (a hand edit, a partial restore)."""
    own = f"{head - base} (its events {base + 1}..{head})"
    what = f"reading {reading!r}" if reading else "nothing was written"
    return CorruptDataError(
        f"session {session_id!r}: its event list {conn.session_keys(session_id).ev} holds "
        f"{length} item(s) where its record says {own}: events are missing or stray items "
        f"follow the head ({what}); restore the session from a backup, or repair the list "
        "to match the head"
    )


def holding(lease: Lease) -> str:
    """What the lease key holds while ``lease`` is the session's: ``TOKEN OWNER``."""
    return f"{lease.token} {lease.owner}"


def busy(session_id: str, result: list[Any]) -> SessionBusyError:
    """The error for a script's ``{-9, holder, ms left}``: another writer holds the lease."""
    left = int(result[2])
    return SessionBusyError(session_id, text(result[1]), left / 1000 if left > 0 else None)


def damaged_lease(conn: RedisConnection, session_id: str) -> CorruptDataError:
    """The error for a lease key that does not hold ``TOKEN OWNER``."""
    return CorruptDataError(
        f"session {session_id!r}: its lease key {conn.session_keys(session_id).lease} is damaged (it "
        "does not hold 'TOKEN OWNER'); delete that key (the session is then free to write)"
    )


async def append(
    conn: RedisConnection,
    session_id: str,
    events: Sequence[NewEvent],
    expected_seq: int,
    lease: Lease | None = None,
) -> int:
    """See :meth:`Store.append`.

    One script: it checks the session, the head and that the event list ends
    at the head (a stray or missing item would put the new events at the
    wrong seqs: that is :class:`CorruptDataError` and nothing is written),
    recognises an append it already applied (by the first event's id),
    refuses an archived session, checks the lease, pushes the events, moves
    the head and adds the events' figures (:func:`count_events`, counted
    here before the call) to the record's. An append whose first event has
    an id is sent again when the connection drops before its reply.
    """
    check_append(events, expected_seq)
    validate_id(session_id)
    token, owner = "", ""
    if lease is not None:
        check_lease_for(lease, session_id)
        token, owner = str(lease.token), holding(lease)
    first_id = events[0].event_id or ""
    entries = [entry(seq, e) for seq, e in enumerate(events, expected_seq + 1)]
    figures = [min(n, FIGURE_MAX) for n in count_events(events)]
    args = [expected_seq, repr(now()), first_id, token, owner, *figures, *entries]
    result = await conn.script("append", args, conn.session_keys(session_id), resend=bool(first_id))
    code = int(result[0])
    if code == -5:
        raise stray(conn, session_id, int(result[1]), int(result[2]), int(result[3]))
    if code == -9:
        raise busy(session_id, result)
    if code == -10 and lease is not None:
        raise LeaseLostError(session_id, lease.token, text(result[1]))
    if code == -11:
        raise damaged_lease(conn, session_id)
    if code == -13:
        raise SessionArchivedError(session_id)
    return check_status(conn, result, session_id, expected_seq)


async def _node(
    conn: RedisConnection, session_id: str, *, events: bool, whole: bool = True
) -> tuple[dict[bytes, bytes], int]:
    """The record of ``session_id`` and (when ``events``) the length of its event list.

    Both in one ``MULTI``/``EXEC``: an append in between cannot make them
    disagree. Unless ``whole``, only the fields a fork chain needs.
    """
    keys = conn.session_keys(session_id)

    async def work(r: aioredis.Redis) -> tuple[dict[bytes, bytes], int]:
        pipe = r.pipeline(transaction=events)
        if whole:
            pipe.hgetall(keys.rec)
        else:
            pipe.hmget(keys.rec, _CHAIN_FIELDS)
        if events:
            pipe.llen(keys.ev)
        got = await pipe.execute()
        if whole:
            raw = got[0]
        else:
            raw = {k: v for k, v in zip(_CHAIN_KEYS, got[0], strict=True) if v is not None}
        return cast(dict[bytes, bytes], raw), (int(got[1]) if events else -1)

    return await conn.run(work, keys=[keys.rec, keys.ev] if events else [keys.rec])


def _chain_node(conn: RedisConnection, raw: dict[bytes, bytes], session_id: str) -> Node:
    """One session of a fork chain, from its record's fields."""
    try:
        head = int(raw[b"head"])
        base = int(raw.get(b"parent_seq") or b"0")
        parent = (raw.get(b"parent_id") or b"").decode()
        stamp = (raw.get(b"stamp") or b"").decode()
        if parent:
            stored_id(parent)
        if head < 0 or base < 0:
            raise ValueError(f"head {head} and parent_seq {base} must be >= 0")
    except KeyError as exc:
        raise damaged_record(conn, session_id, f"the field {exc} is missing") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged_record(conn, session_id, str(exc)[:300]) from exc
    return Node(session_id, head, base, parent, stamp)


async def lineage(conn: RedisConnection, session_id: str, *, events: bool = False) -> list[Node]:
    """The session and its ancestors, nearest first.

    A fork chain that loops back on itself (a hand edit, a bad restore),
    names a missing parent or holds a damaged record is
    :class:`CorruptDataError`. With ``events``, each session's event list
    must also hold exactly its own events (``parent_seq+1..head``: no stray
    item after the head, none missing), and each fork point must lie within
    its parent's events.
    """
    raw, length = await _node(conn, session_id, events=events)
    visible(conn, raw, session_id)
    decode(conn, raw, session_id)  # damage anywhere in it is reported by every call
    node = _chain_node(conn, raw, session_id)
    chain, lengths = [node], [length]
    seen = {session_id}
    while node.parent:
        child, parent = node, node.parent
        if parent in seen:
            raise fork_loop(session_id, [n.session_id for n in chain] + [parent])
        seen.add(parent)
        raw, length = await _node(conn, parent, events=events, whole=False)
        if not raw:
            await _check_still_there(conn, chain[0])  # deleted meanwhile: not damage
            raise CorruptDataError(
                f"session {session_id!r}: {child.session_id!r} is a fork of {parent!r}, whose "
                "record is missing from Redis; restore it from a backup"
            )
        node = _chain_node(conn, raw, parent)
        chain.append(node)
        lengths.append(length)
    if events:
        for i, (child, length) in enumerate(zip(chain, lengths, strict=True)):
            if length != child.head - child.base:
                raise stray(
                    conn, child.session_id, child.head, length, child.base, reading=session_id
                )
            up = chain[i + 1] if i + 1 < len(chain) else None
            if up is not None and child.base > up.head:
                raise CorruptDataError(
                    f"session {session_id!r}: {child.session_id!r} is a fork of "
                    f"{up.session_id!r} at seq {child.base}, past that session's head "
                    f"{up.head}; restore the sessions from a backup"
                )
    return chain


async def read(
    conn: RedisConnection,
    session_id: str,
    after_seq: int = 0,
    upto_seq: int | None = None,
    *,
    batch_size: int = DEFAULT_READ_BATCH,
) -> AsyncIterator[list[StoredEvent]]:
    """See :meth:`Store.read`.

    Every session of the fork chain is checked first: its event list must
    hold exactly the events its record counts (no stray item after the
    head, none missing), and every event must carry its own seq. Anything
    else is :class:`CorruptDataError`.
    """
    validate_id(session_id)
    check_read(after_seq, upto_seq, batch_size)
    chain = await lineage(conn, session_id, events=True)
    bases = {node.session_id: node.base for node in chain}
    nodes = [(node.session_id, node.base) for node in chain]
    for seg_id, lo, hi in fork_segments(nodes, chain[0].head, after_seq, upto_seq):
        key = conn.session_keys(seg_id).ev
        base = bases[seg_id]
        start = lo
        while start < hi:
            stop = min(hi, start + batch_size)

            async def work(
                r: aioredis.Redis, key: str = key, lo: int = start - base, hi: int = stop - base
            ) -> list[bytes]:
                return cast(list[bytes], await r.lrange(key, lo, hi - 1))

            items = await conn.run(work, keys=[key])
            if len(items) != stop - start:
                await _check_still_there(conn, chain[0])
                raise CorruptDataError(
                    f"session {session_id!r}: events {start + 1}..{stop} of {seg_id!r} are "
                    f"missing from Redis ({key} gave {len(items)}); restore from a backup"
                )
            yield decode_items(conn, session_id, seg_id, start, items)
            start = stop


async def _check_still_there(conn: RedisConnection, node: Node) -> None:
    """Raise not-found when the session being read was deleted (or replaced) meanwhile."""
    raw = await read_raw(conn, node.session_id)
    visible(conn, raw, node.session_id)
    if (raw.get(b"stamp") or b"").decode() != node.stamp:
        raise SessionNotFoundError(node.session_id, "deleted while it was being read")


def decode_items(
    conn: RedisConnection, session_id: str, seg_id: str, start: int, items: list[bytes]
) -> list[StoredEvent]:
    """Events ``start+1...`` of ``seg_id`` (read for ``session_id``) from their list items."""
    try:
        texts = [item.decode() for item in items]
    except UnicodeDecodeError:
        return _decode_each(conn, session_id, seg_id, start, items)
    if not all(t[:1] == "[" for t in texts):
        return _decode_each(conn, session_id, seg_id, start, items)
    cut = [t.split("\n", 1) for t in texts]
    try:
        headers = json.loads("[" + ",".join(c[0] for c in cut) + "]")
        return [
            _event(seq, header, c[1])
            for seq, header, c in zip(
                range(start + 1, start + 1 + len(cut)), headers, cut, strict=True
            )
        ]
    except (ValueError, TypeError, IndexError, RecursionError):
        return _decode_each(conn, session_id, seg_id, start, items)  # finds the damaged one


def _decode_each(
    conn: RedisConnection, session_id: str, seg_id: str, start: int, items: list[bytes]
) -> list[StoredEvent]:
    """One by one: reads events of the older format, and names a damaged event's seq."""
    out = []
    for seq, item in enumerate(items, start + 1):
        try:
            decoded = item.decode()
            if decoded[:1] == "[":
                header, data = decoded.split("\n", 1)
                out.append(_event(seq, json.loads(header), data))
            else:  # written before the header format: type, ts, turn, version, data
                kind, ts, turn, version, data = decoded.split(LEGACY_SEP, 4)
                out.append(StoredEvent(seq, kind, float(ts), turn or None, data, int(version)))
        except (ValueError, TypeError, IndexError, RecursionError, UnicodeDecodeError) as exc:
            inherited = f" (inherited from {seg_id!r})" if seg_id != session_id else ""
            raise CorruptDataError(
                f"session {session_id!r}, seq {seq}{inherited}: the stored event in "
                f"{conn.session_keys(seg_id).ev} is damaged ({str(exc)[:200]}); restore it "
                "from a backup"
            ) from exc
    return out


async def fork(
    conn: RedisConnection, session_id: str, at_seq: int, new_record: SessionRecord
) -> SessionRecord:
    """See :meth:`Store.fork`.

    Four steps (see the package docstring): the index lists the fork, the
    parent holds it, its record is written, the index mark is cleared. The
    first two go in one round trip, in that order (:meth:`.RedisConnection.in_order`).
    """
    validate_id(session_id)
    check_fork_at(at_seq)
    stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
    stamp = secrets.token_hex(8)
    listing = index.index_keys(conn, stored)
    member = member_of(stored.id, stamp)
    hold = ("hold", [repr(now()), at_seq, member], conn.session_keys(session_id))
    listed, held = await conn.in_order([index.intent_call(conn, stored, stamp), hold])
    if isinstance(listed, StoreError):  # not marked: nothing of the fork may stay
        if not isinstance(held, StoreError) and int(held[0]) >= 0:
            await index.release(conn, session_id, member)
        await index.forget(conn, member, listing)
        raise listed
    change = index.changed(stored, stamp, listed)
    if isinstance(held, StoreError) or int(held[0]) < 0:
        await index.forget(conn, change.member, listing)
        if isinstance(held, StoreError):
            raise held
        if int(held[0]) == -4:
            check_fork_point(session_id, at_seq, int(held[1]))
        check_status(conn, held, session_id)
    code = await commit_record(conn, stored, stamp, change.t)
    if code != 1:
        await index.release(conn, session_id, change.member)
        await index.forget(conn, change.member, listing)
        if code == -6:
            raise conn.too_late(f"forking {session_id!r} into {stored.id!r}")
        raise SessionExistsError(stored.id)
    await index.disarm(conn, change)
    return stored


async def put_blob(conn: RedisConnection, session_id: str, data: bytes, media_type: str) -> str:
    """See :meth:`Store.put_blob` (one script; kept under its content hash)."""
    validate_id(session_id)
    check_blob(data, media_type)
    blob_id = hashlib.sha256(data).hexdigest()
    args = [repr(now()), blob_id, bytes(data)]
    check_status(
        conn, await conn.script("put_blob", args, conn.session_keys(session_id)), session_id
    )
    return blob_id


async def get_blob(conn: RedisConnection, session_id: str, blob_id: str) -> bytes:
    """See :meth:`Store.get_blob`: the session's own blobs, then its ancestors'."""
    validate_id(session_id)
    validate_id(blob_id, "blob id")
    for node in await lineage(conn, session_id):
        key = conn.session_keys(node.session_id).blob

        async def work(r: aioredis.Redis, key: str = key) -> bytes | None:
            return cast(bytes | None, await r.hget(key, blob_id))

        data = await conn.run(work, keys=[key])
        if data is not None:
            return bytes(data)
    raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")
