"""The storage contract: records, event rows and the ``Store`` protocol.

A store keeps, per session, one *record* (who owns it, its state, its parent)
and an append-only log of *events* numbered ``1..head``. A store knows nothing
of LLMs or of what an event means: event payloads are JSON text that the store
gives back as equal JSON (byte for byte, except PostgreSQL, whose ``jsonb``
column normalises whitespace and key order). ``chatsession.log`` gives them
meaning.

Third parties implement :class:`Store` without inheriting from anything here;
``isinstance(obj, Store)`` checks the shape at run time.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, NamedTuple, Protocol, Self, TypeVar, runtime_checkable
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatsession.errors import (
    CorruptDataError,
    InvalidArgumentError,
    InvalidIdError,
    UnsupportedValueError,
)

__all__ = [
    "DEFAULT_READ_BATCH",
    "EDITABLE_FIELDS",
    "EVENT_SCHEMA_VERSION",
    "MAX_BLOB_BYTES",
    "MAX_FIELD_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_JSON_DEPTH",
    "MAX_LEASE_TTL",
    "MAX_PAYLOAD_BYTES",
    "MAX_SCHEMA_VERSION",
    "STRICT_JSON",
    "Lease",
    "NewEvent",
    "Page",
    "ParentRef",
    "SessionRecord",
    "SessionState",
    "Store",
    "StoredEvent",
    "check_append",
    "check_before",
    "check_blob",
    "check_event",
    "check_filters",
    "check_fork_at",
    "check_fork_point",
    "check_json_value",
    "check_lease",
    "check_lease_request",
    "check_limit",
    "check_payload",
    "check_read",
    "check_record",
    "check_snapshot",
    "check_text",
    "check_version",
    "decode_cursor",
    "describe_failure",
    "encode_cursor",
    "fork_loop",
    "fork_segments",
    "initial_record",
    "new_event_id",
    "now",
    "redact_text",
    "redact_url",
    "updated_record",
    "validate_id",
]

#: The version of the event payload format this code writes. ``chatsession.log``
#: upgrades older versions when it reads them.
EVENT_SCHEMA_VERSION = 2

#: How many events ``Store.read`` yields per batch unless told otherwise.
DEFAULT_READ_BATCH = 2000

#: The longest id accepted for sessions, blobs and the like.
MAX_ID_LENGTH = 128

#: The deepest nesting of arrays and objects accepted in a stored JSON value
#: (an event payload, a record's metadata or fingerprint). State, metadata and
#: checkpoint values sit 2 to 3 levels inside their event's payload.
MAX_JSON_DEPTH = 128

#: The largest event payload (UTF-8 bytes of its JSON text); larger tool
#: outputs belong in blobs, which ``ChatSession`` makes on its own.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

#: The largest blob accepted by ``put_blob``.
MAX_BLOB_BYTES = 256 * 1024 * 1024

#: The highest event ``schema_version`` a store keeps (PostgreSQL's ``smallint``).
MAX_SCHEMA_VERSION = 32767

#: The longest ``user_id``, ``agent_id``, ``window_id``, ``title``, event
#: ``turn_id`` or media type accepted.
MAX_FIELD_LENGTH = 1024

_EVENT_TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_EVENT_ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_ESCAPED_SURROGATE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_LINE_BREAKS = ("\n", "\r")

_ID_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")

K = TypeVar("K")  # how a backend names a session in a fork chain (id or row key)

SessionState = Literal["active", "idle", "archived", "expired"]


def validate_id(value: object, what: str = "session id") -> str:
    """Check that ``value`` is safe as a file name and as a key in every backend.

    Args:
        value: The candidate id.
        what: What the id names, for the error message.

    Returns:
        The id, unchanged.

    Raises:
        InvalidIdError: If the id is not a string of 1-128 characters from
            ``A-Z a-z 0-9 - _ .`` that does not start with ``.``.
    """
    if not isinstance(value, str):
        raise InvalidIdError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidIdError(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdError(
            f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
        )
    if _ID_RE.fullmatch(value) is None:
        bad = sorted({c for c in value if not (c.isascii() and (c.isalnum() or c in "-_."))})
        if bad:
            shown = ", ".join(repr(c) for c in bad[:5])
            reason = f"it contains {shown}"
        else:
            reason = "it starts with '.'"
        raise InvalidIdError(
            f"{what} {value[:40]!r} is not allowed: {reason}; use letters, digits, "
            "'-', '_' and '.' (not first), at most 128 characters"
        )
    return value


def now() -> float:
    """The current time as a Unix timestamp (seconds, float); used for ``ts`` fields."""
    return time.time()


class NewEvent(NamedTuple):
    """An event to append; the store gives it the next seq.

    Attributes:
        type: The event type (``message``, ``usage``, ...); opaque to the store.
        data: The payload as JSON text; returned as equal JSON (see the module docstring).
        ts: When it happened (Unix seconds).
        turn_id: The turn it belongs to, if any.
        schema_version: The payload format version (see ``chatsession.log``).
        event_id: A unique id the writer gives the event (``new_event_id()``):
            an append whose reply was lost and that is sent again is then
            recognised and applied once (see :meth:`Store.append`).
    """

    type: str
    data: str
    ts: float
    turn_id: str | None = None
    schema_version: int = EVENT_SCHEMA_VERSION
    event_id: str | None = None


class StoredEvent(NamedTuple):
    """An event read back from a store.

    Attributes:
        seq: Position in the session's log, from 1; contiguous.
        type: The event type.
        ts: When it happened (Unix seconds).
        turn_id: The turn it belongs to, if any.
        data: The payload JSON text as appended (equal JSON; see the module docstring).
        schema_version: The payload format version it was written with.
        event_id: The id it was appended with, if any.
    """

    seq: int
    type: str
    ts: float
    turn_id: str | None
    data: str
    schema_version: int
    event_id: str | None = None

    def to_json(self) -> str:
        """The event as one JSON object ``{seq, type, ts, turn_id, v, data}``."""
        turn = "null" if self.turn_id is None else json.dumps(self.turn_id)
        return (
            f'{{"seq":{self.seq},"type":{json.dumps(self.type)},"ts":{self.ts!r},'
            f'"turn_id":{turn},"v":{self.schema_version},"data":{self.data}}}'
        )


class Lease(NamedTuple):
    """A session's write lease: one writer at a time, across processes and machines.

    Attributes:
        session_id: The session it is for.
        owner: Who holds it (any string the holder chooses, e.g. host:pid:uuid).
        token: The fencing token: it grows with every new holder, never with a
            renewal. Appends made under the lease carry it, so a holder whose
            lease expired (a paused process) cannot write after another took over.
        expires_at: When it runs out, in Unix seconds by the store's clock.
    """

    session_id: str
    owner: str
    token: int
    expires_at: float


def new_event_id() -> str:
    """A fresh event id (32 hex digits): unique, so a re-sent append is recognised."""
    return uuid.uuid4().hex


#: The longest lease a holder may ask for, in seconds.
MAX_LEASE_TTL = 24 * 3600.0


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


class ParentRef(BaseModel):
    """Where a fork branches off: the parent session and the last shared seq."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    seq: int = Field(ge=0)


class SessionRecord(BaseModel):
    """What a store keeps about one session besides its events.

    ``head``, ``version`` and ``parent`` are maintained by the store: values
    passed in by callers are ignored on ``create`` and checked on ``update``.

    Attributes:
        id: The session id (see :func:`validate_id`).
        user_id: The owner, if any.
        agent_id: Which agent the session belongs to, if any.
        window_id: Which client window (tab, device) it belongs to, if any.
        title: A human title.
        state: ``active``, ``idle``, ``archived`` or ``expired``.
        created_at: Unix seconds, set by ``create``/``fork``.
        updated_at: Unix seconds, refreshed by ``append`` and ``update``.
        expires_at: Unix seconds after which the session is invisible, or None.
        metadata: Free JSON-compatible key-values.
        parent: The fork point, for a fork.
        fingerprint: The agent's fingerprint (model, prompt and tool hashes).
        head: The seq of the last event (including inherited ones for a fork).
        version: Incremented by every ``update``; used for conditional updates.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    user_id: str | None = None
    agent_id: str | None = None
    window_id: str | None = None
    title: str | None = None
    state: SessionState = "active"
    created_at: float = 0.0
    updated_at: float = 0.0
    expires_at: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    parent: ParentRef | None = None
    fingerprint: dict[str, Any] | None = None
    head: int = 0
    version: int = 0

    def is_expired(self, at: float | None = None) -> bool:
        """Whether ``expires_at`` has passed (at ``at``, default now)."""
        return self.expires_at is not None and self.expires_at <= (now() if at is None else at)


class Page(NamedTuple):
    """One page of a listing.

    Attributes:
        records: The records, newest first (by ``created_at``, then id).
        next_cursor: Pass to the next ``list_sessions`` call; None on the last page.
    """

    records: list[SessionRecord]
    next_cursor: str | None


def encode_cursor(record: SessionRecord) -> str:
    """The keyset cursor that resumes a listing after ``record``."""
    raw = json.dumps([record.created_at, record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Parse a cursor made by :func:`encode_cursor`.

    Raises:
        InvalidArgumentError: If the cursor was not made by this library.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, session_id = json.loads(raw)
        return float(created_at), validate_id(session_id)
    except (ValueError, TypeError) as exc:
        shown = cursor[:40] if isinstance(cursor, str) else cursor
        raise InvalidArgumentError(
            f"bad listing cursor {shown!r}: pass back a next_cursor from list_sessions"
        ) from exc


def fork_segments(
    lineage: Sequence[tuple[K, int]], head: int, after_seq: int = 0, upto_seq: int | None = None
) -> list[tuple[K, int, int]]:
    """Plan a read across a fork chain.

    Args:
        lineage: ``(key, fork_seq)`` from the session itself up to the
            root (``key`` is whatever names a session in the backend), where ``fork_seq`` is the last seq that node inherits from
            its parent (0 for the root).
        head: The session's head seq.
        after_seq: Read events with seq greater than this.
        upto_seq: Read events with seq up to this (default: the head).

    Returns:
        ``(session_id, lo, hi)`` segments in read order: read that session's own
        events with ``lo < seq <= hi``. Empty segments are left out.
    """
    limit = head if upto_seq is None else min(upto_seq, head)
    segments: list[tuple[K, int, int]] = []
    for session_id, fork_seq in lineage:
        lo, hi = max(fork_seq, after_seq), limit
        if hi > lo:
            segments.append((session_id, lo, hi))
        limit = min(limit, fork_seq)
        if limit <= after_seq:
            break
    segments.reverse()
    return segments


#: Record fields a caller may change through ``Store.update``.
EDITABLE_FIELDS = frozenset(
    {"user_id", "agent_id", "window_id", "title", "state", "expires_at", "metadata", "fingerprint"}
)


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
        }
    )


def updated_record(current: SessionRecord, changes: SessionRecord) -> SessionRecord:
    """``current`` with the editable fields of ``changes``, a new version and ``updated_at``.

    ``changes`` is checked (:func:`check_record`); stores also check it before any I/O.
    """
    check_record(changes)
    update = {name: getattr(changes, name) for name in EDITABLE_FIELDS}
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
    if not controls and any(ord(c) < 32 or c == "\x7f" for c in value):
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


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range for a float")
    return value


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
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
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


_SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "auth")


def redact_url(url: object) -> str:
    """``url`` safe to show: its password and secret-looking query values replaced by ``***``.

    Used in every message, ``repr`` and log line that shows a store or model URL.
    A password holding characters that should have been percent-encoded
    (``/``, ``?``, ``#``, ``@``) is masked too: everything between ``user:``
    and the last ``@`` counts as the password.
    """
    if not isinstance(url, str):
        return repr(url)
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if sep and at >= 0 and not rest.startswith("/"):
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***@{rest[at + 1 :]}"
    masked = scheme + sep + rest
    base, question, query = masked.partition("?")
    if not question or not any(key in query.lower() for key in _SECRET_KEYS):
        return masked  # as given (urlunsplit would rewrite sqlite:/// and file: URLs)
    query, hash_mark, fragment = query.partition("#")
    pairs = parse_qsl(query, keep_blank_values=True)
    shown = urlencode(
        [(k, "***" if any(s in k.lower() for s in _SECRET_KEYS) else v) for k, v in pairs],
        safe="/:,*",
    )
    return f"{base}?{shown}{hash_mark}{fragment}"


_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*):[^\s@]*@")


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` in it shown as ``scheme://user:***@``.

    For messages that quote a URL among other words (errors from drivers and
    model servers) before they are shown or stored.
    """
    return _URL_CREDENTIALS.sub(r"\1:***@", text)


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


@runtime_checkable
class Store(Protocol):
    """The storage contract every backend meets (memory, SQLite, JSONL folder,
    Redis, PostgreSQL, or your own).

    All methods are coroutines. Ids are validated before any I/O
    (:class:`~chatsession.errors.InvalidIdError`). A backend that cannot reach
    its storage raises :class:`~chatsession.errors.StoreUnavailableError`, never
    :class:`~chatsession.errors.SessionNotFoundError`.

    Deleted and expired sessions are invisible to every method: ``get``,
    ``append``, ``read``, ``fork`` and ``update`` raise ``SessionNotFoundError``
    and listings skip them. Deleting a session never breaks its forks: their
    inherited events stay readable.
    """

    url: str
    """The URL the store was opened with (passwords masked)."""

    async def create(self, record: SessionRecord) -> SessionRecord:
        """Create a session with no events.

        Args:
            record: The new record; ``head``, ``version`` and ``parent`` are
                ignored; ``created_at``/``updated_at`` are set to now when 0.

        Returns:
            The stored record (``head`` 0, ``version`` 1).

        Raises:
            SessionExistsError: The id is taken (also by a deleted session
                still kept for its forks).
        """
        ...

    async def get(self, session_id: str) -> SessionRecord:
        """Return the session's record, with its current ``head``.

        Raises:
            SessionNotFoundError: No visible session with that id.
        """
        ...

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """Replace the editable fields of a record if its version is still the one read.

        Editable: ``user_id``, ``agent_id``, ``window_id``, ``title``, ``state``,
        ``expires_at``, ``metadata``, ``fingerprint``. ``updated_at`` is set to now.

        Returns:
            The stored record with ``version`` = ``expected_version + 1``.

        Raises:
            ConflictError: The stored version is not ``expected_version``.
            SessionNotFoundError: No visible session with that id.
        """
        ...

    async def delete(self, session_id: str) -> None:
        """Delete a session, its events and blobs.

        Forks of the session keep working: the events they inherit stay stored
        (invisibly) until no fork needs them.

        Raises:
            SessionNotFoundError: No visible session with that id.
        """
        ...

    async def list_sessions(
        self,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        window_id: str | None = None,
        state: SessionState | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """List visible sessions, newest first, filtered and paginated by keyset.

        Sessions created while paging through do not shift later pages: each
        existing session is returned exactly once.

        Args:
            user_id: Only this owner's sessions.
            agent_id: Only this agent's sessions.
            window_id: Only this window's sessions.
            state: Only sessions in this state.
            limit: Page size, 1-1000.
            cursor: ``next_cursor`` of the previous page.

        Raises:
            ValueError: A bad ``limit`` or ``cursor``.
        """
        ...

    async def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_seq: int,
        *,
        lease: Lease | None = None,
    ) -> int:
        """Append events atomically if the head is still ``expected_seq``.

        The events get seqs ``expected_seq + 1 ...``; all are stored or none.
        When this returns, the events are durable to the backend's documented
        guarantee and every later ``read`` sees them.

        Leases: with ``lease``, the append happens only if that lease is still
        the session's current one and has not expired (by the store's clock),
        checked in the same atomic step. Without one, it happens only if no
        other writer holds a live lease.

        Retries: when the head is not ``expected_seq`` but the event at
        ``expected_seq + 1`` carries the ``event_id`` of ``events[0]``, this
        append was already applied (its reply was lost): it returns
        ``expected_seq + len(events)`` and writes nothing.

        Returns:
            The head right after these events.

        Raises:
            ConflictError: The head is not ``expected_seq``; nothing was written.
            LeaseLostError: ``lease`` is no longer current or has expired;
                nothing was written.
            SessionBusyError: No ``lease`` was given and another writer holds a
                live one; nothing was written.
            SessionNotFoundError: No visible session with that id.
            InvalidArgumentError: ``events`` is empty or ``expected_seq`` bad.
            UnsupportedValueError: An event cannot be stored exactly.
        """
        ...

    async def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Lease:
        """Take the session's write lease for ``ttl`` seconds.

        Succeeds when no lease is held, the held one has expired, or ``owner``
        already holds it (then it is renewed, keeping its token). A new holder
        gets a token greater than every earlier one of the session. Atomic.

        Returns:
            The lease now held.

        Raises:
            SessionBusyError: Another owner holds a live lease (``holder`` and
                ``retry_after``, the seconds until it runs out, are set).
            SessionNotFoundError: No visible session with that id.
            InvalidArgumentError: A bad owner or ttl.
        """
        ...

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Extend a lease still held to ``ttl`` seconds from now (same token).

        A lease that expired but that nobody else took may be renewed.

        Raises:
            LeaseLostError: It was released, or another owner took it.
            SessionNotFoundError: No visible session with that id.
        """
        ...

    async def release_lease(self, lease: Lease) -> None:
        """Give the lease up, if it is still this one (same token). Idempotent."""
        ...

    async def put_snapshot(self, session_id: str, seq: int, data: bytes) -> None:
        """Keep ``data`` as the session's snapshot of its log at ``seq``.

        Snapshots are derived data (a cache of the fold, written by the
        session layer): the store keeps the one with the highest seq (a
        snapshot at a lower seq than the kept one is ignored), deletes it with
        the session, and never fences it with a lease. Forks do not share
        their parent's.

        Raises:
            SessionNotFoundError: No visible session with that id.
            InvalidArgumentError: ``seq`` is not an int in ``0..head``.
            UnsupportedValueError: ``data`` is not bytes, or over ``MAX_BLOB_BYTES``.
        """
        ...

    async def get_snapshot(self, session_id: str) -> tuple[int, bytes] | None:
        """The session's kept snapshot as ``(seq, data)``, or None.

        Raises:
            SessionNotFoundError: No visible session with that id.
        """
        ...

    def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """Stream the session's events with ``after_seq < seq <= upto_seq`` in batches.

        For a fork, the events inherited from its ancestors come first (up to
        the fork points), then its own; seqs are contiguous from 1.

        Raises:
            ValueError: ``after_seq`` or ``upto_seq`` is negative or
                ``batch_size`` is below 1 (raised on first iteration, before
                any I/O).
            SessionNotFoundError: No visible session with that id (raised on
                first iteration).
            CorruptDataError: A stored event cannot be read back.
        """
        ...

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """Create ``new_record.id`` as a fork of ``session_id`` sharing events ``1..at_seq``.

        Nothing is copied: the fork records ``parent = (session_id, at_seq)``
        and reads the parent's events through it. Cost is constant in history
        length.

        Returns:
            The fork's record (``head`` = ``at_seq``, ``parent`` set).

        Raises:
            SessionNotFoundError: No visible parent with that id.
            SessionExistsError: ``new_record.id`` is taken.
            ValueError: ``at_seq`` is negative or past the parent's head.
        """
        ...

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """Store a large payload for the session and return its id (a content hash).

        Raises:
            SessionNotFoundError: No visible session with that id.
        """
        ...

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """Return a blob stored for the session or one of its ancestors.

        Raises:
            BlobNotFoundError: No such blob reachable from the session.
            SessionNotFoundError: No visible session with that id.
        """
        ...

    async def purge_expired(self, before: float | None = None) -> int:
        """Delete sessions whose ``expires_at`` is before ``before`` (default now).

        Returns:
            How many sessions were deleted.
        """
        ...

    async def aclose(self) -> None:
        """Release connections, threads and file handles. Idempotent."""
        ...

    async def __aenter__(self) -> Self:
        """Return the store itself (``async with open_store(url) as store``)."""
        ...

    async def __aexit__(self, *exc: object) -> None:
        """Close the store (:meth:`aclose`)."""
        ...
