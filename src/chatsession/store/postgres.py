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

Tables ``sessions`` (the records; ``body`` is JSONB; ``text_payloads`` is
true once a session has a payload kept as text, see below), ``events``
(primary key ``(session_pk, seq)``; the payload is in ``data``, JSONB, so it
can be queried and indexed in place, or, for the rare payloads JSONB cannot
hold, in ``data_text`` as the exact text, with ``data`` NULL; a CHECK keeps
exactly one of the two set), ``blobs``. Schema changes are named migrations
recorded in ``chatsession_migrations``, applied once under an advisory lock,
so processes starting at once are safe. Migration ``002_events_data_jsonb``
converts the payloads of a database made by an earlier version (it rewrites
the events table under an exclusive lock: on a big table the first store to
open waits for it, and so do the others). A payload that is not valid JSON
stops it with :class:`~chatsession.errors.CorruptDataError` and changes
nothing. Migration ``003_events_data_text`` adds ``data_text``, the CHECK,
``sessions.text_payloads`` and ``fillfactor = 80`` on ``sessions``: no
rewrite, one scan of the events table to check the constraint.

Payloads kept as JSONB come back as *equal JSON*, not byte for byte as
appended (the other backends keep the bytes): JSONB drops insignificant
whitespace, orders object keys (shorter keys first), keeps only the last of
duplicate keys and writes numbers in plain decimal (``1e16`` comes back as
``10000000000000000``, which ``json.loads`` reads as an ``int``).

JSONB cannot hold a ``\\u0000`` escape, an unpaired surrogate escape (a
``\\ud800``-``\\udbff`` not followed by a ``\\udc00``-``\\udfff``, or the
latter alone) or a number beyond ``numeric`` (more than 131072 digits before
the point or 16383 after: ``1e131072``). Such a payload is kept in
``data_text`` exactly as appended and comes back byte for byte. The client
finds the escapes (a substring test for ``\\u``, about 30 ns a payload, then
a scan of the escapes of the payloads that have one); the server finds the
numbers: the statement fails having written nothing and is sent once more
with those payloads as text, the only append that takes two round trips.
Text is checked as JSON by the server (``::json``, which keeps it as is). A
payload that is not JSON text (in either column) raises
:class:`~chatsession.errors.UsageError` and writes nothing. A session whose
``text_payloads`` is false (nearly all) reads ``data`` as before; one that
is true reads ``COALESCE(data_text, data::text)``; a fork reads each
ancestor's part by that ancestor's flag.

An append is one SQL statement (so one transaction and one round trip): it
moves the head only if it is still ``expected_seq`` (which locks the
session's row, so it cannot race a delete) and inserts the events: up to 16
events, none kept as text, as one ``VALUES`` row each, otherwise as
``unnest`` of arrays. The
``sessions`` fillfactor leaves room on each page so that moving the head is a
HOT update (no index entries written) on pages filled since migration 003.
Expiry is the ``expires_at`` column, checked on every read; ``purge_expired``
deletes in bounded batches that skip sessions locked by other calls.

Driver errors are translated where they happen:

- the server or the network is down, refuses service (starting up, shutting
  down, too many connections, out of disk, read-only standby) or does not
  answer in time (``command_timeout``, ``statement_timeout``, a cancelled
  statement): :class:`~chatsession.errors.StoreUnavailableError`. The pool
  replaces broken connections, so the same store object works again when
  the server is back;
- a refused login or a missing database: :class:`~chatsession.errors.InvalidURLError`;
- chatsession's tables missing or changed, or data the server reports as
  damaged: :class:`~chatsession.errors.CorruptDataError`;
- a value the server rejects: :class:`~chatsession.errors.UsageError`;
- a deadlock or serialization failure is retried (the transaction was rolled
  back, so nothing was written); if it persists, and for anything else the
  server refuses (a missing privilege, say): :class:`~chatsession.errors.StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from decimal import Decimal
from functools import partial
from typing import Any, NoReturn, Self, TypeAlias, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg
import asyncpg.exceptions as pgerr
from asyncpg.pool import PoolConnectionProxy

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ChatSessionError,
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    SessionExistsError,
    SessionNotFoundError,
    StoreError,
    StoreUnavailableError,
    UsageError,
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
    check_read,
    decode_cursor,
    encode_cursor,
    fork_segments,
    initial_record,
    now,
    updated_record,
    validate_id,
)

__all__ = ["MIGRATIONS", "PostgresStore"]


async def _reset(conn: Conn) -> None:
    """The pool's reset on release: roll back a transaction left open, nothing more.

    asyncpg's own full reset (``RESET ALL`` and friends) costs a round trip
    per release and undoes nothing the store leaves behind: no ``SET`` beyond
    the pool's server settings, no ``LISTEN``, only transaction-scoped
    advisory locks. A call cancelled mid-transaction does leave one open, and
    it must not swallow the next caller's writes.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


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
_PURGE_BATCH = 100  # sessions deleted per purge transaction
_ATTEMPTS = 3  # tries of a call the server aborted as a deadlock or serialization failure
_MIGRATION_TIMEOUT = 3600.0  # seconds a migration statement (or the wait for one) may take
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_VALUES_MAX = 16  # appends of up to this many events (all jsonb) send one VALUES row each
#: Every backslash escape of a JSON text, in order; group 1 is the hex of a
#: ``\\u0000`` or surrogate escape (``\\\\`` is one escape, so ``\\\\u0000`` is none).
_ESCAPE_RE = re.compile(r"\\(?:u(0000|[dD][89a-fA-F][0-9a-fA-F]{2})|.)", re.DOTALL)
_FIRST_RE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_NUMERIC_INT_DIGITS = 131072  # PostgreSQL numeric (so jsonb): digits before the point
_NUMERIC_SCALE = 16383  # and after it


def _needs_text(data: str) -> bool:
    """Whether JSON text ``data`` has a string jsonb cannot hold.

    That is a ``\\u0000`` escape or an unpaired surrogate escape (a high one
    not followed by a low one, or a low one alone); an escaped backslash
    before ``u`` is not an escape.
    """
    if _FIRST_RE.search(data) is None:
        return False
    high_end = -1  # where the last high surrogate escape ended, if one waits for its pair
    for match in _ESCAPE_RE.finditer(data):
        code = match.group(1)
        if high_end >= 0:
            if match.start() != high_end or code is None or code[1] not in "cdefCDEF":
                return True
            high_end = -1
        elif code is not None:
            if code == "0000" or code[1] not in "89abAB":
                return True
            high_end = match.end()
    return high_end >= 0


def _fits_numeric(data: str) -> bool:
    """Whether every number in JSON text ``data`` fits PostgreSQL's ``numeric``.

    jsonb keeps numbers as ``numeric``: at most 131072 digits before the
    point and 16383 after (``1e131072`` and ``1e-16384`` do not fit). Text
    that is not JSON counts as fitting (the server judges it).
    """
    fits = True

    def number(text: str) -> None:
        nonlocal fits
        value = Decimal(text)
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)  # finite: JSON has no NaN or Infinity literal here
        if (value and value.adjusted() >= _NUMERIC_INT_DIGITS) or -exponent > _NUMERIC_SCALE:
            fits = False

    try:
        json.loads(data, parse_int=number, parse_float=number)
    except (ValueError, RecursionError):
        return True
    return fits


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


def _migration_2(s: str) -> list[str]:
    # One statement, so it is atomic; a payload that is not JSON aborts it.
    return [f"ALTER TABLE {s}.events ALTER COLUMN data TYPE jsonb USING data::jsonb"]


def _migration_3(s: str) -> list[str]:
    # Catalog changes only (a new column with a constant default is not written
    # into existing rows), plus one scan of the events table to check the new
    # constraint; no rewrite. The fillfactor applies to pages filled from now on.
    return [
        f"""ALTER TABLE {s}.events
            ALTER COLUMN data DROP NOT NULL,
            ADD COLUMN data_text text,
            ADD CONSTRAINT events_data_or_data_text CHECK ((data IS NULL) <> (data_text IS NULL))""",
        f"""ALTER TABLE {s}.sessions
            ADD COLUMN text_payloads boolean NOT NULL DEFAULT false,
            SET (fillfactor = 80)""",
    ]


#: Applied in order, each once, recorded by name. Never edit or reorder: append.
MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("001_sessions_events_blobs", _migration_1),
    ("002_events_data_jsonb", _migration_2),
    ("003_events_data_text", _migration_3),
]

#: The server or the network is down, refuses service, or did not answer in time.
_OUTAGE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (command_timeout) is one too
    pgerr.PostgresConnectionError,  # class 08: the connection failed or was lost
    pgerr.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
    pgerr.InsufficientResourcesError,  # class 53: too many connections, disk full, no memory
    pgerr.PostgresSystemError,  # class 58: an I/O error on the server
    pgerr.LockNotAvailableError,  # lock_timeout ran out
    pgerr.ReadOnlySQLTransactionError,  # a standby, or the server is read-only
)

#: Aborted by the server to break a deadlock or a serialization conflict:
#: nothing was written, so the call is tried again.
_RETRY: tuple[type[BaseException], ...] = (
    pgerr.DeadlockDetectedError,
    pgerr.SerializationError,
)


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, _OUTAGE):
        return True
    # asyncpg's plain InterfaceError also says "connection is closed" when the
    # server went away between calls; its subclasses are configuration errors.
    return type(exc) is pgerr.InterfaceError and "is closed" in str(exc)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    detail = getattr(exc, "detail", None)
    return f"{text}; {detail}" if detail else text


class PostgresStore:
    """The PostgreSQL store (``postgresql://``). See the module docstring.

    Payloads are kept as JSONB: ``read`` returns them as JSON equal to what
    was appended, with whitespace and key order normalised (not byte for
    byte as the other backends do). The rare payloads JSONB cannot hold
    (``\\u0000``, unpaired surrogates, numbers beyond ``numeric``) are kept
    as text and returned byte for byte; see the module docstring.
    """

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
        self._lane_busy = False  # a call is using the lane (one event loop: a flag suffices)
        self._lane_retry_at = 0.0
        self._closed = False
        self._append_cache: dict[tuple[int, bool], str] = {}

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

    # -- errors ----------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"PostgreSQL at {self.address} is unavailable ({_describe(exc)}); check "
            "that the server is running and reachable and the URL is right, then retry"
        )

    def _translate(self, exc: BaseException) -> BaseException:
        """The chatsession error for a driver or network error; any other is returned as is."""
        if isinstance(exc, ChatSessionError) or not isinstance(exc, Exception):
            return exc
        where, what = f"PostgreSQL at {self.address}", _describe(exc)
        if self._closed:
            return ChatSessionClosedError(f"store {self.url} was closed during the call")
        if isinstance(exc, pgerr.ReadOnlySQLTransactionError):
            return StoreUnavailableError(
                f"{where} refuses writes ({what}): it is a standby or read-only; point the "
                "URL at the primary, or retry once a failover has finished"
            )
        if _is_outage(exc):
            return self._unavailable(exc)
        if isinstance(exc, pgerr.InvalidAuthorizationSpecificationError):
            return InvalidURLError(
                f"{where} refused the login ({what}); check the user and password in the "
                "URL (and the server's pg_hba.conf)"
            )
        if isinstance(exc, pgerr.InvalidCatalogNameError):
            return InvalidURLError(f"{where}: {what}; create the database or fix the URL")
        if isinstance(exc, pgerr.ClientConfigurationError):
            return InvalidURLError(f"the PostgreSQL URL {self.url} cannot be used ({what})")
        if isinstance(
            exc,
            (pgerr.UndefinedTableError, pgerr.UndefinedColumnError, pgerr.InvalidSchemaNameError),
        ):
            return CorruptDataError(
                f"chatsession's tables in schema {self.schema!r} at {self.address} are missing "
                f"or were changed by hand ({what}); restore them from a backup"
            )
        if isinstance(exc, (pgerr.DataCorruptedError, pgerr.IndexCorruptedError)):
            return CorruptDataError(f"{where} reports damaged data ({what}); restore from a backup")
        if isinstance(exc, pgerr.InsufficientPrivilegeError):
            return StoreError(
                f"{where} denied access ({what}); grant the URL's user the privileges on "
                f"schema {self.schema!r} and its tables, or connect as their owner"
            )
        if isinstance(exc, _RETRY):
            return StoreError(
                f"{where} aborted the call {_ATTEMPTS} times ({what}); nothing was written: "
                "retry later"
            )
        if isinstance(exc, pgerr.DataError):  # class 22, or a value the driver cannot encode
            return UsageError(f"{where} rejected a value of the call ({what}); fix the arguments")
        if isinstance(exc, (pgerr.PostgresError, pgerr.InterfaceError, pgerr.InternalClientError)):
            return StoreError(
                f"{where} failed ({what}); nothing is known to have been written: retry, "
                "and report a bug if it persists"
            )
        return exc

    def _raise(self, exc: BaseException) -> NoReturn:
        translated = self._translate(exc)
        if translated is exc:
            raise exc
        raise translated from exc

    # -- plumbing --------------------------------------------------------------

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
                        reset=_reset,
                    )
                except Exception as exc:
                    self._raise(exc)
                try:
                    async with pool.acquire() as conn:
                        await self._migrate(conn)
                except BaseException as exc:
                    pool.terminate()
                    self._raise(exc)
                self._pool = pool
        assert self._pool is not None
        return self._pool

    async def _migrate(self, conn: Conn) -> None:
        s, wait = self._s, _MIGRATION_TIMEOUT
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                f"chatsession:{self.schema}",
                timeout=wait,
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
                try:
                    for statement in migration(s):
                        await conn.execute(statement, timeout=wait)
                except pgerr.DataError as exc:
                    raise CorruptDataError(
                        f"PostgreSQL at {self.address}, schema {self.schema!r}: migration {name} "
                        f"cannot convert the stored data ({_describe(exc)}); nothing was changed: "
                        "repair or delete the rows it names, then open the store again"
                    ) from exc
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
            except Exception as exc:
                if not _is_outage(exc):
                    self._raise(exc)
                self._lane_retry_at = time.monotonic() + 1.0
                return None
        return self._lane

    async def _drop_lane(self, pool: asyncpg.Pool) -> None:
        """Hand the lane back to the pool (which rolls back what it left open)."""
        lane, self._lane = self._lane, None
        if lane is not None:
            with contextlib.suppress(Exception):
                await pool.release(lane, timeout=1)

    @staticmethod
    async def _run(conn: Conn, fn: Callable[[Conn], Awaitable[T]], tx: bool) -> T:
        if not tx:
            return await fn(conn)
        async with conn.transaction():
            return await fn(conn)

    async def _attempt(self, fn: Callable[[Conn], Awaitable[T]], tx: bool) -> T:
        pool = self._pool if self._pool is not None and not self._closed else await self._get_pool()
        if not self._lane_busy:
            self._lane_busy = True
            try:
                lane = self._lane if self._lane is not None else await self._lane_connection(pool)
                if lane is not None:
                    try:
                        result = await (self._run(lane, fn, tx) if tx else fn(lane))
                    except BaseException as exc:
                        # cancelled (it may be mid-query), broken, or left in a
                        # transaction: never reuse it; the pool cleans it up
                        if (
                            isinstance(exc, asyncio.CancelledError)
                            or _is_outage(exc)
                            or lane.is_closed()
                            or lane.is_in_transaction()
                        ):
                            await self._drop_lane(pool)
                        raise
                    if lane.is_in_transaction():
                        await self._drop_lane(pool)
                    return result
            finally:
                self._lane_busy = False
        async with pool.acquire() as conn:
            return await self._run(conn, fn, tx)

    async def _with(self, fn: Callable[[Conn], Awaitable[T]], *, tx: bool = False) -> T:
        """Run ``fn`` on a connection (in a transaction if ``tx``), translating errors."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return await self._attempt(fn, tx)
            except _RETRY as exc:
                if attempt == _ATTEMPTS:
                    self._raise(exc)
                await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
            except pgerr.ReadOnlySQLTransactionError as exc:
                if self._pool is not None:  # after a failover: new connections, maybe a new primary
                    await self._pool.expire_connections()
                self._raise(exc)
            except Exception as exc:
                self._raise(exc)
        raise AssertionError("unreachable")

    # -- rows ------------------------------------------------------------------

    _COLUMNS = (
        "s.pk, s.id, s.user_id, s.agent_id, s.window_id, s.state, s.created_at, s.updated_at, "
        "s.expires_at, p.id AS parent_id, s.parent_seq, s.head, s.version, s.body::text AS body, "
        "s.deleted, s.children, s.parent_pk, s.text_payloads"
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

    async def _lineage(self, conn: Conn, pk: int) -> list[tuple[tuple[int, bool], int]]:
        """``((pk, text_payloads), fork_seq)`` from row ``pk`` up to the root."""
        chain: list[tuple[tuple[int, bool], int]] = []
        current: int | None = pk
        while current is not None:
            row = await conn.fetchrow(
                f"SELECT parent_pk, parent_seq, text_payloads FROM {self._s}.sessions WHERE pk = $1",
                current,
            )
            if row is None:
                raise CorruptDataError(f"a fork's ancestor (row {current}) is missing")
            chain.append(((current, row["text_payloads"]), row["parent_seq"] or 0))
            current = row["parent_pk"]
        return chain

    # -- records ---------------------------------------------------------------

    @staticmethod
    def _identity(r: SessionRecord) -> tuple[Any, ...]:
        """``id, user_id, agent_id, window_id, state, created_at, updated_at, expires_at``."""
        return (
            r.id,
            r.user_id,
            r.agent_id,
            r.window_id,
            r.state,
            r.created_at,
            r.updated_at,
            r.expires_at,
        )

    async def _insert(self, conn: Conn, r: SessionRecord, parent_pk: int | None) -> None:
        try:
            await conn.execute(
                f"INSERT INTO {self._s}.sessions (id, user_id, agent_id, window_id, state, created_at, "
                "updated_at, expires_at, parent_pk, parent_seq, head, version, body) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb)",
                *self._identity(r),
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

    def _append_sql(self, n: int, text: bool) -> tuple[str, str]:
        """The append statement for ``n`` events and the status it answers on success.

        Up to ``_VALUES_MAX`` events, all kept as jsonb: a ``VALUES`` row each,
        whose parameters are the events' fields in order (cheaper than
        ``unnest``). Otherwise ``unnest`` of one array per column, with
        ``data_text`` only when some payload is kept as text.
        """
        values = n <= _VALUES_MAX and not text
        key = (n if values else 0, text)
        sql = self._append_cache.get(key)
        if sql is None:
            s = self._s
            extra = ", data_text" if text else ""
            # data_text::json checks that it is JSON and gives back the same text
            head = f"""WITH moved AS (
                UPDATE {s}.sessions SET head = head + $4, updated_at = $3
                    {", text_payloads = true" if text else ""}
                WHERE id = $1 AND head = $2 AND NOT deleted
                    AND (expires_at IS NULL OR expires_at > $3)
                RETURNING pk
            )
            INSERT INTO {s}.events (session_pk, seq, type, ts, turn_id, v, data{extra})
            SELECT moved.pk, $2 + e.ord, e.type, e.ts, e.turn_id, e.v, e.data
                {", e.data_text::json::text" if text else ""}
            FROM moved, """
            if values:  # $5... : each event's type, data, ts, turn_id, schema_version
                rows = ", ".join(
                    f"({i + 1}, ${5 + 5 * i}::text, ${6 + 5 * i}::jsonb, ${7 + 5 * i}::float8, "
                    f"${8 + 5 * i}::text, ${9 + 5 * i}::int)"
                    for i in range(n)
                )
                sql = f"{head}(VALUES {rows}) AS e(ord, type, data, ts, turn_id, v)"
            else:
                arrays = "$5::text[], $6::jsonb[], $7::float8[], $8::text[], $9::int[]"
                arrays += ", $10::text[]" if text else ""
                sql = (
                    f"{head}unnest({arrays}) "
                    f"WITH ORDINALITY AS e(type, data, ts, turn_id, v{extra}, ord)"
                )
            self._append_cache[key] = sql
        return sql, f"INSERT 0 {n}"

    async def append(self, session_id: str, events: Sequence[NewEvent], expected_seq: int) -> int:
        """See :meth:`Store.append`."""
        check_append(events, expected_seq)
        validate_id(session_id)
        n = len(events)
        try:  # the substring test costs ~30 ns; only payloads with a \\u escape are scanned
            as_text = [i for i, e in enumerate(events) if "\\u" in e.data and _needs_text(e.data)]
        except TypeError:
            raise UsageError(
                f"cannot append to session {session_id!r}: event data must be JSON text (a str); "
                "nothing was written"
            ) from None

        def arguments(as_text: list[int]) -> tuple[str, str, list[Any]]:
            sql, status = self._append_sql(n, bool(as_text))
            args: list[Any] = [session_id, expected_seq, now(), n]
            if n <= _VALUES_MAX and not as_text:
                for e in events:
                    args.extend(e)
                return sql, status, args
            data: list[str | None] = [e.data for e in events]
            args += ([e.type for e in events], data, [e.ts for e in events])
            args += ([e.turn_id for e in events], [e.schema_version for e in events])
            if as_text:
                texts: list[str | None] = [None] * n
                for i in as_text:
                    texts[i], data[i] = data[i], None
                args.append(texts)
            return sql, status, args

        sql, status, args = arguments(as_text)

        async def work(conn: Conn) -> int:
            nonlocal sql, status, args
            for retried in (False, True):
                try:
                    if await conn.execute(sql, *args) == status:
                        return expected_seq + n
                    break  # the head moved, or the session is gone
                except asyncpg.UniqueViolationError:
                    # the head matched but seq expected_seq + 1 is taken: unless
                    # another writer moved the head since, the log is damaged, and
                    # a conflict would send the caller's retry loop round forever
                    row = await self._visible_row(conn, session_id)
                    if row["head"] != expected_seq:
                        raise ConflictError(session_id, expected_seq, row["head"]) from None
                    raise CorruptDataError(
                        f"session {session_id!r}: PostgreSQL holds events after seq {expected_seq} "
                        f"but the session's head is {expected_seq} (the events and sessions tables "
                        "disagree, as after a partial restore); restore both from one backup"
                    ) from None
                except pgerr.DataError as exc:
                    # a number beyond numeric's range, which jsonb cannot hold: the
                    # statement wrote nothing; send it once more with those payloads as text
                    more = as_text
                    if not retried and isinstance(exc, pgerr.NumericValueOutOfRangeError):
                        more = [
                            i
                            for i, e in enumerate(events)
                            if i in as_text or not _fits_numeric(e.data)
                        ]
                    if more == as_text:
                        raise UsageError(
                            f"cannot append to session {session_id!r}: PostgreSQL rejected an "
                            f"event ({_describe(exc)}); data must be JSON text, type and turn_id "
                            "strings, ts a number, schema_version a small int; nothing was written"
                        ) from exc
                    sql, status, args = arguments(more)
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
        """See :meth:`Store.read`.

        Payloads come back as JSON equal to what was appended, normalised by
        JSONB, or byte for byte for those kept as text (see the module docstring). A session deleted while it is read
        raises ``SessionNotFoundError`` at the next batch that misses rows.
        """
        check_read(after_seq, upto_seq, batch_size)
        validate_id(session_id)

        # a session with no payload kept as text (nearly all) reads jsonb as is
        where = "WHERE session_pk = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
        sql = {
            False: f"SELECT seq, type, ts, turn_id, data, v FROM {self._s}.events {where}",
            True: f"SELECT seq, type, ts, turn_id, COALESCE(data_text, data::text), v "
            f"FROM {self._s}.events {where}",
        }
        chunk = max(batch_size, _READ_CHUNK)

        async def plan(
            conn: Conn,
        ) -> tuple[int, list[tuple[tuple[int, bool], int, int]], list[asyncpg.Record]]:
            row = await self._visible_row(conn, session_id)
            lineage = [((row["pk"], row["text_payloads"]), row["parent_seq"] or 0)]
            if row["parent_pk"] is not None:
                lineage += await self._lineage(conn, row["parent_pk"])
            segments = fork_segments(lineage, row["head"], after_seq, upto_seq)
            first: list[asyncpg.Record] = []
            if segments:
                (pk, text), lo, hi = segments[0]
                first = await conn.fetch(sql[text], pk, lo, hi, chunk)
            return row["pk"], segments, first

        own_pk, segments, rows = await self._with(plan)
        make = StoredEvent._make
        for index, ((pk, text), lo, hi) in enumerate(segments):
            start = lo
            while start < hi:
                if index or start != lo:
                    rows = await self._with(partial(_fetch, sql[text], (pk, start, hi, chunk)))
                expected = min(chunk, hi - start)
                if len(rows) != expected or (
                    rows and (rows[0][0] != start + 1 or rows[-1][0] != start + expected)
                ):
                    await self._check_still_there(session_id, own_pk)
                    raise CorruptDataError(
                        f"session {session_id!r}: events {start + 1}..{start + expected} are "
                        f"incomplete in PostgreSQL (found {len(rows)}); restore from a backup"
                    )
                for i in range(0, len(rows), batch_size):
                    yield list(map(make, rows[i : i + batch_size]))
                start += expected

    async def _check_still_there(self, session_id: str, pk: int) -> None:
        """Raise ``SessionNotFoundError`` if the session read as row ``pk`` is gone."""
        try:
            row = await self._with(lambda conn: self._visible_row(conn, session_id))
        except SessionNotFoundError as exc:
            raise SessionNotFoundError(session_id, "deleted or expired during the read") from exc
        if row["pk"] != pk:
            raise SessionNotFoundError(session_id, "deleted during the read, and created again")

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        validate_id(new_record.id)

        if isinstance(at_seq, bool) or not isinstance(at_seq, int) or at_seq < 0:
            check_fork_point(session_id, at_seq, 0)  # raises ValueError before any I/O
        stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
        s = self._s
        # one statement (one round trip, one transaction): lock the parent, insert
        # the fork if the parent is visible and has the fork point, count the fork
        sql = f"""
            WITH parent AS (
                SELECT pk, head, deleted, expires_at FROM {s}.sessions WHERE id = $1 FOR UPDATE
            ), ok AS (
                SELECT pk FROM parent
                WHERE NOT deleted AND (expires_at IS NULL OR expires_at > $14) AND $10 <= head
            ), ins AS (
                INSERT INTO {s}.sessions (id, user_id, agent_id, window_id, state, created_at,
                    updated_at, expires_at, parent_pk, parent_seq, head, version, body)
                SELECT $2, $3, $4, $5, $6, $7, $8, $9, ok.pk, $10, $11, $12, $13::jsonb FROM ok
                RETURNING parent_pk
            ), counted AS (
                UPDATE {s}.sessions SET children = children + 1
                WHERE pk IN (SELECT parent_pk FROM ins)
            )
            SELECT head, deleted, expires_at, (SELECT count(*) FROM ins) AS made FROM parent
        """

        async def work(conn: Conn) -> SessionRecord:
            r = stored
            try:
                row = await conn.fetchrow(
                    sql,
                    session_id,
                    *self._identity(r),
                    at_seq,
                    r.head,
                    r.version,
                    self._body(r),
                    now(),
                )
            except asyncpg.UniqueViolationError:
                raise SessionExistsError(r.id) from None
            if row is None or row["deleted"]:
                raise SessionNotFoundError(session_id)
            if row["expires_at"] is not None and row["expires_at"] <= now():
                raise SessionNotFoundError(session_id, "expired")
            if not row["made"]:
                check_fork_point(session_id, at_seq, row["head"])
                raise SessionNotFoundError(session_id, "expired")  # expired as the call ran
            return stored

        return await self._with(work)

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
            for (pk, _), _ in await self._lineage(conn, row["pk"]):
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
        """See :meth:`Store.purge_expired`.

        Deletes in transactions of at most 100 sessions, oldest expiry first,
        skipping sessions that another call holds locked (a concurrent
        ``delete`` or ``purge_expired``): those are left for that call or the
        next purge, so purges never wait for, or deadlock with, other calls.
        """
        at = now() if before is None else before
        sql = (
            f"SELECT pk FROM {self._s}.sessions WHERE NOT deleted AND expires_at IS NOT NULL "
            "AND expires_at <= $1 ORDER BY expires_at, pk LIMIT $2 FOR UPDATE SKIP LOCKED"
        )

        async def batch(conn: Conn) -> int:
            rows = await conn.fetch(sql, at, _PURGE_BATCH)
            for row in rows:
                await self._remove(conn, row["pk"])
            return len(rows)

        total = 0
        while True:
            done = await self._with(batch, tx=True)
            total += done
            if done < _PURGE_BATCH:
                return total

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await self._drop_lane(pool)
            await pool.close()
