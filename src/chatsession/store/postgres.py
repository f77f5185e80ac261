"""``postgresql://user@host/db``: sessions in PostgreSQL (asyncpg, the ``postgres`` extra).

URL: a libpq-style URL (user, password, host, port, database, and
``sslmode``), plus chatsession's query options:

``schema`` (default ``public``)
    The schema holding chatsession's tables (created if missing).
``synchronous_commit=off``
    Commits return before the server flushes its WAL: appends cost a network
    round trip instead of a disk flush. What it risks: if the *server*
    crashes (not a client), the last few hundred milliseconds of
    acknowledged appends can be lost; the database is never corrupted and
    seqs stay contiguous. The default (``on``) loses nothing acknowledged.
``min_size``, ``max_size`` (default 1 and 10)
    The connection pool's size.
``command_timeout``, ``connect_timeout`` (seconds, default 30 and 10)
    How long a call or a connection attempt waits before the store reports
    itself unavailable.

Tables ``sessions`` (the records; ``body`` is JSONB), ``events`` (primary key
``(session_pk, seq)``), ``blobs``. Event payloads are kept in a ``text``
column, not JSONB: JSONB would reorder keys and drop whitespace, and the store
returns every payload byte for byte as appended (cast with ``data::jsonb`` to
query them). Schema changes are named migrations recorded in
``chatsession_migrations``, applied once under an advisory lock, so processes
starting at once are safe.

An append is one SQL statement (so one transaction and one round trip): it
moves the head only if it is still ``expected_seq`` and inserts the events.
Expiry is the ``expires_at`` column, checked on every read; ``purge_expired``
deletes. Connection failures raise
:class:`~chatsession.errors.StoreUnavailableError`; the pool replaces broken
connections, so the same store object works again when the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Self, TypeAlias, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

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
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    StoredEvent,
    check_append,
    check_fork_point,
    check_limit,
    decode_cursor,
    encode_cursor,
    fork_segments,
    initial_record,
    now,
    updated_record,
    validate_id,
)

__all__ = ["MIGRATIONS", "PostgresStore"]


async def _no_reset(conn: Conn) -> None:
    """Skip the pool's per-release reset round trip.

    The store leaves no session state on a connection: no ``SET`` beyond the
    pool's server settings, no ``LISTEN``, only transaction-scoped advisory
    locks, and every transaction is closed before release.
    """


async def _fetch(sql: str, args: tuple[Any, ...], conn: Conn) -> list[asyncpg.Record]:
    return await conn.fetch(sql, *args)


T = TypeVar("T")
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
_OPTIONS = {
    "schema",
    "synchronous_commit",
    "min_size",
    "max_size",
    "command_timeout",
    "connect_timeout",
}
_PASSTHROUGH = {"sslmode", "application_name"}
_READ_CHUNK = 10_000  # rows fetched per query; yielded in batch_size slices
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _migration_1(s: str) -> list[str]:
    return [
        f"""CREATE TABLE {s}.sessions (
            pk bigserial PRIMARY KEY,
            id text NOT NULL UNIQUE,
            user_id text,
            agent_id text,
            window_id text,
            state text NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            expires_at double precision,
            parent_pk bigint,
            parent_seq bigint,
            head bigint NOT NULL DEFAULT 0,
            version bigint NOT NULL DEFAULT 1,
            deleted boolean NOT NULL DEFAULT false,
            children integer NOT NULL DEFAULT 0,
            body jsonb NOT NULL DEFAULT '{{}}'
        )""",
        f"CREATE INDEX sessions_by_created ON {s}.sessions (created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_user ON {s}.sessions (user_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_agent ON {s}.sessions (agent_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_window ON {s}.sessions (window_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_expiry ON {s}.sessions (expires_at) WHERE expires_at IS NOT NULL",
        f"""CREATE TABLE {s}.events (
            session_pk bigint NOT NULL,
            seq bigint NOT NULL,
            type text NOT NULL,
            ts double precision NOT NULL,
            turn_id text,
            v smallint NOT NULL,
            data text NOT NULL,
            PRIMARY KEY (session_pk, seq)
        )""",
        f"""CREATE TABLE {s}.blobs (
            session_pk bigint NOT NULL,
            id text NOT NULL,
            media_type text NOT NULL DEFAULT '',
            data bytea NOT NULL,
            PRIMARY KEY (session_pk, id)
        )""",
    ]


#: Applied in order, each once, recorded by name. Never edit or reorder: append.
MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("001_sessions_events_blobs", _migration_1),
]

_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    OSError,
    asyncio.TimeoutError,
    ConnectionError,
)


class PostgresStore:
    """The PostgreSQL store (``postgresql://``). See the module docstring."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        synchronous_commit: str = "on",
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        shown_url: str | None = None,
    ) -> None:
        if _SCHEMA_RE.fullmatch(schema) is None:
            raise InvalidURLError(
                f"schema {schema!r} is not a plain lower-case identifier (letters, digits, _)"
            )
        if synchronous_commit not in ("on", "off", "local", "remote_write", "remote_apply"):
            raise InvalidURLError(
                f"synchronous_commit must be 'on' or 'off', not {synchronous_commit!r}"
            )
        self._dsn = dsn
        self.url = shown_url or dsn
        parts = urlsplit(dsn)
        self.address = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
        self.schema = schema
        self._s = f'"{schema}"'
        self.synchronous_commit = synchronous_commit
        self._min_size, self._max_size = int(min_size), int(max_size)
        self._command_timeout = float(command_timeout)
        self._connect_timeout = float(connect_timeout)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock: asyncio.Lock | None = None
        self._lane: PoolConnectionProxy[asyncpg.Record] | None = None
        self._lane_lock: asyncio.Lock | None = None
        self._lane_retry_at = 0.0
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``postgresql://...`` (see the module docstring for options).

        Raises:
            InvalidURLError: A malformed URL or an unknown option.
        """
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        query.update({k: str(v) for k, v in options.items()})
        unknown = set(query) - _OPTIONS - _PASSTHROUGH
        if unknown:
            raise InvalidURLError(
                f"unknown postgresql option(s) {sorted(unknown)}; known: {sorted(_OPTIONS | _PASSTHROUGH)}"
            )
        passthrough = "&".join(f"{k}={v}" for k, v in query.items() if k in _PASSTHROUGH)
        dsn = urlunsplit(parts._replace(scheme="postgresql", query=passthrough))
        netloc = parts.netloc
        if parts.password:
            netloc = f"{parts.username or ''}:***@{netloc.split('@')[-1]}"
        shown = urlunsplit(parts._replace(netloc=netloc))
        kwargs: dict[str, Any] = {"shown_url": shown}
        try:
            for name, kind in (
                ("schema", str),
                ("synchronous_commit", str),
                ("min_size", int),
                ("max_size", int),
                ("command_timeout", float),
                ("connect_timeout", float),
            ):
                if name in query:
                    kwargs[name] = kind(query[name])
        except ValueError as exc:
            raise InvalidURLError(f"bad postgresql option value in {url!r}: {exc}") from exc
        return cls(dsn, **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing --------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"PostgreSQL at {self.address} is unavailable ({type(exc).__name__}: {exc}); check "
            "that the server is running and reachable and the URL is right, then retry"
        )

    async def _get_pool(self) -> asyncpg.Pool:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        if self._pool is not None:
            return self._pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                try:
                    pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        command_timeout=self._command_timeout,
                        timeout=self._connect_timeout,
                        server_settings={"synchronous_commit": self.synchronous_commit},
                        reset=_no_reset,
                    )
                except _UNAVAILABLE as exc:
                    raise self._unavailable(exc) from exc
                except asyncpg.InvalidCatalogNameError as exc:
                    raise StoreUnavailableError(
                        f"PostgreSQL at {self.address}: {exc}; create the database first"
                    ) from exc
                try:
                    async with pool.acquire() as conn:
                        await self._migrate(conn)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        assert self._pool is not None
        return self._pool

    async def _migrate(self, conn: Conn) -> None:
        s = self._s
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"chatsession:{self.schema}"
            )
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.chatsession_migrations "
                "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in await conn.fetch(f"SELECT name FROM {s}.chatsession_migrations")}
            for name, migration in MIGRATIONS:
                if name in done:
                    continue
                for statement in migration(s):
                    await conn.execute(statement)
                await conn.execute(
                    f"INSERT INTO {s}.chatsession_migrations (name) VALUES ($1)", name
                )

    async def _lane_connection(
        self, pool: asyncpg.Pool
    ) -> PoolConnectionProxy[asyncpg.Record] | None:
        """The fast lane: one pooled connection kept by this store object.

        A call that finds it free uses it without a pool acquire and release
        (about 30 us each); calls that find it busy use the pool as usual.
        """
        if self._lane is None:
            if time.monotonic() < self._lane_retry_at:
                return None
            try:
                self._lane = await pool.acquire(timeout=self._connect_timeout)
            except _UNAVAILABLE:
                self._lane_retry_at = time.monotonic() + 1.0
                return None
        return self._lane

    async def _drop_lane(self, pool: asyncpg.Pool) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            with contextlib.suppress(Exception):
                await pool.release(lane, timeout=1)

    async def _with(self, fn: Callable[[Conn], Awaitable[T]], *, tx: bool = False) -> T:
        pool = await self._get_pool()
        if self._lane_lock is None:
            self._lane_lock = asyncio.Lock()
        if not self._lane_lock.locked():
            async with self._lane_lock:
                lane = await self._lane_connection(pool)
                if lane is not None:
                    try:
                        if not tx:
                            return await fn(lane)
                        async with lane.transaction():
                            return await fn(lane)
                    except _UNAVAILABLE as exc:
                        await self._drop_lane(pool)
                        raise self._unavailable(exc) from exc
                    except asyncio.CancelledError:
                        await self._drop_lane(pool)  # it may be mid-query: do not reuse
                        raise
        try:
            async with pool.acquire() as conn:
                if not tx:
                    return await fn(conn)
                async with conn.transaction():
                    return await fn(conn)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    # -- rows ------------------------------------------------------------------

    _COLUMNS = (
        "s.pk, s.id, s.user_id, s.agent_id, s.window_id, s.state, s.created_at, s.updated_at, "
        "s.expires_at, p.id AS parent_id, s.parent_seq, s.head, s.version, s.body::text AS body, "
        "s.deleted, s.children, s.parent_pk"
    )

    def _from(self) -> str:
        return f"{self._s}.sessions s LEFT JOIN {self._s}.sessions p ON p.pk = s.parent_pk"

    def _record(self, row: asyncpg.Record) -> SessionRecord:
        try:
            body = json.loads(row["body"])
            parent = (
                ParentRef(session_id=row["parent_id"], seq=row["parent_seq"])
                if row["parent_pk"] is not None
                else None
            )
            return SessionRecord(
                id=row["id"],
                user_id=row["user_id"],
                agent_id=row["agent_id"],
                window_id=row["window_id"],
                state=row["state"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                expires_at=row["expires_at"],
                parent=parent,
                head=row["head"],
                version=row["version"],
                **body,
            )
        except (ValueError, TypeError) as exc:
            raise CorruptDataError(
                f"the PostgreSQL record of session {row['id']!r} is damaged ({exc}); "
                "restore it from a backup"
            ) from exc

    @staticmethod
    def _body(record: SessionRecord) -> str:
        return json.dumps(
            {"title": record.title, "metadata": record.metadata, "fingerprint": record.fingerprint}
        )

    async def _visible_row(self, conn: Conn, session_id: str, lock: bool = False) -> asyncpg.Record:
        sql = f"SELECT {self._COLUMNS} FROM {self._from()} WHERE s.id = $1"
        if lock:
            sql += " FOR UPDATE OF s"
        row = await conn.fetchrow(sql, session_id)
        if row is None or row["deleted"]:
            raise SessionNotFoundError(session_id)
        if row["expires_at"] is not None and row["expires_at"] <= now():
            raise SessionNotFoundError(session_id, "expired")
        return row

    async def _lineage(self, conn: Conn, pk: int) -> list[tuple[int, int]]:
        chain: list[tuple[int, int]] = []
        current: int | None = pk
        while current is not None:
            row = await conn.fetchrow(
                f"SELECT parent_pk, parent_seq FROM {self._s}.sessions WHERE pk = $1", current
            )
            if row is None:
                raise CorruptDataError(f"a fork's ancestor (row {current}) is missing")
            chain.append((current, row["parent_seq"] or 0))
            current = row["parent_pk"]
        return chain

    # -- records ---------------------------------------------------------------

    async def _insert(self, conn: Conn, r: SessionRecord, parent_pk: int | None) -> None:
        try:
            await conn.execute(
                f"INSERT INTO {self._s}.sessions (id, user_id, agent_id, window_id, state, created_at, "
                "updated_at, expires_at, parent_pk, parent_seq, head, version, body) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb)",
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
            )
        except asyncpg.UniqueViolationError:
            raise SessionExistsError(r.id) from None

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)
        await self._with(lambda conn: self._insert(conn, stored, None))
        return stored

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)
        row = await self._with(lambda conn: self._visible_row(conn, session_id))
        return self._record(row)

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        validate_id(record.id)

        async def work(conn: Conn) -> SessionRecord:
            current = self._record(await self._visible_row(conn, record.id, lock=True))
            if current.version != expected_version:
                raise ConflictError(record.id, expected_version, current.version, "version")
            new = updated_record(current, record)
            await conn.execute(
                f"UPDATE {self._s}.sessions SET user_id = $2, agent_id = $3, window_id = $4, "
                "state = $5, expires_at = $6, updated_at = $7, version = $8, body = $9::jsonb "
                "WHERE id = $1",
                new.id,
                new.user_id,
                new.agent_id,
                new.window_id,
                new.state,
                new.expires_at,
                new.updated_at,
                new.version,
                self._body(new),
            )
            return new

        return await self._with(work, tx=True)

    async def _remove(self, conn: Conn, pk: int) -> None:
        row = await conn.fetchrow(
            f"SELECT children, parent_pk FROM {self._s}.sessions WHERE pk = $1 FOR UPDATE", pk
        )
        if row is None:
            return
        if row["children"] > 0:
            await conn.execute(f"UPDATE {self._s}.sessions SET deleted = true WHERE pk = $1", pk)
            return
        await conn.execute(f"DELETE FROM {self._s}.events WHERE session_pk = $1", pk)
        await conn.execute(f"DELETE FROM {self._s}.blobs WHERE session_pk = $1", pk)
        await conn.execute(f"DELETE FROM {self._s}.sessions WHERE pk = $1", pk)
        parent = row["parent_pk"]
        if parent is not None:
            left = await conn.fetchrow(
                f"UPDATE {self._s}.sessions SET children = children - 1 WHERE pk = $1 "
                "RETURNING children, deleted",
                parent,
            )
            if left is not None and left["children"] <= 0 and left["deleted"]:
                await self._remove(conn, parent)

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        validate_id(session_id)

        async def work(conn: Conn) -> None:
            row = await self._visible_row(conn, session_id, lock=True)
            await self._remove(conn, row["pk"])

        await self._with(work, tx=True)

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
        after = decode_cursor(cursor) if cursor else None
        params: list[Any] = [now()]
        where = ["NOT s.deleted", "(s.expires_at IS NULL OR s.expires_at > $1)"]
        for column, value in (
            ("user_id", user_id),
            ("agent_id", agent_id),
            ("window_id", window_id),
            ("state", state),
        ):
            if value is not None:
                params.append(value)
                where.append(f"s.{column} = ${len(params)}")
        if after is not None:
            params.extend(after)
            a, b = len(params) - 1, len(params)
            where.append(f"(s.created_at < ${a} OR (s.created_at = ${a} AND s.id < ${b}))")
        params.append(limit + 1)
        sql = (
            f"SELECT {self._COLUMNS} FROM {self._from()} WHERE {' AND '.join(where)} "
            f"ORDER BY s.created_at DESC, s.id DESC LIMIT ${len(params)}"
        )
        rows = await self._with(lambda conn: conn.fetch(sql, *params))
        records = [self._record(r) for r in rows[:limit]]
        return Page(records, encode_cursor(records[-1]) if len(rows) > limit else None)

    # -- events ----------------------------------------------------------------

    def _append_sql(self) -> str:
        s = self._s
        return f"""
        WITH moved AS (
            UPDATE {s}.sessions SET head = head + $3, updated_at = $4
            WHERE id = $1 AND head = $2 AND NOT deleted AND (expires_at IS NULL OR expires_at > $4)
            RETURNING pk
        ), added AS (
            INSERT INTO {s}.events (session_pk, seq, type, ts, turn_id, v, data)
            SELECT moved.pk, $2 + e.ord, e.type, e.ts, e.turn_id, e.v, e.data
            FROM moved, unnest($5::text[], $6::float8[], $7::text[], $8::int[], $9::text[])
                WITH ORDINALITY AS e(type, ts, turn_id, v, data, ord)
            RETURNING 1
        )
        SELECT count(*) FROM added
        """

    async def append(self, session_id: str, events: Sequence[NewEvent], expected_seq: int) -> int:
        """See :meth:`Store.append`."""
        check_append(events, expected_seq)
        validate_id(session_id)
        sql = self._append_sql()
        args = (
            session_id,
            expected_seq,
            len(events),
            now(),
            [e.type for e in events],
            [e.ts for e in events],
            [e.turn_id for e in events],
            [e.schema_version for e in events],
            [e.data for e in events],
        )

        async def work(conn: Conn) -> int:
            try:
                added = await conn.fetchval(sql, *args)
            except asyncpg.UniqueViolationError:
                added = 0
            if added == len(events):
                return expected_seq + len(events)
            row = await self._visible_row(conn, session_id)
            raise ConflictError(session_id, expected_seq, row["head"])

        return await self._with(work)

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

        sql = (
            f"SELECT seq, type, ts, turn_id, data, v FROM {self._s}.events "
            "WHERE session_pk = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
        )
        chunk = max(batch_size, _READ_CHUNK)

        async def plan(conn: Conn) -> tuple[list[tuple[int, int, int]], list[asyncpg.Record]]:
            row = await self._visible_row(conn, session_id)
            lineage = [(row["pk"], row["parent_seq"] or 0)]
            if row["parent_pk"] is not None:
                lineage += await self._lineage(conn, row["parent_pk"])
            segments = fork_segments(lineage, row["head"], after_seq, upto_seq)
            first: list[asyncpg.Record] = []
            if segments:
                pk, lo, hi = segments[0]
                first = await conn.fetch(sql, pk, lo, hi, chunk)
            return segments, first

        segments, rows = await self._with(plan)
        make = StoredEvent._make
        for index, (pk, lo, hi) in enumerate(segments):
            start = lo
            while start < hi:
                if index or start != lo:
                    rows = await self._with(partial(_fetch, sql, (pk, start, hi, chunk)))
                expected = min(chunk, hi - start)
                if len(rows) != expected or (
                    rows and (rows[0][0] != start + 1 or rows[-1][0] != start + expected)
                ):
                    raise CorruptDataError(
                        f"session {session_id!r}: events {start + 1}..{start + expected} are "
                        f"incomplete in PostgreSQL (found {len(rows)}); restore from a backup"
                    )
                for i in range(0, len(rows), batch_size):
                    yield list(map(make, rows[i : i + batch_size]))
                start += expected

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        validate_id(new_record.id)

        async def work(conn: Conn) -> SessionRecord:
            row = await self._visible_row(conn, session_id, lock=True)
            check_fork_point(session_id, at_seq, row["head"])
            stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
            await self._insert(conn, stored, row["pk"])
            await conn.execute(
                f"UPDATE {self._s}.sessions SET children = children + 1 WHERE pk = $1", row["pk"]
            )
            return stored

        return await self._with(work, tx=True)

    # -- blobs -----------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        blob_id = hashlib.sha256(data).hexdigest()

        async def work(conn: Conn) -> None:
            row = await self._visible_row(conn, session_id)
            await conn.execute(
                f"INSERT INTO {self._s}.blobs (session_pk, id, media_type, data) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                row["pk"],
                blob_id,
                media_type,
                bytes(data),
            )

        await self._with(work)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")

        async def work(conn: Conn) -> bytes:
            row = await self._visible_row(conn, session_id)
            for pk, _ in await self._lineage(conn, row["pk"]):
                data = await conn.fetchval(
                    f"SELECT data FROM {self._s}.blobs WHERE session_pk = $1 AND id = $2",
                    pk,
                    blob_id,
                )
                if data is not None:
                    return bytes(data)
            raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")

        return await self._with(work)

    # -- upkeep ----------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`."""
        at = now() if before is None else before

        async def work(conn: Conn) -> int:
            rows = await conn.fetch(
                f"SELECT pk FROM {self._s}.sessions WHERE NOT deleted AND expires_at IS NOT NULL "
                "AND expires_at <= $1 FOR UPDATE",
                at,
            )
            for row in rows:
                await self._remove(conn, row["pk"])
            return len(rows)

        return await self._with(work, tx=True)

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await self._drop_lane(pool)
            await pool.close()
