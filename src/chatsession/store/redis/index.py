"""The index slot: the steps a change across slots takes there, and the commit of a new record.

Listings read sorted sets in the slot ``{idx}``, derived from the records.
``create``, ``fork``, ``update`` and ``delete`` change a session's slot and
the index slot in a short ordered sequence of single-slot scripts (see the
package docstring); the helpers here are the steps they share with cleanup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from chatsession.errors import StoreError
from chatsession.store.types import SessionRecord

from .connection import RedisConnection
from .scripts import NATIVE_EXPIRY_LIMIT, key_list, member_of, split_member, text

__all__ = [
    "Change",
    "changed",
    "disarm",
    "expiry",
    "forget",
    "index_call",
    "index_keys",
    "intent",
    "intent_call",
    "place",
    "release",
]

_INDEX_TRIES = 4  # calls of an index script that asks for keys it was not given


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


def index_keys(conn: RedisConnection, record: SessionRecord) -> list[str]:
    """The listing indexes a record belongs in: ``all``, and its user's, agent's and window's."""
    keys = [conn.index()]
    for kind, value in (
        ("user", record.user_id),
        ("agent", record.agent_id),
        ("window", record.window_id),
    ):
        if value is not None:
            keys.append(conn.index(kind, value))
    return keys


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
    conn: RedisConnection, stored: SessionRecord, stamp: str
) -> tuple[str, list[Any], list[str]]:
    """Create and fork, step 1, as a call: list the new incarnation and mark it due.

    Returns:
        The script's name, arguments and keys (its reply goes to :func:`changed`).
    """
    expires, _ = expiry(stored)
    parent = stored.parent.session_id if stored.parent else ""
    args = [member_of(stored.id, stamp), repr(stored.created_at), expires, parent, conn.grace]
    return "intent", args, [*conn.fixed, *index_keys(conn, stored)]


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
    listing = index_keys(conn, record)
    expires, _ = expiry(record)
    args = [record.version, repr(record.created_at), expires, due, len(listing)]
    await index_call(conn, "place", member, listing, args, known)


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
