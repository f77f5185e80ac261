"""Session records: create, get, update, delete, list, fork, purge and stats."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import asyncpg

from chatsession.errors import (
    ConflictError,
    CorruptDataError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
)
from chatsession.store.base import (
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    StoreStats,
    check_before,
    check_create,
    check_filters,
    check_fork_at,
    check_fork_point,
    check_limit,
    check_record,
    check_stats,
    check_version,
    decode_cursor,
    encode_cursor,
    initial_record,
    now,
    top_counts,
    updated_record,
    validate_id,
)
from chatsession.store.postgres.connection import Conn
from chatsession.store.postgres.jsonb import jsonb_changes
from chatsession.store.postgres.rows import Rows
from chatsession.store.records import check_visible, encode_body

_log = logging.getLogger("chatsession.store")
_PURGE_BATCH = 100  # sessions deleted per purge transaction


def _body(record: SessionRecord) -> tuple[str | None, str | None]:
    """The record's ``body`` for the jsonb column and for ``body_text``: one is None.

    Kept as text when jsonb would not give it back as the same values and
    types (a NUL in a string, ``-0.0``, ``1e+16``: see the package docstring).
    """
    text = encode_body(record)
    return (None, text) if jsonb_changes(text) else (text, None)


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


class Records(Rows):
    """Records: one ``sessions`` row per session."""

    def __init__(self, url: str, **options: object) -> None:
        super().__init__(url, **options)
        s = self._s
        columns = (
            "id, user_id, agent_id, window_id, state, created_at, updated_at, expires_at, "
            "head, version, body, body_text"
        )
        self._create_sql = (
            f"INSERT INTO {s}.sessions ({columns}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)"
        )
        # under the user's lock: count the user's visible sessions that are not
        # archived ($13: now) and insert only below the limit ($14); say whether
        # the id was taken, so that it is reported before the limit
        self._create_limited_sql = f"""
            WITH counted AS (
                SELECT count(*) AS n FROM {s}.sessions
                WHERE user_id = $2 AND NOT deleted AND state <> 'archived'
                    AND (expires_at IS NULL OR expires_at > $13)
            ), made AS (
                INSERT INTO {s}.sessions ({columns})
                SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12
                FROM counted WHERE counted.n < $14
                RETURNING pk
            )
            SELECT counted.n, (SELECT count(*) FROM made) AS made,
                EXISTS (SELECT 1 FROM {s}.sessions WHERE id = $1) AS taken
            FROM counted"""
        # one statement, so one snapshot: the sessions by state (past their
        # expiry apart), and the top users and agents with how many there are
        visible = "NOT deleted AND (expires_at IS NULL OR expires_at > $1)"

        def top(column: str) -> str:
            return f"""(SELECT '{column}', {column}, false, count(*), NULL::numeric,
                    NULL::numeric, NULL::numeric, count(*) OVER ()
                FROM {s}.sessions WHERE {visible} AND {column} IS NOT NULL
                GROUP BY {column} ORDER BY 4 DESC, {column} COLLATE "C" LIMIT $3)"""

        self._stats_sql = f"""
            (SELECT 'state' AS kind,
                    CASE WHEN state = 'active' AND updated_at < $2::float8 THEN 'idle'
                        ELSE state END AS key,
                    expires_at IS NOT NULL AND expires_at <= $1 AS expired,
                    count(*) AS n, sum(messages)::numeric AS messages, sum(tokens) AS tokens,
                    sum(bytes)::numeric AS bytes, NULL::bigint AS total
                FROM {s}.sessions WHERE NOT deleted GROUP BY 2, 3)
            UNION ALL {top("user_id")}
            UNION ALL {top("agent_id")}"""

    async def create(
        self, record: SessionRecord, *, max_per_user: int | None = None
    ) -> SessionRecord:
        """See :meth:`Store.create`.

        With ``max_per_user``, one transaction takes a lock on the user
        (``pg_advisory_xact_lock`` of a hash of the schema and the user id:
        transaction-scoped, so it works through poolers, and released by the
        commit), then counts and inserts in one statement, which sees every
        create committed by an earlier holder of the lock, in any process.
        """
        check_create(record, max_per_user)  # before any I/O
        stored = initial_record(record)
        body, body_text = _body(stored)
        args = (*_identity(stored), stored.head, stored.version, body, body_text)

        async def work(conn: Conn) -> None:
            try:
                await conn.execute(self._create_sql, *args)
            except asyncpg.UniqueViolationError:
                raise SessionExistsError(stored.id) from None

        async def limited(conn: Conn, user_id: str, limit: int) -> None:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"chatsession:{self.schema}:user:{user_id}",
            )
            try:
                (row,) = await conn.fetch(self._create_limited_sql, *args, now(), limit)
            except asyncpg.UniqueViolationError:
                raise SessionExistsError(stored.id) from None
            if row["taken"]:
                raise SessionExistsError(stored.id)
            if not row["made"]:
                raise SessionLimitError(user_id, limit, row["n"])

        user_id = stored.user_id
        if max_per_user is None or user_id is None:  # check_create: a limit has a user
            await self._with(work)
        else:
            await self._with(partial(limited, user_id=user_id, limit=max_per_user), tx=True)
        return stored

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)
        row = await self._with(lambda conn: self._visible_row(conn, session_id), idempotent=True)
        return self._record(row)

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        check_record(record)  # before any I/O
        check_version(expected_version)
        sql = (
            f"UPDATE {self._s}.sessions SET user_id = $2, agent_id = $3, window_id = $4, "
            "state = $5, expires_at = $6, updated_at = $7, version = $8, body = $9::jsonb, "
            "body_text = $10 WHERE id = $1"
        )

        async def work(conn: Conn) -> SessionRecord:
            current = self._record(await self._visible_row(conn, record.id, lock=True))
            if current.version != expected_version:
                raise ConflictError(record.id, expected_version, current.version, "version")
            new = updated_record(current, record)
            await conn.execute(
                sql,
                new.id,
                new.user_id,
                new.agent_id,
                new.window_id,
                new.state,
                new.expires_at,
                new.updated_at,
                new.version,
                *_body(new),
            )
            return new

        return await self._with(work, tx=True)

    async def _remove(self, conn: Conn, pk: int) -> None:
        """Delete row ``pk`` (or mark it deleted while forks need it), then the
        ancestors that were kept only for it. A loop, not a recursion: chains can
        be long, and a damaged one may come back round. The snapshot and the
        lease go at once; a row kept for its forks keeps only its events and
        blobs, which they read."""
        s = self._s
        current: int | None = pk
        seen: set[int] = set()
        while current is not None and current not in seen:
            seen.add(current)
            row = await conn.fetchrow(
                f"SELECT children, parent_pk FROM {s}.sessions WHERE pk = $1 FOR UPDATE", current
            )
            if row is None:
                return
            await conn.execute(f"DELETE FROM {s}.snapshots WHERE session_pk = $1", current)
            if row["children"] > 0:  # kept for its forks' reads: no lease, no snapshot
                await conn.execute(
                    f"UPDATE {s}.sessions SET deleted = true, lease_owner = NULL, "
                    "lease_expires = NULL WHERE pk = $1",
                    current,
                )
                return
            await conn.execute(f"DELETE FROM {s}.events WHERE session_pk = $1", current)
            await conn.execute(f"DELETE FROM {s}.blobs WHERE session_pk = $1", current)
            await conn.execute(f"DELETE FROM {s}.sessions WHERE pk = $1", current)
            parent = row["parent_pk"]
            if parent is None:
                return
            left = await conn.fetchrow(
                f"UPDATE {s}.sessions SET children = children - 1 WHERE pk = $1 "
                "RETURNING children, deleted",
                parent,
            )
            if left is None or left["children"] > 0 or not left["deleted"]:
                return
            current = parent

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
        """See :meth:`Store.list_sessions`.

        A damaged record is left out of the page (the page may then be
        shorter than ``limit``; paging goes on past it) and logged as a
        warning on the ``chatsession.store`` logger, naming the session.
        """
        sql, params = self._list_query(
            user_id=user_id,
            agent_id=agent_id,
            window_id=window_id,
            state=state,
            limit=limit,
            cursor=cursor,
        )
        rows = await self._with(lambda conn: conn.fetch(sql, *params), idempotent=True)
        records: list[SessionRecord] = []
        for row in rows[:limit]:
            try:
                records.append(self._record(row))
            except CorruptDataError as exc:
                _log.warning("list_sessions left out session %r: %s", row["id"], exc)
        next_cursor = None
        if len(rows) > limit:  # from the last row read, damaged or not, so paging goes on
            last = rows[limit - 1]
            next_cursor = encode_cursor(
                SessionRecord.model_construct(id=last["id"], created_at=last["created_at"])
            )
        return Page(records, next_cursor)

    def _list_query(
        self,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        window_id: str | None = None,
        state: SessionState | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[str, list[Any]]:
        """The statement ``list_sessions`` sends and its parameters (checked first).

        Filtered by owner (and state), it walks index ``sessions_by_user``
        (``sessions_by_user_state``) from the cursor, newest first, and stops
        after ``limit + 1`` rows: the cost follows the page and that user's
        sessions, not the whole table.
        """
        check_limit(limit)
        check_filters(user_id, agent_id, window_id, state)
        after = decode_cursor(cursor) if cursor is not None else None
        params: list[Any] = [now()]
        where = ["NOT s.deleted", "(s.expires_at IS NULL OR s.expires_at > $1)"]
        for column, value in (
            ("user_id", user_id),
            ("agent_id", agent_id),
            ("window_id", window_id),
            ("state", state),
        ):
            if value is None:
                continue
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
        return sql, params

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        check_fork_at(at_seq)  # before any I/O; past the head is found by the statement
        # checks the record before any I/O
        stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
        body, body_text = _body(stored)
        s = self._s
        # one statement (one round trip, one transaction): lock the parent, insert
        # the fork if the parent is visible and has the fork point, count the fork
        sql = f"""
            WITH parent AS (
                SELECT pk, head, deleted, expires_at FROM {s}.sessions WHERE id = $1 FOR UPDATE
            ), ok AS (
                SELECT pk FROM parent
                WHERE NOT deleted AND (expires_at IS NULL OR expires_at > $15) AND $10 <= head
            ), ins AS (
                INSERT INTO {s}.sessions (id, user_id, agent_id, window_id, state, created_at,
                    updated_at, expires_at, parent_pk, parent_seq, head, version, body, body_text)
                SELECT $2, $3, $4, $5, $6, $7, $8, $9, ok.pk, $10, $11, $12, $13::jsonb, $14
                FROM ok
                RETURNING parent_pk
            ), counted AS (
                UPDATE {s}.sessions SET children = children + 1
                WHERE pk IN (SELECT parent_pk FROM ins)
            )
            SELECT head, deleted, expires_at, (SELECT count(*) FROM ins) AS made FROM parent
        """

        async def work(conn: Conn) -> SessionRecord:
            r = stored
            at = now()
            try:
                row = await conn.fetchrow(
                    sql, session_id, *_identity(r), at_seq, r.head, r.version, body, body_text, at
                )
            except asyncpg.UniqueViolationError:
                raise SessionExistsError(r.id) from None
            if row is None:
                raise SessionNotFoundError(session_id)
            check_visible(session_id, row["deleted"], row["expires_at"], at)
            if not row["made"]:
                check_fork_point(session_id, at_seq, row["head"])
                raise SessionNotFoundError(session_id, "expired")  # expired as the call ran
            return stored

        return await self._with(work)

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`.

        Deletes in transactions of at most 100 sessions, oldest expiry first,
        until one finds none left. Each transaction picks its sessions with
        ``FOR UPDATE SKIP LOCKED``: purges running at once (in any process)
        pick disjoint sessions, so each session is deleted, and counted, by
        one of them; a session kept for its forks is marked ``deleted`` and no
        purge picks it again. Sessions another call holds locked (a concurrent
        ``delete``, an append, a purge that is removing a parent its last fork
        no longer needs) are skipped, so purges never wait for, or deadlock
        with, other calls: a purge that freed such a parent picks it in its
        next transaction, anything else is left for that call or the next purge.
        """
        check_before(before)
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
            if not done:
                return total

    async def stats(self, *, idle_before: float | None = None, top: int = 100) -> StoreStats:
        """See :meth:`Store.stats`.

        One statement (one snapshot): aggregates over the ``sessions`` table,
        whose ``messages``, ``tokens`` and ``bytes`` every append adds to; no
        event row is read. The server groups and sorts (the top users and
        agents by count, then by id in code point order, ``COLLATE "C"``);
        the store receives a few rows per state and the ``top`` users and
        agents, whatever the number of sessions.
        """
        check_stats(idle_before, top)
        at = now()
        idle = None if idle_before is None else float(idle_before)
        rows = await self._with(
            lambda conn: conn.fetch(self._stats_sql, at, idle, max(top, 1)), idempotent=True
        )
        stats = StoreStats()
        users: dict[str, int] = {}
        agents: dict[str, int] = {}
        for kind, key, expired, n, messages, tokens, size, total in rows:
            if kind == "state":
                if expired:
                    stats.by_state["expired"] += n
                    continue
                stats.sessions += n
                if key in stats.by_state:
                    stats.by_state[key] += n
                stats.messages += int(messages)
                stats.tokens += int(tokens)
                stats.bytes += int(size)
            elif kind == "user_id":
                stats.users = total
                users[key] = n
            else:
                stats.agents = total
                agents[key] = n
        # the server picked them; UNION ALL does not promise to keep their order
        stats.by_user, stats.by_agent = top_counts(users, top), top_counts(agents, top)
        return stats
