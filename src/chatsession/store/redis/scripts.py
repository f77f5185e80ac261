"""The Lua scripts of the Redis store, one atomic step each, and the formats they share.

The scripts are the ``lua/*.lua`` files of this package, loaded once at
import. A script whose first line is ``--! uses: clock session`` gets the
named libraries of ``lua/lib/`` put before it (``clock``: the server's clock;
``session``: the keys and checks of one session; ``index``: the entries of
the index slot).

Every script touches only the keys it is given in ``KEYS``, and all of them
share one hash tag, so each call runs on one Redis Cluster hash slot. No
script builds a key name. There are two families:

*Session scripts* get one session's six keys (:class:`SessionKeys`, in that
order). They decide whether an append, a lease, a snapshot, a fork of the
session, a create, an update or a delete happens at all. They answer
``{-8, field}`` when the record's ``field`` is missing or not a number where
one is needed (a damaged record: the client reports it as such), never a Lua
error. (``count_one.lua``, which ``stats()`` runs once per session, gets only
the record's key, and only reads.)

*Index scripts* get ``PREFIX{idx}:where``, ``:due``, ``:expiry`` and then
listing indexes (``:all``, ``:user:U``, ...). ``ARGV[1]`` is always the
*incarnation* being changed: ``ID#STAMP``, a session id with the random stamp
its ``create`` or ``fork`` gave it, so that a leftover of a deleted session
never gets mixed up with a new session of the same id. When a script needs to
change an index key it was not given (``where`` lists more than the client
knew), it changes nothing and answers ``{-1, json list of keys}``; the client
calls again with them.

Times of steps (``t``, ``due``, lease expiry, the scores of ``:forks`` and
``:due``) come from the server's clock (``TIME``, ``PX``), never from the
client's; ``now`` and ``before`` arguments are client time, compared with
``expires_at`` (which is client time too). Numbers go back to the client as
strings (a Lua number would be cut to an integer).

Every script can be sent again after a lost reply (the client does so for
connection errors): it either changes nothing the second time, or recognises
its own first run (the stamp of a ``create``, the change id of an ``update``
or a ``delete``, the event id of an ``append``) and answers as the first run
did. The one exception is ``tally.lua`` (``stats()`` adding counts of users
and agents to two sorted sets kept for the call): it adds, so it is never
sent again. See
the package docstring for how the steps are put together.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from typing import Any, NamedTuple

__all__ = [
    "FIGURE_MAX",
    "MARK",
    "NATIVE_EXPIRY_LIMIT",
    "SCRIPTS",
    "SessionKeys",
    "key_list",
    "member_of",
    "split_member",
    "text",
    "where_entry",
]

#: Sessions expiring at or after this (Unix seconds: the year 10000) get no
#: native Redis expiry: their keys stay until ``purge_expired`` removes them
#: (they are invisible from ``expires_at`` on all the same). ``lib/session.lua``
#: holds the same number.
NATIVE_EXPIRY_LIMIT = 253_402_300_800.0

#: The most a session's figure (``messages``, ``tokens``, ``bytes``) counts: 15
#: digits, so sums stay exact in Lua and ``HINCRBY`` never fails; an append
#: past it leaves the figure there. ``lib/session.lua`` holds the same number.
FIGURE_MAX = 999_999_999_999_999

#: Between an id and its stamp in index members; sorts before every character
#: an id may hold, so members sort as their ids do.
MARK = "#"

_USES = re.compile(r"--! uses:((?: [a-z]+)+)\n")


class SessionKeys(NamedTuple):
    """A session's keys, all under its hash tag ``{ID}``, in the order session scripts get them."""

    rec: str  # hash: the record, head, version, stamp, fence, tombstone flag
    ev: str  # list: its own events
    blob: str  # hash: blob id -> bytes
    forks: str  # sorted set: its forks (ID#STAMP) by when each began
    lease: str  # string 'TOKEN OWNER' with the lease's own expiry (PX)
    snap: str  # hash: seq, data of the kept snapshot


def _load() -> dict[str, str]:
    folder = files(__package__ or "chatsession.store.redis").joinpath("lua")
    libraries = {
        entry.name[:-4]: entry.read_text("utf-8")
        for entry in folder.joinpath("lib").iterdir()
        if entry.name.endswith(".lua")
    }
    scripts: dict[str, str] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".lua"):
            continue
        source = entry.read_text("utf-8")
        uses = _USES.match(source)
        if uses is not None:
            names = uses.group(1).split()
            source = "".join(libraries[name] for name in names) + source[uses.end() :]
        scripts[entry.name[:-4]] = source
    return scripts


#: Every script by name (its file name); the store registers them all.
SCRIPTS: dict[str, str] = _load()


def text(value: Any) -> str:
    """A script's reply item as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def member_of(session_id: str, stamp: str) -> str:
    """The index member naming one incarnation of a session: ``ID#STAMP``."""
    return f"{session_id}{MARK}{stamp}"


def split_member(member: bytes | str) -> tuple[str, str]:
    """``(session id, stamp)`` of an ``ID#STAMP`` member."""
    text = member.decode() if isinstance(member, bytes) else member
    session_id, _, stamp = text.partition(MARK)
    return session_id, stamp


def key_list(raw: Any) -> list[str]:
    """The index keys in a JSON list from a script (Lua writes an empty list as ``{}``)."""
    try:
        keys = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def where_entry(raw: bytes | str) -> tuple[str, list[str]]:
    """The parent id and the index keys of a ``where`` entry ('' and [] if unreadable)."""
    try:
        info = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):  # a damaged entry: cleanup re-derives it
        info = {}
    if not isinstance(info, dict):
        return "", []
    parent, idx = info.get("parent"), info.get("idx")
    keys = [k for k in idx if isinstance(k, str)] if isinstance(idx, list) else []
    return (parent if isinstance(parent, str) else ""), keys
