"""Write leases: a row's columns, decided by one statement each on the server's clock.

A session's lease is three columns of its ``sessions`` row (a row, not an
advisory lock: it outlives the connection that took it and works through
poolers): ``lease_owner`` (NULL when none is held), ``lease_expires`` (Unix
seconds by the server's ``clock_timestamp()``) and ``lease_token``, the
highest fencing token handed out, which is the holder's while
``lease_owner`` is set. Acquiring, renewing and releasing are one ``UPDATE``
each, atomic with the row lock; a refusal is explained by a second read,
judged by the shared rules of :mod:`chatsession.store.leases`. The fenced
append is in :mod:`chatsession.store.postgres.events`.
"""

from __future__ import annotations

from chatsession.errors import LeaseLostError, SessionBusyError, SessionNotFoundError
from chatsession.store.base import Lease, check_lease, check_lease_request, now
from chatsession.store.leases import granted, renewed
from chatsession.store.postgres.connection import Conn
from chatsession.store.postgres.rows import Rows
from chatsession.store.records import check_visible

_CLOCK = "date_part('epoch', clock_timestamp())"  # the server's clock, Unix seconds
_ATTEMPTS = 3  # a refused call whose cause was gone when looked at is sent again this often


class Leases(Rows):
    """``acquire_lease``, ``renew_lease`` and ``release_lease``."""

    def __init__(self, url: str, **options: object) -> None:
        super().__init__(url, **options)
        s = self._s
        visible = "NOT s.deleted AND (s.expires_at IS NULL OR s.expires_at > $4)"
        # a live holder asking again keeps its token; a new holder gets the next one
        self._acquire_sql = f"""
            UPDATE {s}.sessions AS s SET
                lease_token = CASE WHEN s.lease_owner = $2 AND s.lease_expires > c.clock
                    THEN s.lease_token ELSE s.lease_token + 1 END,
                lease_owner = $2,
                lease_expires = c.clock + $3::float8
            FROM (SELECT {_CLOCK} AS clock) AS c
            WHERE s.id = $1 AND {visible}
                AND (s.lease_owner IS NULL OR s.lease_expires <= c.clock OR s.lease_owner = $2)
            RETURNING s.lease_token, s.lease_expires"""
        self._renew_sql = f"""
            UPDATE {s}.sessions AS s SET lease_expires = c.clock + $3::float8
            FROM (SELECT {_CLOCK} AS clock) AS c
            WHERE s.id = $1 AND {visible} AND s.lease_owner IS NOT NULL AND s.lease_token = $2
            RETURNING s.lease_owner, s.lease_expires"""
        self._release_sql = (
            f"UPDATE {s}.sessions SET lease_owner = NULL, lease_expires = NULL "
            "WHERE id = $1 AND lease_token = $2 AND lease_owner IS NOT NULL"
        )
        self._held_sql = (
            "SELECT deleted, expires_at, lease_owner, lease_token, lease_expires, "
            f"{_CLOCK} AS clock FROM {s}.sessions WHERE id = $1"
        )

    async def _held(self, conn: Conn, session_id: str) -> tuple[Lease | None, int, float]:
        """The session's lease (expired or not), its highest token and the server's clock.

        Raises:
            SessionNotFoundError: No visible session with that id.
        """
        row = await conn.fetchrow(self._held_sql, session_id)
        if row is None:
            raise SessionNotFoundError(session_id)
        check_visible(session_id, row["deleted"], row["expires_at"])
        held = None
        if row["lease_owner"] is not None:
            held = Lease(session_id, row["lease_owner"], row["lease_token"], row["lease_expires"])
        return held, row["lease_token"], row["clock"]

    async def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Lease:
        """See :meth:`Store.acquire_lease`. Expiry is judged by the server's clock."""
        check_lease_request(session_id, owner, ttl)

        async def work(conn: Conn) -> Lease:
            for _ in range(_ATTEMPTS):
                row = await conn.fetchrow(self._acquire_sql, session_id, owner, ttl, now())
                if row is not None:
                    return Lease(session_id, owner, row["lease_token"], row["lease_expires"])
                held, last_token, clock = await self._held(conn, session_id)
                granted(session_id, held, last_token, owner, ttl, clock)  # raises if busy
            raise SessionBusyError(session_id)  # it changed hands at every look

        # sent again by the same owner, it finds itself the holder: the same lease
        return await self._with(work, idempotent=True)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """See :meth:`Store.renew_lease`. Expiry is judged by the server's clock."""
        check_lease(lease)
        check_lease_request(lease.session_id, lease.owner, ttl)
        session_id = lease.session_id

        async def work(conn: Conn) -> Lease:
            row = await conn.fetchrow(self._renew_sql, session_id, lease.token, ttl, now())
            if row is not None:
                return Lease(session_id, row["lease_owner"], lease.token, row["lease_expires"])
            held, _, clock = await self._held(conn, session_id)
            renewed(lease, held, ttl, clock)  # raises: it is not the held one
            raise LeaseLostError(session_id, lease.token, "it changed while it was renewed")

        return await self._with(work, idempotent=True)

    async def release_lease(self, lease: Lease) -> None:
        """See :meth:`Store.release_lease`."""
        check_lease(lease)

        async def work(conn: Conn) -> None:
            await conn.execute(self._release_sql, lease.session_id, lease.token)

        await self._with(work, idempotent=True)
