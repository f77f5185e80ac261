"""What only the PostgreSQL backend does: options, migrations, processes, outages."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import asyncpg.exceptions as pgerr
import pytest

import chatsession.store.postgres as pg_store
from chatsession import (
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoredEvent,
    StoreError,
    StoreUnavailableError,
    UsageError,
    open_store,
)
from chatsession.store.postgres import MIGRATIONS, PostgresStore
from tests.store.tcp_proxy import TCPProxy

POSTGRES_URL = os.environ.get(
    "CHATSESSION_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
WRITER = Path(__file__).with_name("turn_writer.py")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A unique schema, dropped afterwards."""
    name = f"cstest_{uuid.uuid4().hex[:10]}"
    yield name
    conn = await asyncpg.connect(POSTGRES_URL)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    await conn.close()


def ev(n: int) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0)


def test_options_and_masking() -> None:
    store = open_store(
        "postgresql://u:secret@127.0.0.1:5432/test?schema=app&synchronous_commit=off&max_size=3"
    )
    assert isinstance(store, PostgresStore)
    assert (store.schema, store.synchronous_commit) == ("app", "off")
    assert "secret" not in store.url
    for bad in (
        "postgresql://127.0.0.1/test?schema=Bad-Name",
        "postgresql://127.0.0.1/test?pool=3",
        "postgresql://127.0.0.1/test?synchronous_commit=maybe",
        "postgresql://127.0.0.1/test?max_size=many",
    ):
        with pytest.raises(InvalidURLError):
            open_store(bad)


async def test_synchronous_commit_off_is_applied(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}&synchronous_commit=off") as store:
        await store.create(SessionRecord(id="s"))
        value = await store._with(lambda conn: conn.fetchval("SHOW synchronous_commit"))  # type: ignore[attr-defined]
    assert value == "off"


async def test_migrations_once_with_eight_stores_starting_together(schema: str) -> None:
    url = f"{POSTGRES_URL}?schema={schema}"
    stores = [open_store(url) for _ in range(8)]
    await asyncio.gather(*(s.create(SessionRecord(id=f"s{i}")) for i, s in enumerate(stores)))
    for s in stores:
        await s.aclose()
    conn = await asyncpg.connect(POSTGRES_URL)
    names = [r[0] for r in await conn.fetch(f'SELECT name FROM "{schema}".chatsession_migrations')]
    count = await conn.fetchval(f'SELECT count(*) FROM "{schema}".sessions')
    await conn.close()
    assert names == [name for name, _ in MIGRATIONS]
    assert count == 8


async def pg(sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement on a connection of its own (not the store's)."""
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def column_type(schema: str) -> str:
    rows = await pg(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = $1 "
        "AND table_name = 'events' AND column_name = 'data'",
        schema,
    )
    return str(rows[0][0])


async def migrations_done(schema: str) -> list[tuple[str, Any]]:
    rows = await pg(f'SELECT name, applied_at FROM "{schema}".chatsession_migrations ORDER BY name')
    return [(r[0], r[1]) for r in rows]


async def read_all(store: Store, session_id: str, **window: int) -> list[StoredEvent]:
    return [r async for b in store.read(session_id, **window) for r in b]


async def test_an_older_schema_is_upgraded(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{POSTGRES_URL}?schema={schema}"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="old"))
        await store.append("old", [ev(1)], 0)

    def add_note_column(s: str) -> list[str]:
        return [f"ALTER TABLE {s}.sessions ADD COLUMN note text"]

    monkeypatch.setattr(pg_store, "MIGRATIONS", [*MIGRATIONS, ("999_test_note", add_note_column)])
    async with open_store(url) as store:
        assert (await store.get("old")).head == 1  # old data still readable
    column = await pg(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 AND column_name = 'note'",
        schema,
    )
    assert [name for name, _ in await migrations_done(schema)] == [
        *(name for name, _ in MIGRATIONS),
        "999_test_note",
    ]
    assert column[0][0] == 1


async def make_database_at(schema: str, migrations: int, payloads: list[str]) -> None:
    """A database as an older version left it: the first ``migrations`` applied,
    session ``old`` with ``payloads`` as events 1.. (kept as the column takes them),
    and ``fork``, a fork of it at seq 2. Made by SQL: this version's store needs
    its own schema."""
    s = f'"{schema}"'
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        async with conn.transaction():
            await conn.execute(f"CREATE SCHEMA {s}")
            await conn.execute(
                f"CREATE TABLE {s}.chatsession_migrations "
                "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for name, migration in MIGRATIONS[:migrations]:
                for statement in migration(s):
                    await conn.execute(statement)
                await conn.execute(
                    f"INSERT INTO {s}.chatsession_migrations (name) VALUES ($1)", name
                )
            await conn.execute(
                f"INSERT INTO {s}.sessions (id, state, created_at, updated_at, head, children) "
                "VALUES ('old', 'active', 1, 1, $1, 1)",
                len(payloads),
            )
            await conn.execute(
                f"INSERT INTO {s}.sessions (id, state, created_at, updated_at, head, parent_pk, "
                f"parent_seq) SELECT 'fork', 'active', 2, 2, 2, pk, 2 FROM {s}.sessions"
            )
            for seq, text in enumerate(payloads, 1):
                await conn.execute(
                    f"INSERT INTO {s}.events (session_pk, seq, type, ts, v, data) "
                    f"SELECT pk, $1, 'message', 1.0, 1, $2 FROM {s}.sessions WHERE id = 'old'",
                    seq,
                    text,
                )
    finally:
        await conn.close()


async def make_previous_schema(schema: str, payloads: list[str]) -> None:
    """A database as the version before JSONB made it: ``data`` text, kept verbatim."""
    await make_database_at(schema, 1, payloads)
    assert await column_type(schema) == "text"


async def test_text_payloads_of_the_previous_schema_become_jsonb_once(schema: str) -> None:
    sent = ['{"n": 0}', '{ "z" : [1, 2.50 ,"x"],\n "a":{"k":null} }', '{"n":2,"n":3}']
    await make_previous_schema(schema, sent)
    url = f"{POSTGRES_URL}?schema={schema}"
    async with open_store(url) as store:
        rows = await read_all(store, "old")
        assert [json.loads(r.data) for r in rows] == [json.loads(t) for t in sent]
        assert rows[1].data == '{"a": {"k": null}, "z": [1, 2.50, "x"]}'  # normalised by jsonb
        assert [r.data for r in await read_all(store, "fork")] == [r.data for r in rows[:2]]
        assert await store.append("old", [ev(3)], 3) == 4
    assert await column_type(schema) == "jsonb"
    first = await migrations_done(schema)
    assert [name for name, _ in first] == [name for name, _ in MIGRATIONS]
    async with open_store(url) as store:  # run once: a later store finds it done
        assert len(await read_all(store, "old")) == 4
    assert await migrations_done(schema) == first


async def test_a_payload_that_is_not_json_stops_the_upgrade_and_changes_nothing(
    schema: str,
) -> None:
    await make_previous_schema(schema, ['{"n": 0}', "not json", '{"n": 2}'])
    store = open_store(f"{POSTGRES_URL}?schema={schema}")
    try:
        for _ in range(2):  # every call says so; never "not found", never an outage
            with pytest.raises(CorruptDataError, match="002_events_data_jsonb") as info:
                await store.get("old")
            assert "invalid input syntax for type json" in str(info.value)
    finally:
        await store.aclose()
    assert await column_type(schema) == "text"
    assert [name for name, _ in await migrations_done(schema)] == [MIGRATIONS[0][0]]
    await pg(f"""UPDATE "{schema}".events SET data = '{{"fixed": true}}' WHERE seq = 2""")
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        assert [json.loads(r.data) for r in await read_all(store, "old")] == [
            {"n": 0},
            {"fixed": True},
            {"n": 2},
        ]
    assert await column_type(schema) == "jsonb"


async def test_a_database_made_at_migration_002_is_upgraded_once(schema: str) -> None:
    url = f"{POSTGRES_URL}?schema={schema}"
    await make_database_at(schema, 2, [json.dumps({"n": n}) for n in (1, 2, 3)])
    assert await column_type(schema) == "jsonb"
    old_rows = f'SELECT session_pk, seq, data::text FROM "{schema}".events ORDER BY 1, 2 LIMIT 3'
    before = await pg(old_rows)
    stores = [open_store(url) for _ in range(4)]  # opened at once: 003 runs once
    try:
        heads = await asyncio.gather(*(s.get("old") for s in stores))
        assert {r.head for r in heads} == {3}
        store = stores[0]
        assert [json.loads(r.data)["n"] for r in await read_all(store, "old")] == [1, 2, 3]
        assert await store.append("old", [NewEvent("tool", AS_TEXT[0], 1.0)], 3) == 4
        assert await store.append("fork", [NewEvent("tool", AS_TEXT[1], 1.0), ev(9)], 2) == 4
        assert (await read_all(store, "old"))[3].data == AS_TEXT[0]
        fork = await read_all(store, "fork")
        assert [r.data for r in fork[:2]] == [r.data for r in (await read_all(store, "old"))[:2]]
        assert fork[2].data == AS_TEXT[1]
    finally:
        for s in stores:
            await s.aclose()
    after = await pg(old_rows)
    assert after == before  # the old rows are untouched
    done = await migrations_done(schema)
    assert [name for name, _ in done] == [name for name, _ in MIGRATIONS]
    assert done[-1][0] == "003_events_data_text"
    options = await pg(
        "SELECT reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = 'sessions'",
        schema,
    )
    assert options[0][0] == ["fillfactor=80"]
    async with open_store(url) as store:
        assert (await store.get("old")).head == 4
    assert await migrations_done(schema) == done


async def test_moving_the_head_keeps_the_session_row_on_its_page(schema: str) -> None:
    """Fillfactor 80 leaves room on each page, so the head UPDATE can stay HOT."""

    async def block(session_id: str) -> int:
        rows = await pg(
            f'SELECT (ctid::text::point)[0]::int FROM "{schema}".sessions WHERE id = $1',
            session_id,
        )
        return int(rows[0][0])

    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        ids = [f"s{i:03}" for i in range(150)]  # a few pages, filled to 80 %
        for session_id in ids:
            await store.create(SessionRecord(id=session_id))
        first = await block(ids[0])
        assert await block(ids[-1]) > first  # more than one page
        assert await store.append(ids[0], [ev(1), ev(2)], 0) == 2
        assert await block(ids[0]) == first
        # without the room (fillfactor 100) a row on a full page moves
        await pg(f'ALTER TABLE "{schema}".sessions SET (fillfactor = 100)')
        full = [f"f{i:03}" for i in range(150)]
        for session_id in full:
            await store.create(SessionRecord(id=session_id))
        victim = full[0]
        was = await block(victim)
        assert await block(full[-1]) > was
        assert await store.append(victim, [ev(1)], 0) == 1
        assert await block(victim) != was


async def test_payloads_are_jsonb_equal_json_and_bad_ones_are_refused(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))
        sent = '{"role":"user",   "content":"hi \\u00e9", "a":1e2}'
        assert await store.append("s", [NewEvent("message", sent, 1.0)], 0) == 1
        (row,) = await read_all(store, "s")
        assert row.data == '{"a": 100, "role": "user", "content": "hi é"}'
        assert json.loads(row.data) == json.loads(sent)
        rows = await pg(
            f"SELECT data->>'role' FROM \"{schema}\".events WHERE data @> '{{\"a\": 100}}'"
        )
        assert [r[0] for r in rows] == ["user"]  # queryable in place
        bad_ones = ["not json", '{"a": NaN}', '"\x00"', "not json \\u0000", "[1e131072", 5]
        for bad in bad_ones:  # the last ones would be kept as text, but are not JSON either
            with pytest.raises(UsageError, match="JSON text"):
                await store.append("s", [ev(2), NewEvent("message", bad, 1.0)], 1)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="out of range"):
            await store.append("s", [NewEvent("message", "{}", 1.0, None, 70_000)], 1)
        assert [r.seq for r in await read_all(store, "s")] == [1]  # nothing written
        assert await store.append("s", [ev(2)], 1) == 2


#: JSON texts jsonb cannot hold: kept as text, read back byte for byte.
AS_TEXT = [
    '{"out": "a\\u0000b",  "n": 1}',  # NUL
    '"\\ud800"',  # a lone high surrogate
    '["\\uDC00", "x"]',  # a lone low surrogate (upper-case hex)
    '"\\ud83d\\u0041"',  # a high surrogate followed by no low one
    '"\\ude00\\ud83d"',  # a pair in the wrong order
    '"\\\\\\u0000"',  # an escaped backslash, then a real NUL
    '{"big": 1e131072}',  # beyond numeric (found by the server, sent again as text)
    '[1e-16384, "\\u0000"]',
]
#: Look-alikes that jsonb does hold: kept as jsonb.
AS_JSONB = [
    '"\\ud83d\\ude00"',  # a surrogate pair (an emoji)
    '"\\\\u0000"',  # an escaped backslash before u0000: no NUL
    '"\\\\ud800"',
    '"\\u0001 \\u00e9"',
    "[1e131071, 1e-16383]",
]


def exact_json(text: str) -> Any:
    """``text`` parsed with numbers as ``Decimal`` (jsonb writes 1e131071 out in full)."""
    return json.loads(text, parse_int=Decimal, parse_float=Decimal)


async def kept_as(schema: str, session_id: str) -> dict[int, str]:
    """seq -> which column holds the payload ("data" or "data_text")."""
    rows = await pg(
        f'SELECT e.seq, e.data IS NULL AS is_text FROM "{schema}".events e '
        f'JOIN "{schema}".sessions s ON s.pk = e.session_pk WHERE s.id = $1',
        session_id,
    )
    return {r[0]: "data_text" if r[1] else "data" for r in rows}


def test_the_client_tells_what_jsonb_cannot_hold_like_the_server() -> None:
    for text in AS_TEXT[:6]:
        assert pg_store._needs_text(text), text
    for text in AS_JSONB:
        assert not pg_store._needs_text(text), text
    assert not pg_store._fits_numeric(AS_TEXT[6])
    assert pg_store._fits_numeric(AS_JSONB[-1])
    assert pg_store._fits_numeric("not json")  # the server judges it


async def test_the_escape_scan_agrees_with_the_server_on_every_mix() -> None:
    pieces = ["\\u0000", "\\ud800", "\\uDBFF", "\\udc00", "\\uDfFf", "\\\\", "\\n", "a", "\\u0041"]
    texts = ['"' + "".join(mix) + '"' for mix in itertools.product(pieces, repeat=3)]
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        for text in texts:
            try:
                await conn.fetchval("SELECT $1::text::jsonb", text)
                held = True
            except (pgerr.UntranslatableCharacterError, pgerr.InvalidTextRepresentationError):
                held = False
            assert pg_store._needs_text(text) is not held, text
    finally:
        await conn.close()


async def test_payloads_jsonb_cannot_hold_are_kept_as_exact_text(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))
        head = 0
        for text in AS_TEXT + AS_JSONB:  # one at a time: the VALUES form, then the text form
            head = await store.append("s", [NewEvent("tool", text, 2.5, "t1")], head)
        rows = await read_all(store, "s")
        assert [r.data for r in rows[: len(AS_TEXT)]] == AS_TEXT  # byte for byte
        assert [(r.type, r.ts, r.turn_id, r.schema_version) for r in rows] == [
            ("tool", 2.5, "t1", 1)
        ] * len(rows)
        for sent, back in zip(AS_JSONB, rows[len(AS_TEXT) :], strict=True):
            assert exact_json(back.data) == exact_json(sent)
        where = await kept_as(schema, "s")
        assert [where[seq] for seq in range(1, head + 1)] == ["data_text"] * len(AS_TEXT) + [
            "data"
        ] * len(AS_JSONB)
        assert json.loads(rows[0].to_json())["data"] == {"out": "a\x00b", "n": 1}


@pytest.mark.parametrize("size", [2, 16, 17, 40])
async def test_mixed_batches_keep_order_and_each_payload_where_it_fits(
    schema: str, size: int
) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(0)], 0)
        texts = [
            AS_TEXT[i % len(AS_TEXT)] if i % 3 == 1 else json.dumps({"n": i}) for i in range(size)
        ]
        batch = [
            NewEvent("message", t, float(i), None if i % 2 else f"t{i}")
            for i, t in enumerate(texts)
        ]
        with pytest.raises(ConflictError) as info:  # stale: nothing written, in every form
            await store.append("s", batch, 0)
        assert info.value.actual == 1
        with pytest.raises(SessionNotFoundError):
            await store.append("nope", batch, 0)
        assert await store.append("s", batch, 1) == size + 1
        rows = await read_all(store, "s", batch_size=3)
        assert [r.seq for r in rows] == list(range(1, size + 2))
        for i, (sent, back) in enumerate(zip(batch, rows[1:], strict=True)):
            assert (back.ts, back.turn_id) == (sent.ts, sent.turn_id)
            if i % 3 == 1:
                assert back.data == sent.data  # kept as text: exact
            else:
                assert json.loads(back.data) == json.loads(sent.data)
        window = await read_all(store, "s", after_seq=1, upto_seq=3)
        assert [r.data for r in window] == [r.data for r in rows[1:3]]
        where = await kept_as(schema, "s")
        assert sum(v == "data_text" for v in where.values()) == len(range(1, size, 3))


async def test_text_payloads_read_across_forks(schema: str) -> None:
    nul, lone = AS_TEXT[0], AS_TEXT[1]
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(1), NewEvent("tool", nul, 1.0), ev(3)], 0)
        await store.fork("p", 2, SessionRecord(id="f"))
        await store.append("f", [NewEvent("tool", lone, 1.0)], 2)
        await store.fork("f", 3, SessionRecord(id="g"))
        await store.append("g", [ev(4), NewEvent("tool", AS_TEXT[6], 1.0)], 3)
        await store.delete("p")  # its events stay for the forks
        await store.delete("f")
        rows = await read_all(store, "g")
        assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
        assert [rows[1].data, rows[2].data, rows[4].data] == [nul, lone, AS_TEXT[6]]
        assert [r.data for r in await read_all(store, "g", after_seq=1, upto_seq=3)] == [nul, lone]


async def test_exactly_one_payload_column_is_set_and_text_sessions_are_marked(
    schema: str,
) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        for session_id in ("plain", "text"):
            await store.create(SessionRecord(id=session_id))
            await store.append(session_id, [ev(1)], 0)
        await store.append("text", [NewEvent("tool", AS_TEXT[0], 1.0)], 1)
        await store.fork("text", 1, SessionRecord(id="fork"))  # inherits only jsonb rows
    marks = await pg(f'SELECT id, text_payloads FROM "{schema}".sessions ORDER BY id')
    assert [tuple(r) for r in marks] == [("fork", False), ("plain", False), ("text", True)]
    insert = (
        f'INSERT INTO "{schema}".events (session_pk, seq, type, ts, v, data, data_text) '
        f"SELECT pk, 9, 'm', 1, 1, $1::jsonb, $2 FROM \"{schema}\".sessions WHERE id = 'plain'"
    )
    for data, text in (("{}", "{}"), (None, None)):
        with pytest.raises(pgerr.CheckViolationError, match="events_data_or_data_text"):
            await pg(insert, data, text)


async def test_events_past_the_head_are_corrupt_data_not_an_endless_conflict(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1), ev(2)], 0)
        await pg(f'UPDATE "{schema}".sessions SET head = 1 WHERE id = $1', "s")
        with pytest.raises(CorruptDataError, match="head is 1"):
            await store.append("s", [ev(3)], 1)  # seq 2 is taken although the head is 1
        with pytest.raises(ConflictError) as info:  # a real conflict is still one
            await store.append("s", [ev(3)], 0)
        assert info.value.actual == 1


@pytest.mark.parametrize(
    ("raised", "expected", "words"),
    [
        (ConnectionResetError("reset by peer"), StoreUnavailableError, "unavailable"),
        (pgerr.InterfaceError("connection is closed"), StoreUnavailableError, "unavailable"),
        (pgerr.AdminShutdownError("terminating connection"), StoreUnavailableError, "unavailable"),
        (pgerr.QueryCanceledError("canceling statement"), StoreUnavailableError, "unavailable"),
        (pgerr.ReadOnlySQLTransactionError("read-only"), StoreUnavailableError, "refuses writes"),
        (pgerr.InvalidPasswordError("password failed"), InvalidURLError, "refused the login"),
        (pgerr.ClientConfigurationError("bad sslmode"), InvalidURLError, "cannot be used"),
        (pgerr.InterfaceError("another operation is in progress"), StoreError, "failed"),
        (pgerr.InsufficientPrivilegeError("permission denied"), StoreError, "denied"),
        (pgerr.UndefinedTableError("no such table"), CorruptDataError, "missing"),
        (pgerr.DeadlockDetectedError("deadlock detected"), StoreError, "3 times"),
    ],
)
async def test_driver_errors_are_translated_precisely(
    schema: str, raised: Exception, expected: type[Exception], words: str
) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))
        calls = 0

        async def fail(conn: Any) -> None:
            nonlocal calls
            calls += 1
            raise raised

        for tx in (False, True):
            with pytest.raises(expected, match=words) as info:
                await store._with(fail, tx=tx)  # type: ignore[attr-defined]
            assert info.value.__cause__ is raised
            assert not isinstance(info.value, SessionNotFoundError | ConflictError)
            if expected is not StoreUnavailableError:
                assert not isinstance(info.value, StoreUnavailableError)
        assert calls == (6 if isinstance(raised, pgerr.DeadlockDetectedError) else 2)
        assert (await store.get("s")).head == 0  # the store goes on


async def test_a_deadlock_is_retried(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        calls = 0

        async def flaky(conn: Any) -> int:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise pgerr.DeadlockDetectedError("deadlock detected")
            return int(await conn.fetchval("SELECT 7"))

        assert await store._with(flaky, tx=True) == 7  # type: ignore[attr-defined]
        assert calls == 3


async def test_a_refused_login_or_a_missing_database_is_a_bad_url_not_an_outage(
    schema: str,
) -> None:
    target = urlsplit(POSTGRES_URL)
    server = f"{target.hostname}:{target.port or 5432}"
    user = target.username or "postgres"
    for url, words in (
        (
            f"postgresql://no_such_role_cs@{server}{target.path}?schema={schema}",
            "refused the login",
        ),
        (f"postgresql://{user}@{server}/no_such_database_cs?schema={schema}", "does not exist"),
        (f"{POSTGRES_URL}?schema={schema}&sslmode=bogus", "cannot be used"),
    ):
        store = open_store(url)
        try:
            with pytest.raises(InvalidURLError, match=words):
                await store.get("s")
        finally:
            await store.aclose()


async def test_a_read_only_server_is_unavailable_for_writes(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}&max_size=1") as store:
        await store.create(SessionRecord(id="s"))
        await store._with(  # type: ignore[attr-defined]
            lambda conn: conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        )
        with pytest.raises(StoreUnavailableError, match="refuses writes"):
            await store.append("s", [ev(1)], 0)
        # that connection is replaced: a new one (a new primary, after a failover) writes
        assert await store.append("s", [ev(1)], 0) == 1


async def test_a_cancelled_statement_is_unavailable_and_the_store_goes_on(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))
        pid = await store._with(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))  # type: ignore[attr-defined]
        locker = await asyncpg.connect(POSTGRES_URL)
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute(f'SELECT 1 FROM "{schema}".sessions WHERE id = $1 FOR UPDATE', "s")
            task = asyncio.create_task(store.append("s", [ev(1)], 0))  # waits for the row lock
            for _ in range(200):
                waiting = await locker.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                )
                if waiting:
                    break
                await asyncio.sleep(0.01)
            assert await locker.fetchval("SELECT pg_cancel_backend($1)", pid)
            with pytest.raises(StoreUnavailableError, match="QueryCanceledError"):
                await task
            await tx.rollback()
        finally:
            await locker.close()
        assert await store.append("s", [ev(1)], 0) == 1


async def test_purge_deletes_in_bounded_batches(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_store, "_PURGE_BATCH", 7)
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        past = time.time() - 100
        for i in range(30):
            await store.create(SessionRecord(id=f"x{i}", expires_at=past + i))
        await store.create(SessionRecord(id="keep"))
        await store.create(SessionRecord(id="later", expires_at=time.time() + 3600))
        transactions = 0
        real = store._with  # type: ignore[attr-defined]

        async def counting(fn: Any, *, tx: bool = False) -> Any:
            nonlocal transactions
            transactions += tx
            return await real(fn, tx=tx)

        monkeypatch.setattr(store, "_with", counting)
        assert await store.purge_expired() == 30
        assert transactions == 5  # 7 + 7 + 7 + 7 + 2
        assert await store.purge_expired() == 0
    rows = await pg(f'SELECT id FROM "{schema}".sessions ORDER BY id')
    assert [r[0] for r in rows] == ["keep", "later"]


async def test_purge_skips_what_a_concurrent_delete_holds_and_never_deadlocks(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="p"))
        await store.fork("p", 0, SessionRecord(id="a"))
        past = time.time() - 100
        for session_id, at in (("p", past), ("a", past + 1)):  # p first, on disk too
            await pg(
                f'UPDATE "{schema}".sessions SET expires_at = $1 WHERE id = $2', at, session_id
            )
        deleter = await asyncpg.connect(POSTGRES_URL)
        try:
            # what delete("a") does: lock a, then (after its events) p, for p's fork count
            tx = deleter.transaction()
            await tx.start()
            await deleter.execute(
                f'SELECT 1 FROM "{schema}".sessions WHERE id = $1 FOR UPDATE', "a"
            )
            purge = asyncio.create_task(store.purge_expired())
            await asyncio.sleep(0.3)
            await asyncio.wait_for(
                deleter.execute(
                    f'UPDATE "{schema}".sessions SET children = children - 1 WHERE id = $1', "p"
                ),
                10,
            )
            assert await asyncio.wait_for(purge, 10) == 1  # p (kept for its fork); a skipped
            await tx.rollback()
        finally:
            await deleter.close()
        assert await store.purge_expired() == 1  # a, and p with it
    assert await pg(f'SELECT id FROM "{schema}".sessions') == []


@pytest.mark.parametrize("path", ["lane", "pool"])
@pytest.mark.parametrize("moment", ["begin", "statement"])
async def test_a_call_cancelled_mid_transaction_does_not_swallow_later_appends(
    schema: str, path: str, moment: str
) -> None:
    # min_size = max_size = 2: the lane plus one pooled connection, reused by every call
    store = open_store(f"{POSTGRES_URL}?schema={schema}&min_size=2&max_size=2")
    reader = open_store(f"{POSTGRES_URL}?schema={schema}")
    gate = asyncio.Event()
    hold: asyncio.Task[Any] | None = None
    locker: Any = None
    try:
        record = await store.create(SessionRecord(id="s"))
        if path == "pool":  # keep the fast lane busy: calls go through the pool
            hold = asyncio.create_task(store._with(lambda conn: gate.wait()))  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        if moment == "statement":  # the update waits for a row lock inside its transaction
            locker = await asyncpg.connect(POSTGRES_URL)
            await locker.execute("BEGIN")
            await locker.execute(f'SELECT 1 FROM "{schema}".sessions WHERE id = $1 FOR UPDATE', "s")
        task = asyncio.create_task(store.update(record, record.version))
        await asyncio.sleep(0 if moment == "begin" else 0.2)  # "begin": BEGIN is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if locker is not None:
            await locker.execute("ROLLBACK")
        assert await store.append("s", [ev(1)], 0) == 1
        assert (await reader.get("s")).head == 1  # committed: another store sees it
        assert [json.loads(r.data)["n"] for r in await read_all(reader, "s")] == [1]
    finally:
        gate.set()
        if hold is not None:
            await hold
        if locker is not None:
            await locker.close()
        await store.aclose()
        await reader.aclose()


async def test_a_transaction_left_open_on_the_fast_lane_is_rolled_back(schema: str) -> None:
    store = open_store(f"{POSTGRES_URL}?schema={schema}&min_size=1&max_size=1")
    reader = open_store(f"{POSTGRES_URL}?schema={schema}")
    try:
        await store.create(SessionRecord(id="s"))
        await store._with(lambda conn: conn.execute("BEGIN"))  # type: ignore[attr-defined]
        assert await store.append("s", [ev(1)], 0) == 1
        assert (await reader.get("s")).head == 1
    finally:
        await store.aclose()
        await reader.aclose()


async def test_read_checks_its_arguments_before_any_io() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    try:
        for kwargs in ({"after_seq": -1}, {"upto_seq": -1}, {"batch_size": 0}, {"after_seq": True}):
            with pytest.raises(ValueError, match="must be"):
                _ = [b async for b in store.read("s", **kwargs)]
    finally:
        await store.aclose()


async def test_a_session_deleted_while_it_is_read_is_not_found(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(n) for n in range(3)], 0)
        await store.fork("p", 3, SessionRecord(id="f"))
        await store.append("f", [ev(n) for n in range(3, 6)], 3)
        batches = store.read("f", batch_size=1)
        assert [r.seq for r in await anext(batches)] == [1]  # the parent's part is planned
        await store.delete("f")
        with pytest.raises(SessionNotFoundError, match="during the read"):
            async for _ in batches:
                pass
        assert len(await read_all(store, "p")) == 3


@pytest.mark.parametrize("sessions", [1, 50])
async def test_four_processes_times_250_turns(schema: str, sessions: int) -> None:
    url = f"{POSTGRES_URL}?schema={schema}"
    async with open_store(url) as store:
        for n in range(sessions):
            await store.create(SessionRecord(id=f"s{n}"))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WRITER),
            url,
            str(sessions),
            f"w{p}",
            "250",
            "--barrier",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for p in range(4)
    ]
    try:
        for proc in procs:  # all connected, then all started at once
            assert proc.stdout is not None and proc.stdin is not None
            ready = await asyncio.wait_for(proc.stdout.readline(), 60)
            if ready != b"READY\n":
                assert proc.stderr is not None
                pytest.fail(f"a writer did not start: {ready!r} {await proc.stderr.read()!r}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"GO\n")
        outs = [await proc.communicate() for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err.decode()
    acked: dict[tuple[str, int], str] = {}
    conflicts = 0
    for out, _ in outs:
        *lines, last = out.decode().splitlines()
        assert last.startswith("CONFLICTS "), last
        conflicts += int(last.split(" ")[1])
        for line in lines:
            _, sid, seq, payload = line.split(" ")
            assert (sid, int(seq)) not in acked
            acked[(sid, int(seq))] = payload
    assert len(acked) == 2000
    expected = {f"w{p}-{t}-{part}" for p in range(4) for t in range(250) for part in "ua"}
    assert set(acked.values()) == expected  # nothing lost, nothing twice
    async with open_store(url) as store:
        stored: list[str] = []
        for n in range(sessions):
            rows = await read_all(store, f"s{n}")
            assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
            payloads = [json.loads(r.data)["p"] for r in rows]
            for r, payload in zip(rows, payloads, strict=True):
                assert acked[(f"s{n}", r.seq)] == payload
            for user, assistant in zip(payloads[::2], payloads[1::2], strict=True):
                assert user.endswith("-u") and assistant == user[:-1] + "a"  # a turn stays whole
            stored += payloads
    assert sorted(stored) == sorted(expected)
    if sessions == 1:
        # Writers that ran one after another would conflict only on their first
        # append (3 in all) and write in 4 runs: proof that they ran at once.
        owners = [acked[("s0", seq)].split("-")[0] for seq in range(1, 2001, 2)]
        switches = sum(a != b for a, b in itertools.pairwise(owners))
        assert conflicts > 3, conflicts
        assert switches > 3, switches


async def test_connections_cut_while_appending_and_restored(schema: str) -> None:
    target = urlsplit(POSTGRES_URL)
    proxy = TCPProxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    store: Store | None = None
    direct: Store | None = None
    appender: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    try:
        netloc = (
            f"{target.username}@127.0.0.1:{proxy.port}"
            if target.username
            else f"127.0.0.1:{proxy.port}"
        )
        url = f"postgresql://{netloc}{target.path}?schema={schema}&connect_timeout=2&command_timeout=2"
        store = open_store(url)
        await store.create(SessionRecord(id="s"))
        acked: dict[int, int] = {}  # seq -> n of every acknowledged append
        failures = 0

        async def append_in_a_loop(store: Store) -> None:
            nonlocal failures
            head, n = 0, 0
            while not stop.is_set():
                try:
                    head = await store.append("s", [ev(n)], head)
                    acked[head] = n
                except StoreUnavailableError:
                    failures += 1
                    await asyncio.sleep(0.02)
                except ConflictError as exc:  # a failed append may have been written after all
                    assert exc.actual is not None
                    head = exc.actual
                n += 1

        appender = asyncio.create_task(append_in_a_loop(store))
        while len(acked) < 20:
            await asyncio.sleep(0.01)
        proxy.cut()  # the appender's call is in flight
        seen = len(acked)
        outage = re.escape(f"127.0.0.1:{proxy.port}")
        calls: list[Callable[[Store], Awaitable[object]]] = [
            lambda s: s.get("s"),
            lambda s: s.append("s", [ev(-1)], 1),
            lambda s: read_all(s, "s"),
            lambda s: s.fork("s", 1, SessionRecord(id="f")),
            lambda s: s.put_blob("s", b"blob"),
            lambda s: s.list_sessions(),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailableError, match=outage):
                await call(store)
        await asyncio.sleep(0.5)  # the appender keeps failing meanwhile
        proxy.restore()
        deadline = asyncio.get_running_loop().time() + 15
        while len(acked) < seen + 20:  # the same store object recovers
            assert asyncio.get_running_loop().time() < deadline, "no append after the outage"
            await asyncio.sleep(0.05)
        stop.set()
        await appender  # raises whatever else it met (never "not found")
        assert failures > 0
        direct = open_store(f"{POSTGRES_URL}?schema={schema}")
        for reader in (store, direct):
            rows = await read_all(reader, "s")
            assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
            numbers = [json.loads(r.data)["n"] for r in rows]
            assert len(set(numbers)) == len(numbers)  # nothing twice
            for seq, n in acked.items():  # nothing acknowledged lost
                assert numbers[seq - 1] == n
        head = (await store.get("s")).head
        assert await store.append("s", [ev(10_000)], head) == head + 1
        assert (await store.fork("s", 1, SessionRecord(id="f"))).head == 1
        assert await store.get_blob("s", await store.put_blob("s", b"blob")) == b"blob"
        assert len((await store.list_sessions()).records) == 2
    finally:
        stop.set()
        if appender is not None and not appender.done():
            appender.cancel()
            with contextlib.suppress(BaseException):
                await appender
        if store is not None:
            await store.aclose()
        if direct is not None:
            await direct.aclose()
        proxy.close()


async def test_unreachable_server_is_unavailable_not_missing() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1:1\b") as info:
        await store.get("anything")
    assert not isinstance(info.value, SessionNotFoundError)
    await store.aclose()
