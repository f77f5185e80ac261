"""``session.json``: a session's record and the store's bookkeeping, read and written whole.

Besides the record's fields the header keeps ``deleted`` (a deleted session
kept for its forks), ``children`` (its forks), ``create_id`` (a random id
given by ``create``/``fork``, so a deleted and re-created session is never
mistaken for the old one) and ``counts``: the figures of the session's own
events for ``stats()`` (``messages``, ``tokens``, ``bytes``, as
:func:`~chatsession.store.types.count_events` counts them) and ``head``, the
last seq they cover. It is replaced atomically on every change, appends
included.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from chatsession.errors import SessionNotFoundError
from chatsession.store.base import EventCounts, SessionRecord, describe_failure
from chatsession.store.jsonl.files import HEADER, Folder
from chatsession.store.jsonl.lines import loads
from chatsession.store.records import check_visible, damaged, decode_record, is_visible

__all__ = [
    "Header",
    "counts_field",
    "counts_of",
    "fork_seq",
    "header_of",
    "read_header",
    "record_of",
    "shown",
    "visible",
    "visible_header",
    "write_header",
]

Header = dict[str, Any]
#: Header keys that are not record fields.
_BOOKKEEPING = ("deleted", "children", "create_id", "counts")
_COUNT_KEYS = ("messages", "tokens", "bytes", "head")
_FIX = "restore it from a backup or rewrite it by hand (see docs/stores.md for its fields)"


def _check_bookkeeping(header: Any, session_id: str) -> None:
    """Check the header fields the store itself relies on (the record's are checked after)."""
    if type(header) is not dict:
        raise TypeError(f"a JSON {type(header).__name__}, not an object")
    if header.get("id") != session_id:
        raise ValueError(f"its id is {header.get('id')!r}, not {session_id!r}")
    if type(header.get("deleted", False)) is not bool:
        raise TypeError(f"deleted {header['deleted']!r} is not true or false")
    children = header.get("children", [])
    if type(children) is not list or any(type(c) is not str for c in children):
        raise TypeError(f"children {str(children)[:80]} is not a list of session ids")
    if type(header.get("create_id")) not in (str, type(None)):
        raise TypeError(f"create_id {header['create_id']!r} is not a string")
    for name in ("created_at", "expires_at"):
        value = header.get(name)
        if type(value) not in (float, int) and not (value is None and name == "expires_at"):
            raise TypeError(f"{name} {value!r} is not a number")
    parent = header.get("parent")
    if parent is not None and (
        type(parent) is not dict
        or type(parent.get("session_id")) is not str
        or type(parent.get("seq")) is not int
        or parent["seq"] < 0
    ):
        raise TypeError(f"parent {str(parent)[:80]} is not {{session_id, seq}}")


def read_header(folder: Folder, session_id: str) -> Header | None:
    """The session's header, or None if there is no such session.

    Only a missing ``session.json`` means "no such session"; any other
    failure to read it raises (an ``OSError``, for the caller to translate).

    Raises:
        CorruptDataError: The file is not a sound header (names session and file).
    """
    path = folder.dir(session_id) / HEADER
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        header = loads(raw)
        _check_bookkeeping(header, session_id)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise damaged(session_id, str(path), describe_failure(exc), _FIX) from exc
    record_of(folder, header, 0)  # every record field, for every caller
    return header  # type: ignore[no-any-return]


def write_header(folder: Folder, header: Header) -> None:
    """Replace the session's header atomically."""
    path = folder.dir(header["id"]) / HEADER
    folder.write_atomic(path, json.dumps(header, indent=1, ensure_ascii=False).encode())


def header_of(record: SessionRecord, kept: Header | None = None) -> Header:
    """The header for ``record``, keeping the bookkeeping of ``kept`` (or starting it)."""
    header = record.model_dump(mode="json", exclude={"head"})
    if kept is None:
        start = record.parent.seq if record.parent else 0
        header.update(
            deleted=False,
            children=[],
            create_id=uuid.uuid4().hex,
            counts=counts_field(EventCounts(0, 0, 0), start),
        )
    else:
        header.update(
            deleted=bool(kept.get("deleted")),
            children=list(kept.get("children", [])),
            create_id=kept.get("create_id"),
        )
        if "counts" in kept:
            header["counts"] = kept["counts"]
    return header


def counts_field(counts: EventCounts, head: int) -> dict[str, int]:
    """The header's ``counts``: ``counts`` of the session's own events up to seq ``head``."""
    return {
        "messages": counts.messages,
        "tokens": counts.tokens,
        "bytes": counts.bytes,
        "head": head,
    }


def counts_of(header: Header) -> tuple[EventCounts, int] | None:
    """The header's figures and the last seq they cover; None if it has none or they are unsound.

    Headers written before the store kept figures have none; they are counted
    from the log by the session's next append (see ``JSONLStore.append``).
    """
    kept = header.get("counts")
    if type(kept) is not dict or any(
        type(kept.get(key)) is not int or kept[key] < 0 for key in _COUNT_KEYS
    ):
        return None
    return EventCounts(kept["messages"], kept["tokens"], kept["bytes"]), kept["head"]


def record_of(folder: Folder, header: Header, head: int) -> SessionRecord:
    """The record a header holds, with ``head``.

    Raises:
        CorruptDataError: A field is missing or of the wrong type.
    """
    fields = {k: v for k, v in header.items() if k not in _BOOKKEEPING}
    place = str(folder.dir(header["id"]) / HEADER)
    return decode_record({**fields, "head": head}, header["id"], place, fix=_FIX)


def shown(header: Header | None) -> bool:
    """Whether a header (or None: no session) is a visible session."""
    return header is not None and is_visible(header.get("deleted"), header.get("expires_at"))


def visible(session_id: str, header: Header | None) -> Header:
    """``header`` if it is a visible session's.

    Raises:
        SessionNotFoundError: None, deleted or expired.
    """
    if header is None:
        raise SessionNotFoundError(session_id)
    check_visible(session_id, header.get("deleted"), header.get("expires_at"))
    return header


def visible_header(folder: Folder, session_id: str) -> Header:
    """The header of a visible session (see :func:`visible`)."""
    return visible(session_id, read_header(folder, session_id))


def fork_seq(header: Header) -> int:
    """The last seq a session inherits from its parent (0 for a root)."""
    parent = header.get("parent")
    return int(parent["seq"]) if parent else 0
