"""``memory://``: a store that lives in this process only.

Every ``open_store("memory://")`` is a new, empty store. Nothing survives the
process; use it for tests and throwaway sessions. It implements the whole
:class:`~chatsession.store.base.Store` contract and is the reference the other
backends are checked against.

It keeps what it acknowledged, not the caller's objects: records are copied
in and out (changing a dict passed to ``create`` or one returned by ``get``
changes nothing stored), events are immutable tuples of immutable values,
and blobs are copied to ``bytes``.

The message for a fork chain that loops back on itself is made here and
shared with the other embedded backends.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ConflictError,
    CorruptDataError,
    InvalidArgumentError,
    InvalidURLError,
    SessionArchivedError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
)
from chatsession.store.base import (
    DEFAULT_READ_BATCH,
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
    check_append,
    check_before,
    check_blob,
    check_create,
    check_filters,
    check_fork_at,
    check_fork_point,
    check_lease,
    check_lease_request,
    check_limit,
    check_read,
    check_record,
    check_snapshot,
    check_stats,
    check_version,
    count_events,
    decode_cursor,
    fork_loop,
    fork_segments,
    initial_record,
    now,
    redact_url,
    updated_record,
    validate_id,
)
from chatsession.store.leases import check_lease_for, check_writer, granted, renewed
from chatsession.store.options import parse_options
from chatsession.store.records import check_visible, is_visible, page_of

__all__ = ["MemoryStore"]


@dataclass
class _Entry:
    record: SessionRecord
    events: list[StoredEvent] = field(default_factory=list)  # own events only
    blobs: dict[str, bytes] = field(default_factory=dict)
    children: set[str] = field(default_factory=set)
    deleted: bool = False
    lease: Lease | None = None  # the current holder (expired or not)
    last_token: int = 0  # the highest fencing token handed out
    snapshot: tuple[int, bytes] | None = None
    messages: int = 0  # figures of its own events, for stats()
    tokens: int = 0
    bytes: int = 0


class MemoryStore:
    """An in-process store (``memory://``). See the module docstring."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._entries: dict[str, _Entry] = {}
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``memory://`` (no options).

        Raises:
            InvalidURLError: The URL has a host, a path, a query or options.
        """
        try:
            parts = urlsplit(url)
        except ValueError:
            raise InvalidURLError(f"cannot parse {redact_url(url)}; use plain memory://") from None
        if parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise InvalidURLError(
                f"memory:// takes no host or path, got {redact_url(url)}; use plain memory://"
            )
        parse_options(url, {}, options, backend="memory")
        return cls(url)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- helpers ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")

    def _visible(self, session_id: str) -> _Entry:
        self._check_open()
        validate_id(session_id)
        entry = self._entries.get(session_id)
        if entry is None:
            raise SessionNotFoundError(session_id)
        check_visible(session_id, entry.deleted, entry.record.expires_at)
        return entry

    def _lineage(self, entry: _Entry) -> list[tuple[str, int]]:
        chain: list[tuple[str, int]] = []
        seen: set[str] = set()
        current: _Entry | None = entry
        while current is not None:
            seen.add(current.record.id)
            parent = current.record.parent
            chain.append((current.record.id, parent.seq if parent else 0))
            if parent is None:
                break
            if parent.session_id in seen:
                raise fork_loop(entry.record.id, [sid for sid, _ in chain] + [parent.session_id])
            current = self._entries.get(parent.session_id)
            if current is None:
                raise CorruptDataError(
                    f"session {entry.record.id!r}: its fork ancestor {parent.session_id!r} is "
                    "missing from the store"
                )
        return chain

    def _purge(self, session_id: str) -> None:
        entry = self._entries.pop(session_id)
        parent = entry.record.parent
        if parent is None:
            return
        parent_entry = self._entries.get(parent.session_id)
        if parent_entry is None:
            return
        parent_entry.children.discard(session_id)
        if parent_entry.deleted and not parent_entry.children:
            self._purge(parent.session_id)

    # -- records ---------------------------------------------------------

    async def create(
        self, record: SessionRecord, *, max_per_user: int | None = None
    ) -> SessionRecord:
        """See :meth:`Store.create`."""
        check_create(record, max_per_user)
        stored = initial_record(record).model_copy(deep=True)
        self._check_open()
        if record.id in self._entries:
            raise SessionExistsError(record.id)
        if max_per_user is not None and record.user_id is not None:
            at = now()
            count = sum(
                1
                for e in self._entries.values()
                if e.record.user_id == record.user_id
                and e.record.state != "archived"
                and is_visible(e.deleted, e.record.expires_at, at)
            )
            if count >= max_per_user:
                raise SessionLimitError(record.user_id, max_per_user, count)
        self._entries[record.id] = _Entry(stored)
        return stored.model_copy(deep=True)

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        return self._visible(session_id).record.model_copy(deep=True)

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        check_record(record)
        check_version(expected_version)
        entry = self._visible(record.id)
        if entry.record.version != expected_version:
            raise ConflictError(record.id, expected_version, entry.record.version, "version")
        entry.record = updated_record(entry.record, record).model_copy(deep=True)
        return entry.record.model_copy(deep=True)

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        entry = self._visible(session_id)
        if entry.children:
            entry.deleted = True
        else:
            self._purge(session_id)

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
        """See :meth:`Store.list_sessions`."""
        check_limit(limit)
        check_filters(user_id=user_id, agent_id=agent_id, window_id=window_id, state=state)
        after = decode_cursor(cursor) if cursor is not None else None
        self._check_open()
        at = now()
        rows = [
            e.record
            for e in self._entries.values()
            if is_visible(e.deleted, e.record.expires_at, at)
            and (user_id is None or e.record.user_id == user_id)
            and (agent_id is None or e.record.agent_id == agent_id)
            and (window_id is None or e.record.window_id == window_id)
            and (state is None or e.record.state == state)
            and (after is None or (e.record.created_at, e.record.id) < after)
        ]
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return page_of([r.model_copy(deep=True) for r in rows[: limit + 1]], limit)

    # -- events ----------------------------------------------------------

    async def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_seq: int,
        *,
        lease: Lease | None = None,
    ) -> int:
        """See :meth:`Store.append`."""
        check_append(events, expected_seq)
        if lease is not None:
            check_lease_for(lease, session_id)
        entry = self._visible(session_id)
        head = entry.record.head
        if head != expected_seq:
            if self._applied_already(entry, events, expected_seq):
                return expected_seq + len(events)
            raise ConflictError(session_id, expected_seq, head)
        if entry.record.state == "archived":
            raise SessionArchivedError(session_id)
        check_writer(session_id, entry.lease, lease, now())
        counts = count_events(events)
        entry.messages += counts.messages
        entry.tokens += counts.tokens
        entry.bytes += counts.bytes
        entry.events.extend(
            StoredEvent(
                head + i, e.type, float(e.ts), e.turn_id, e.data, e.schema_version, e.event_id
            )
            for i, e in enumerate(events, start=1)
        )
        entry.record = entry.record.model_copy(
            update={"head": head + len(events), "updated_at": now()}
        )
        return head + len(events)

    def _applied_already(
        self, entry: _Entry, events: Sequence[NewEvent], expected_seq: int
    ) -> bool:
        """Whether this exact append (by its first event's id) is already in the log."""
        first_id = events[0].event_id
        if first_id is None or expected_seq >= entry.record.head:
            return False
        own_start = entry.record.parent.seq if entry.record.parent else 0
        if expected_seq < own_start:
            return False  # before the fork point: the parent's events, not ours
        stored = entry.events[expected_seq - own_start]
        return stored.event_id == first_id

    # -- leases and snapshots --------------------------------------------

    async def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Lease:
        """See :meth:`Store.acquire_lease`."""
        check_lease_request(session_id, owner, ttl)
        entry = self._visible(session_id)
        entry.lease = granted(session_id, entry.lease, entry.last_token, owner, ttl, now())
        entry.last_token = max(entry.last_token, entry.lease.token)
        return entry.lease

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """See :meth:`Store.renew_lease`."""
        check_lease(lease)
        check_lease_request(lease.session_id, lease.owner, ttl)
        entry = self._visible(lease.session_id)
        entry.lease = renewed(lease, entry.lease, ttl, now())
        return entry.lease

    async def release_lease(self, lease: Lease) -> None:
        """See :meth:`Store.release_lease`."""
        check_lease(lease)
        self._check_open()
        entry = self._entries.get(lease.session_id)
        if entry is not None and entry.lease is not None and entry.lease.token == lease.token:
            entry.lease = None

    async def put_snapshot(self, session_id: str, seq: int, data: bytes) -> None:
        """See :meth:`Store.put_snapshot`."""
        validate_id(session_id)
        check_snapshot(seq, data)
        entry = self._visible(session_id)
        if seq > entry.record.head:
            raise InvalidArgumentError(
                f"a snapshot of session {session_id!r} at seq {seq} is past its head "
                f"{entry.record.head}"
            )
        if entry.snapshot is None or entry.snapshot[0] <= seq:
            entry.snapshot = (seq, bytes(data))

    async def get_snapshot(self, session_id: str) -> tuple[int, bytes] | None:
        """See :meth:`Store.get_snapshot`."""
        return self._visible(session_id).snapshot

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`."""
        check_read(after_seq, upto_seq, batch_size)
        entry = self._visible(session_id)
        segments = fork_segments(self._lineage(entry), entry.record.head, after_seq, upto_seq)
        for seg_id, lo, hi in segments:
            seg = self._entries[seg_id]
            own_start = seg.record.parent.seq if seg.record.parent else 0
            rows = seg.events[lo - own_start : hi - own_start]
            for i in range(0, len(rows), batch_size):
                yield rows[i : i + batch_size]

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        check_fork_at(at_seq)
        check_record(new_record)
        parent = self._visible(session_id)
        check_fork_point(session_id, at_seq, parent.record.head)
        if new_record.id in self._entries:
            raise SessionExistsError(new_record.id)
        stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
        stored = stored.model_copy(deep=True)
        self._entries[new_record.id] = _Entry(stored)
        parent.children.add(new_record.id)
        return stored.model_copy(deep=True)

    # -- blobs -----------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        check_blob(data, media_type)
        entry = self._visible(session_id)
        kept = bytes(data)
        blob_id = hashlib.sha256(kept).hexdigest()
        entry.blobs[blob_id] = kept
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        entry = self._visible(session_id)
        validate_id(blob_id, "blob id")
        for seg_id, _ in self._lineage(entry):
            data = self._entries[seg_id].blobs.get(blob_id)
            if data is not None:
                return data
        raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")

    # -- upkeep ----------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`."""
        check_before(before)
        self._check_open()
        at = now() if before is None else before
        expired = [
            sid for sid, e in self._entries.items() if not e.deleted and e.record.is_expired(at)
        ]
        for sid in expired:
            entry = self._entries.get(sid)
            if entry is None:
                continue
            if entry.children:
                entry.deleted = True
            else:
                self._purge(sid)
        return len(expired)

    async def stats(self, *, idle_before: float | None = None, top: int = 100) -> StoreStats:
        """See :meth:`Store.stats`."""
        check_stats(idle_before, top)
        self._check_open()
        at = now()
        tally = StatsTally(idle_before)
        for entry in self._entries.values():
            record = entry.record
            if entry.deleted:
                continue
            if record.is_expired(at):
                tally.expired()
                continue
            tally.add(
                str(record.state),
                record.updated_at,
                record.user_id,
                record.agent_id,
                EventCounts(entry.messages, entry.tokens, entry.bytes),
            )
        return tally.result(top)

    async def aclose(self) -> None:
        """Drop everything; the store cannot be used afterwards."""
        self._closed = True
        self._entries.clear()
