"""``RedisStore``: the ``Store`` protocol over the modules of this package."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Self

from chatsession.store.checks import check_create
from chatsession.store.types import (
    DEFAULT_READ_BATCH,
    Lease,
    NewEvent,
    Page,
    SessionRecord,
    SessionState,
    StoredEvent,
    StoreStats,
)

from . import cleanup, layout, leases, records
from . import events as event_list
from . import stats as store_stats
from .connection import RedisConnection

__all__ = ["RedisStore"]


class RedisStore:
    """The Redis store (``redis://``, ``rediss://``). See :mod:`chatsession.store.redis`.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...``,
            optionally with query options.
        prefix: Put before every key (default ``chatsession:``).
        socket_timeout: Seconds a call waits for the server (> 0, default 5).
        socket_connect_timeout: Seconds a connection attempt waits (> 0, default 5).
        max_connections: The size of the connection pool (>= 1, default 50).
        pool_timeout: Seconds a call waits for a free connection (>= 0, default 10).
        retries: How many times a call that is safe to repeat is sent again
            after its connection dropped before the reply (0-100, default 3).
        username: The user name; overrides the URL's.
        password: The password; overrides the URL's. Never shown in
            :attr:`url`, ``repr`` or messages.
        **tls: TLS options for ``rediss://`` (``ssl_cert_reqs``, ``ssl_ca_certs``,
            ``ssl_ca_path``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``,
            ``ssl_check_hostname``, ``ssl_ciphers``, ``ssl_min_version``).

    Keyword options override the URL's query options.

    Raises:
        InvalidURLError: A malformed URL, an unknown option or a bad value.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = None,
        max_connections: int | None = None,
        pool_timeout: float | None = None,
        retries: int | None = None,
        username: str | None = None,
        password: str | None = None,
        **tls: Any,
    ) -> None:
        options = {
            "prefix": prefix,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            "max_connections": max_connections,
            "pool_timeout": pool_timeout,
            "retries": retries,
            "username": username,
            "password": password,
            **tls,
        }
        self._conn = RedisConnection(url, options)
        #: Put before every key.
        self.prefix = self._conn.prefix
        #: The store's URL, password masked (``***``); shows the prefix.
        self.url = self._conn.url
        #: ``host:port`` of the server.
        self.address = self._conn.address

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``redis://...`` (see the package docstring for its options).

        Args:
            url: The store URL, with query options.
            **options: Options that override the URL's (``password`` among
                them, to keep it out of the URL).

        Raises:
            InvalidURLError: A malformed URL, an unknown option or a bad value.
        """
        return cls(url, **options)

    async def __aenter__(self) -> Self:
        """Return the store itself (``async with open_store(url) as store``)."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the store (:meth:`aclose`)."""
        await self.aclose()

    # -- records -----------------------------------------------------------------

    async def create(
        self, record: SessionRecord, *, max_per_user: int | None = None
    ) -> SessionRecord:
        """See :meth:`Store.create <chatsession.store.base.Store.create>`.

        With ``max_per_user``, the user's live set is counted and the new
        session listed in one script on the index slot (:func:`.records.create`);
        the first such call of a store object upgrades data written by an
        earlier version first (:mod:`.layout`).
        """
        check_create(record, max_per_user)
        if max_per_user is not None:
            await layout.ensure(self._conn)
        return await records.create(self._conn, record, max_per_user, settle=cleanup.settle_marks)

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get <chatsession.store.base.Store.get>`."""
        return await records.get(self._conn, session_id)

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update <chatsession.store.base.Store.update>`."""
        return await records.update(self._conn, record, expected_version)

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete <chatsession.store.base.Store.delete>`."""
        await records.delete(self._conn, session_id)

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
        """See :meth:`Store.list_sessions <chatsession.store.base.Store.list_sessions>`.

        Reads at most ``max(10 * limit, 100)`` index members: when filters or
        expired sessions reject many, the page is shorter than ``limit`` but
        ``next_cursor`` still moves past everything read.
        """
        return await records.list_sessions(
            self._conn,
            user_id=user_id,
            agent_id=agent_id,
            window_id=window_id,
            state=state,
            limit=limit,
            cursor=cursor,
        )

    # -- events ------------------------------------------------------------------

    async def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_seq: int,
        *,
        lease: Lease | None = None,
    ) -> int:
        """See :meth:`Store.append <chatsession.store.base.Store.append>` and :func:`.events.append`."""
        return await event_list.append(self._conn, session_id, events, expected_seq, lease)

    def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read <chatsession.store.base.Store.read>`."""
        return event_list.read(self._conn, session_id, after_seq, upto_seq, batch_size=batch_size)

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork <chatsession.store.base.Store.fork>`."""
        return await event_list.fork(self._conn, session_id, at_seq, new_record)

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob <chatsession.store.base.Store.put_blob>`."""
        return await event_list.put_blob(self._conn, session_id, data, media_type)

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob <chatsession.store.base.Store.get_blob>`."""
        return await event_list.get_blob(self._conn, session_id, blob_id)

    # -- leases and snapshots ----------------------------------------------------

    async def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Lease:
        """See :meth:`Store.acquire_lease <chatsession.store.base.Store.acquire_lease>`."""
        return await leases.acquire(self._conn, session_id, owner, ttl)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """See :meth:`Store.renew_lease <chatsession.store.base.Store.renew_lease>`."""
        return await leases.renew(self._conn, lease, ttl)

    async def release_lease(self, lease: Lease) -> None:
        """See :meth:`Store.release_lease <chatsession.store.base.Store.release_lease>`."""
        await leases.release(self._conn, lease)

    async def put_snapshot(self, session_id: str, seq: int, data: bytes) -> None:
        """See :meth:`Store.put_snapshot <chatsession.store.base.Store.put_snapshot>`."""
        await leases.put_snapshot(self._conn, session_id, seq, data)

    async def get_snapshot(self, session_id: str) -> tuple[int, bytes] | None:
        """See :meth:`Store.get_snapshot <chatsession.store.base.Store.get_snapshot>`."""
        return await leases.get_snapshot(self._conn, session_id)

    # -- upkeep ------------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired <chatsession.store.base.Store.purge_expired>`
        and :mod:`.cleanup`."""
        return await cleanup.purge_expired(self._conn, before)

    async def stats(self, *, idle_before: float | None = None, top: int = 100) -> StoreStats:
        """See :meth:`Store.stats <chatsession.store.base.Store.stats>` and :mod:`.stats`."""
        return await store_stats.stats(self._conn, idle_before, top)

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        await self._conn.aclose()
