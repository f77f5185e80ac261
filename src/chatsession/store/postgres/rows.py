"""Reading ``sessions`` rows: a session's record, whether it is visible, and its fork chain.

:class:`Rows` is what every concern of the store (records, events, leases,
blobs) reads a session through.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from chatsession.errors import InvalidIdError, SessionNotFoundError
from chatsession.store.base import SessionRecord, validate_id
from chatsession.store.postgres.connection import Conn, Connection
from chatsession.store.records import check_visible, decode_body, decode_record

_LINEAGE_PAGE = 1000  # ancestors fetched per recursive query

#: A session's row key and whether its payloads may be kept as text.
Segment = tuple[int, bool]


class Rows(Connection):
    """Session rows: records, visibility, fork chains."""

    _COLUMNS = (
        "s.pk, s.id, s.user_id, s.agent_id, s.window_id, s.state, s.created_at, s.updated_at, "
        "s.expires_at, p.id AS parent_id, s.parent_seq, s.head, s.version, "
        "COALESCE(s.body_text, s.body::text) AS body, "
        "s.deleted, s.children, s.parent_pk, s.text_payloads"
    )

    def __init__(self, url: str, **options: object) -> None:
        super().__init__(url, **options)
        s = self._s
        self._lineage_sql = f"""
            WITH RECURSIVE chain(pk, parent_pk, parent_seq, text_payloads, depth) AS (
                SELECT pk, parent_pk, parent_seq, text_payloads, 1 FROM {s}.sessions WHERE pk = $1
                UNION ALL
                SELECT p.pk, p.parent_pk, p.parent_seq, p.text_payloads, c.depth + 1
                FROM chain c JOIN {s}.sessions p ON p.pk = c.parent_pk
                WHERE c.depth < $2
            )
            SELECT pk, parent_pk, parent_seq, text_payloads FROM chain ORDER BY depth"""

    def _from(self) -> str:
        return f"{self._s}.sessions s LEFT JOIN {self._s}.sessions p ON p.pk = s.parent_pk"

    def _record(self, row: asyncpg.Record) -> SessionRecord:
        """The record a ``sessions`` row holds; ``CorruptDataError`` if it is damaged."""
        session_id = row["id"]
        where = "its record (table sessions)"
        try:
            validate_id(session_id)
        except InvalidIdError as exc:
            raise self._damaged(str(session_id)[:80], where, f"a bad id: {exc}") from None
        body = decode_body(row["body"], session_id, self._place(f"{where}, column body"))
        parent: dict[str, Any] | None = None
        if row["parent_pk"] is not None:
            if row["parent_id"] is None:
                raise self._damaged(
                    session_id, where, f"it names a parent (row {row['parent_pk']}) that is missing"
                )
            parent = {"session_id": row["parent_id"], "seq": row["parent_seq"]}
        head, fork_seq = row["head"], row["parent_seq"]
        if isinstance(head, int) and head < (fork_seq if parent and fork_seq is not None else 0):
            raise self._damaged(session_id, where, f"head {head} is before its fork point")
        fields = {
            "id": session_id,
            "user_id": row["user_id"],
            "agent_id": row["agent_id"],
            "window_id": row["window_id"],
            "state": row["state"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "expires_at": row["expires_at"],
            "parent": parent,
            "head": head,
            "version": row["version"],
            **body,
        }
        return decode_record(fields, session_id, self._place(where))

    async def _visible_row(self, conn: Conn, session_id: str, lock: bool = False) -> asyncpg.Record:
        sql = f"SELECT {self._COLUMNS} FROM {self._from()} WHERE s.id = $1"
        if lock:
            sql += " FOR UPDATE OF s"
        row = await conn.fetchrow(sql, session_id)
        if row is None:
            raise SessionNotFoundError(session_id)
        check_visible(session_id, row["deleted"], row["expires_at"])
        return row

    async def _lineage(
        self, conn: Conn, session_id: str, row: asyncpg.Record
    ) -> list[tuple[Segment, int]]:
        """``((pk, text_payloads), fork_seq)`` from ``row`` (the session's) up to the root.

        One recursive query per 1000 ancestors. Raises ``CorruptDataError`` for
        a chain that loops back on itself or names a missing row.
        """
        where = "its chain of fork parents (sessions.parent_pk)"

        def link(r: asyncpg.Record) -> tuple[Segment, int]:
            if r["parent_pk"] is not None and r["parent_seq"] is None:
                raise self._damaged(session_id, where, f"row {r['pk']} has no fork point")
            return ((r["pk"], r["text_payloads"]), r["parent_seq"] or 0)

        chain = [link(row)]
        seen = {row["pk"]}
        current = row["parent_pk"]
        while current is not None:
            rows = await conn.fetch(self._lineage_sql, current, _LINEAGE_PAGE)
            for r in rows:
                if r["pk"] in seen:
                    raise self._damaged(
                        session_id, where, f"it loops: row {r['pk']} is its own ancestor"
                    )
                seen.add(r["pk"])
                chain.append(link(r))
            if not rows or (len(rows) < _LINEAGE_PAGE and rows[-1]["parent_pk"] is not None):
                missing = rows[-1]["parent_pk"] if rows else current
                raise self._damaged(session_id, where, f"it names row {missing}, which is missing")
            current = rows[-1]["parent_pk"]
        return chain
