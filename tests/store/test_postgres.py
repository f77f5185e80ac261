"""What only the PostgreSQL backend does: options, migrations, processes, outages."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from chatsession import (
    InvalidURLError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    StoreUnavailableError,
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


async def test_an_older_schema_is_upgraded(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import chatsession.store.postgres as pg

    url = f"{POSTGRES_URL}?schema={schema}"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="old"))
        await store.append("old", [ev(1)], 0)

    def add_note_column(s: str) -> list[str]:
        return [f"ALTER TABLE {s}.sessions ADD COLUMN note text"]

    monkeypatch.setattr(pg, "MIGRATIONS", [*pg.MIGRATIONS, ("002_test_note", add_note_column)])
    async with open_store(url) as store:
        assert (await store.get("old")).head == 1  # old data still readable
    conn = await asyncpg.connect(POSTGRES_URL)
    names = [
        r[0]
        for r in await conn.fetch(
            f'SELECT name FROM "{schema}".chatsession_migrations ORDER BY name'
        )
    ]
    column = await conn.fetchval(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 AND column_name = 'note'",
        schema,
    )
    await conn.close()
    assert names == ["001_sessions_events_blobs", "002_test_note"]
    assert column == 1


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
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for p in range(4)
    ]
    outs = [await p.communicate() for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err.decode()
    acked: dict[tuple[str, int], str] = {}
    for out, _ in outs:
        for line in out.decode().splitlines():
            _, sid, seq, payload = line.split(" ")
            assert (sid, int(seq)) not in acked
            acked[(sid, int(seq))] = payload
    assert len(acked) == 2000
    async with open_store(url) as store:
        total = 0
        for n in range(sessions):
            rows = [r async for b in store.read(f"s{n}") for r in b]
            assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
            for r in rows:
                assert acked[(f"s{n}", r.seq)] == json.loads(r.data)["p"]
            total += len(rows)
    assert total == 2000


async def test_connections_cut_and_restored(schema: str) -> None:
    target = urlsplit(POSTGRES_URL)
    proxy = TCPProxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    try:
        netloc = (
            f"{target.username}@127.0.0.1:{proxy.port}"
            if target.username
            else f"127.0.0.1:{proxy.port}"
        )
        url = f"postgresql://{netloc}{target.path}?schema={schema}&connect_timeout=2&command_timeout=2"
        store = open_store(url)
        await store.create(SessionRecord(id="s"))
        head = 0
        for n in range(30):
            head = await store.append("s", [ev(n)], head)
        proxy.cut()
        for call in (store.get("s"), store.append("s", [ev(99)], head), store.list_sessions()):
            with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{proxy.port}"):
                await call
        proxy.restore()
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            try:
                record = await store.get("s")  # the same store object recovers
                break
            except StoreUnavailableError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert record.head == 30
        rows = [r async for b in store.read("s") for r in b]
        assert [json.loads(r.data)["n"] for r in rows] == list(range(30))
        assert await store.append("s", [ev(30)], 30) == 31
        await store.aclose()
    finally:
        proxy.close()


async def test_unreachable_server_is_unavailable_not_missing() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1:1\b") as info:
        await store.get("anything")
    assert not isinstance(info.value, SessionNotFoundError)
    await store.aclose()
