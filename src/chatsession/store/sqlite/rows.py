"""Reading SQLite rows back, type for type: records, leases, events, and what damage looks like.

SQLite columns keep any type, so every value read is checked before it is
trusted; a row that does not hold what the store wrote is
:class:`~chatsession.errors.CorruptDataError` naming the session, the file
and the row or column, never a raw ``TypeError``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from chatsession.errors import CorruptDataError, SessionNotFoundError
from chatsession.store.base import Lease, SessionRecord, StoredEvent
from chatsession.store.records import check_visible, damaged, decode_body, decode_record

__all__ = [
    "EVENT_COLUMNS",
    "RECORD_COLUMNS",
    "RECORD_FROM",
    "Row",
    "bad_event_rows",
    "check_head",
    "damaged_in",
    "events_of",
    "held_lease",
    "past_head",
    "record_of",
    "visible_row",
]

Row = Sequence[Any]

#: A sessions row as ``record_of`` reads it; the numbers are its indexes.
RECORD_COLUMNS = (
    "s.pk, s.id, s.user_id, s.agent_id, s.window_id, s.state, s.created_at, s.updated_at, "  # 0-7
    "s.expires_at, p.id, s.parent_seq, s.head, s.version, s.body, s.deleted, s.children, "  # 8-15
    "s.parent_pk, s.lease_owner, s.lease_token, s.lease_expires"  # 16-19
)
RECORD_FROM = "sessions s LEFT JOIN sessions p ON p.pk = s.parent_pk"
PK, ID, EXPIRES, HEAD, DELETED, CHILDREN, PARENT_PK = 0, 1, 8, 11, 14, 15, 16

#: The columns of an event as ``read`` selects them (``StoredEvent``'s order).
EVENT_COLUMNS = ("seq", "type", "ts", "turn_id", "data", "v", "event_id")
_EVENT_TYPES = (int, str, float, str, str, int, str)
#: The Python types of a sound events row (turn_id and event_id may be NULL).
_EVENT_ROW_TYPES = frozenset(
    (int, str, float, turn, str, int, event)
    for turn in (str, type(None))
    for event in (str, type(None))
)


def damaged_in(path: str, session_id: object, where: str, why: str) -> CorruptDataError:
    """Damage in ``where`` (a row or column) of the SQLite file ``path``."""
    return damaged(session_id, f"the SQLite file {path!r}: {where}", why)


def record_of(row: Row, path: str) -> SessionRecord:
    """The record of a ``RECORD_COLUMNS`` row, checked type for type."""
    body = decode_body(row[13], row[ID], f"the SQLite file {path!r}: the sessions row, column body")
    parent = None
    if row[PARENT_PK] is not None:
        if row[9] is None:
            raise damaged_in(
                path, row[ID], "the sessions row", f"its parent (row {row[PARENT_PK]!r}) is missing"
            )
        parent = {"session_id": row[9], "seq": row[10]}
    fields = {
        "id": row[ID],
        "user_id": row[2],
        "agent_id": row[3],
        "window_id": row[4],
        "state": row[5],
        "created_at": row[6],
        "updated_at": row[7],
        "expires_at": row[EXPIRES],
        "parent": parent,
        "head": row[HEAD],
        "version": row[12],
        **body,
    }
    return decode_record(fields, row[ID], f"the SQLite file {path!r}: the sessions row")


def check_head(path: str, session_id: str, head: object, expires_at: object) -> int:
    """The head of a sessions row, after checking the columns append and fork rely on."""
    if type(head) is not int or head < 0:
        raise damaged_in(path, session_id, "the sessions row, column head", f"{head!r}")
    if expires_at is not None and type(expires_at) is not float:
        raise damaged_in(path, session_id, "the sessions row, column expires_at", f"{expires_at!r}")
    return head


def visible_row(db: sqlite3.Connection, path: str, session_id: str) -> Row:
    """The ``RECORD_COLUMNS`` row of a visible session.

    Raises:
        SessionNotFoundError: No such session, or deleted or expired.
        CorruptDataError: Its head or expiry column is damaged.
    """
    row = db.execute(
        f"SELECT {RECORD_COLUMNS} FROM {RECORD_FROM} WHERE s.id = ?", (session_id,)
    ).fetchone()
    if row is None:
        raise SessionNotFoundError(session_id)
    check_head(path, session_id, row[HEAD], row[EXPIRES])
    check_visible(session_id, row[DELETED], row[EXPIRES])
    return row  # type: ignore[no-any-return]


def held_lease(
    path: str, session_id: str, owner: object, token: object, expires_at: object
) -> Lease | None:
    """The lease a sessions row holds (expired or not), or None when released or never taken."""
    if type(token) is not int or token < 0:
        raise damaged_in(path, session_id, "the sessions row, column lease_token", f"{token!r}")
    if owner is None:
        return None
    if type(owner) is not str or type(expires_at) is not float:
        raise damaged_in(
            path,
            session_id,
            "the sessions row, columns lease_owner and lease_expires",
            f"{owner!r}, {expires_at!r}"[:120],
        )
    return Lease(session_id, owner, token, expires_at)


_EVENTS = msgspec.convert  # checks every row, type for type, and builds the events, in C
_EVENT_LIST = list[StoredEvent]


def events_of(path: str, session_id: str, rows: list[Any]) -> list[StoredEvent]:
    """The events of rows of ``read``'s columns, checked type for type.

    Raises:
        CorruptDataError: A row holds a value of the wrong type (names its seq and column).
    """
    try:
        return _EVENTS(rows, _EVENT_LIST)
    except msgspec.ValidationError:
        damage = bad_event_rows(path, session_id, rows)
        if damage is None:  # msgspec refused what the plain check lets pass: say so
            damage = damaged_in(path, session_id, "its event log", "a row of the wrong shape")
        raise damage from None


def bad_event_rows(path: str, session_id: str, rows: list[Any]) -> CorruptDataError | None:
    """The damage among event rows of ``read``'s columns, or None when every row is sound."""
    kinds = {
        (type(a), type(b), type(c), type(d), type(e), type(f), type(g))
        for a, b, c, d, e, f, g in rows
    }
    if kinds <= _EVENT_ROW_TYPES:
        return None
    for row in rows:
        if tuple(map(type, row)) in _EVENT_ROW_TYPES:
            continue
        bad = [
            f"{column}={value!r}"[:80]
            for value, column, want in zip(row, EVENT_COLUMNS, _EVENT_TYPES, strict=True)
            if type(value) is not want and not (column in ("turn_id", "event_id") and value is None)
        ]
        return damaged_in(
            path, session_id, f"the events row at seq {row[0]!r}", "wrong type in " + ", ".join(bad)
        )
    return damaged_in(path, session_id, "its event log", "a row of the wrong shape")


def past_head(
    db: sqlite3.Connection, path: str, session_id: str, pk: int, head: int
) -> CorruptDataError:
    """The damage of events stored past a session's head."""
    found = db.execute(
        "SELECT min(seq), count(*) FROM events WHERE session_pk = ? AND seq > ?", (pk, head)
    ).fetchone()
    return damaged_in(
        path,
        session_id,
        "its event log",
        f"{found[1]} event(s) are stored past its head {head}, from seq {found[0]}: the head "
        "column or the events table was edited or restored apart",
    )
