"""Session records: create, get, update, delete, list, fork and purge."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from chatsession.errors import (
    ConflictError,
    CorruptDataError,
    SessionExistsError,
    SessionNotFoundError,
)
from chatsession.store.base import (
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    check_before,
    check_filters,
    check_fork_at,
    check_fork_point,
    check_limit,
    check_record,
    check_version,
    decode_cursor,
    encode_cursor,
    initial_record,
    now,
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

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)  # checks the record before any I/O
        body, body_text = _body(stored)
        sql = (
            f"INSERT INTO {self._s}.sessions (id, user_id, agent_id, window_id, state, "
            "created_at, updated_at, expires_at, head, version, body, body_text) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)"
        )

        async def work(conn: Conn) -> None:
            try:
                await conn.execute(
                    sql, *_identity(stored), stored.head, stored.version, body, body_text
                )
            except asyncpg.UniqueViolationError:
                raise SessionExistsError(stored.id) from None

        await self._with(work)
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
        be long, and a damaged one may come back round. The snapshot goes at once."""
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
            if row["children"] > 0:
                await conn.execute(f"UPDATE {s}.sessions SET deleted = true WHERE pk = $1", current)
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
        skipping sessions that another call holds locked (a concurrent
        ``delete`` or ``purge_expired``): those are left for that call or the
        next purge, so purges never wait for, or deadlock with, other calls.
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
            if done < _PURGE_BATCH:
                return total
