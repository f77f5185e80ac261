"""``sqlite:///path.db``: the embedded default store.

URL forms (SQLAlchemy's convention): ``sqlite:///relative/path.db`` is relative
to the working directory, ``sqlite:////absolute/path.db`` absolute, and
``sqlite:///:memory:`` a private in-memory database. Parent directories are
created. Query options (also accepted as keyword options of ``open_store``):

``synchronous=normal`` (default)
    WAL journal with ``synchronous=NORMAL``. Every acknowledged append is in
    the WAL file when ``append`` returns, so killing any process (``kill -9``)
    loses nothing acknowledged. A power loss or OS crash can lose the last
    transactions (never corrupts the database).
``synchronous=full``
    Also ``fsync`` on every commit: acknowledged appends survive power loss.
    Slower (one disk flush per append).
``busy_timeout=MILLISECONDS`` (default 30000)
    How long a writer waits for another process's write transaction.

Concurrency: any number of processes on one machine may share the file. Every
write is one ``BEGIN IMMEDIATE`` transaction, so a conditional append checks
the head and inserts atomically; a writer that cannot get the lock within
``busy_timeout`` gets :class:`~chatsession.errors.StoreUnavailableError`, never
a raw "database is locked". Do not put the file on a network file system.

Each store object owns one connection on one worker thread, so blocking
SQLite calls never run on the event loop.

A new database file is created readable and writable by its owner only
(``0600``); SQLite gives its ``-wal`` and ``-shm`` files the same mode. An
existing file keeps its mode.

Schema changes are named migrations recorded in ``chatsession_migrations``;
they run once, inside a write transaction, so processes starting at once are
safe.

Damage (a bad restore, a hand edit, a disk error) is
:class:`~chatsession.errors.CorruptDataError` naming the session and where it
is (table, column, seq), never :class:`~chatsession.errors.StoreUnavailableError`,
which tells callers to retry: a table or column missing although its migration
is recorded, a record column of the wrong type or holding bad JSON, an event
row of the wrong type, events missing before the head or stored past it, a
fork whose ancestors are missing or loop. ``list_sessions`` skips a session
whose record is damaged and logs a warning (logger ``chatsession.store.sqlite``)
naming it, so one damaged session does not hide the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    SessionExistsError,
    SessionNotFoundError,
    StoreUnavailableError,
)
from chatsession.store.base import (
    DEFAULT_READ_BATCH,
    STRICT_JSON,
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    StoredEvent,
    check_append,
    check_before,
    check_blob,
    check_filters,
    check_fork_at,
    check_fork_point,
    check_limit,
    check_read,
    check_record,
    check_version,
    decode_cursor,
    describe_failure,
    encode_cursor,
    fork_loop,
    fork_segments,
    initial_record,
    now,
    redact_url,
    updated_record,
    validate_id,
)

__all__ = ["SQLiteStore"]


def _fetch(sql: str, params: tuple[Any, ...], db: sqlite3.Connection) -> list[Any]:
    return db.execute(sql, params).fetchall()


T = TypeVar("T")
logger = logging.getLogger(__name__)

_OPTIONS = {"synchronous", "busy_timeout"}
_BODY_KEYS = frozenset({"title", "metadata", "fingerprint"})
#: The Python types of a sound ``events`` row (seq, type, ts, turn_id, data, v).
_EVENT_ROW_TYPES = frozenset(
    {(int, str, float, str, str, int), (int, str, float, type(None), str, int)}
)
_EVENT_COLUMNS = ("seq", "type", "ts", "turn_id", "data", "v")


def _migration_1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE sessions (
            pk INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            user_id TEXT,
            agent_id TEXT,
            window_id TEXT,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            expires_at REAL,
            parent_pk INTEGER,
            parent_seq INTEGER,
            head INTEGER NOT NULL DEFAULT 0,
            version INTEGER NOT NULL DEFAULT 1,
            deleted INTEGER NOT NULL DEFAULT 0,
            children INTEGER NOT NULL DEFAULT 0,
            body TEXT NOT NULL DEFAULT '{}'
        )"""
    )
    db.execute("CREATE INDEX sessions_by_created ON sessions (created_at DESC, id DESC)")
    db.execute("CREATE INDEX sessions_by_user ON sessions (user_id, created_at DESC, id DESC)")
    db.execute("CREATE INDEX sessions_by_agent ON sessions (agent_id, created_at DESC, id DESC)")
    db.execute("CREATE INDEX sessions_by_window ON sessions (window_id, created_at DESC, id DESC)")
    db.execute(
        "CREATE INDEX sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL"
    )
    db.execute(
        """CREATE TABLE events (
            session_pk INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            ts REAL NOT NULL,
            turn_id TEXT,
            v INTEGER NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (session_pk, seq)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE blobs (
            session_pk INTEGER NOT NULL,
            id TEXT NOT NULL,
            media_type TEXT NOT NULL DEFAULT '',
            data BLOB NOT NULL,
            PRIMARY KEY (session_pk, id)
        ) WITHOUT ROWID"""
    )


def _migration_2(db: sqlite3.Connection) -> None:
    db.execute("CREATE INDEX sessions_by_state ON sessions (state, created_at DESC, id DESC)")


#: Applied in order, each once, recorded by name. Never edit or reorder: append.
MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("001_sessions_events_blobs", _migration_1),
    ("002_sessions_by_state", _migration_2),
]

_RECORD_COLUMNS = (
    "s.pk, s.id, s.user_id, s.agent_id, s.window_id, s.state, s.created_at, s.updated_at, "
    "s.expires_at, p.id, s.parent_seq, s.head, s.version, s.body, s.deleted, s.children, "
    "s.parent_pk"
)
_RECORD_FROM = "sessions s LEFT JOIN sessions p ON p.pk = s.parent_pk"


def _path_from_url(url: str) -> tuple[str, dict[str, str]]:
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
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    return path, options


class SQLiteStore:
    """The SQLite store (``sqlite://``). See the module docstring."""

    def __init__(
        self, path: str, *, synchronous: str = "normal", busy_timeout: int = 30000
    ) -> None:
        sync = str(synchronous).lower()
        if sync not in ("normal", "full"):
            raise InvalidURLError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        try:
            timeout_ms = int(busy_timeout)
        except (TypeError, ValueError):
            raise InvalidURLError(
                f"busy_timeout must be milliseconds, not {busy_timeout!r}"
            ) from None
        self.path = path
        self.synchronous = sync
        self.busy_timeout = timeout_ms
        self.url = "sqlite:///" + path
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``sqlite:///path.db`` (see the module docstring for options).

        Raises:
            InvalidURLError: A malformed URL or an unknown option.
        """
        path, query = _path_from_url(url)
        query.update({k: str(v) for k, v in options.items()})
        unknown = set(query) - _OPTIONS
        if unknown:
            raise InvalidURLError(
                f"unknown sqlite option(s) {sorted(unknown)} in {redact_url(url)}; "
                f"known: {sorted(_OPTIONS)}"
            )
        return cls(path, **query)  # type: ignore[arg-type]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the worker thread --------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            parent = Path(self.path).expanduser().absolute().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailableError(
                    f"cannot create the directory {str(parent)!r} for the SQLite store: "
                    f"{exc.strerror or exc}; choose a writable path (CHATSESSION_STORE_URL or "
                    "CHATSESSION_DATA_DIR)"
                ) from exc
            try:  # a new database holds conversations: readable by its owner only
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise StoreUnavailableError(
                    f"cannot create the SQLite file {self.path!r}: {exc.strerror or exc}; "
                    "choose a writable path (CHATSESSION_STORE_URL or CHATSESSION_DATA_DIR)"
                ) from exc
        try:
            db = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        try:
            db.execute(f"PRAGMA busy_timeout = {self.busy_timeout}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if self.path != ":memory:" and str(mode).lower() != "wal":
                raise StoreUnavailableError(
                    f"cannot turn on WAL mode for {self.path!r} (got {mode!r}); is it on a "
                    "network file system?"
                )
            db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            self._migrate(db)
        except sqlite3.Error as exc:
            db.close()
            raise self._translate(exc) from exc
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute(
            "CREATE TABLE IF NOT EXISTS chatsession_migrations "
            "(name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        done = {row[0] for row in db.execute("SELECT name FROM chatsession_migrations")}
        if all(name in done for name, _ in MIGRATIONS):
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            done = {row[0] for row in db.execute("SELECT name FROM chatsession_migrations")}
            for name, migrate in MIGRATIONS:
                if name not in done:
                    migrate(db)
                    db.execute(
                        "INSERT INTO chatsession_migrations (name, applied_at) VALUES (?, ?)",
                        (name, now()),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _translate(self, exc: sqlite3.Error) -> Exception:
        message = str(exc)
        lowered = message.lower()
        if isinstance(exc, sqlite3.DatabaseError) and (
            "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered
        ):
            return CorruptDataError(
                f"the SQLite file {self.path!r} is damaged ({message}); restore it from a backup, "
                f"or salvage it with: sqlite3 {self.path} .recover | sqlite3 repaired.db"
            )
        if "no such table" in lowered or "no such column" in lowered or "has no column" in lowered:
            return CorruptDataError(
                f"the SQLite file {self.path!r} lacks part of its schema ({message}), though its "
                "migrations are recorded as done: it was damaged or edited by hand; restore it "
                "from a backup"
            )
        if "locked" in lowered or "busy" in lowered:
            return StoreUnavailableError(
                f"the SQLite file {self.path!r} stayed locked by another writer for more than "
                f"{self.busy_timeout} ms; retry, or raise busy_timeout in the store URL"
            )
        if "unable to open" in lowered or "readonly" in lowered or "disk i/o" in lowered:
            return StoreUnavailableError(
                f"cannot use the SQLite file {self.path!r} ({message}); check that the path "
                "exists and is writable"
            )
        return StoreUnavailableError(f"SQLite error on {self.path!r}: {message}")

    def _work(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._db is None:
                self._db = self._connect()
            db = self._db
        try:
            return fn(db)
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise self._translate(exc) from exc
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="chatsession-sqlite"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._work, fn)

    # -- rows ----------------------------------------------------------------

    def _damaged(self, session_id: object, where: str, why: str) -> CorruptDataError:
        return CorruptDataError(
            f"session {session_id!r} in the SQLite file {self.path!r}: {where} is damaged "
            f"({why}); restore the file from a backup"
        )

    def _record(self, row: Sequence[Any]) -> SessionRecord:
        """The record of a ``_RECORD_COLUMNS`` row, checked type for type."""
        where = "the sessions row, column body"
        try:
            if type(row[13]) is not str:
                raise TypeError(f"a {type(row[13]).__name__}, not JSON text")
            body = STRICT_JSON.decode(row[13])
            if type(body) is not dict or not body.keys() <= _BODY_KEYS:
                raise TypeError(f"not a JSON object with keys {sorted(_BODY_KEYS)}")
            where = "the sessions row"
            parent = None
            if row[16] is not None:
                if row[9] is None:
                    raise ValueError(f"its parent (row {row[16]!r}) is missing")
                parent = {"session_id": row[9], "seq": row[10]}
            return SessionRecord.model_validate(
                {
                    "id": row[1],
                    "user_id": row[2],
                    "agent_id": row[3],
                    "window_id": row[4],
                    "state": row[5],
                    "created_at": row[6],
                    "updated_at": row[7],
                    "expires_at": row[8],
                    "parent": parent,
                    "head": row[11],
                    "version": row[12],
                    **body,
                },
                strict=True,
            )
        except (ValueError, TypeError, RecursionError) as exc:
            raise self._damaged(row[1], where, describe_failure(exc)) from exc

    def _check_head(self, session_id: str, head: object, expires_at: object) -> int:
        """The head of a sessions row, after checking the columns append and fork rely on."""
        if type(head) is not int or head < 0:
            raise self._damaged(session_id, "the sessions row, column head", f"{head!r}")
        if expires_at is not None and type(expires_at) is not float:
            raise self._damaged(
                session_id, "the sessions row, column expires_at", f"{expires_at!r}"
            )
        return head

    @staticmethod
    def _body(record: SessionRecord) -> str:
        return json.dumps(
            {"title": record.title, "metadata": record.metadata, "fingerprint": record.fingerprint},
            separators=(",", ":"),
        )

    @staticmethod
    def _row(db: sqlite3.Connection, session_id: str) -> Any:
        return db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM {_RECORD_FROM} WHERE s.id = ?", (session_id,)
        ).fetchone()

    def _visible_row(self, db: sqlite3.Connection, session_id: str) -> Any:
        row = self._row(db, session_id)
        if row is None or row[14]:
            raise SessionNotFoundError(session_id)
        self._check_head(session_id, row[11], row[8])
        if row[8] is not None and row[8] <= now():
            raise SessionNotFoundError(session_id, "expired")
        return row

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
                raise self._damaged(
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
                raise self._damaged(
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

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)
        await self._run(lambda db: self._insert(db, stored, None))
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
                    self._body(r),
                ),
            )
        except sqlite3.IntegrityError:
            raise SessionExistsError(r.id) from None

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)
        row = await self._run(lambda db: self._visible_row(db, session_id))
        return self._record(row)

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        check_record(record)
        check_version(expected_version)

        def work(db: sqlite3.Connection) -> SessionRecord:
            db.execute("BEGIN IMMEDIATE")
            current = self._record(self._visible_row(db, record.id))
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
                    self._body(new),
                    new.id,
                ),
            )
            db.execute("COMMIT")
            return new

        return await self._run(work)

    def _remove(self, db: sqlite3.Connection, pk: int) -> None:
        """Delete a session row (tombstone if it has forks), then unneeded ancestors."""
        row = db.execute("SELECT children, parent_pk FROM sessions WHERE pk = ?", (pk,)).fetchone()
        if row is None:
            return
        if row[0] > 0:
            db.execute("UPDATE sessions SET deleted = 1 WHERE pk = ?", (pk,))
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
            row = self._visible_row(db, session_id)
            self._remove(db, row[0])
            db.execute("COMMIT")

        await self._run(work)

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
        where = ["s.deleted = 0", "(s.expires_at IS NULL OR s.expires_at > ?)"]
        params: list[Any] = [now()]
        for column, value in (
            ("user_id", user_id),
            ("agent_id", agent_id),
            ("window_id", window_id),
            ("state", state),
        ):
            if value is not None:
                where.append(f"s.{column} = ?")
                params.append(value)
        base_sql = f"SELECT {_RECORD_COLUMNS} FROM {_RECORD_FROM} WHERE {' AND '.join(where)}"
        order = " ORDER BY s.created_at DESC, s.id DESC LIMIT ?"
        keyset = " AND (s.created_at < ? OR (s.created_at = ? AND s.id < ?))"
        records: list[SessionRecord] = []
        while len(records) <= limit:
            want = limit + 1 - len(records)
            if after is None:
                sql, args = base_sql + order, [*params, want]
            else:
                sql, args = base_sql + keyset + order, [*params, after[0], after[0], after[1], want]
            rows = await self._run(partial(_fetch, sql, tuple(args)))
            for row in rows:
                try:
                    records.append(self._record(row))
                except CorruptDataError as exc:
                    logger.warning("list_sessions skips session %r: %s", row[1], exc)
            if len(rows) < want:
                break
            after = (rows[-1][6], rows[-1][1])  # go on after the last row, sound or not
        more = len(records) > limit
        records = records[:limit]
        return Page(records, encode_cursor(records[-1]) if more else None)

    # -- events --------------------------------------------------------------

    async def append(self, session_id: str, events: Sequence[NewEvent], expected_seq: int) -> int:
        """See :meth:`Store.append`."""
        check_append(events, expected_seq)
        validate_id(session_id)

        def work(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT pk, head, deleted, expires_at FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is None or row[2]:
                raise SessionNotFoundError(session_id)
            self._check_head(session_id, row[1], row[3])
            if row[3] is not None and row[3] <= now():
                raise SessionNotFoundError(session_id, "expired")
            pk: int = row[0]
            head = self._check_head(session_id, row[1], row[3])
            if head != expected_seq:
                raise ConflictError(session_id, expected_seq, head)
            try:
                db.executemany(
                    "INSERT INTO events (session_pk, seq, type, ts, turn_id, v, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (pk, head + i, e.type, e.ts, e.turn_id, e.schema_version, e.data)
                        for i, e in enumerate(events, start=1)
                    ],
                )
            except sqlite3.IntegrityError as exc:
                raise self._past_head(db, session_id, pk, head) from exc
            new_head = head + len(events)
            db.execute(
                "UPDATE sessions SET head = ?, updated_at = ? WHERE pk = ?", (new_head, now(), pk)
            )
            db.execute("COMMIT")
            return new_head

        return await self._run(work)

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

        def plan(db: sqlite3.Connection) -> list[tuple[int, int, int]]:
            row = self._visible_row(db, session_id)
            stray = db.execute(
                "SELECT 1 FROM events WHERE session_pk = ? AND seq > ? LIMIT 1", (row[0], row[11])
            ).fetchone()
            if stray is not None:
                raise self._past_head(db, session_id, row[0], row[11])
            lineage = self._lineage(db, session_id, row[0])
            return fork_segments(lineage, row[11], after_seq, upto_seq)

        segments = await self._run(plan)
        sql = (
            "SELECT seq, type, ts, turn_id, data, v FROM events "
            "WHERE session_pk = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
        )
        make = StoredEvent._make
        for pk, lo, hi in segments:
            start = lo
            while start < hi:
                params = (pk, start, hi, batch_size)
                rows = await self._run(partial(_fetch, sql, params))
                expected = min(batch_size, hi - start)
                if len(rows) != expected or (
                    rows and (rows[0][0] != start + 1 or rows[-1][0] != start + expected)
                ):
                    # deleted (or expired) since the read began: not damage
                    await self._run(lambda db: self._visible_row(db, session_id))
                    raise CorruptDataError(
                        f"session {session_id!r} in {self.path!r}: events {start + 1}.."
                        f"{start + expected} are incomplete (found {len(rows)}); the file is "
                        "damaged: restore it from a backup"
                    )
                kinds = {
                    (type(a), type(b), type(c), type(d), type(e), type(f))
                    for a, b, c, d, e, f in rows
                }  # SQLite's columns keep any type: a damaged row must not pass as an event
                if not kinds <= _EVENT_ROW_TYPES:
                    raise self._bad_event_row(session_id, rows)
                yield [make(r) for r in rows]
                start += expected

    def _past_head(
        self, db: sqlite3.Connection, session_id: str, pk: int, head: int
    ) -> CorruptDataError:
        found = db.execute(
            "SELECT min(seq), count(*) FROM events WHERE session_pk = ? AND seq > ?", (pk, head)
        ).fetchone()
        return self._damaged(
            session_id,
            "its event log",
            f"{found[1]} event(s) are stored past its head {head}, from seq {found[0]}: the head "
            "column or the events table was edited or restored apart",
        )

    def _bad_event_row(self, session_id: str, rows: list[Any]) -> CorruptDataError:
        wanted = (int, str, float, str, str, int)
        for row in rows:
            if tuple(map(type, row)) in _EVENT_ROW_TYPES:
                continue
            bad = [
                f"{column}={value!r}"[:80]
                for value, column, want in zip(row, _EVENT_COLUMNS, wanted, strict=True)
                if type(value) is not want and not (column == "turn_id" and value is None)
            ]
            return self._damaged(
                session_id, f"the events row at seq {row[0]!r}", "wrong type in " + ", ".join(bad)
            )
        return self._damaged(session_id, "its event log", "a row of the wrong shape")

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        check_fork_at(at_seq)
        check_record(new_record)

        def work(db: sqlite3.Connection) -> SessionRecord:
            db.execute("BEGIN IMMEDIATE")
            row = self._visible_row(db, session_id)
            check_fork_point(session_id, at_seq, row[11])
            stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
            self._insert(db, stored, row[0])
            db.execute("UPDATE sessions SET children = children + 1 WHERE pk = ?", (row[0],))
            db.execute("COMMIT")
            return stored

        return await self._run(work)

    # -- blobs ---------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        check_blob(data, media_type)
        blob_id = hashlib.sha256(data).hexdigest()

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            row = self._visible_row(db, session_id)
            db.execute(
                "INSERT OR IGNORE INTO blobs (session_pk, id, media_type, data) VALUES (?, ?, ?, ?)",
                (row[0], blob_id, media_type, bytes(data)),
            )
            db.execute("COMMIT")

        await self._run(work)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")

        def work(db: sqlite3.Connection) -> bytes:
            row = self._visible_row(db, session_id)
            for pk, _ in self._lineage(db, session_id, row[0]):
                found = db.execute(
                    "SELECT data FROM blobs WHERE session_pk = ? AND id = ?", (pk, blob_id)
                ).fetchone()
                if found is not None:
                    return bytes(found[0])
            raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")

        return await self._run(work)

    # -- upkeep --------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`."""
        check_before(before)
        at = now() if before is None else before

        def work(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            pks = [
                r[0]
                for r in db.execute(
                    "SELECT pk FROM sessions WHERE deleted = 0 AND expires_at IS NOT NULL "
                    "AND expires_at <= ?",
                    (at,),
                )
            ]
            for pk in pks:
                self._remove(db, pk)
            db.execute("COMMIT")
            return len(pks)

        return await self._run(work)

    async def aclose(self) -> None:
        """Close the connection and stop the worker thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:

            def close() -> None:
                if self._db is not None:
                    self._db.close()
                    self._db = None

            await asyncio.get_running_loop().run_in_executor(executor, close)
            executor.shutdown(wait=False)
