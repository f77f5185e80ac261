"""The index slot: the steps a change across slots takes there, and the commit of a new record.

Listings read sorted sets in the slot ``{idx}``, derived from the records.
``create``, ``fork``, ``update`` and ``delete`` change a session's slot and
the index slot in a short ordered sequence of single-slot scripts (see the
package docstring); the helpers here are the steps they share with cleanup.

A record's *placement* is the sorted sets it belongs in, each with its score:
the listing indexes (``all``, its user's, agent's and window's) by
``created_at``, and, for a session of a user that is not archived, the user's
*live set* by ``expires_at`` (``+inf`` for none), which ``create`` counts
(``ZCOUNT`` from now on) to keep a user under ``max_per_user``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

from chatsession.errors import StoreError
from chatsession.store.types import SessionRecord, now

from .connection import RedisConnection
from .scripts import NATIVE_EXPIRY_LIMIT, key_list, member_of, split_member, text

__all__ = [
    "LAYOUT",
    "Change",
    "changed",
    "disarm",
    "expiry",
    "forget",
    "index_call",
    "index_keys",
    "intent",
    "intent_call",
    "live_key",
    "pages",
    "place",
    "placement",
    "release",
    "walk",
]

_INDEX_TRIES = 4  # calls of an index script that asks for keys it was not given

#: The layout of the index slot and records this code writes, kept in
#: ``PREFIX{idx}:meta`` (field ``layout``): 2 added the users' live sets and
#: the records' figures (``messages``, ``tokens``, ``bytes``, ``counted``).
#: A store of layout 1 is upgraded in place (:mod:`.layout`).
LAYOUT = 2


class Change(NamedTuple):
    """A change across slots under way: its incarnation and its mark on the due set."""

    member: str  # ID#STAMP
    t: str  # when it began (server clock), for the commit's deadline
    due: str  # its score in the due set, to clear the mark it set and no other


def expiry(record: SessionRecord) -> tuple[str, str]:
    """``expires_at`` as script arguments: seconds, and milliseconds for ``PEXPIREAT``.

    The milliseconds are ``""`` (no native expiry) from
    :data:`~.scripts.NATIVE_EXPIRY_LIMIT` on.
    """
    if record.expires_at is None:
        return "", ""
    native = record.expires_at < NATIVE_EXPIRY_LIMIT
    return repr(record.expires_at), str(math.floor(record.expires_at * 1000)) if native else ""


def live_key(conn: RedisConnection, record: SessionRecord) -> str | None:
    """The live set a record counts in: its user's, unless it has none or is archived."""
    if record.user_id is None or record.state == "archived":
        return None
    return conn.index("live", record.user_id)


def placement(conn: RedisConnection, record: SessionRecord) -> list[tuple[str, str]]:
    """The sorted sets a record belongs in, each with its score (see the module docstring)."""
    created = repr(record.created_at)
    keys = [(conn.index(), created)]
    for kind, value in (
        ("user", record.user_id),
        ("agent", record.agent_id),
        ("window", record.window_id),
    ):
        if value is not None:
            keys.append((conn.index(kind, value), created))
    live = live_key(conn, record)
    if live is not None:
        keys.append((live, "+inf" if record.expires_at is None else repr(record.expires_at)))
    return keys


def index_keys(conn: RedisConnection, record: SessionRecord) -> list[str]:
    """The keys of a record's placement: listing indexes, and its live set if it counts."""
    return [key for key, _ in placement(conn, record)]


async def index_call(
    conn: RedisConnection,
    name: str,
    member: str,
    listing: Sequence[str],
    args: Sequence[Any],
    known: Sequence[str] = (),
) -> list[Any]:
    """Run an index script with ``listing`` (and ``known``) as its index keys.

    A script that finds the entry in an index it was not given changes
    nothing and names the keys; it is called again with them.
    """
    keys = [*conn.fixed, *listing]
    keys += [k for k in dict.fromkeys(known) if k not in keys]
    for _ in range(_INDEX_TRIES):
        result = await conn.script(name, [member, *args], keys)
        if result[0] != -1:
            return result
        keys += [k for k in key_list(result[1]) if k not in keys]
    raise StoreError(
        f"the index entry of session {split_member(member)[0]!r} kept changing while the store "
        "was updating it; retry"
    )


async def forget(
    conn: RedisConnection, member: str, listing: Sequence[str] = (), known: Sequence[str] = ()
) -> None:
    """Remove ``member`` from the index slot entirely."""
    await index_call(conn, "forget", member, listing, [], known)


def intent_call(
    conn: RedisConnection, stored: SessionRecord, stamp: str, max_per_user: int | None = None
) -> tuple[str, list[Any], list[str]]:
    """Create and fork, step 1, as a call: list the new incarnation and mark it due.

    With ``max_per_user``, only if the user's live set counts fewer (see ``intent.lua``).

    Returns:
        The script's name, arguments and keys (its reply goes to :func:`changed`).
    """
    expires, _ = expiry(stored)
    parent = stored.parent.session_id if stored.parent else ""
    placed = placement(conn, stored)
    limit = "" if max_per_user is None else str(max_per_user)
    args: list[Any] = [member_of(stored.id, stamp), expires, parent, conn.grace, limit]
    args += [repr(now()), LAYOUT, len(placed), *(score for _, score in placed)]
    keys = [*conn.fixed, *(key for key, _ in placed), conn.index("meta")]
    if max_per_user is not None and stored.user_id is not None:
        keys.append(conn.index("live", stored.user_id))
    return "intent", args, keys


def changed(stored: SessionRecord, stamp: str, reply: list[Any]) -> Change:
    """The change under way, from the reply to the ``intent`` step (``{t, due}``)."""
    return Change(member_of(stored.id, stamp), text(reply[0]), text(reply[1]))


async def intent(conn: RedisConnection, stored: SessionRecord, stamp: str) -> Change:
    """Create and fork, step 1: list the new incarnation and mark it due."""
    return changed(stored, stamp, await conn.script(*intent_call(conn, stored, stamp)))


async def disarm(conn: RedisConnection, change: Change) -> None:
    """Clear the mark of a finished create or fork."""
    await conn.script("disarm", [change.member, change.due], conn.fixed)


async def place(
    conn: RedisConnection, member: str, due: str, record: SessionRecord, known: Sequence[str] = ()
) -> None:
    """Make the index entry of ``member`` follow ``record`` (see ``place.lua``)."""
    placed = placement(conn, record)
    expires, _ = expiry(record)
    args = [record.version, expires, due, len(placed), *(score for _, score in placed)]
    await index_call(conn, "place", member, [key for key, _ in placed], args, known)


async def release(conn: RedisConnection, parent_id: str, member: str) -> bool:
    """Drop ``member`` from ``parent_id``'s forks, and every tombstone this empties.

    Returns:
        Whether ``parent_id`` itself went (it was a tombstone and had no
        other forks).
    """
    if not parent_id:
        return False
    result = await conn.script("release", [member], conn.session_keys(parent_id))
    if int(result[0]) != 1:
        return False
    while True:
        gone = member_of(parent_id, text(result[2]))
        await forget(conn, gone)
        parent_id = text(result[1])
        if not parent_id:
            return True
        result = await conn.script("release", [gone], conn.session_keys(parent_id))
        if int(result[0]) != 1:
            return True


async def walk(conn: RedisConnection, key: str, batch: int) -> AsyncIterator[list[tuple[str, str]]]:
    """Every member of the index ``key`` with its score, newest first, ``batch`` at a time.

    Keyset paging (``page.lua``, by score and member): members added or removed
    meanwhile never make another one seen twice or missed. Each call holds one
    batch: memory stays flat in the size of the index.
    """
    position: tuple[str, str] | None = None
    while True:
        args = ["+inf", "", batch] if position is None else [*position, batch]
        flat = await conn.script("page", args, [key], write=False)
        members = [(text(flat[i]), text(flat[i + 1])) for i in range(0, len(flat), 2)]
        if members:
            yield members
        if len(members) < batch:
            return
        position = (members[-1][1], members[-1][0])


async def pages(conn: RedisConnection, key: str, batch: int) -> AsyncIterator[list[bytes]]:
    """As :func:`walk`, members only, as they are stored (the batch in one reply item).

    Members hold no space (ids and stamps hold none); one written by another
    program that does would be split in two here.
    """
    position: tuple[str, str] | None = None
    while True:
        args = ["+inf", "", batch] if position is None else [*position, batch]
        reply = await conn.script("page", [*args, "joined"], [key], write=False)
        count = int(reply[1])
        if count:
            yield bytes(reply[0]).split(b" ")
        if count < batch:
            return
        position = (text(reply[2]), text(reply[3]))
