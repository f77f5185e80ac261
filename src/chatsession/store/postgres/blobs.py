"""Bytes kept beside a session's log: blobs (named by their content) and its snapshot."""

from __future__ import annotations

import hashlib

from chatsession.errors import BlobNotFoundError, InvalidArgumentError, SessionNotFoundError
from chatsession.store.base import check_blob, check_snapshot, now, validate_id
from chatsession.store.postgres.connection import Conn
from chatsession.store.postgres.rows import Rows
from chatsession.store.records import check_visible


class Blobs(Rows):
    """Tables ``blobs`` (``(session_pk, id)``) and ``snapshots`` (one row per session)."""

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        check_blob(data, media_type)  # before any I/O
        content = bytes(data)
        blob_id = hashlib.sha256(content).hexdigest()

        async def work(conn: Conn) -> None:
            row = await self._visible_row(conn, session_id)
            await conn.execute(
                f"INSERT INTO {self._s}.blobs (session_pk, id, media_type, data) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                row["pk"],
                blob_id,
                media_type,
                content,
            )

        await self._with(work, idempotent=True)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")

        async def work(conn: Conn) -> bytes:
            row = await self._visible_row(conn, session_id)
            pks = [pk for (pk, _), _ in await self._lineage(conn, session_id, row)]
            # blobs are named by their content's hash: any copy found is the one
            data = await conn.fetchval(
                f"SELECT data FROM {self._s}.blobs WHERE session_pk = ANY($1::bigint[]) "
                "AND id = $2 LIMIT 1",
                pks,
                blob_id,
            )
            if data is None:
                raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")
            return bytes(data)

        return await self._with(work, idempotent=True)

    async def put_snapshot(self, session_id: str, seq: int, data: bytes) -> None:
        """See :meth:`Store.put_snapshot`.

        One statement: the session's row is share-locked (so a concurrent
        delete cannot leave the snapshot behind), and the snapshot is written
        only if ``seq`` is within the head and not below the kept one's.
        """
        validate_id(session_id)
        check_snapshot(seq, data)  # before any I/O
        s = self._s
        sql = f"""
            WITH target AS (
                SELECT pk, head, deleted, expires_at FROM {s}.sessions WHERE id = $1
                FOR KEY SHARE
            ), kept AS (
                INSERT INTO {s}.snapshots (session_pk, seq, data)
                SELECT pk, $2, $3 FROM target
                WHERE NOT deleted AND (expires_at IS NULL OR expires_at > $4) AND $2 <= head
                ON CONFLICT (session_pk) DO UPDATE SET seq = EXCLUDED.seq, data = EXCLUDED.data
                    WHERE {s}.snapshots.seq <= EXCLUDED.seq
            )
            SELECT head, deleted, expires_at FROM target"""

        async def work(conn: Conn) -> None:
            at = now()
            row = await conn.fetchrow(sql, session_id, seq, data, at)
            if row is None:
                raise SessionNotFoundError(session_id)
            check_visible(session_id, row["deleted"], row["expires_at"], at)
            if seq > row["head"]:
                raise InvalidArgumentError(
                    f"a snapshot of session {session_id!r} at seq {seq} is past its head "
                    f"{row['head']}"
                )

        await self._with(work, idempotent=True)

    async def get_snapshot(self, session_id: str) -> tuple[int, bytes] | None:
        """See :meth:`Store.get_snapshot`."""
        validate_id(session_id)
        s = self._s
        sql = (
            f"SELECT s.deleted, s.expires_at, n.seq, n.data FROM {s}.sessions s "
            f"LEFT JOIN {s}.snapshots n ON n.session_pk = s.pk WHERE s.id = $1"
        )

        async def work(conn: Conn) -> tuple[int, bytes] | None:
            row = await conn.fetchrow(sql, session_id)
            if row is None:
                raise SessionNotFoundError(session_id)
            check_visible(session_id, row["deleted"], row["expires_at"])
            return None if row["seq"] is None else (row["seq"], bytes(row["data"]))

        return await self._with(work, idempotent=True)
