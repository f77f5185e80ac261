"""Session records as every store keeps them: who may see one, and how its free fields are stored.

Written once for all backends:

- **Visibility.** A deleted session (even one kept for its forks) and an
  expired one (``expires_at`` at or before now) are invisible:
  :func:`check_visible` raises :class:`~chatsession.errors.SessionNotFoundError`,
  :func:`is_visible` says whether a listing shows it.
- **The body.** A record's free fields (:data:`BODY_FIELDS`: ``title``,
  ``metadata``, ``fingerprint``) are kept as one compact JSON object
  (:func:`encode_body`); the checks run before any write
  (:func:`~chatsession.store.checks.check_record`) guarantee that it reads
  back as the same values and types. :func:`decode_body` reads it back
  strictly (NaN, Infinity and unknown keys refused).
- **Pages.** :func:`page_of` cuts a listing's ``limit + 1`` records into a
  page and the cursor of the next one.
- **Decoding.** :func:`decode_record` builds the record from stored fields,
  type for type. Whatever cannot be read back is
  :class:`~chatsession.errors.CorruptDataError` naming the session and the
  place (:func:`damaged`), never a raw ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from chatsession.errors import CorruptDataError, SessionNotFoundError
from chatsession.store.checks import STRICT_JSON, describe_failure
from chatsession.store.types import Page, SessionRecord, SessionState, encode_cursor, now

_STATES = frozenset(state.value for state in SessionState)

__all__ = [
    "BODY_FIELDS",
    "check_visible",
    "damaged",
    "decode_body",
    "decode_record",
    "encode_body",
    "is_visible",
    "page_of",
]

#: The record fields kept together as one JSON object (the *body*).
BODY_FIELDS = ("title", "metadata", "fingerprint")
_BODY_KEYS = frozenset(BODY_FIELDS)


def is_visible(deleted: object, expires_at: float | None, at: float | None = None) -> bool:
    """Whether a session is visible: not deleted, and not expired at ``at`` (default now)."""
    if deleted:
        return False
    return expires_at is None or expires_at > (now() if at is None else at)


def check_visible(
    session_id: str, deleted: object, expires_at: float | None, at: float | None = None
) -> None:
    """Raise unless the session is visible (see :func:`is_visible`).

    Raises:
        SessionNotFoundError: It is deleted (plain "not found", so a deleted
            id does not leak) or expired (said so).
    """
    if deleted:
        raise SessionNotFoundError(session_id)
    if expires_at is not None and expires_at <= (now() if at is None else at):
        raise SessionNotFoundError(session_id, "expired")


_RESTORE = "restore it from a backup"


def damaged(session_id: object, place: str, why: str, fix: str = _RESTORE) -> CorruptDataError:
    """The error for stored data of ``session_id`` that cannot be read back.

    Args:
        session_id: The session the data belongs to.
        place: Where the data is, e.g. ``"the SQLite file 'a.db': the sessions row, column body"``.
        why: What is wrong with it.
        fix: What to do about it.
    """
    return CorruptDataError(f"session {session_id!r}: {place} is damaged ({why}); {fix}")


def encode_body(record: SessionRecord) -> str:
    """The record's body: ``{"title", "metadata", "fingerprint"}`` as compact JSON text."""
    return json.dumps(
        {"title": record.title, "metadata": record.metadata, "fingerprint": record.fingerprint},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def decode_body(raw: object, session_id: object, place: str) -> dict[str, Any]:
    """The body fields of a stored body (JSON text: a ``str``; bytes are damage too).

    Raises:
        CorruptDataError: Not text, not strict JSON, not an object, or keys
            other than :data:`BODY_FIELDS` (names ``session_id`` and ``place``).
    """
    try:
        if type(raw) is not str:
            raise TypeError(f"a {type(raw).__name__}, not JSON text")
        body = STRICT_JSON.decode(raw)
        if type(body) is not dict or not body.keys() <= _BODY_KEYS:
            raise TypeError(f"not a JSON object with keys {sorted(_BODY_KEYS)}")
    except (ValueError, TypeError, RecursionError) as exc:
        raise damaged(session_id, place, describe_failure(exc)) from exc
    return body


def decode_record(
    fields: Mapping[str, Any],
    session_id: object,
    place: str,
    *,
    strict: bool = True,
    fix: str = _RESTORE,
) -> SessionRecord:
    """The record of stored ``fields`` (the body's included), checked type for type.

    Args:
        fields: Every stored field of the record by name (``parent`` as
            ``{"session_id", "seq"}`` or None).
        session_id: The session, for the message.
        place: Where the fields are, for the message.
        strict: Refuse values of another type that pydantic would convert
            (``"1"`` for 1); drivers that give exact types use True.
        fix: What to do about damage, for the message.

    Raises:
        CorruptDataError: A field is missing, of the wrong type or out of range.
    """
    state = fields.get("state")
    if type(state) is str and state in _STATES:  # strict mode wants the enum itself
        fields = {**fields, "state": SessionState(state)}
    try:
        return SessionRecord.model_validate(fields, strict=strict)
    except (ValueError, TypeError, RecursionError) as exc:
        raise damaged(session_id, place, describe_failure(exc), fix) from exc


def page_of(records: list[SessionRecord], limit: int) -> Page:
    """The page of the first ``limit`` of ``records`` (read up to ``limit + 1``, newest first),
    with a cursor when there were more."""
    if len(records) > limit:
        kept = records[:limit]
        return Page(kept, encode_cursor(kept[-1]))
    return Page(records, None)
