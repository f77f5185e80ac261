"""The values the storage contract speaks in: records, events, leases, ids and limits.

Re-exported by :mod:`chatsession.store.base`, which holds the ``Store`` protocol.
"""

from __future__ import annotations

import base64
import enum
import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from chatsession.errors import InvalidArgumentError, InvalidIdError

#: The version of the event payload format this code writes. ``chatsession.log``
#: upgrades older versions when it reads them.
EVENT_SCHEMA_VERSION = 3


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


_ID_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


K = TypeVar("K")  # how a backend names a session in a fork chain (id or row key)


class SessionState(enum.StrEnum):
    """A session's state; a ``str``, so ``record.state == "active"`` also works.

    Stores keep what they are given (``active`` or ``archived`` in practice);
    :class:`~chatsession.manager.SessionManager` derives the other two when it
    reads: ``IDLE`` (active, but no activity for ``idle_after``) and
    ``EXPIRED`` (its TTL has passed: invisible everywhere at once).
    """

    ACTIVE = "active"
    IDLE = "idle"
    ARCHIVED = "archived"
    EXPIRED = "expired"


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


class _EventIds:
    """Event ids: a random 96-bit prefix per process (drawn again after a fork) and a counter.

    Unique across processes and machines without asking the OS for randomness
    on every event (``uuid4`` costs a system call each time).
    """

    def __init__(self) -> None:
        self.reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(12)
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_event_ids = _EventIds()


def new_event_id() -> str:
    """A fresh event id (at most 40 characters): unique, so a re-sent append is recognised."""
    return _event_ids()


#: The longest lease a holder may ask for, in seconds.
MAX_LEASE_TTL = 24 * 3600.0


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
    state: SessionState = SessionState.ACTIVE
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


class EventCounts(NamedTuple):
    """What a batch of events adds to a session's figures in :class:`StoreStats`."""

    messages: int
    tokens: int
    bytes: int


def count_events(events: Sequence[NewEvent]) -> EventCounts:
    """Count what :meth:`Store.stats` sums, as every store does when it appends.

    ``messages``: events of type ``message``; ``tokens``: the ``total_tokens``
    of ``usage`` events (a non-negative int at the top of their payload; the
    only thing a store reads inside a payload, and only for stats);
    ``bytes``: the UTF-8 length of every payload.
    """
    messages = tokens = size = 0
    for event in events:
        size += len(event.data.encode("utf-8", "surrogatepass"))
        if event.type == "message":
            messages += 1
        elif event.type == "usage":
            tokens += _total_tokens(event.data)
    return EventCounts(messages, tokens, size)


def _total_tokens(data: str) -> int:
    try:
        value = json.loads(data).get("total_tokens", 0)
    except (ValueError, AttributeError):
        return 0
    return value if type(value) is int and value >= 0 else 0


class StoreStats(BaseModel):
    """Figures about a whole store, computed by the store (see :meth:`Store.stats`).

    Attributes:
        sessions: Visible sessions (not deleted, not expired).
        by_state: Sessions per state, every state present: ``active`` and
            ``idle`` (active with no activity since ``idle_before``) and
            ``archived`` count visible sessions; ``expired`` counts sessions
            past their ``expires_at`` not yet purged (0 where the backend
            expires them natively, as Redis does).
        users: Distinct owners of visible sessions (``user_id`` None not counted).
        agents: Distinct agents of visible sessions.
        by_user: Visible sessions per owner: the ``top`` owners with the most
            (ties by id).
        by_agent: The same per agent.
        messages: Message events of the visible sessions (a fork counts only
            its own: what it inherits counts with its parent).
        tokens: ``total_tokens`` of their usage events.
        bytes: UTF-8 bytes of all their event payloads.
    """

    model_config = ConfigDict(extra="forbid")

    sessions: int = 0
    by_state: dict[str, int] = Field(
        default_factory=lambda: {state.value: 0 for state in SessionState}
    )
    users: int = 0
    agents: int = 0
    by_user: dict[str, int] = Field(default_factory=dict)
    by_agent: dict[str, int] = Field(default_factory=dict)
    messages: int = 0
    tokens: int = 0
    bytes: int = 0


def top_counts(counts: dict[str, int], top: int) -> dict[str, int]:
    """The ``top`` entries with the highest counts (ties by key), highest first."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return dict(ranked[:top])


class StatsTally:
    """:meth:`Store.stats` summed in Python, session by session (memory, ``file://``).

    Args:
        idle_before: Active sessions not updated since this time count as idle.
    """

    def __init__(self, idle_before: float | None) -> None:
        self.idle_before = idle_before
        self.stats = StoreStats()
        self.users: dict[str, int] = {}
        self.agents: dict[str, int] = {}

    def expired(self) -> None:
        """Count a session past its expiry, not yet purged."""
        self.stats.by_state["expired"] += 1

    def add(
        self,
        state: str,
        updated_at: float,
        user_id: str | None,
        agent_id: str | None,
        counts: EventCounts,
    ) -> None:
        """Count a visible session with its own figures."""
        stats = self.stats
        if state == "active" and self.idle_before is not None and updated_at < self.idle_before:
            state = "idle"
        stats.sessions += 1
        stats.by_state[state] = stats.by_state.get(state, 0) + 1
        if user_id is not None:
            self.users[user_id] = self.users.get(user_id, 0) + 1
        if agent_id is not None:
            self.agents[agent_id] = self.agents.get(agent_id, 0) + 1
        stats.messages += counts.messages
        stats.tokens += counts.tokens
        stats.bytes += counts.bytes

    def result(self, top: int) -> StoreStats:
        """The figures, with the ``top`` users and agents named."""
        stats = self.stats
        stats.users, stats.agents = len(self.users), len(self.agents)
        stats.by_user, stats.by_agent = top_counts(self.users, top), top_counts(self.agents, top)
        return stats


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
