"""Checks every store runs before any I/O, and the helpers that build what they store.

Whatever a store acknowledges it gives back exactly; these checks refuse,
before anything is written, what some backend could not give back
(:class:`~chatsession.errors.UnsupportedValueError`) and bad arguments
(:class:`~chatsession.errors.InvalidArgumentError`). Re-exported by
:mod:`chatsession.store.base`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import msgspec
from pydantic import ValidationError

from chatsession.errors import CorruptDataError, InvalidArgumentError, UnsupportedValueError
from chatsession.store.types import (
    EDITABLE_FIELDS,
    MAX_BLOB_BYTES,
    MAX_FIELD_LENGTH,
    MAX_JSON_DEPTH,
    MAX_LEASE_TTL,
    MAX_PAYLOAD_BYTES,
    MAX_SCHEMA_VERSION,
    Lease,
    NewEvent,
    ParentRef,
    SessionRecord,
    SessionState,
    now,
    validate_id,
)

_EVENT_TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


_EVENT_ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


_ESCAPED_SURROGATE_RE = re.compile(r"\\u[dD][89a-fA-F]")


_LINE_BREAKS = ("\n", "\r")


def check_lease_request(session_id: str, owner: object, ttl: object) -> None:
    """Reject a bad lease request before any I/O.

    Raises:
        InvalidIdError: A bad session id.
        InvalidArgumentError: ``owner`` is not a 1-200 character string without
            control characters, or ``ttl`` is not a number of seconds in
            (0, :data:`MAX_LEASE_TTL`].
    """
    validate_id(session_id)
    if (
        type(owner) is not str
        or not 0 < len(owner) <= 200
        or any(ord(c) < 32 or c == "\x7f" for c in owner)
    ):
        raise InvalidArgumentError(
            f"a lease owner is 1-200 characters without control characters, got {owner!r}"[:200]
        )
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_LEASE_TTL:
        raise InvalidArgumentError(
            f"a lease ttl is a number of seconds above 0 and at most {MAX_LEASE_TTL:.0f}, "
            f"got {ttl!r}"
        )


def check_lease(lease: object) -> Lease:
    """Reject something that is not a :class:`Lease` a store handed out (before any I/O).

    Raises:
        InvalidArgumentError: Not a ``Lease`` with a valid id, owner and int token.
    """
    if not isinstance(lease, Lease):
        raise InvalidArgumentError(
            f"expected a Lease from acquire_lease(), not {type(lease).__name__}"
        )
    validate_id(lease.session_id)
    if not _is_int(lease.token) or lease.token < 1:
        raise InvalidArgumentError(f"a lease token is an int >= 1, got {lease.token!r}")
    return lease


def initial_record(record: SessionRecord, parent: ParentRef | None = None) -> SessionRecord:
    """The record as ``create`` (or ``fork``, with ``parent``) stores it.

    Checks the record (:func:`check_record`), stamps ``created_at``/``updated_at``
    when unset, sets ``version`` to 1 and ``head`` to the fork point (0 for a
    new session).
    """
    check_record(record)
    at = now()
    created = record.created_at or at
    return record.model_copy(
        update={
            "created_at": created,
            "updated_at": record.updated_at or created,
            "version": 1,
            "head": parent.seq if parent else 0,
            "parent": parent,
            "state": SessionState(record.state),  # model_copy(update=) may have left a str
        }
    )


def updated_record(current: SessionRecord, changes: SessionRecord) -> SessionRecord:
    """``current`` with the editable fields of ``changes``, a new version and ``updated_at``.

    ``changes`` is checked (:func:`check_record`); stores also check it before any I/O.
    """
    check_record(changes)
    update = {name: getattr(changes, name) for name in EDITABLE_FIELDS}
    update["state"] = SessionState(changes.state)  # model_copy(update=) may have left a str
    update["version"] = current.version + 1
    update["updated_at"] = now()
    return current.model_copy(update=update)


def _unsupported(what: str, why: str) -> UnsupportedValueError:
    return UnsupportedValueError(f"{what} cannot be stored exactly: {why}")


def _is_int(value: object) -> bool:
    return type(value) is int


def check_text(
    value: object,
    what: str,
    *,
    optional: bool = False,
    controls: bool = True,
    limit: int = MAX_FIELD_LENGTH,
) -> None:
    """Refuse a name or id field that some backend could not give back exactly.

    Args:
        value: The candidate: a ``str`` (or None when ``optional``).
        what: What it names, for the message.
        optional: Whether None is allowed.
        controls: Whether control characters other than NUL are allowed
            (ids such as ``user_id`` and ``turn_id`` allow none).
        limit: The most characters allowed.

    Raises:
        UnsupportedValueError: Not a plain ``str``, too long, or holding NUL,
            a lone surrogate or (when refused) a control character.
    """
    if value is None and optional:
        return
    if type(value) is not str:
        kind = "a string or None" if optional else "a string"
        raise _unsupported(what, f"it must be {kind}, not {type(value).__name__}")
    if len(value) > limit:
        raise _unsupported(what, f"it is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise _unsupported(what, "it contains NUL (\\x00)")
    if not controls and _CONTROLS.search(value) is not None:
        raise _unsupported(what, "it contains control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _unsupported(
            what, "it contains a lone UTF-16 surrogate (not valid unicode)"
        ) from None


def _render_path(path: tuple[Any, ...] | None) -> str:
    parts: list[str] = []
    while path is not None:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f"[{key!r}]")
    return "".join(reversed(parts))


def check_json_value(value: object, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse a value that JSON cannot carry back exactly.

    Accepted: ``dict`` with ``str`` keys, ``list``, ``str``, ``int``, finite
    ``float``, ``bool`` and None, nested at most ``max_depth`` levels. Refused:
    everything else (tuples and sets, which would come back as lists or not
    at all; subclasses such as enums; NaN and infinities; lone surrogates;
    integers over 4,000 digits).

    Raises:
        UnsupportedValueError: Names the offending place, e.g. ``metadata['a'][2]``.
    """
    stack: list[tuple[object, int, tuple[Any, ...] | None]] = [(value, 0, None)]
    while stack:
        item, depth, path = stack.pop()
        kind = type(item)
        if kind is str:
            try:
                item.encode("utf-8")  # type: ignore[attr-defined]
            except UnicodeEncodeError:
                raise _unsupported(
                    what + _render_path(path), "a string holds a lone UTF-16 surrogate"
                ) from None
        elif item is None or kind is bool:
            continue
        elif kind is int:
            if item.bit_length() > 13_000:  # type: ignore[attr-defined]
                raise _unsupported(what + _render_path(path), "an integer has over 4,000 digits")
        elif kind is float:
            if not math.isfinite(item):  # type: ignore[arg-type]
                raise _unsupported(
                    what + _render_path(path), f"{item!r} is not a JSON number (NaN or infinite)"
                )
        elif kind is dict or kind is list:
            if depth >= max_depth:
                raise _unsupported(
                    what + _render_path(path),
                    f"it nests deeper than {max_depth} levels of objects and arrays",
                )
            if kind is dict:
                for key, sub in item.items():  # type: ignore[attr-defined]
                    if type(key) is not str:
                        raise _unsupported(
                            what + _render_path(path),
                            f"key {key!r} is a {type(key).__name__}; JSON keys are strings",
                        )
                    stack.append((key, depth + 1, path))
                    stack.append((sub, depth + 1, (path, key)))
            else:
                for index, sub in enumerate(item):  # type: ignore[arg-type]
                    stack.append((sub, depth + 1, (path, index)))
        else:
            raise _unsupported(
                what + _render_path(path),
                f"a {kind.__name__} is not JSON; use dict (str keys), list, str, int, "
                "float, bool or None",
            )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


#: Strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are refused (``ValueError``).
STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def describe_failure(exc: BaseException) -> str:
    """A short reason for a parse or validation failure, for a ``CorruptDataError`` message."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply to read"
    if isinstance(exc, KeyError):
        return f"the field {exc.args[0]!r} is missing"
    return str(exc)[:200]


def fork_loop(session_id: str, chain: Sequence[object]) -> CorruptDataError:
    """The error for a fork chain that comes back to a session already in it."""
    path = " -> ".join(repr(str(node)) for node in chain)
    return CorruptDataError(
        f"session {session_id!r}: its fork parents loop ({path}), so its events cannot be "
        "read; the store was edited by hand or restored badly: restore it from a backup, "
        "or give one of these sessions its real parent back"
    )


def _check_time(value: object, what: str) -> None:
    """A time is a finite float, or an int a float holds exactly; ``-0.0`` is refused
    (SQLite gives it back as 0.0). Stores give times back as floats."""
    if type(value) is int:
        if abs(value) > 2**53:
            raise _unsupported(what, "it is beyond the whole seconds a float holds exactly (2**53)")
        return
    if type(value) is not float or not math.isfinite(value):
        raise _unsupported(what, f"{value!r} is not a finite number of seconds")
    if value == 0 and math.copysign(1.0, value) < 0:
        raise _unsupported(what, "-0.0 is not kept as such by every store; use 0.0")


_PAYLOAD_DECODER = msgspec.json.Decoder()
_CONTROLS = re.compile("[\x00-\x1f\x7f]")


def check_payload(text: object, what: str = "event data") -> None:
    """Refuse an event payload that some backend could not give back exactly.

    A payload is compact JSON text (no line breaks outside strings, as
    ``json.dumps`` and ``model_dump_json`` write it) of at most
    :data:`MAX_PAYLOAD_BYTES`, nested at most :data:`MAX_JSON_DEPTH` levels,
    with finite numbers and valid unicode only.

    Raises:
        UnsupportedValueError: What is wrong with it.
    """
    if type(text) is not str:
        raise _unsupported(what, f"it must be JSON text (a str), not {type(text).__name__}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise _unsupported(what, "it holds a lone UTF-16 surrogate (not valid unicode)") from None
    if size > MAX_PAYLOAD_BYTES:
        raise _unsupported(
            what, f"it is {size} bytes; the limit is {MAX_PAYLOAD_BYTES} (keep large data in blobs)"
        )
    if any(c in text for c in _LINE_BREAKS):
        raise _unsupported(what, "it holds a line break; write compact one-line JSON")
    try:
        # strict JSON: NaN, Infinity and numbers beyond a float are refused
        value = _PAYLOAD_DECODER.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = "it nests too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise _unsupported(what, f"it is not valid JSON ({reason})") from None
    # a payload with few brackets cannot nest deeply, nor hide an escaped surrogate without "\u"
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    if deep or ("\\u" in text and _ESCAPED_SURROGATE_RE.search(text) is not None):
        check_json_value(value, what)


def check_event(event: object, index: int = 0) -> None:
    """Refuse a :class:`NewEvent` some backend could not give back exactly.

    Raises:
        UnsupportedValueError: A bad ``type``, ``data``, ``ts``, ``turn_id``
            or ``schema_version``.
    """
    if not isinstance(event, NewEvent):
        raise InvalidArgumentError(
            f"events[{index}] must be a NewEvent (see chatsession.log.encode), "
            f"not {type(event).__name__}"
        )
    kind, data, ts, turn_id, version, event_id = event
    what = f"events[{index}]"
    if event_id is not None and (
        type(event_id) is not str or _EVENT_ID_RE.fullmatch(event_id) is None
    ):
        raise _unsupported(
            f"{what}.event_id", f"{event_id!r} is not 1-64 characters of A-Z a-z 0-9 _ -"[:160]
        )
    if type(kind) is not str or _EVENT_TYPE_RE.fullmatch(kind) is None:
        raise _unsupported(
            f"{what}.type {kind!r}"[:120], "use 1-64 characters of a-z, 0-9 and '_', a letter first"
        )
    _check_time(ts, f"{what}.ts")
    if turn_id is not None:
        check_text(turn_id, f"{what}.turn_id", controls=False)
    if not _is_int(version) or not 0 <= version <= MAX_SCHEMA_VERSION:
        raise _unsupported(
            f"{what}.schema_version", f"{version!r} is not an int from 0 to {MAX_SCHEMA_VERSION}"
        )
    check_payload(data, f"{what}.data")


def check_record(record: SessionRecord) -> None:
    """Refuse a record some backend could not give back exactly.

    ``user_id``, ``agent_id`` and ``window_id`` are free strings without
    control characters; ``title`` without NUL; times are finite; ``metadata``
    and ``fingerprint`` are JSON objects (see :func:`check_json_value`).

    Raises:
        InvalidIdError: A bad session id.
        UnsupportedValueError: Any other field that cannot be stored exactly.
    """
    if not isinstance(record, SessionRecord):
        raise InvalidArgumentError(f"expected a SessionRecord, not {type(record).__name__}")
    validate_id(record.id)
    for name in ("user_id", "agent_id", "window_id"):
        check_text(getattr(record, name), name, optional=True, controls=False)
    check_text(record.title, "title", optional=True)
    if record.state not in ("active", "idle", "archived", "expired"):
        raise _unsupported("state", f"{record.state!r} is not active, idle, archived or expired")
    for name in ("created_at", "updated_at", "expires_at"):
        value = getattr(record, name)
        if value is None and name == "expires_at":
            continue
        _check_time(value, name)
    if type(record.metadata) is not dict:
        raise _unsupported("metadata", f"it must be a dict, not {type(record.metadata).__name__}")
    check_json_value(record.metadata, "metadata")
    if record.fingerprint is not None:
        if type(record.fingerprint) is not dict:
            raise _unsupported("fingerprint", "it must be a dict or None")
        check_json_value(record.fingerprint, "fingerprint")
    if record.parent is not None and not isinstance(record.parent, ParentRef):
        raise InvalidArgumentError("parent must be a ParentRef or None")


def check_snapshot(seq: object, data: object) -> None:
    """Reject a snapshot that is not ``bytes`` of at most :data:`MAX_BLOB_BYTES` at an int seq >= 0.

    Raises:
        InvalidArgumentError: A bad seq.
        UnsupportedValueError: Bad data.
    """
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise InvalidArgumentError(f"a snapshot's seq is an int >= 0, got {seq!r}")
    if not isinstance(data, bytes):
        raise _unsupported("snapshot", f"it must be bytes, not {type(data).__name__}")
    if len(data) > MAX_BLOB_BYTES:
        raise _unsupported("snapshot", f"it is {len(data)} bytes; the limit is {MAX_BLOB_BYTES}")


def check_blob(data: object, media_type: object) -> None:
    """Refuse a blob that is not ``bytes`` of at most :data:`MAX_BLOB_BYTES`, or a bad media type.

    Raises:
        UnsupportedValueError: What is wrong with it.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _unsupported("blob", f"it must be bytes, not {type(data).__name__}")
    if len(data) > MAX_BLOB_BYTES:
        raise _unsupported("blob", f"it is {len(data)} bytes; the limit is {MAX_BLOB_BYTES}")
    check_text(media_type, "media_type", controls=False, limit=255)


def check_append(events: Sequence[NewEvent], expected_seq: int) -> None:
    """Reject a bad batch or ``expected_seq`` before any I/O (see :func:`check_event`).

    Raises:
        InvalidArgumentError: An empty batch, or ``expected_seq`` not an int >= 0.
        UnsupportedValueError: An event no backend could give back exactly.
    """
    if isinstance(events, str | bytes) or not isinstance(events, Sequence) or not events:
        raise InvalidArgumentError("append needs a non-empty list of NewEvent")
    if not _is_int(expected_seq) or expected_seq < 0:
        raise InvalidArgumentError(f"expected_seq must be an int >= 0, got {expected_seq!r}")
    for index, event in enumerate(events):
        check_event(event, index)


def check_fork_point(session_id: str, at_seq: int, head: int) -> None:
    """Reject a fork point outside ``0..head``.

    Raises:
        InvalidArgumentError: ``at_seq`` is not an int in ``0..head``.
    """
    if not _is_int(at_seq) or not 0 <= at_seq <= head:
        raise InvalidArgumentError(
            f"cannot fork {session_id!r} at seq {at_seq!r}: its events are 1..{head}"
        )


def check_version(expected_version: int) -> None:
    """Reject an ``update``'s ``expected_version`` that is not an int >= 0 (:class:`InvalidArgumentError`)."""
    if not _is_int(expected_version) or expected_version < 0:
        raise InvalidArgumentError(
            f"expected_version must be an int >= 0 (the record's version), got {expected_version!r}"
        )


def check_fork_at(at_seq: int) -> None:
    """Reject a fork point that is not an int >= 0, before any I/O (:class:`InvalidArgumentError`).

    Whether it is past the parent's head is checked later, by :func:`check_fork_point`.
    """
    if not _is_int(at_seq) or at_seq < 0:
        raise InvalidArgumentError(f"at_seq must be an int >= 0, got {at_seq!r}")


def check_filters(
    user_id: object = None, agent_id: object = None, window_id: object = None, state: object = None
) -> None:
    """Reject ``list_sessions`` filters no session could match exactly.

    Raises:
        UnsupportedValueError: A filter that is not None or a string a record
            could hold (see :func:`check_record`).
        InvalidArgumentError: A ``state`` other than the four.
    """
    for name, value in (("user_id", user_id), ("agent_id", agent_id), ("window_id", window_id)):
        check_text(value, f"the {name} filter", optional=True, controls=False)
    if state is not None and state not in ("active", "idle", "archived", "expired"):
        raise InvalidArgumentError(
            f"state must be None, 'active', 'idle', 'archived' or 'expired', got {state!r}"
        )


def check_create(record: SessionRecord, max_per_user: object) -> None:
    """Check ``create``'s arguments: the record, and a limit that only a user's session takes.

    Raises:
        InvalidArgumentError: ``max_per_user`` is not None or an int >= 1, or
            it is given for a record without ``user_id``.
        UnsupportedValueError: The record cannot be stored exactly.
    """
    check_record(record)
    if max_per_user is None:
        return
    if isinstance(max_per_user, bool) or not isinstance(max_per_user, int) or max_per_user < 1:
        raise InvalidArgumentError(
            f"max_per_user must be None or an int >= 1, not {max_per_user!r}"
        )
    if record.user_id is None:
        raise InvalidArgumentError(
            f"max_per_user={max_per_user} needs a record with a user_id (session "
            f"{record.id!r} has none)"
        )


def check_stats(idle_before: object, top: object) -> None:
    """Check ``stats``'s arguments.

    Raises:
        InvalidArgumentError: ``idle_before`` is not None or a finite number, or
            ``top`` is not an int in 0..10,000.
    """
    if idle_before is not None and (
        isinstance(idle_before, bool)
        or not isinstance(idle_before, int | float)
        or not math.isfinite(idle_before)
    ):
        raise InvalidArgumentError(
            f"idle_before must be None or a finite Unix time, not {idle_before!r}"
        )
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 10_000:
        raise InvalidArgumentError(f"top must be an int from 0 to 10000, not {top!r}")


def check_before(before: object) -> None:
    """Reject a ``purge_expired(before=...)`` that is not None or a number (NaN refused).

    Raises:
        InvalidArgumentError: A bool, a string, NaN or anything but an int or float.
    """
    if before is None:
        return
    if type(before) not in (int, float) or before != before:
        raise InvalidArgumentError(
            f"before must be None or a number of seconds (not NaN), got {before!r}"
        )


def check_limit(limit: int) -> None:
    """Reject a page size outside 1..1000 (:class:`InvalidArgumentError`)."""
    if not _is_int(limit) or not 1 <= limit <= 1000:
        raise InvalidArgumentError(f"limit must be an int from 1 to 1000, got {limit!r}")


def check_read(after_seq: int, upto_seq: int | None, batch_size: int) -> None:
    """Reject a bad read range or batch size before any I/O (:class:`InvalidArgumentError`)."""
    if not _is_int(after_seq) or after_seq < 0:
        raise InvalidArgumentError(f"after_seq must be an int >= 0, got {after_seq!r}")
    if upto_seq is not None and (not _is_int(upto_seq) or upto_seq < 0):
        raise InvalidArgumentError(f"upto_seq must be None or an int >= 0, got {upto_seq!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
