"""Connections and recovery: the pool, the fast lane, what is sent again, and error translation.

:class:`Connection` is the base of :class:`~chatsession.store.postgres.PostgresStore`:
every call runs through :meth:`Connection._with`, which picks a connection,
sends the call once more on a fresh one when the one it used was lost and the
call is safe to repeat, retries deadlocks, and turns every driver error into
a chatsession error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeAlias, TypeVar

import asyncpg
import asyncpg.exceptions as pgerr
from asyncpg.pool import PoolConnectionProxy

from chatsession.errors import (
    ChatSessionClosedError,
    ChatSessionError,
    CorruptDataError,
    InvalidURLError,
    StoreError,
    StoreUnavailableError,
    UsageError,
)
from chatsession.store.postgres import schema
from chatsession.store.postgres.errors import RETRY, connection_lost, describe, is_outage
from chatsession.store.postgres.settings import parse_url
from chatsession.store.records import damaged
from chatsession.store.urls import redact_url

T = TypeVar("T")
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
_ATTEMPTS = 3  # tries of a call the server aborted as a deadlock or serialization failure


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


def _alive(conn: Conn) -> bool:
    """Whether a connection taken from the pool is still attached and open.

    When the server closes a connection (a restart, ``pg_terminate_backend``,
    ``idle_session_timeout``), asyncpg hands it back to the pool by itself and
    detaches the proxy we hold: every method of the proxy then raises
    ``InterfaceError``. That is "gone", not a reason to fail every later call.
    """
    try:
        return not conn.is_closed()
    except pgerr.InterfaceError:
        return False


def _in_transaction(conn: Conn) -> bool:
    try:
        return conn.is_in_transaction()
    except pgerr.InterfaceError:  # detached: the pool already took it back
        return False


class Connection:
    """A pool of connections to one PostgreSQL schema, and how calls use it.

    Args:
        url: A ``postgresql://`` URL.
        **options: Options overriding the URL's.

    Raises:
        InvalidURLError: A malformed URL, an unknown or repeated option, a
            bad value or port (the password is never shown).
    """

    def __init__(self, url: str, **options: object) -> None:
        settings = parse_url(url, options)
        self._settings = settings
        self.url = redact_url(url)
        self.address = settings.address
        self.schema = settings.schema
        self._s = f'"{settings.schema}"'
        #: What the URL asked for, or None: the database's and the role's setting applies.
        self.synchronous_commit = settings.synchronous_commit
        self._pool: asyncpg.Pool | None = None
        self._pool_lock: asyncio.Lock | None = None
        self._lane: PoolConnectionProxy[asyncpg.Record] | None = None
        self._lane_busy = False  # a call is using the lane (one event loop: a flag suffices)
        self._lane_retry_at = 0.0
        self._closed = False

    # -- errors ----------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"PostgreSQL at {self.address} is unavailable ({describe(exc)}); check "
            "that the server is running and reachable and the URL is right, then retry"
        )

    def _translate(self, exc: BaseException) -> BaseException:
        """The chatsession error for a driver or network error; any other is returned as is."""
        if isinstance(exc, ChatSessionError) or not isinstance(exc, Exception):
            return exc
        where, what = f"PostgreSQL at {self.address}", describe(exc)
        if self._closed:
            return ChatSessionClosedError(f"store {self.url} was closed during the call")
        if isinstance(exc, pgerr.ReadOnlySQLTransactionError):
            return StoreUnavailableError(
                f"{where} refuses writes ({what}): it is a standby or read-only; point the "
                "URL at the primary, or retry once a failover has finished"
            )
        if is_outage(exc):
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
        if isinstance(exc, RETRY):
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

    def _place(self, where: str) -> str:
        """``where`` (a table and column, an event) in this store, for messages."""
        return f"{where} in PostgreSQL (schema {self.schema!r} at {self.address})"

    def _damaged(self, session_id: str, where: str, why: str) -> CorruptDataError:
        """Damage found in ``where`` (a table and column, an event) of a session's rows."""
        return damaged(session_id, self._place(where), why)

    # -- the pool and the fast lane --------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        pool = self._pool
        if pool is not None:
            return pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            pool = self._pool
            if pool is None:
                pool = await self._open_pool()
                self._pool = pool
            return pool

    async def _open_pool(self) -> asyncpg.Pool:
        """A new pool, with the schema migrated; any failure raises a chatsession error."""
        settings = self._settings
        try:
            pool = await asyncpg.create_pool(
                min_size=settings.min_size,
                max_size=settings.max_size,
                command_timeout=settings.command_timeout,
                timeout=settings.connect_timeout,
                reset=_reset,
                **settings.connect_kwargs(),
            )
        except Exception as exc:
            self._raise(exc)
        try:
            async with pool.acquire() as conn:
                await schema.migrate(conn, self.schema, self.address)
        except BaseException as exc:
            pool.terminate()
            self._raise(exc)
        return pool

    async def _lane_connection(
        self, pool: asyncpg.Pool
    ) -> PoolConnectionProxy[asyncpg.Record] | None:
        """The fast lane: one pooled connection kept by this store object.

        A call that finds it free uses it without a pool acquire and release
        (about 30 us each); calls that find it busy use the pool as usual. A
        lane the server closed (asyncpg has taken it back) is replaced.
        """
        lane = self._lane
        if lane is not None and not _alive(lane):
            await self._drop_lane(pool)
            lane = None
        if lane is None:
            if time.monotonic() < self._lane_retry_at:
                return None
            try:
                lane = self._lane = await pool.acquire(timeout=self._settings.connect_timeout)
            except Exception as exc:
                if not is_outage(exc):
                    self._raise(exc)
                self._lane_retry_at = time.monotonic() + 1.0
                return None
        return lane

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
                lane = await self._lane_connection(pool)
                if lane is not None:
                    try:
                        result = await self._run(lane, fn, tx)
                    except BaseException as exc:
                        # cancelled (it may be mid-query), broken, closed by the
                        # server, or left in a transaction: never reuse it
                        if (
                            isinstance(exc, asyncio.CancelledError)
                            or is_outage(exc)
                            or not _alive(lane)
                            or _in_transaction(lane)
                        ):
                            await self._drop_lane(pool)
                        raise
                    if _in_transaction(lane):
                        await self._drop_lane(pool)
                    return result
            finally:
                self._lane_busy = False
        async with pool.acquire() as conn:
            try:
                return await self._run(conn, fn, tx)
            except BaseException as exc:
                if connection_lost(exc) and _alive(conn):
                    conn.terminate()  # never handed out again
                raise

    async def _with(
        self, fn: Callable[[Conn], Awaitable[T]], *, tx: bool = False, idempotent: bool = False
    ) -> T:
        """Run ``fn`` on a connection (in a transaction if ``tx``), translating errors.

        ``idempotent`` calls whose connection was lost are sent once more on a
        fresh one: a connection closed by the server while it sat in the pool
        (a restart, ``idle_session_timeout``, a pooler) is only found out when
        a call uses it, and a reply lost on the way back leaves the caller not
        knowing whether a write was done. Reads are idempotent, and so are
        writes that recognise themselves when sent again (an append whose
        events carry ids, a blob named by its content); other writes are not
        sent again.
        """
        attempt = 1
        lost_once = False
        while True:
            try:
                return await self._attempt(fn, tx)
            except RETRY as exc:
                if attempt >= _ATTEMPTS:
                    self._raise(exc)
                await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
                attempt += 1
            except pgerr.ReadOnlySQLTransactionError as exc:
                if self._pool is not None:  # after a failover: new connections, maybe a new primary
                    await self._pool.expire_connections()
                self._raise(exc)
            except Exception as exc:
                if idempotent and not lost_once and connection_lost(exc):
                    lost_once = True  # once: a server that is down stays unavailable
                    continue
                self._raise(exc)

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await self._drop_lane(pool)
            await pool.close()
