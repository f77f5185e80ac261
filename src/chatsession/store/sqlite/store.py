"""``SQLiteStore``: records, events, forks and blobs (leases and snapshots in ``leases.py``)."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any, Self, TypeVar
from urllib.parse import unquote, urlsplit

from chatsession.errors import (
    BlobNotFoundError,
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    SessionArchivedError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
)
from chatsession.store.base import (
    DEFAULT_READ_BATCH,
    Lease,
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
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
from chatsession.store.leases import check_lease_for, check_writer
from chatsession.store.options import choice, integer, parse_options, read_options
from chatsession.store.records import check_visible, encode_body, page_of
from chatsession.store.sqlite import leases
from chatsession.store.sqlite.connection import Connections, in_one_snapshot
from chatsession.store.sqlite.rows import (
    EVENT_COLUMNS,
    HEAD,
    ID,
    PK,
    RECORD_COLUMNS,
    check_head,
    damaged_in,
    events_of,
    held_lease,
    past_head,
    record_of,
    visible_row,
)
from chatsession.store.sqlite.stats import ADD_COUNTS_SQL, clamped, store_stats

__all__ = ["SQLiteStore"]

T = TypeVar("T")
logger = logging.getLogger("chatsession.store.sqlite")

#: The options of a ``sqlite://`` URL (see the package docstring).
OPTIONS = {
    "synchronous": choice("normal", "full", default="normal"),
    "busy_timeout": integer(0, 24 * 3600 * 1000, default=30_000),
}

_APPEND_SQL = (
    "SELECT pk, head, deleted, expires_at, state, lease_owner, lease_token, lease_expires "
    "FROM sessions WHERE id = ?"
)
#: A user's sessions that count against ``create(max_per_user=)``: visible, not archived.
COUNT_USER_SQL = (
    "SELECT count(*) FROM sessions WHERE user_id = ? AND state <> 'archived' AND deleted = 0 "
    "AND (expires_at IS NULL OR expires_at > ?)"
)
#: Expired sessions a purge deletes per write transaction (others may write in between).
_PURGE_BATCH = 200
_INSERT_EVENTS_SQL = (
    "INSERT INTO events (session_pk, seq, type, ts, turn_id, v, data, event_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_READ_SQL = (
    f"SELECT {', '.join(EVENT_COLUMNS)} FROM events "
    "WHERE session_pk = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)


def _fetch(sql: str, params: tuple[Any, ...], db: sqlite3.Connection) -> list[Any]:
    return db.execute(sql, params).fetchall()


def listing_sql(filters: tuple[str, ...], *, keyset: bool) -> str:
    """The query of one page of ``list_sessions`` filtered by equality on ``filters``.

    Parameters: now, the filters' values in order, with ``keyset`` the
    ``created_at`` and id to go on after, then the row limit. A user's
    listing reads that user's index entries only (with a state, those in that
    state): SQLite would otherwise pick the state or agent index, which holds
    every user's sessions. The keyset is a row value, a range on the index.
    """
    where = ["s.deleted = 0", "(s.expires_at IS NULL OR s.expires_at > ?)"]
    where += [f"s.{column} = ?" for column in filters]
    if keyset:
        where.append("(s.created_at, s.id) < (?, ?)")
    index = ""
    if "user_id" in filters:
        by_state = "state" in filters
        index = " INDEXED BY " + ("sessions_by_user_state" if by_state else "sessions_by_user")
    return (
        f"SELECT {RECORD_COLUMNS} FROM sessions s{index} "
        f"LEFT JOIN sessions p ON p.pk = s.parent_pk WHERE {' AND '.join(where)} "
        "ORDER BY s.created_at DESC, s.id DESC LIMIT ?"
    )


def _path_from_url(url: str) -> str:
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidURLError(f"cannot parse the sqlite URL {shown}: {exc}") from None
    if parts.scheme.lower() != "sqlite":
        raise InvalidURLError(f"not a sqlite:// URL: {shown}")
    if parts.netloc:
        raise InvalidURLError(
            f"sqlite URL {shown} has a host part; use sqlite:///relative.db or "
            "sqlite:////absolute/path.db"
        )
    path = unquote(parts.path)
    if path.startswith("/"):
        path = path[1:]
    if not path:
        raise InvalidURLError(f"sqlite URL {shown} names no file; e.g. sqlite:///sessions.db")
    return path


class SQLiteStore:
    """The SQLite store (``sqlite://``). See :mod:`chatsession.store.sqlite`.

    Args:
        path: The database file (``:memory:`` for a private in-memory one).
        synchronous: ``normal`` (default) or ``full``.
        busy_timeout: Milliseconds a write waits for another process's lock.

    Raises:
        InvalidURLError: A bad ``synchronous`` or ``busy_timeout``.
    """

    def __init__(
        self, path: str, *, synchronous: str = "normal", busy_timeout: int = 30000
    ) -> None:
        self.url = "sqlite:///" + path
        values = read_options(
            OPTIONS,
            {"synchronous": synchronous, "busy_timeout": busy_timeout},
            backend="sqlite",
            url=self.url,
        )
        self.path = path
        self.synchronous: str = values["synchronous"]
        self.busy_timeout: int = values["busy_timeout"]
        self._db = Connections(path, self.busy_timeout, self.synchronous, self.url)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``sqlite:///path.db`` (see :mod:`chatsession.store.sqlite` for options).

        Raises:
            InvalidURLError: A malformed URL, an unknown or repeated option, or a bad value.
        """
        path = _path_from_url(url)
        values = parse_options(url, OPTIONS, options, backend="sqlite")
        return cls(path, **values)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the worker thread."""
        return await self._db.run(fn)

    def _visible(self, db: sqlite3.Connection, session_id: str) -> Any:
        return visible_row(db, self.path, session_id)

    def _lineage(self, db: sqlite3.Connection, session_id: str, pk: int) -> list[tuple[int, int]]:
        """``(pk, fork_seq)`` from the session up to the root."""
        chain: list[tuple[int, int]] = []
        names: list[str] = []
        current: int | None = pk
        while current is not None:
            row = db.execute(
                "SELECT parent_pk, parent_seq, id FROM sessions WHERE pk = ?", (current,)
            ).fetchone()
            if row is None:
                raise damaged_in(
                    self.path,
                    session_id,
                    "its fork chain",
                    f"the ancestor in sessions row {current} is missing",
                )
            parent_pk, fork_seq, name = row
            names.append(name)
            if parent_pk is None:
                chain.append((current, 0))
                break
            if type(parent_pk) is not int or type(fork_seq) is not int or fork_seq < 0:
                raise damaged_in(
                    self.path,
                    session_id,
                    f"the fork point of {name!r} (columns parent_pk, parent_seq)",
                    f"{parent_pk!r}, {fork_seq!r}",
                )
            chain.append((current, fork_seq))
            if any(node == parent_pk for node, _ in chain):
                looped = db.execute("SELECT id FROM sessions WHERE pk = ?", (parent_pk,)).fetchone()
                raise fork_loop(session_id, [*names, looped[0] if looped else parent_pk])
            current = parent_pk
        return chain

    # -- records -------------------------------------------------------------

    async def create(
        self, record: SessionRecord, *, max_per_user: int | None = None
    ) -> SessionRecord:
        """See :meth:`Store.create`.

        With ``max_per_user``, the user's sessions are counted and the new one
        inserted in one ``BEGIN IMMEDIATE`` transaction (other processes wait
        for it); the count reads only that user's index entries.
        """
        check_create(record, max_per_user)
        stored = initial_record(record)

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            if max_per_user is not None and stored.user_id is not None:
                taken = db.execute("SELECT 1 FROM sessions WHERE id = ?", (stored.id,))
                if taken.fetchone() is not None:
                    raise SessionExistsError(stored.id)
                count = db.execute(COUNT_USER_SQL, (stored.user_id, now())).fetchone()[0]
                if count >= max_per_user:
                    raise SessionLimitError(stored.user_id, max_per_user, count)
            self._insert(db, stored, None)
            db.execute("COMMIT")

        await self._db.call(work)
        return stored

    def _insert(self, db: sqlite3.Connection, r: SessionRecord, parent_pk: int | None) -> None:
        try:
            db.execute(
                "INSERT INTO sessions (id, user_id, agent_id, window_id, state, created_at, "
                "updated_at, expires_at, parent_pk, parent_seq, head, version, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id,
                    r.user_id,
                    r.agent_id,
                    r.window_id,
                    r.state,
                    r.created_at,
                    r.updated_at,
                    r.expires_at,
                    parent_pk,
                    r.parent.seq if r.parent else None,
                    r.head,
                    r.version,
                    encode_body(r),
                ),
            )
        except sqlite3.IntegrityError:
            raise SessionExistsError(r.id) from None

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)
        row = await self._db.call(lambda db: self._visible(db, session_id))
        return record_of(row, self.path)

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        check_record(record)
        check_version(expected_version)

        def work(db: sqlite3.Connection) -> SessionRecord:
            db.execute("BEGIN IMMEDIATE")
            current = record_of(self._visible(db, record.id), self.path)
            if current.version != expected_version:
                raise ConflictError(record.id, expected_version, current.version, "version")
            new = updated_record(current, record)
            db.execute(
                "UPDATE sessions SET user_id = ?, agent_id = ?, window_id = ?, state = ?, "
                "expires_at = ?, updated_at = ?, version = ?, body = ? WHERE id = ?",
                (
                    new.user_id,
                    new.agent_id,
                    new.window_id,
                    new.state,
                    new.expires_at,
                    new.updated_at,
                    new.version,
                    encode_body(new),
                    new.id,
                ),
            )
            db.execute("COMMIT")
            return new

        return await self._db.call(work)

    def _remove(self, db: sqlite3.Connection, pk: int) -> None:
        """Delete a session row (tombstone if it has forks), then unneeded ancestors.

        A tombstone keeps the events its forks read, and loses its snapshot.
        """
        row = db.execute("SELECT children, parent_pk FROM sessions WHERE pk = ?", (pk,)).fetchone()
        if row is None:
            return
        db.execute("DELETE FROM snapshots WHERE session_pk = ?", (pk,))
        if row[0] > 0:
            db.execute(
                "UPDATE sessions SET deleted = 1, lease_owner = NULL, lease_expires = NULL "
                "WHERE pk = ?",
                (pk,),
            )
            return
        db.execute("DELETE FROM events WHERE session_pk = ?", (pk,))
        db.execute("DELETE FROM blobs WHERE session_pk = ?", (pk,))
        db.execute("DELETE FROM sessions WHERE pk = ?", (pk,))
        parent = row[1]
        if parent is not None:
            db.execute("UPDATE sessions SET children = children - 1 WHERE pk = ?", (parent,))
            left = db.execute(
                "SELECT children, deleted FROM sessions WHERE pk = ?", (parent,)
            ).fetchone()
            if left is not None and left[0] <= 0 and left[1]:
                self._remove(db, parent)

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        validate_id(session_id)

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            self._remove(db, self._visible(db, session_id)[PK])
            db.execute("COMMIT")

        await self._db.run(work)

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
        """See :meth:`Store.list_sessions`.

        A session whose record is damaged is skipped, with a warning logged.
        """
        check_limit(limit)
        check_filters(user_id=user_id, agent_id=agent_id, window_id=window_id, state=state)
        after: tuple[Any, Any] | None = decode_cursor(cursor) if cursor is not None else None
        filters = {"user_id": user_id, "agent_id": agent_id, "window_id": window_id, "state": state}
        chosen = {column: value for column, value in filters.items() if value is not None}
        params: list[Any] = [now(), *chosen.values()]
        records: list[SessionRecord] = []
        while len(records) <= limit:
            want = limit + 1 - len(records)
            sql = listing_sql(tuple(chosen), keyset=after is not None)
            args = [*params, *(after or ()), want]
            rows = await self._db.run(partial(_fetch, sql, tuple(args)))
            for row in rows:
                try:
                    records.append(record_of(row, self.path))
                except CorruptDataError as exc:
                    logger.warning("list_sessions skips session %r: %s", row[ID], exc)
            if len(rows) < want:
                break
            after = (rows[-1][6], rows[-1][ID])  # go on after the last row, sound or not
        return page_of(records, limit)

    # -- events --------------------------------------------------------------

    async def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_seq: int,
        *,
        lease: Lease | None = None,
    ) -> int:
        """See :meth:`Store.append`.

        Runs on the event loop's thread when the write lock is free at once,
        on the worker thread (waiting up to ``busy_timeout``) when it is not.
        The session's state and lease are checked, the events inserted and its
        head and figures (``count_events``, counted before) updated in one
        ``BEGIN IMMEDIATE`` transaction.
        """
        check_append(events, expected_seq)
        validate_id(session_id)
        if lease is not None:
            check_lease_for(lease, session_id)
        path = self.path
        messages, tokens, size = clamped(count_events(events))

        def work(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(_APPEND_SQL, (session_id,)).fetchone()
            if row is None:
                raise SessionNotFoundError(session_id)
            pk, head, deleted, expires_at, state, owner, token, lease_expires = row
            head = check_head(path, session_id, head, expires_at)
            at = now()
            check_visible(session_id, deleted, expires_at, at)
            if head != expected_seq:
                if self._applied_already(db, pk, head, events, expected_seq):
                    db.execute("ROLLBACK")
                    return expected_seq + len(events)
                raise ConflictError(session_id, expected_seq, head)
            if state == "archived":
                raise SessionArchivedError(session_id)
            check_writer(
                session_id, held_lease(path, session_id, owner, token, lease_expires), lease, at
            )
            try:
                db.executemany(
                    _INSERT_EVENTS_SQL,
                    [
                        (
                            pk,
                            head + i,
                            e.type,
                            e.ts,
                            e.turn_id,
                            e.schema_version,
                            e.data,
                            e.event_id,
                        )
                        for i, e in enumerate(events, start=1)
                    ],
                )
            except sqlite3.IntegrityError as exc:
                raise past_head(db, path, session_id, pk, head) from exc
            new_head = head + len(events)
            db.execute(ADD_COUNTS_SQL, (new_head, at, messages, tokens, size, pk))
            db.execute("COMMIT")
            return new_head

        return await self._db.call(work)

    @staticmethod
    def _applied_already(
        db: sqlite3.Connection, pk: int, head: int, events: Sequence[NewEvent], expected_seq: int
    ) -> bool:
        """Whether this append (by its first event's id) is already the session's own at
        ``expected_seq + 1`` (an inherited seq is not in this session's rows)."""
        first_id = events[0].event_id
        if first_id is None or expected_seq >= head:
            return False
        found = db.execute(
            "SELECT event_id FROM events WHERE session_pk = ? AND seq = ?", (pk, expected_seq + 1)
        ).fetchone()
        return found is not None and found[0] == first_id

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`."""
        validate_id(session_id)
        check_read(after_seq, upto_seq, batch_size)

        def plan(db: sqlite3.Connection) -> tuple[list[tuple[int, int, int]], list[Any]]:
            """The batches to read (``pk, after, upto``), and the rows of the first."""
            row = self._visible(db, session_id)
            stray = db.execute(
                "SELECT 1 FROM events WHERE session_pk = ? AND seq > ? LIMIT 1",
                (row[PK], row[HEAD]),
            ).fetchone()
            if stray is not None:
                raise past_head(db, self.path, session_id, row[PK], row[HEAD])
            lineage = self._lineage(db, session_id, row[PK])
            batches = [
                (pk, start, hi)
                for pk, lo, hi in fork_segments(lineage, row[HEAD], after_seq, upto_seq)
                for start in range(lo, hi, batch_size)
            ]
            first = _fetch(_READ_SQL, (*batches[0], batch_size), db) if batches else []
            return batches, first

        batches, rows = await self._db.run(in_one_snapshot(plan))
        for index, (pk, start, hi) in enumerate(batches):
            if index:
                rows = await self._db.run(partial(_fetch, _READ_SQL, (pk, start, hi, batch_size)))
            expected = min(batch_size, hi - start)
            if len(rows) != expected or (
                rows and (rows[0][0] != start + 1 or rows[-1][0] != start + expected)
            ):
                # deleted (or expired) since the read began: not damage
                await self._db.run(lambda db: self._visible(db, session_id))
                raise damaged_in(
                    self.path,
                    session_id,
                    f"events {start + 1}..{start + expected}",
                    f"they are incomplete (found {len(rows)})",
                )
            yield events_of(self.path, session_id, rows)

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        check_fork_at(at_seq)
        check_record(new_record)

        def work(db: sqlite3.Connection) -> SessionRecord:
            db.execute("BEGIN IMMEDIATE")
            row = self._visible(db, session_id)
            check_fork_point(session_id, at_seq, row[HEAD])
            stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
            self._insert(db, stored, row[PK])
            db.execute("UPDATE sessions SET children = children + 1 WHERE pk = ?", (row[PK],))
            db.execute("COMMIT")
            return stored

        return await self._db.call(work)

    # -- leases and snapshots ------------------------------------------------

    async def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Lease:
        """See :meth:`Store.acquire_lease`."""
        check_lease_request(session_id, owner, ttl)
        return await self._db.call(partial(leases.acquire, self.path, session_id, owner, ttl))

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """See :meth:`Store.renew_lease`."""
        check_lease(lease)
        check_lease_request(lease.session_id, lease.owner, ttl)
        return await self._db.call(partial(leases.renew, self.path, lease, ttl))

    async def release_lease(self, lease: Lease) -> None:
        """See :meth:`Store.release_lease`."""
        check_lease(lease)
        await self._db.call(partial(leases.release, lease))

    async def put_snapshot(self, session_id: str, seq: int, data: bytes) -> None:
        """See :meth:`Store.put_snapshot`."""
        validate_id(session_id)
        check_snapshot(seq, data)
        await self._db.run(partial(leases.put_snapshot, self.path, session_id, seq, data))

    async def get_snapshot(self, session_id: str) -> tuple[int, bytes] | None:
        """See :meth:`Store.get_snapshot`. A damaged snapshot row counts as none (logged)."""
        validate_id(session_id)
        return await self._db.run(
            in_one_snapshot(partial(leases.get_snapshot, self.path, session_id))
        )

    # -- blobs ---------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        check_blob(data, media_type)
        blob_id = hashlib.sha256(data).hexdigest()

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            row = self._visible(db, session_id)
            db.execute(
                "INSERT OR IGNORE INTO blobs (session_pk, id, media_type, data) VALUES (?, ?, ?, ?)",
                (row[PK], blob_id, media_type, bytes(data)),
            )
            db.execute("COMMIT")

        await self._db.run(work)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")

        def work(db: sqlite3.Connection) -> bytes:
            row = self._visible(db, session_id)
            for pk, _ in self._lineage(db, session_id, row[PK]):
                found = db.execute(
                    "SELECT data FROM blobs WHERE session_pk = ? AND id = ?", (pk, blob_id)
                ).fetchone()
                if found is not None:
                    return bytes(found[0])
            raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")

        return await self._db.run(in_one_snapshot(work))

    # -- upkeep --------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`.

        Deletes in write transactions of up to 200 sessions, each finding and
        deleting its sessions under the write lock: a purge running in another
        process at once finds them gone, so each session is deleted, and
        counted, once; other writers get the lock between two batches.
        """
        check_before(before)
        at = now() if before is None else before

        def batch(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            pks = [
                r[0]
                for r in db.execute(
                    "SELECT pk FROM sessions WHERE deleted = 0 AND expires_at IS NOT NULL "
                    "AND expires_at <= ? LIMIT ?",
                    (at, _PURGE_BATCH),
                )
            ]
            for pk in pks:
                self._remove(db, pk)
            db.execute("COMMIT")
            return len(pks)

        purged = 0
        while True:
            done = await self._db.run(batch)
            purged += done
            if done < _PURGE_BATCH:
                return purged

    async def stats(self, *, idle_before: float | None = None, top: int = 100) -> StoreStats:
        """See :meth:`Store.stats`.

        Aggregate queries over the ``sessions`` table (its counters and
        indexes) in one read transaction on the worker thread; no event row
        is read.
        """
        check_stats(idle_before, top)
        work = partial(store_stats, self.path, now(), idle_before, top)
        return await self._db.run(in_one_snapshot(work))

    async def aclose(self) -> None:
        """Close the connections and stop the worker thread. Idempotent."""
        await self._db.aclose()
