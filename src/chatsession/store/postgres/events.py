"""Events: the fenced, conditional append (one statement) and the streaming read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import asyncpg
import asyncpg.exceptions as pgerr

from chatsession.errors import (
    ConflictError,
    CorruptDataError,
    SessionArchivedError,
    SessionNotFoundError,
    UsageError,
)
from chatsession.store.base import (
    DEFAULT_READ_BATCH,
    Lease,
    NewEvent,
    StoredEvent,
    check_append,
    check_read,
    count_events,
    fork_segments,
    now,
    validate_id,
)
from chatsession.store.leases import check_lease_for, check_writer
from chatsession.store.postgres.connection import Conn
from chatsession.store.postgres.errors import describe
from chatsession.store.postgres.jsonb import fits_numeric, is_strict_json, jsonb_changes
from chatsession.store.postgres.rows import Rows, Segment
from chatsession.store.records import check_visible

_VALUES_MAX = 16  # appends of up to this many events (all jsonb) send one VALUES row each
_FIELDS = 6  # parameters per event in a VALUES row: NewEvent's fields, in order
_FIRST = 9  # the first event parameter: $1..$8 are the session, head, time, count, token, figures
_ATTEMPTS = 3  # a refused append whose cause was gone when looked at is sent again this often
_CLOCK = "date_part('epoch', clock_timestamp())"  # the server's clock, Unix seconds


async def _fetch(sql: str, args: tuple[Any, ...], conn: Conn) -> list[asyncpg.Record]:
    """Every page of events ``read`` fetches goes through here (one round trip)."""
    return await conn.fetch(sql, *args)


class Events(Rows):
    """The log: ``events`` rows keyed by ``(session_pk, seq)``."""

    def __init__(self, url: str, **options: object) -> None:
        super().__init__(url, **options)
        s = self._s
        self._append_cache: dict[tuple[int, bool], str] = {}
        where = "WHERE session_pk = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
        # a session with no payload kept as text (nearly all) reads jsonb as is
        self._read_sql = {
            False: f"SELECT seq, type, ts, turn_id, data, v, event_id FROM {s}.events {where}",
            True: "SELECT seq, type, ts, turn_id, COALESCE(data_text::json::text, data::text), "
            f"v, event_id FROM {s}.events {where}",
        }
        # why an append wrote nothing: the head, the state, the lease, and the id
        # of the event after expected_seq (an append sent again finds its own there)
        self._refused_sql = f"""
            SELECT s.head, s.deleted, s.expires_at, s.state, s.lease_owner, s.lease_token,
                s.lease_expires, {_CLOCK} AS clock,
                (SELECT e.event_id FROM {s}.events e
                    WHERE e.session_pk = s.pk AND e.seq = $2 + 1) AS next_event_id
            FROM {s}.sessions s WHERE s.id = $1"""

    # -- append ------------------------------------------------------------------

    def _append_sql(self, n: int, text: bool) -> tuple[str, str]:
        """The append statement for ``n`` events and the status it answers on success.

        It moves the head only if it is still ``expected_seq``, the session is
        not archived and the writer may write (``$5``, the lease's token: it
        must be the current holder's and unexpired by the server's clock;
        NULL: no live lease may be held), adds the events' figures (``$6``
        messages, ``$7`` tokens, ``$8`` bytes) to the session's, then inserts
        the events. Up to ``_VALUES_MAX`` events, all kept as jsonb: a
        ``VALUES`` row each, whose parameters are the events' fields in order
        (cheaper than ``unnest``). Otherwise ``unnest`` of one array per
        column, with ``data_text`` only when some payload is kept as text.
        """
        values = n <= _VALUES_MAX and not text
        key = (n if values else 0, text)
        sql = self._append_cache.get(key)
        if sql is None:
            s = self._s
            extra = ", data_text" if text else ""
            # data_text::json checks that it is JSON and gives back the same text
            head = f"""WITH moved AS (
                UPDATE {s}.sessions SET head = head + $4, updated_at = $3,
                    messages = messages + $6, tokens = tokens + $7::numeric, bytes = bytes + $8
                    {", text_payloads = true" if text else ""}
                WHERE id = $1 AND head = $2 AND NOT deleted AND state <> 'archived'
                    AND (expires_at IS NULL OR expires_at > $3)
                    AND CASE WHEN $5::bigint IS NULL
                        THEN lease_owner IS NULL OR lease_expires <= {_CLOCK}
                        ELSE lease_token = $5 AND lease_owner IS NOT NULL
                            AND lease_expires > {_CLOCK} END
                RETURNING pk
            )
            INSERT INTO {s}.events (session_pk, seq, type, ts, turn_id, v, data, event_id{extra})
            SELECT moved.pk, $2 + e.ord, e.type, e.ts, e.turn_id, e.v, e.data, e.event_id
                {", e.data_text::json::text" if text else ""}
            FROM moved, """
            if values:  # $9... : each event's type, data, ts, turn_id, schema_version, event_id
                rows = ", ".join(
                    "({}, ${}::text, ${}::jsonb, ${}::float8, ${}::text, ${}::int, ${}::text)".format(
                        i + 1, *range(_FIRST + _FIELDS * i, _FIRST + _FIELDS * (i + 1))
                    )
                    for i in range(n)
                )
                sql = f"{head}(VALUES {rows}) AS e(ord, type, data, ts, turn_id, v, event_id)"
            else:
                arrays = (
                    "$9::text[], $10::jsonb[], $11::float8[], $12::text[], $13::int[], $14::text[]"
                )
                arrays += ", $15::text[]" if text else ""
                sql = (
                    f"{head}unnest({arrays}) "
                    f"WITH ORDINALITY AS e(type, data, ts, turn_id, v, event_id{extra}, ord)"
                )
            self._append_cache[key] = sql
        return sql, f"INSERT 0 {n}"

    async def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_seq: int,
        *,
        lease: Lease | None = None,
    ) -> int:
        """See :meth:`Store.append`.

        One statement (one round trip, one transaction) checks the head, the
        lease and the session's visibility and writes the events. An append
        whose first event has an ``event_id`` is sent once more on a fresh
        connection when the reply was lost (it then recognises itself if it
        was done); one without is not, and raises ``StoreUnavailableError``.
        """
        check_append(events, expected_seq)
        validate_id(session_id)
        token = None if lease is None else check_lease_for(lease, session_id).token
        n = len(events)  # schema_version <= MAX_SCHEMA_VERSION, events.v's smallint
        figures = count_events(events)
        # a substring test and a regex search for most payloads; a scan or a parse for few
        as_text = [i for i, e in enumerate(events) if jsonb_changes(e.data)]

        def arguments(as_text: list[int]) -> tuple[str, str, list[Any]]:
            sql, status = self._append_sql(n, bool(as_text))
            args: list[Any] = [session_id, expected_seq, now(), n, token, *figures]
            if n <= _VALUES_MAX and not as_text:
                for e in events:
                    args.extend(e)
                return sql, status, args
            data: list[str | None] = [e.data for e in events]
            args += ([e.type for e in events], data, [e.ts for e in events])
            args += ([e.turn_id for e in events], [e.schema_version for e in events])
            args.append([e.event_id for e in events])
            if as_text:
                texts: list[str | None] = [None] * n
                for i in as_text:
                    texts[i], data[i] = data[i], None
                args.append(texts)
            return sql, status, args

        sql, status, args = arguments(as_text)

        async def work(conn: Conn) -> int:
            nonlocal sql, status, args, as_text
            for _ in range(_ATTEMPTS):
                try:
                    if await conn.execute(sql, *args) == status:
                        return expected_seq + n
                except asyncpg.UniqueViolationError:
                    raise await self._taken_seq(conn, session_id, expected_seq) from None
                except pgerr.DataError as exc:
                    # a number beyond numeric's range, which jsonb cannot hold: the
                    # statement wrote nothing; send it once more with those payloads as text
                    more = as_text
                    if isinstance(exc, pgerr.NumericValueOutOfRangeError):
                        more = [
                            i
                            for i, e in enumerate(events)
                            if i in as_text or not fits_numeric(e.data)
                        ]
                    if more == as_text:
                        raise UsageError(
                            f"cannot append to session {session_id!r}: PostgreSQL rejected an "
                            f"event ({describe(exc)}); nothing was written"
                        ) from exc
                    as_text = more
                    sql, status, args = arguments(as_text)
                    continue
                if await self._why_refused(conn, session_id, events, expected_seq, lease):
                    return expected_seq + n  # done before: its reply was lost
            raise ConflictError(session_id, expected_seq, None)

        return await self._with(work, idempotent=events[0].event_id is not None)

    async def _why_refused(
        self,
        conn: Conn,
        session_id: str,
        events: Sequence[NewEvent],
        expected_seq: int,
        lease: Lease | None,
    ) -> bool:
        """Raise what kept an append from being written, or return True if it already was.

        Called when the append statement wrote nothing. Returns True when the
        event after ``expected_seq`` carries the first event's id (this append
        was done before: its reply was lost), False when nothing is wrong any
        more (the lease was released meanwhile: send it again).

        Raises:
            SessionNotFoundError: The session is gone or expired.
            ConflictError: The head is not ``expected_seq``.
            SessionArchivedError: The session is archived.
            LeaseLostError: ``lease`` is not the current one or expired.
            SessionBusyError: No ``lease`` and another writer holds a live one.
        """
        row = await conn.fetchrow(self._refused_sql, session_id, expected_seq)
        if row is None:
            raise SessionNotFoundError(session_id)
        check_visible(session_id, row["deleted"], row["expires_at"])
        head = row["head"]
        if head != expected_seq:
            first_id = events[0].event_id
            if first_id is not None and head > expected_seq and row["next_event_id"] == first_id:
                return True
            raise ConflictError(session_id, expected_seq, head)
        if row["state"] == "archived":
            raise SessionArchivedError(session_id)
        held = None
        if row["lease_owner"] is not None:
            held = Lease(session_id, row["lease_owner"], row["lease_token"], row["lease_expires"])
        check_writer(session_id, held, lease, row["clock"])
        return False

    async def _taken_seq(self, conn: Conn, session_id: str, expected_seq: int) -> Exception:
        """The error for an append whose head matched but whose first seq is taken.

        Unless another writer moved the head since, the log is damaged, and a
        conflict would send the caller's retry loop round forever.
        """
        row = await self._visible_row(conn, session_id)
        if row["head"] != expected_seq:
            return ConflictError(session_id, expected_seq, row["head"])
        return CorruptDataError(
            f"session {session_id!r}: PostgreSQL holds events after seq {expected_seq} "
            f"but the session's head is {expected_seq} (the events and sessions tables "
            "disagree, as after a partial restore); restore both from one backup"
        )

    # -- read --------------------------------------------------------------------

    async def _page(
        self,
        session_id: str,
        pk: int,
        text: bool,
        start: int,
        hi: int,
        limit: int,
        conn: Conn,
    ) -> list[asyncpg.Record]:
        """Up to ``limit`` events of row ``pk`` with ``start < seq <= hi``, in order."""
        try:
            rows = await _fetch(self._read_sql[text], (pk, start, hi, limit), conn)
        except pgerr.InvalidTextRepresentationError:  # a data_text that is not JSON
            raise await self._bad_text(conn, session_id, pk, start, hi) from None
        if not text and any(r[4] is None for r in rows):
            # payloads kept as text in a session not marked so (a partial restore):
            # read them as text, as they were acknowledged
            return await self._page(session_id, pk, True, start, hi, limit, conn)
        if text and any(r[4] is None for r in rows):
            seq = next(r[0] for r in rows if r[4] is None)
            raise self._damaged(session_id, f"event {seq} (table events)", "it has no payload")
        return rows

    async def _bad_text(
        self, conn: Conn, session_id: str, pk: int, start: int, hi: int
    ) -> CorruptDataError:
        """The error naming the first event of row ``pk`` whose ``data_text`` is not JSON."""
        rows = await conn.fetch(
            f"SELECT seq, data_text FROM {self._s}.events WHERE session_pk = $1 AND seq > $2 "
            "AND seq <= $3 AND data_text IS NOT NULL ORDER BY seq",
            pk,
            start,
            hi,
        )
        bad = next((r["seq"] for r in rows if not is_strict_json(r["data_text"])), None)
        where = f"event {bad}" if bad is not None else f"an event in {start + 1}..{hi}"
        return self._damaged(session_id, f"{where} (events.data_text)", "it is not JSON")

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`.

        One query per batch (keyset on seq): the store holds one batch of
        ``batch_size`` events at a time. Payloads come back as JSON equal to
        what was appended, normalised by JSONB, or byte for byte for those kept
        as text (see the package docstring). A session deleted while it is read
        raises ``SessionNotFoundError`` at the next batch that misses rows.
        """
        check_read(after_seq, upto_seq, batch_size)
        validate_id(session_id)

        async def plan(
            conn: Conn,
        ) -> tuple[int, list[tuple[Segment, int, int]], list[asyncpg.Record]]:
            row = await self._visible_row(conn, session_id)
            lineage = await self._lineage(conn, session_id, row)
            segments = fork_segments(lineage, row["head"], after_seq, upto_seq)
            first: list[asyncpg.Record] = []
            if segments:
                (pk, text), lo, hi = segments[0]
                first = await self._page(session_id, pk, text, lo, hi, batch_size, conn)
            return row["pk"], segments, first

        own_pk, segments, rows = await self._with(plan, idempotent=True)
        make = StoredEvent._make
        for index, ((pk, text), lo, hi) in enumerate(segments):
            start = lo
            while start < hi:
                if index or start != lo:
                    page = partial(self._page, session_id, pk, text, start, hi, batch_size)
                    rows = await self._with(page, idempotent=True)
                expected = min(batch_size, hi - start)
                if len(rows) != expected or (
                    rows and (rows[0][0] != start + 1 or rows[-1][0] != start + expected)
                ):
                    await self._check_still_there(session_id, own_pk)
                    raise CorruptDataError(
                        f"session {session_id!r}: events {start + 1}..{start + expected} are "
                        f"incomplete in PostgreSQL (found {len(rows)}); restore from a backup"
                    )
                batch = list(map(make, rows))
                rows = []  # hold one batch, not two, while the caller works
                yield batch
                start += expected

    async def _check_still_there(self, session_id: str, pk: int) -> None:
        """Raise ``SessionNotFoundError`` if the session read as row ``pk`` is gone."""
        try:
            row = await self._with(
                lambda conn: self._visible_row(conn, session_id), idempotent=True
            )
        except SessionNotFoundError as exc:
            raise SessionNotFoundError(session_id, "deleted or expired during the read") from exc
        if row["pk"] != pk:
            raise SessionNotFoundError(session_id, "deleted during the read, and created again")
