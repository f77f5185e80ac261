"""What only the PostgreSQL backend does: options, migrations, processes, outages."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import asyncpg.exceptions as pgerr
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import chatsession.store.postgres.events as pg_events
import chatsession.store.postgres.jsonb as pg_jsonb
import chatsession.store.postgres.records as pg_records
import chatsession.store.postgres.rows as pg_rows
import chatsession.store.postgres.schema as pg_schema
from chatsession import (
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    NewEvent,
    ParentRef,
    SessionArchivedError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoredEvent,
    StoreError,
    StoreUnavailableError,
    UnsupportedValueError,
    open_store,
)
from chatsession.store.base import EVENT_SCHEMA_VERSION, check_payload, count_events
from chatsession.store.postgres import MIGRATIONS, PostgresStore
from tests.store.tcp_proxy import TCPProxy
from tests.strategies import json_texts

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
    assert "secret" not in store.url and "secret" not in repr(store)
    settings = store._settings  # type: ignore[attr-defined]
    assert (settings.max_size, settings.min_size, settings.password) == (3, 1, "secret")
    # keyword options override the URL's; a password may be an option too
    store = open_store(
        "postgresql://u@h/db?max_size=3&password=p%40ss%26sslmode%3Ddisable",
        max_size=5,
        command_timeout=2,
    )
    settings = store._settings  # type: ignore[attr-defined]
    assert (settings.max_size, settings.command_timeout) == (5, 2.0)
    assert settings.password == "p@ss&sslmode=disable"  # decoded, and nothing more
    assert settings.sslmode is None
    assert "p%40ss" not in store.url and "***" in store.url
    assert store.synchronous_commit is None  # not asked for: the server's setting applies


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("postgresql:///db", {"database": "db"}),
        ("postgresql://:5433/db", {"port": 5433, "database": "db"}),
        ("postgres://h/db", {"host": "h", "database": "db"}),
        ("postgresql://[::1]:6000/db", {"host": "::1", "port": 6000, "database": "db"}),
        (
            "postgresql://h1:5,h2/db",
            {"host": ["h1", "h2"], "port": [5, 5432], "database": "db"},
        ),
        (
            "postgresql://u%40x:p%3Aw%2F@h/d%2Fb?sslmode=verify-full&application_name=a%20b",
            {
                "host": "h",
                "user": "u@x",
                "password": "p:w/",
                "database": "d/b",
                "ssl": "verify-full",
                "server_settings": {"application_name": "a b"},
            },
        ),
        (
            "postgresql://h/db?synchronous_commit=off&password=a%26b%3Dc",
            {
                "host": "h",
                "database": "db",
                "password": "a&b=c",
                "server_settings": {"synchronous_commit": "off"},
            },
        ),
    ],
)
def test_urls_become_driver_arguments_not_a_connection_string(
    url: str, kwargs: dict[str, Any]
) -> None:
    store = PostgresStore.from_url(url)
    assert store._settings.connect_kwargs() == kwargs  # type: ignore[attr-defined]


#: Each is refused by open_store with InvalidURLError, before any I/O.
BAD_URLS = [
    "postgresql://127.0.0.1/test?schema=Bad-Name",
    "postgresql://127.0.0.1/test?pool=3",  # unknown option
    "postgresql://127.0.0.1/test?host=/tmp",  # a libpq parameter not taken from the URL
    "postgresql://127.0.0.1/test?synchronous_commit=maybe",
    "postgresql://127.0.0.1/test?max_size=many",
    "postgresql://127.0.0.1/test?max_size=0",
    "postgresql://127.0.0.1/test?max_size=1_0",
    "postgresql://127.0.0.1/test?min_size=5&max_size=2",
    "postgresql://127.0.0.1/test?command_timeout=nan",
    "postgresql://127.0.0.1/test?connect_timeout=inf",
    "postgresql://127.0.0.1/test?connect_timeout=-1",
    "postgresql://127.0.0.1/test?sslmode=bogus",
    "postgresql://127.0.0.1/test?sslmode=require&sslmode=disable",  # repeated
    "postgresql://127.0.0.1/test?schema=a&schema=b",
    "postgresql://127.0.0.1/test?application_name=%0Aevil",
    "postgresql://127.0.0.1/test?application_name=" + "x" * 64,
    "postgresql://127.0.0.1/test?schema",  # not name=value
    "postgresql://127.0.0.1/test?&schema=a",
    "postgresql://127.0.0.1:port/test",  # a port that is not a number
    "postgresql://127.0.0.1:0/test",
    "postgresql://127.0.0.1:65536/test",
    "postgresql://127.0.0.1:/test",
    "postgresql://[::1/test",
    "postgresql://h1:5432,/test",
    "postgresql://u@127.0.0.1/te%00st",
    "postgresql://127.0.0.1/test#frag",
]
#: Passwords written without %-encoding their '/', '?' or '#': refused, never shown.
CUT_PASSWORDS = [
    "postgresql://alice:ab/cd@127.0.0.1/test",
    "postgresql://alice:12/cd@127.0.0.1/test",  # would parse as host alice, port 12
    "postgresql://alice:ab?cd@127.0.0.1/test",
    "postgresql://alice:12?cd@127.0.0.1/test",
    "postgresql://alice:12?cd=@127.0.0.1/test",
    "postgresql://alice:12?schema=cd@127.0.0.1/test",
    "postgresql://alice:ab#cd@127.0.0.1/test",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_urls_are_refused_without_showing_the_password(url: str) -> None:
    with_password = url.replace("://", "://alice:s3cr%2Ft@", 1) if "@" not in url else url
    with pytest.raises(InvalidURLError) as info:
        open_store(with_password)
    assert "s3cr" not in str(info.value)
    with pytest.raises(InvalidURLError) as info:
        open_store(url + ("&" if "?" in url else "?") + "password=hunter2")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("url", CUT_PASSWORDS)
def test_a_password_cut_short_by_a_reserved_character_is_not_shown(url: str) -> None:
    with pytest.raises(InvalidURLError) as info:
        PostgresStore.from_url(url)
    assert "cd" not in str(info.value).replace("encod", "")


def test_an_at_sign_in_an_option_value_is_written_percent_encoded() -> None:
    with pytest.raises(InvalidURLError, match="%40"):
        PostgresStore.from_url("postgresql:///db?application_name=me@laptop")
    store = PostgresStore.from_url("postgresql:///db?application_name=me%40laptop")
    assert store._settings.application_name == "me@laptop"  # type: ignore[attr-defined]
    store = PostgresStore.from_url("postgresql://u@h/db?application_name=me@laptop")
    assert store._settings.application_name == "me@laptop"  # type: ignore[attr-defined]


def test_bad_keyword_options_are_refused() -> None:
    url = "postgresql://127.0.0.1/test"
    for options in (
        {"pool": 3},
        {"max_size": "3x"},
        {"max_size": True},
        {"max_size": 2.5},
        {"command_timeout": math.nan},
        {"command_timeout": "soon"},
        {"sslmode": 1},
        {"password": 5},
        {"schema": "Bad"},
    ):
        with pytest.raises(InvalidURLError):
            open_store(url, **options)
    with pytest.raises(InvalidURLError, match="given twice") as info:
        open_store("postgresql://u:first@127.0.0.1/test?password=second")
    assert "first" not in str(info.value) and "second" not in str(info.value)


async def test_an_encoded_ampersand_cannot_inject_connection_parameters(schema: str) -> None:
    """``sslmode=require`` must not silently become plaintext through another option's value."""
    injected = "x%26sslmode%3Ddisable%26host%3Dnowhere"
    # this server has no TLS: a store that really requires TLS cannot connect
    store = open_store(
        f"{POSTGRES_URL}?schema={schema}&sslmode=require&application_name={injected}"
    )
    try:
        with pytest.raises(StoreUnavailableError, match="SSL"):
            await store.get("s")
    finally:
        await store.aclose()
    store = open_store(f"{POSTGRES_URL}?schema={schema}&application_name={injected}")
    try:
        shown = await store._with(lambda conn: conn.fetchval("SHOW application_name"))  # type: ignore[attr-defined]
        assert shown == "x&sslmode=disable&host=nowhere"  # one value, as written
    finally:
        await store.aclose()


async def test_passwords_never_appear_in_urls_reprs_or_errors(schema: str) -> None:
    target = urlsplit(POSTGRES_URL)
    server = f"{target.hostname}:{target.port or 5432}"
    for url in (
        f"postgresql://no_such_role_cs:pw%3Dtopsecret@{server}/test?schema={schema}",
        f"postgresql://no_such_role_cs@{server}/test?schema={schema}&password=topsecret",
        "postgresql://no_such_role_cs:topsecret@127.0.0.1:1/test?connect_timeout=2",
    ):
        store = open_store(url)
        try:
            assert "topsecret" not in store.url and "topsecret" not in repr(store)
            with pytest.raises((InvalidURLError, StoreUnavailableError)) as info:
                await store.get("s")
            for exc in (info.value, info.value.__cause__):
                assert "topsecret" not in str(exc)
        finally:
            await store.aclose()


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

    monkeypatch.setattr(pg_schema, "MIGRATIONS", [*MIGRATIONS, ("999_test_note", add_note_column)])
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
        # 004: the old rows keep their jsonb body; a body jsonb cannot hold goes to text
        old = await store.update((await store.get("old")).model_copy(update={"title": "t"}), 1)
        assert (old.title, await body_columns(schema, "old")) == ("t", (True, False))
        await store.fork("old", 4, SessionRecord(id="nul", metadata={"x": "\x00"}))
        assert (await store.get("nul")).metadata == {"x": "\x00"}
        assert await body_columns(schema, "nul") == (False, True)
    finally:
        for s in stores:
            await s.aclose()
    after = await pg(old_rows)
    assert after == before  # the old rows are untouched
    done = await migrations_done(schema)
    assert [name for name, _ in done] == [name for name, _ in MIGRATIONS]
    assert [name for name, _ in done[2:]] == [
        "003_events_data_text",
        "004_sessions_body_text",
        "005_leases_event_ids_snapshots",
        "006_session_figures_user_states",
    ]
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
        sent = '{"role":"user",   "content":"hi \\u00e9", "a":100, "f":1.50}'
        assert await store.append("s", [NewEvent("message", sent, 1.0)], 0) == 1
        (row,) = await read_all(store, "s")
        assert row.data == '{"a": 100, "f": 1.50, "role": "user", "content": "hi é"}'
        assert same_json(json.loads(row.data), json.loads(sent))
        rows = await pg(
            f"SELECT data->>'role' FROM \"{schema}\".events WHERE data @> '{{\"a\": 100}}'"
        )
        assert [r[0] for r in rows] == ["user"]  # queryable in place
        bad_ones = ["not json", '{"a": NaN}', '"\x00"', "not json \\u0000", "[1e131072", 5]
        for bad in bad_ones + REFUSED:  # refused by the checks, before any I/O
            with pytest.raises(UnsupportedValueError, match="cannot be stored exactly"):
                await store.append("s", [ev(2), NewEvent("message", bad, 1.0)], 1)  # type: ignore[arg-type]
        with pytest.raises(UnsupportedValueError, match="32767"):
            await store.append("s", [NewEvent("message", "{}", 1.0, None, 70_000)], 1)
        assert [r.seq for r in await read_all(store, "s")] == [1]  # nothing written
        assert (await store.get("s")).head == 1
        assert await store.append("s", [ev(2)], 1) == 2


#: Escapes jsonb cannot hold (what the client scan must find). A lone surrogate
#: is not unicode, so the checks refuse those payloads before they get here.
ESCAPES_JSONB_CANNOT_HOLD = [
    '{"out": "a\\u0000b",  "n": 1}',  # NUL
    '"\\ud800"',  # a lone high surrogate
    '["\\uDC00", "x"]',  # a lone low surrogate (upper-case hex)
    '"\\ud83d\\u0041"',  # a high surrogate followed by no low one
    '"\\ude00\\ud83d"',  # a pair in the wrong order
    '"\\\\\\u0000"',  # an escaped backslash, then a real NUL
]
#: Beyond numeric: a plain decimal with more than 16383 digits after the point.
#: The client does not look for it; the server finds it and the append is sent
#: again with it as text.
BIG_FRACTION = '{"tiny": 0.' + "0" * 16383 + "1}"
#: JSON texts jsonb cannot hold, or would give back as other types: kept as
#: text, read back byte for byte.
AS_TEXT = [
    '{"out": "a\\u0000b",  "n": 1}',  # NUL
    '"\\\\\\u0000"',  # an escaped backslash, then a real NUL
    '[1e-16384, "\\u0000"]',  # beyond numeric (found by the client)
    BIG_FRACTION,  # beyond numeric (found by the server)
    '{"f": 1e16}',  # jsonb writes 10000000000000000: an int
    "[-0.0, 1.5e1, -0e3, 2E+2]",  # 0.0, 15, 0, 200: a lost sign, ints
]
#: Look-alikes that jsonb gives back as the same values and types: kept as jsonb.
AS_JSONB = [
    '"\\ud83d\\ude00"',  # a surrogate pair (an emoji)
    '"\\\\u0000"',  # an escaped backslash before u0000: no NUL
    '"\\\\ud800"',
    '"\\u0001 \\u00e9"',
    "[1.5, 1e-7, 12.5e-1, 100, -0, -0.5, 123456789012345678901234567890, 1e-16383]",
    '"1e16 and -0.0 in a string"',
]
#: Refused before any I/O (UnsupportedValueError): lone surrogates are not
#: unicode, and these numbers are infinite as floats.
REFUSED = [*ESCAPES_JSONB_CANNOT_HOLD[1:5], '{"big": 1e131072}', "[1e131071]"]


def same_json(a: Any, b: Any) -> bool:
    """Equal JSON values of the same types (``1.0`` is not ``1``; ``-0.0`` is not ``0.0``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


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
    for text in ESCAPES_JSONB_CANNOT_HOLD:
        assert pg_jsonb.needs_text(text), text
    for text in AS_JSONB:
        assert not pg_jsonb.needs_text(text), text
        assert not pg_jsonb.jsonb_changes(text), text
    for text in AS_TEXT:
        assert pg_jsonb.jsonb_changes(text) is (text != BIG_FRACTION), text
    assert not pg_jsonb.fits_numeric('{"big": 1e131072}')
    assert not pg_jsonb.fits_numeric(BIG_FRACTION)
    assert pg_jsonb.fits_numeric("[1e131071, 1e-16383]")
    assert pg_jsonb.fits_numeric("not json")  # the server judges it


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
            assert pg_jsonb.needs_text(text) is not held, text
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
            ("tool", 2.5, "t1", EVENT_SCHEMA_VERSION)
        ] * len(rows)
        for sent, back in zip(AS_JSONB, rows[len(AS_TEXT) :], strict=True):
            assert exact_json(back.data) == exact_json(sent)
            assert same_json(json.loads(back.data), json.loads(sent)), (sent, back.data)
        where = await kept_as(schema, "s")
        assert [where[seq] for seq in range(1, head + 1)] == ["data_text"] * len(AS_TEXT) + [
            "data"
        ] * len(AS_JSONB)
        assert json.loads(rows[0].to_json())["data"] == {"out": "a\x00b", "n": 1}
        assert same_json(json.loads(rows[5].data), [-0.0, 15.0, -0.0, 200.0])
        for text in REFUSED:  # lone surrogates, infinite floats: refused, nothing written
            with pytest.raises(UnsupportedValueError):
                await store.append("s", [ev(0), NewEvent("tool", text, 2.5)], head)
        assert (await store.get("s")).head == head
        assert len(await read_all(store, "s")) == head


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
                assert same_json(json.loads(back.data), json.loads(sent.data))
        window = await read_all(store, "s", after_seq=1, upto_seq=3)
        assert [r.data for r in window] == [r.data for r in rows[1:3]]
        where = await kept_as(schema, "s")
        assert sum(v == "data_text" for v in where.values()) == len(range(1, size, 3))


async def test_text_payloads_read_across_forks(schema: str) -> None:
    nul, floats = AS_TEXT[0], AS_TEXT[4]
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(1), NewEvent("tool", nul, 1.0), ev(3)], 0)
        await store.fork("p", 2, SessionRecord(id="f"))
        await store.append("f", [NewEvent("tool", floats, 1.0)], 2)
        await store.fork("f", 3, SessionRecord(id="g"))
        await store.append("g", [ev(4), NewEvent("tool", BIG_FRACTION, 1.0)], 3)
        await store.delete("p")  # its events stay for the forks
        await store.delete("f")
        rows = await read_all(store, "g")
        assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
        assert [rows[1].data, rows[2].data, rows[4].data] == [nul, floats, BIG_FRACTION]
        window = [r.data for r in await read_all(store, "g", after_seq=1, upto_seq=3)]
        assert window == [nul, floats]


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
    monkeypatch.setattr(pg_records, "_PURGE_BATCH", 7)
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
        assert transactions == 6  # 7 + 7 + 7 + 7 + 2, then one that finds none
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


# -- connections the server closed ------------------------------------------------


async def terminate(application_name: str) -> int:
    """``pg_terminate_backend`` every connection with that application_name (only the
    test's own store's), then wait until the server has let them all go."""
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            application_name,
        )
        for _ in range(500):
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                application_name,
            )
            if not left:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the client reads the server's goodbye
        return int(killed)
    finally:
        await conn.close()


async def backend_pids(application_name: str) -> set[int]:
    rows = await pg(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
    )
    return {r[0] for r in rows}


@pytest.mark.parametrize("path", ["lane", "pool"])
async def test_the_store_recovers_after_the_server_terminates_its_connections(
    schema: str, path: str
) -> None:
    name = f"cs-{uuid.uuid4().hex[:12]}"
    store = open_store(f"{POSTGRES_URL}?schema={schema}&application_name={name}&min_size=3")
    gate = asyncio.Event()
    hold: asyncio.Task[Any] | None = None
    try:
        await store.create(SessionRecord(id="s"))
        assert await store.append("s", [ev(1)], 0) == 1
        if path == "pool":  # keep the fast lane busy: every call goes through the pool
            hold = asyncio.create_task(store._with(lambda conn: gate.wait()))  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        for round_ in range(2):  # and again, on the connections that replaced them
            before = await backend_pids(name)
            assert len(before) >= 3  # the lane and the pool's others
            assert await terminate(name) == len(before)
            # the same store object goes on at once: its next calls work
            calls = [
                store.get("s"),
                store.append("s", [ev(2 + round_)], 1 + round_),
                read_all(store, "s"),
                store.list_sessions(),
                store.put_blob("s", b"x"),
            ]
            if path == "pool":  # at the same time, so several pooled connections are used
                results = await asyncio.gather(*calls)
            else:
                results = [await call for call in calls]
            assert results[1] == 2 + round_
            assert len(results[2]) in (1 + round_, 2 + round_)  # before or after the append
            rows = await read_all(store, "s")
            assert [json.loads(r.data)["n"] for r in rows] == list(range(1, 3 + round_))
            assert not (await backend_pids(name)) & before  # new connections, none reused
    finally:
        gate.set()
        if hold is not None:
            await hold
        await store.aclose()


async def test_a_call_whose_connection_is_terminated_is_unavailable_then_the_store_goes_on(
    schema: str,
) -> None:
    name = f"cs-{uuid.uuid4().hex[:12]}"
    async with open_store(f"{POSTGRES_URL}?schema={schema}&application_name={name}") as store:
        await store.create(SessionRecord(id="s"))
        slow = asyncio.create_task(
            store._with(lambda conn: conn.execute("SELECT pg_sleep(30)"))  # type: ignore[attr-defined]
        )
        for _ in range(500):  # until the statement runs on the server
            rows = await pg(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 "
                "AND query LIKE 'SELECT pg_sleep%'",
                name,
            )
            if rows:
                break
            await asyncio.sleep(0.01)
        await terminate(name)
        with pytest.raises(StoreUnavailableError, match="unavailable"):
            await asyncio.wait_for(slow, 10)
        assert await store.append("s", [ev(1)], 0) == 1
        assert (await store.get("s")).head == 1


# -- what is acknowledged reads back exactly ----------------------------------------

#: Record values the checks allow, some of which jsonb would change or refuse.
METADATA: dict[str, Any] = {
    "nul": "a\x00b",  # jsonb cannot hold \u0000
    "float_int": 1e16,  # json.dumps writes 1e+16: jsonb would give back an int
    "neg_zero": -0.0,
    "one": 1.0,
    "big": 10**300,
    "tiny": 5e-324,
    "huge": 1.7976931348623157e308,
    "text": "\u2028\u2029\x85\x1f\x7f é 😀",
    "": [None, True, False, "", [], {}],
}
PLAIN_METADATA: dict[str, Any] = {"one": 1.0, "n": [1, 2.5, "x"], "deep": {"a": {"b": None}}}


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"d": value}


async def body_columns(schema: str, session_id: str) -> tuple[bool, bool]:
    """(body set, body_text set) of a session's row."""
    rows = await pg(
        f'SELECT body IS NOT NULL, body_text IS NOT NULL FROM "{schema}".sessions WHERE id = $1',
        session_id,
    )
    return bool(rows[0][0]), bool(rows[0][1])


async def test_records_read_back_exactly_whatever_jsonb_would_do_to_them(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        exact = SessionRecord(
            id="exact",
            user_id="",
            agent_id="agent é",
            window_id=None,
            title="",
            metadata=METADATA,
            fingerprint={"settings": {"temperature": -0.0, "n": 1e20}, "deep": nested(120)},
        )
        plain = SessionRecord(id="plain", title=None, user_id="u", metadata=PLAIN_METADATA)
        for record in (exact, plain):
            await store.create(record)
        await store.append("exact", [ev(1)], 0)
        await store.fork("exact", 1, exact.model_copy(update={"id": "fork"}))
        listed = {r.id: r for r in (await store.list_sessions()).records}
        for session_id, sent in (("exact", exact), ("plain", plain), ("fork", exact)):
            for got in (await store.get(session_id), listed[session_id]):
                for field in ("user_id", "agent_id", "window_id", "title"):
                    assert getattr(got, field) == getattr(sent, field), field
                assert same_json(got.metadata, sent.metadata), got.metadata
                assert same_json(got.fingerprint, sent.fingerprint)
        # kept as jsonb unless jsonb would change it
        assert await body_columns(schema, "exact") == (False, True)
        assert await body_columns(schema, "fork") == (False, True)
        assert await body_columns(schema, "plain") == (True, False)
        # update moves a body from one column to the other, both ways
        current = await store.get("plain")
        updated = await store.update(current.model_copy(update={"metadata": METADATA}), 1)
        assert await body_columns(schema, "plain") == (False, True)
        assert same_json((await store.get("plain")).metadata, METADATA)
        await store.update(updated.model_copy(update={"metadata": PLAIN_METADATA}), 2)
        assert await body_columns(schema, "plain") == (True, False)
        assert same_json((await store.get("plain")).metadata, PLAIN_METADATA)
        # what the checks refuse never reaches the server, and nothing is written
        for bad in (
            SessionRecord(id="bad", user_id="a\x00b"),
            SessionRecord(id="bad", title="nul \x00"),
            SessionRecord(id="bad", metadata={"x": "\ud800"}),
            SessionRecord(id="bad", metadata={"x": math.inf}),
            SessionRecord(id="bad", metadata=nested(130)),
        ):
            with pytest.raises(UnsupportedValueError):
                await store.create(bad)
            with pytest.raises(UnsupportedValueError):
                await store.fork("exact", 1, bad)
            with pytest.raises(UnsupportedValueError):
                await store.update(bad.model_copy(update={"id": "plain"}), 3)
        assert [r.id for r in (await store.list_sessions()).records] == ["fork", "plain", "exact"]
        assert (await store.get("plain")).version == 3


async def test_record_and_blob_checks_come_before_any_io() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    try:
        calls = [
            store.create(SessionRecord(id="x", user_id="a\x00b")),
            store.update(SessionRecord(id="x", metadata={"s": {1}}), 1),
            store.fork("p", 0, SessionRecord(id="x", expires_at=math.nan)),
            store.put_blob("x", "not bytes"),  # type: ignore[arg-type]
            store.put_blob("x", b"x", "text/plain\r\nX: y"),
        ]
        for call in calls:
            with pytest.raises(UnsupportedValueError):  # not StoreUnavailableError
                await call
    finally:
        await store.aclose()


# -- damaged rows -------------------------------------------------------------------

#: Hand edits of a session's row (``ID`` is its id) that leave its record unreadable.
RECORD_DAMAGE = {
    "body null": "UPDATE SCHEMA.sessions SET body = 'null' WHERE id = 'ID'",
    "body a list": "UPDATE SCHEMA.sessions SET body = '[1, 2]' WHERE id = 'ID'",
    "body metadata a number": """UPDATE SCHEMA.sessions SET body = '{"metadata": 5}' WHERE id = 'ID'""",
    "body unknown key": """UPDATE SCHEMA.sessions SET body = '{"owner": "x"}' WHERE id = 'ID'""",
    "body_text not json": "UPDATE SCHEMA.sessions SET body = NULL, body_text = '{\"title\": [' "
    "WHERE id = 'ID'",
    "body_text nested deep": "UPDATE SCHEMA.sessions SET body = NULL, "
    "body_text = '{\"metadata\": {\"a\": ' || repeat('[', 100000) || repeat(']', 100000) || '}}' "
    "WHERE id = 'ID'",
    "state": "UPDATE SCHEMA.sessions SET state = 'bogus' WHERE id = 'ID'",
    "missing parent": "UPDATE SCHEMA.sessions SET parent_pk = 999999999, parent_seq = 1 "
    "WHERE id = 'ID'",
    "parent without a fork point": "UPDATE SCHEMA.sessions SET parent_pk = "
    "(SELECT pk FROM SCHEMA.sessions WHERE id = 'healthy'), parent_seq = NULL WHERE id = 'ID'",
    "head before the fork point": "UPDATE SCHEMA.sessions SET parent_pk = "
    "(SELECT pk FROM SCHEMA.sessions WHERE id = 'healthy'), parent_seq = 3, head = 2 "
    "WHERE id = 'ID'",
    "negative head": "UPDATE SCHEMA.sessions SET head = -1 WHERE id = 'ID'",
    "bad id": "UPDATE SCHEMA.sessions SET id = 'a/b' WHERE id = 'ID'",
}

REMEDY = re.compile(r"restore|backup|delete", re.IGNORECASE)


async def hand_edit(schema: str, sql: str, session_id: str = "") -> None:
    await pg(sql.replace("SCHEMA", f'"{schema}"').replace("'ID'", f"'{session_id}'"))


async def test_a_damaged_record_is_corrupt_data_and_left_out_of_listings(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="healthy", created_at=1.0))
        await store.append("healthy", [ev(n) for n in range(3)], 0)
        ids = [f"d{i:02}" for i in range(len(RECORD_DAMAGE))]
        for n, session_id in enumerate(ids):
            await store.create(SessionRecord(id=session_id, created_at=10.0 + n))
        for session_id, sql in zip(ids, RECORD_DAMAGE.values(), strict=True):
            await hand_edit(schema, sql, session_id)
        for session_id, what in zip(ids, RECORD_DAMAGE, strict=True):
            if what == "bad id":
                continue  # no call can name it; the listing still meets it
            for call in (
                store.get(session_id),
                store.update(SessionRecord(id=session_id), 1),
            ):
                with pytest.raises(CorruptDataError) as info:
                    await call
                message = str(info.value)
                assert repr(session_id) in message and REMEDY.search(message), (what, message)
        # paging goes on past damaged records, which are logged, not raised
        caplog.set_level(logging.WARNING, logger="chatsession.store")
        seen: list[str] = []
        cursor = None
        while True:
            page = await store.list_sessions(limit=3, cursor=cursor)
            seen += [r.id for r in page.records]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == ["healthy"]
        warned = [r.getMessage() for r in caplog.records if r.name == "chatsession.store"]
        assert len(warned) == len(RECORD_DAMAGE)
        for session_id in ids[:-1]:
            assert any(repr(session_id) in line for line in warned), session_id
        assert len(await read_all(store, "healthy")) == 3


async def test_damaged_events_are_corrupt_data_naming_the_session_and_event(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        for session_id in ("text", "plain", "gap", "short"):
            await store.create(SessionRecord(id=session_id))
            await store.append(session_id, [ev(n) for n in range(1, 6)], 0)
        await store.append("text", [NewEvent("tool", AS_TEXT[0], 1.0)], 5)  # marks it
        # a payload kept as text that is not JSON (an edit of data_text)
        await hand_edit(
            schema,
            "UPDATE SCHEMA.events SET data = NULL, data_text = '{\"n\": ' WHERE seq = 3 "
            "AND session_pk = (SELECT pk FROM SCHEMA.sessions WHERE id = 'ID')",
            "text",
        )
        # a gap, and a head past the last event
        await hand_edit(
            schema,
            "DELETE FROM SCHEMA.events WHERE seq = 2 "
            "AND session_pk = (SELECT pk FROM SCHEMA.sessions WHERE id = 'ID')",
            "gap",
        )
        await hand_edit(schema, "UPDATE SCHEMA.sessions SET head = 9 WHERE id = 'ID'", "short")
        for session_id, words in (
            ("text", "event 3 (events.data_text) in PostgreSQL"),
            ("gap", "events 1..5 are incomplete"),
            ("short", "events 1..9 are incomplete in PostgreSQL (found 5)"),
        ):
            with pytest.raises(CorruptDataError, match=re.escape(words)) as info:
                await read_all(store, session_id)
            assert repr(session_id) in str(info.value) and REMEDY.search(str(info.value))
        # a payload kept as text in a session whose row lost its mark (a partial
        # restore): still read back exactly as acknowledged
        await hand_edit(
            schema,
            "UPDATE SCHEMA.events SET data = NULL, data_text = '{\"n\":4.0}' WHERE seq = 4 "
            "AND session_pk = (SELECT pk FROM SCHEMA.sessions WHERE id = 'ID')",
            "plain",
        )
        rows = await read_all(store, "plain", batch_size=2)
        assert [r.data for r in rows][2:4] == ['{"n": 3}', '{"n":4.0}']


# -- fork chains --------------------------------------------------------------------


async def test_a_fork_cycle_is_corrupt_data_for_every_walk_of_the_chain(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_rows, "_LINEAGE_PAGE", 4)  # several queries a walk
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="f0"))
        await store.append("f0", [ev(0)], 0)
        blob_id = await store.put_blob("f0", b"root's blob")
        for n in range(1, 10):  # f0 <- f1 <- ... <- f9
            await store.fork(f"f{n - 1}", n, SessionRecord(id=f"f{n}"))
            await store.append(f"f{n}", [ev(n)], n)
        assert [json.loads(r.data)["n"] for r in await read_all(store, "f9")] == list(range(10))
        assert await store.get_blob("f9", blob_id) == b"root's blob"
        # the chain loops: f2's parent becomes f7 (f7 -> ... -> f2 -> f7)
        await hand_edit(
            schema,
            "UPDATE SCHEMA.sessions SET parent_pk = (SELECT pk FROM SCHEMA.sessions WHERE id = "
            "'f7'), parent_seq = 1 WHERE id = 'ID'",
            "f2",
        )
        for call in (
            read_all(store, "f9"),
            read_all(store, "f9", after_seq=8),
            store.get_blob("f9", blob_id),
            store.get_blob("f3", "0" * 64),
        ):
            with pytest.raises(CorruptDataError, match=r"'f[93]'.*loops") as info:
                await asyncio.wait_for(call, 10)
            assert REMEDY.search(str(info.value))
        # sessions outside the loop still read; deleting inside it ends
        assert len(await read_all(store, "f1")) == 2
        await asyncio.wait_for(store.delete("f9"), 10)
        await asyncio.wait_for(store.delete("f2"), 10)
        await asyncio.wait_for(store.purge_expired(), 10)


async def test_a_long_chain_of_kept_ancestors_is_read_and_removed_without_recursion(
    schema: str,
) -> None:
    depth = 1200
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="root"))
        await store.append("root", [ev(0)], 0)
        # deleted ancestors kept for their one fork each: root <- t1 <- ... <- t1199
        await hand_edit(
            schema,
            f"""INSERT INTO SCHEMA.sessions (id, state, created_at, updated_at, head, parent_seq,
                    children, deleted, parent_pk)
                SELECT 't' || n, 'active', 1, 1, 1, 1, 1, true, NULL
                FROM generate_series(1, {depth - 1}) AS n""",
        )
        await hand_edit(
            schema,
            """UPDATE SCHEMA.sessions c SET parent_pk = p.pk FROM SCHEMA.sessions p
               WHERE c.id LIKE 't%' AND p.id = CASE WHEN c.id = 't1' THEN 'root'
                   ELSE 't' || (substr(c.id, 2)::int - 1) END""",
        )
        await hand_edit(
            schema,
            "UPDATE SCHEMA.sessions SET children = 1, deleted = true WHERE id = 'ID'",
            "root",
        )
        await hand_edit(
            schema,
            f"""INSERT INTO SCHEMA.sessions (id, state, created_at, updated_at, head, parent_seq,
                    parent_pk)
                SELECT 'leaf', 'active', 2, 2, 1, 1, pk FROM SCHEMA.sessions
                WHERE id = 't{depth - 1}'""",
        )
        assert [json.loads(r.data)["n"] for r in await read_all(store, "leaf")] == [0]
        assert (await store.get("leaf")).parent == ParentRef(session_id=f"t{depth - 1}", seq=1)
        await store.delete("leaf")  # and with it every ancestor kept only for it
        assert await pg(f'SELECT id FROM "{schema}".sessions') == []


# -- reads stream -------------------------------------------------------------------


async def test_a_read_fetches_one_batch_per_query(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[int] = []  # rows each query brought back
    real = pg_events._fetch

    async def counting(sql: str, args: tuple[Any, ...], conn: Any) -> list[Any]:
        rows = await real(sql, args, conn)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(pg_events, "_fetch", counting)
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="p"))
        for start in range(0, 3000, 500):
            await store.append("p", [ev(n) for n in range(start, start + 500)], start)
        await store.fork("p", 2900, SessionRecord(id="f"))
        await store.append("f", [ev(n) for n in range(2900, 3100)], 2900)
        for batch_size in (1000, 64, 7):
            fetched.clear()
            sizes: list[int] = []
            seqs: list[int] = []
            async for batch in store.read("f", batch_size=batch_size):
                sizes.append(len(batch))
                seqs += [r.seq for r in batch]
                assert fetched[-1] == len(batch)  # fetched just before it was yielded
            assert seqs == list(range(1, 3101))
            assert max(fetched) <= batch_size  # never more than a batch held
            assert fetched == sizes  # one query per batch
            parent, own = 2900, 200  # batches never span the fork point
            expected = [batch_size] * (parent // batch_size) + [parent % batch_size]
            expected += [batch_size] * (own // batch_size) + [own % batch_size]
            assert sizes == [s for s in expected if s]
        fetched.clear()
        window = [r.seq async for b in store.read("f", 10, 2950, batch_size=25) for r in b]
        assert window == list(range(11, 2951))
        assert max(fetched) <= 25


# -- synchronous_commit -------------------------------------------------------------


@pytest.fixture
async def role_with_async_commit() -> AsyncIterator[str]:
    """A throwaway login role whose own setting is ``synchronous_commit = off``."""
    role = f"cs_role_{uuid.uuid4().hex[:10]}"
    await pg(f"CREATE ROLE {role} LOGIN")
    await pg(f"GRANT CREATE ON DATABASE test TO {role}")
    await pg(f"ALTER ROLE {role} SET synchronous_commit = off")
    yield role
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f"DROP OWNED BY {role} CASCADE")
        await conn.execute(f"DROP ROLE {role}")
    finally:
        await conn.close()


async def test_the_roles_synchronous_commit_is_honoured_unless_the_url_sets_one(
    schema: str, role_with_async_commit: str
) -> None:
    target = urlsplit(POSTGRES_URL)
    server = f"{target.hostname}:{target.port or 5432}"
    url = f"postgresql://{role_with_async_commit}@{server}{target.path}?schema={schema}"
    for query, expected in (
        ("", "off"),
        ("&synchronous_commit=on", "on"),
        ("&synchronous_commit=local", "local"),
    ):
        async with open_store(url + query) as store:
            await store.create(SessionRecord(id="s"))
            shown = await store._with(lambda conn: conn.fetchval("SHOW synchronous_commit"))  # type: ignore[attr-defined]
            assert shown == expected, query
            await store.delete("s")
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:  # the server's default
        shown = await store._with(lambda conn: conn.fetchval("SHOW synchronous_commit"))  # type: ignore[attr-defined]
        assert shown == await pg_setting("synchronous_commit")


async def pg_setting(name: str) -> str:
    rows = await pg("SELECT current_setting($1)", name)
    return str(rows[0][0])


def test_no_assert_guards_a_runtime_condition() -> None:
    """``python -O`` strips asserts: the store checks with typed errors instead."""
    import ast

    package = Path(pg_schema.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) > 5
    for module in modules:
        tree = ast.parse(module.read_text())
        asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
        raises = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Raise)
            and getattr(node.exc, "id", getattr(getattr(node.exc, "func", None), "id", ""))
            == "AssertionError"
        ]
        assert asserts == [] and raises == [], module.name


# -- the client's jsonb-or-text decision, against the server --------------------------

#: JSON number texts in every form: sign, digits, fraction, exponent (the forms
#: jsonb rewrites are here, not only those json.dumps writes).
NUMBER_TEXTS = st.builds(
    lambda sign, whole, fraction, exponent: f"{sign}{whole}{fraction}{exponent}",
    st.sampled_from(["", "-"]),
    st.sampled_from(["0", "1", "7", "10", "123456789012345678901"]),
    st.sampled_from(["", ".0", ".00", ".5", ".25", ".000", ".0001", ".10"]),
    st.sampled_from(
        ["", "e0", "e1", "E+2", "e-1", "e-5", "e16", "E-3", "e+300", "e-300", "e-16384"]
    ),
)
PAYLOAD_TEXTS = json_texts(max_depth=3) | st.lists(NUMBER_TEXTS, min_size=1, max_size=4).map(
    lambda numbers: "[" + ",".join(numbers) + "]"
)


@pytest.fixture(scope="module")
def server_jsonb() -> Iterator[Callable[[str], str | None]]:
    """``text::jsonb::text`` as the server gives it back, or None if jsonb refuses it."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(POSTGRES_URL))

    def jsonb(text: str) -> str | None:
        try:
            return str(loop.run_until_complete(conn.fetchval("SELECT $1::text::jsonb::text", text)))
        except (pgerr.DataError, pgerr.InvalidTextRepresentationError):
            return None

    try:
        yield jsonb
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


@settings(max_examples=300, deadline=None)
@given(text=PAYLOAD_TEXTS)
def test_the_client_keeps_as_jsonb_exactly_what_jsonb_gives_back_the_same(
    server_jsonb: Callable[[str], str | None], text: str
) -> None:
    try:
        check_payload(text)
    except UnsupportedValueError:
        assume(False)  # refused before a store sees it (an infinite float, say)
    back = server_jsonb(text)
    kept_the_same = back is not None and same_json(json.loads(back), json.loads(text))
    assert pg_jsonb.jsonb_changes(text) is not kept_the_same, (text, back)


# -- many users: migration 006, limits, archived sessions, stats, purge, listing ---------


def compact(value: Any) -> str:
    """JSON as chatsession writes it (msgspec): no spaces, UTF-8 as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def figures(schema: str, session_id: str) -> tuple[int, int, int]:
    rows = await pg(
        f'SELECT messages, tokens, bytes FROM "{schema}".sessions WHERE id = $1', session_id
    )
    return int(rows[0][0]), int(rows[0][1]), int(rows[0][2])


async def test_migration_006_counts_what_a_database_at_005_holds_and_keeps_it(
    schema: str,
) -> None:
    """Back-filled once from the events (jsonb and text payloads), data untouched."""
    jsonb_events = [
        NewEvent("message", compact({"role": "user", "content": "héllo\n\t✓"}), 1.0),
        NewEvent("message", compact({"a": [1, 2.5, {"b": None}], "c": [], "d": {}}), 1.0),
        NewEvent("usage", compact({"total_tokens": 120, "prompt_tokens": 100}), 1.0),
        NewEvent("usage", compact({"total_tokens": 5.0}), 1.0),  # a float: not counted
        NewEvent("usage", compact({"total_tokens": -3}), 1.0),  # negative: not counted
        NewEvent("usage", compact({"total_tokens": "7"}), 1.0),  # a string: not counted
        NewEvent("usage", compact([1, 2]), 1.0),
        NewEvent("tool", compact("just a string"), 1.0),
    ]
    text_events = [  # what jsonb cannot hold: kept as text, counted byte for byte
        NewEvent("usage", '{"out":"a\\u0000b\\"","total_tokens":12}', 1.0),
        NewEvent("message", '{"f": 1e16,  "n": "\\ud800"}', 1.0),
        NewEvent("usage", '{"total_tokens":1, "total_tokens":30}', 1.0),  # the last one counts
    ]
    await make_database_at(schema, 5, [])  # 'old' (head 0 for now) and its fork at 2
    s = f'"{schema}"'
    every = jsonb_events + text_events
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        async with conn.transaction():
            for seq, e in enumerate(every, 1):
                as_text = e in text_events
                await conn.execute(
                    f"INSERT INTO {s}.events (session_pk, seq, type, ts, v, data, data_text) "
                    f"SELECT pk, $1, $2, 1.0, 1, $3::jsonb, $4 FROM {s}.sessions WHERE id = 'old'",
                    seq,
                    e.type,
                    None if as_text else e.data,
                    e.data if as_text else None,
                )
            await conn.execute(
                f"UPDATE {s}.sessions SET head = $1, text_payloads = true, user_id = 'ann' "
                "WHERE id = 'old'",
                len(every),
            )
        before = await conn.fetch(
            f"SELECT session_pk, seq, type, data::text, data_text FROM {s}.events ORDER BY 1, 2"
        )
    finally:
        await conn.close()
    expected = count_events(every)
    assert expected.messages == 3 and expected.tokens == 120 + 30 + 12
    url = f"{POSTGRES_URL}?schema={schema}"
    stores = [open_store(url) for _ in range(3)]  # opened at once: 006 runs once
    try:
        await asyncio.gather(*(store.get("old") for store in stores))
        store = stores[0]
        assert await figures(schema, "old") == tuple(expected)
        assert await figures(schema, "fork") == (0, 0, 0)  # a fork counts its own only
        stats = await store.stats()
        assert (stats.sessions, stats.users, stats.by_user) == (2, 1, {"ann": 1})
        assert (stats.messages, stats.tokens, stats.bytes) == tuple(expected)
        back = [r async for b in store.read("old") for r in b]
        assert [json.loads(r.data) for r in back[: len(jsonb_events)]] == [
            json.loads(e.data) for e in jsonb_events
        ]
        assert [r.data for r in back[len(jsonb_events) :]] == [e.data for e in text_events]
        # from now on every append adds its own figures
        more = [ev(1), NewEvent("usage", compact({"total_tokens": 8}), 1.0)]
        assert await stores[1].append("old", more, len(every)) == len(every) + 2
        assert await stores[2].append("fork", [ev(2)], 2) == 3
        total = count_events(every + more)
        assert await figures(schema, "old") == tuple(total)
        assert await figures(schema, "fork") == tuple(count_events([ev(2)]))
        stats = await store.stats()
        assert stats.messages == total.messages + 1 and stats.tokens == total.tokens
    finally:
        for store in stores:
            await store.aclose()
    after = await pg(
        f"SELECT session_pk, seq, type, data::text, data_text FROM {s}.events ORDER BY 1, 2"
    )
    assert after[: len(before)] == before  # the stored events are untouched
    names = [r[0] for r in await pg(f"SELECT name FROM {s}.chatsession_migrations ORDER BY 1")]
    assert names == [name for name, _ in MIGRATIONS]
    assert names[5] == "006_session_figures_user_states"


@pytest.mark.parametrize(
    "value",
    [
        {"role": "assistant", "content": [{"type": "text", "text": 'a"b\\c\u0001é𝄞'}]},
        {"k": [[], {}, [1, [2, [3]]], {"x": {"y": {"z": None}}}], "t": True, "f": -1.25},
        [1, "two", 3.5, None, False, {"a": 1, "b": 2}],
        "a string",
        12,
    ],
)
async def test_the_back_fill_counts_a_jsonb_payload_as_its_compact_text(
    schema: str, value: Any
) -> None:
    """jsonb has lost the payload's text: its compact form is what chatsession wrote."""
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))
    text = compact(value)
    counted = await pg(
        f"SELECT {pg_schema._OLD_BYTES} FROM (SELECT $1::jsonb AS data, NULL::text AS data_text) e",
        text,
    )
    assert counted[0][0] == len(text.encode())


async def test_a_limited_create_waits_for_the_users_lock_and_holds_none_after(
    schema: str,
) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="a", user_id="ann"), max_per_user=2)
        holder = await asyncpg.connect(POSTGRES_URL)
        try:
            tx = holder.transaction()
            await tx.start()
            # what another process's create(max_per_user=) for ann holds, mid-way
            await holder.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"chatsession:{schema}:user:ann",
            )
            await holder.execute(
                f'INSERT INTO "{schema}".sessions (id, user_id, state, created_at, updated_at) '
                "VALUES ('b', 'ann', 'active', 1, 1)"
            )
            waiting = asyncio.create_task(
                store.create(SessionRecord(id="c", user_id="ann"), max_per_user=2)
            )
            other = await store.create(SessionRecord(id="d", user_id="bob"), max_per_user=1)
            assert other.id == "d"  # another user's lock: not held up
            await asyncio.sleep(0.3)
            assert not waiting.done()  # it waits for ann's lock ...
            await tx.commit()
            with pytest.raises(SessionLimitError) as info:  # ... and then counts b
                await asyncio.wait_for(waiting, 10)
            assert (info.value.limit, info.value.count) == (2, 2)
        finally:
            await holder.close()
        (key,) = await pg("SELECT hashtextextended($1, 0)", f"chatsession:{schema}:user:ann")
        locks = await pg(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND classid::bigint = $1 AND objid::bigint = $2",
            (key[0] >> 32) & 0xFFFFFFFF,
            key[0] & 0xFFFFFFFF,
        )
        assert locks[0][0] == 0  # transaction-scoped: released by each commit
    rows = await pg(f'SELECT id FROM "{schema}".sessions ORDER BY id')
    assert [r[0] for r in rows] == ["a", "b", "d"]


async def test_limited_creates_on_many_connections_leave_exactly_the_limit(schema: str) -> None:
    url = f"{POSTGRES_URL}?schema={schema}"
    stores = [open_store(url) for _ in range(6)]  # a pool each: creates on 6+ connections
    try:
        await stores[0].create(SessionRecord(id="archived", user_id="ann", state="archived"))
        await stores[0].create(
            SessionRecord(id="expired", user_id="ann", expires_at=time.time() - 1)
        )

        async def create(n: int) -> str:
            try:
                await stores[n % len(stores)].create(
                    SessionRecord(id=f"s{n}", user_id="ann"), max_per_user=3
                )
            except SessionLimitError as exc:
                assert (exc.user_id, exc.limit, exc.count) == ("ann", 3, 3)
                return "refused"
            return "made"

        outcomes = await asyncio.gather(*(create(n) for n in range(30)))
        assert outcomes.count("made") == 3
        with pytest.raises(SessionExistsError):  # a taken id is said first
            await stores[1].create(SessionRecord(id="archived", user_id="ann"), max_per_user=3)
    finally:
        for store in stores:
            await store.aclose()
    rows = await pg(
        f"SELECT count(*) FROM \"{schema}\".sessions WHERE user_id = 'ann' AND id LIKE 's%'"
    )
    assert rows[0][0] == 3


async def test_appends_racing_an_archive_are_written_whole_or_refused(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}&max_size=12") as store:
        await store.create(SessionRecord(id="s"))

        batches: dict[int, list[NewEvent]] = {}  # by the head each was appended at

        async def writer(name: str) -> None:
            while True:
                head = (await store.get("s")).head
                batch = [ev(head), NewEvent("usage", compact({"total_tokens": head}), 1.0)]
                try:
                    await store.append("s", batch, head)
                except ConflictError:
                    continue
                except SessionArchivedError:
                    return
                batches[head] = batch

        async def archive() -> None:
            await asyncio.sleep(0.2)
            record = await store.get("s")
            while True:
                try:
                    await store.update(
                        record.model_copy(update={"state": "archived"}), record.version
                    )
                    return
                except ConflictError:
                    record = await store.get("s")

        await asyncio.gather(*(writer(f"w{n}") for n in range(6)), archive())
        written = [e for head in sorted(batches) for e in batches[head]]
        record = await store.get("s")
        assert record.state == "archived" and record.head == len(written) > 0
        assert [json.loads(r.data) async for b in store.read("s") for r in b] == [
            json.loads(e.data) for e in written
        ]
        assert await figures(schema, "s") == tuple(count_events(written))
        lease = await store.acquire_lease("s", "me", 30)
        with pytest.raises(SessionArchivedError):  # a lease does not let it write either
            await store.append("s", [ev(9)], record.head, lease=lease)
        assert (await store.get("s")).head == record.head


async def test_stats_read_no_event(schema: str) -> None:
    """The figures come from the sessions rows: stats() runs while events are locked."""
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        sent: dict[str, list[NewEvent]] = {}
        for n in range(6):
            sid = f"s{n}"
            await store.create(SessionRecord(id=sid, user_id=f"u{n % 2}", agent_id="bot"))
            sent[sid] = [ev(n), NewEvent("usage", compact({"total_tokens": 10 + n}), 1.0)]
            sent[sid] += [NewEvent("tool", AS_TEXT[n % len(AS_TEXT)], 1.0)]
            await store.append(sid, sent[sid], 0)
        await store.fork("s0", 2, SessionRecord(id="f", user_id="u0"))
        sent["f"] = [ev(99)]
        await store.append("f", sent["f"], 2)
        await store.delete("s1")  # gone: its figures with it
        del sent["s1"]
        expected = count_events([e for events in sent.values() for e in events])
        locker = await asyncpg.connect(POSTGRES_URL)
        try:
            async with locker.transaction():
                await locker.execute(f'LOCK TABLE "{schema}".events IN ACCESS EXCLUSIVE MODE')
                stats = await asyncio.wait_for(store.stats(top=1), 10)
        finally:
            await locker.close()
    assert (stats.messages, stats.tokens, stats.bytes) == tuple(expected)
    assert (stats.sessions, stats.users, stats.agents) == (6, 2, 1)
    assert (stats.by_user, stats.by_agent) == ({"u0": 4}, {"bot": 5})


async def test_purges_running_at_once_over_fork_chains_delete_each_session_once(
    schema: str,
) -> None:
    """Chains root <- a <- b: some parents expire under live forks (kept, deleted), some
    chains expire whole; four stores purge at once; each session is counted once and
    what is left is the live sessions and the ancestors they still read."""
    url = f"{POSTGRES_URL}?schema={schema}"
    past = time.time() - 100
    expired: set[str] = set()
    live: set[str] = set()
    kept: set[str] = set()  # deleted ancestors a live fork still reads
    async with open_store(url) as store:
        for n in range(40):
            chain = [f"r{n}", f"a{n}", f"b{n}"]
            dies = [n % 4 != 0, n % 3 != 0, n % 2 != 0]  # every mix of the three
            await store.create(SessionRecord(id=chain[0]))
            await store.append(chain[0], [ev(0)], 0)
            for parent, child in itertools.pairwise(chain):
                await store.fork(parent, 1, SessionRecord(id=child))
                await store.append(child, [ev(1)], 1)
            for sid, die in zip(chain, dies, strict=True):
                await store.put_blob(sid, sid.encode())
                await store.put_snapshot(sid, (await store.get(sid)).head, b"snap")
                await store.acquire_lease(sid, "holder", 60)
                if die:
                    await pg(
                        f'UPDATE "{schema}".sessions SET expires_at = $1 WHERE id = $2',
                        past + n,
                        sid,
                    )
                (expired if die else live).add(sid)
            for i, sid in enumerate(chain):
                if dies[i] and not all(dies[i + 1 :]):
                    kept.add(sid)
    stores = [open_store(url) for _ in range(4)]
    try:
        purged = await asyncio.gather(*(s.purge_expired() for s in stores))
        assert sum(purged) == len(expired), purged
        assert await asyncio.gather(*(s.purge_expired() for s in stores)) == [0, 0, 0, 0]
        for sid in live:
            assert (await stores[0].get(sid)).id == sid
    finally:
        for s in stores:
            await s.aclose()
    rows = await pg(f'SELECT id, deleted, lease_owner FROM "{schema}".sessions')
    assert {r[0] for r in rows} == live | kept
    assert {r[0] for r in rows if r[1]} == kept
    assert all(r[2] is None for r in rows if r[1])  # no lease left on a kept row
    left = await pg(
        f'SELECT s.id, (SELECT count(*) FROM "{schema}".snapshots n WHERE n.session_pk = s.pk), '
        f'(SELECT count(*) FROM "{schema}".events e WHERE e.session_pk = s.pk) '
        f'FROM "{schema}".sessions s'
    )
    assert {r[0] for r in left if r[1]} == live  # snapshots only of live sessions
    assert all(r[2] == 1 for r in left)  # each row's own event: nothing else left
    for table in ("events", "blobs"):
        count = await pg(f'SELECT count(*) FROM "{schema}".{table}')
        assert count[0][0] == len(live | kept), table


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


async def test_listing_a_users_sessions_walks_the_users_index(schema: str) -> None:
    """EXPLAIN the statement list_sessions sends, on a table of 20,000 sessions."""
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="first", user_id="u7"))
        await pg(
            f'INSERT INTO "{schema}".sessions (id, user_id, agent_id, state, created_at, '
            "updated_at, expires_at) SELECT 's' || n, 'u' || (n % 200), 'bot', "
            "CASE WHEN n % 5 = 0 THEN 'archived' ELSE 'active' END, n, n, "
            "CASE WHEN n % 7 = 0 THEN 1e12 END FROM generate_series(1, 20000) AS n"
        )
        await pg(f'ANALYZE "{schema}".sessions')
        page = await store.list_sessions(user_id="u7", limit=10)
        cursor = page.next_cursor
        assert len(page.records) == 10 and cursor is not None
        queries = {
            "first page": store._list_query(user_id="u7", limit=10),  # type: ignore[attr-defined]
            "next page": store._list_query(user_id="u7", limit=10, cursor=cursor),  # type: ignore[attr-defined]
            "one state": store._list_query(user_id="u7", state="active", limit=10),  # type: ignore[attr-defined]
            "archived": store._list_query(user_id="u10", state="archived", limit=10),  # type: ignore[attr-defined]
        }
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            for what, (sql, params) in queries.items():
                (plan,) = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *params))
                nodes = list(plan_nodes(plan["Plan"]))
                scans = [n for n in nodes if n.get("Alias") == "s"]
                assert [n["Node Type"] for n in scans] == ["Index Scan"], (what, nodes)
                assert scans[0]["Index Name"] in {"sessions_by_user", "sessions_by_user_state"}
                assert "user_id =" in scans[0]["Index Cond"], (what, scans[0])
                assert not any(n["Node Type"] == "Sort" for n in nodes), what  # index order
                # the page, not the user's sessions (100) or the table (20,000)
                rows = await conn.fetch(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *params)
                analyzed = json.loads(rows[0][0])[0]["Plan"]
                scan = next(n for n in plan_nodes(analyzed) if n.get("Alias") == "s")
                assert scan["Actual Rows"] <= 11, (what, scan)
        finally:
            await conn.close()
