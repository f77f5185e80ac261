"""The storage contract: records, event rows and the ``Store`` protocol.

A store keeps, per session, one *record* (who owns it, its state, its parent)
and an append-only log of *events* numbered ``1..head``. A store knows nothing
of LLMs or of what an event means: event payloads are JSON text that the store
gives back as equal JSON (byte for byte, except PostgreSQL, whose ``jsonb``
column normalises whitespace and key order). ``chatsession.log`` gives them
meaning.

Third parties implement :class:`Store` without inheriting from anything here;
``isinstance(obj, Store)`` checks the shape at run time.

This module holds the protocol and re-exports, for the backends and for
third parties, what it speaks in: the values (:mod:`chatsession.store.types`),
the checks every store runs before any I/O (:mod:`chatsession.store.checks`)
and URL redaction (:mod:`chatsession.store.urls`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, Self, runtime_checkable

from chatsession.store.checks import (
    STRICT_JSON,
    check_append,
    check_before,
    check_blob,
    check_create,
    check_event,
    check_filters,
    check_fork_at,
    check_fork_point,
    check_json_value,
    check_lease,
    check_lease_request,
    check_limit,
    check_payload,
    check_read,
    check_record,
    check_snapshot,
    check_stats,
    check_text,
    check_version,
    describe_failure,
    fork_loop,
    initial_record,
    updated_record,
)
from chatsession.store.types import (
    DEFAULT_READ_BATCH,
    EDITABLE_FIELDS,
    EVENT_SCHEMA_VERSION,
    MAX_BLOB_BYTES,
    MAX_FIELD_LENGTH,
    MAX_ID_LENGTH,
    MAX_JSON_DEPTH,
    MAX_LEASE_TTL,
    MAX_PAYLOAD_BYTES,
    MAX_SCHEMA_VERSION,
    EventCounts,
    Lease,
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    StatsTally,
    StoredEvent,
    StoreStats,
    count_events,
    decode_cursor,
    encode_cursor,
    fork_segments,
    new_event_id,
    now,
    top_counts,
    validate_id,
)
from chatsession.store.urls import (
    redact_text,
    redact_url,
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
    "EventCounts",
    "Lease",
    "NewEvent",
    "Page",
    "ParentRef",
    "SessionRecord",
    "SessionState",
    "StatsTally",
    "Store",
    "StoreStats",
    "StoredEvent",
    "check_append",
    "check_before",
    "check_blob",
    "check_create",
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
    "check_stats",
    "check_text",
    "check_version",
    "count_events",
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
    "top_counts",
    "updated_record",
    "validate_id",
]


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

    async def create(
        self, record: SessionRecord, *, max_per_user: int | None = None
    ) -> SessionRecord:
        """Create a session with no events.

        Args:
            record: The new record; ``head``, ``version`` and ``parent`` are
                ignored; ``created_at``/``updated_at`` are set to now when 0.
            max_per_user: Create only if the record's user has fewer visible
                sessions than this, not counting archived ones; checked and
                written in one atomic step, so concurrent creates (in any
                process) never take a user past it.

        Returns:
            The stored record (``head`` 0, ``version`` 1).

        Raises:
            SessionExistsError: The id is taken (also by a deleted session
                still kept for its forks).
            SessionLimitError: The user already has ``max_per_user`` sessions;
                nothing was written.
            InvalidArgumentError: A bad ``max_per_user``, or one given for a
                record without ``user_id``.
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

        Archived sessions are read-only: an append to a session whose state
        is ``archived`` raises ``SessionArchivedError`` (checked in the same
        atomic step). Every append adds to the session's figures for
        :meth:`stats` (:func:`~chatsession.store.types.count_events`).

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
            SessionArchivedError: The session is archived; nothing was written.
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

        Everything they had goes (events, blobs, snapshot, lease), except
        events a live fork still inherits. Safe to run in several processes
        at once: each session is deleted, and counted, by one of them.

        Returns:
            How many sessions this call deleted.
        """
        ...

    async def stats(self, *, idle_before: float | None = None, top: int = 100) -> StoreStats:
        """Figures about the whole store, computed by the store itself.

        The figures come from what the store keeps per session (counted as
        events are appended) and its indexes, never by reading events back;
        memory stays flat in the number of sessions.

        Args:
            idle_before: Active sessions not updated since this Unix time
                count as ``idle``; None counts none as idle.
            top: How many users and agents ``by_user`` and ``by_agent`` name.

        Raises:
            InvalidArgumentError: A bad ``idle_before`` or ``top``.
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
