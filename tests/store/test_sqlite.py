"""What only the SQLite backend does: URLs, pragmas, migrations, errors."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from chatsession import (
    InvalidURLError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    StoreUnavailableError,
    open_store,
)
from chatsession.store.sqlite import MIGRATIONS, SQLiteStore


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///data/rel.db")
    assert isinstance(relative, SQLiteStore) and relative.path == "data/rel.db"
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db")
    assert isinstance(absolute, SQLiteStore) and absolute.path == f"{tmp_path}/abs.db"
    assert open_store("sqlite:///x.db?synchronous=full").synchronous == "full"  # type: ignore[attr-defined]
    assert open_store("sqlite:///x.db", busy_timeout=5).busy_timeout == 5  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/x.db",
        "sqlite:///",
        "sqlite:///x.db?journal=off",
        "sqlite:///x.db?synchronous=off",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(InvalidURLError):
        open_store(url)


async def test_creates_directories_wal_and_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "s.db"
    async with open_store(f"sqlite:///{path}?synchronous=full") as store:
        await store.create(SessionRecord(id="s"))
        sync = await store._run(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[attr-defined]
    assert sync == 2  # FULL
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = [r[0] for r in db.execute("SELECT name FROM chatsession_migrations")]
    db.close()
    assert names == [name for name, _ in MIGRATIONS]


async def test_migrations_run_once_when_processes_start_together(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/race.db"
    code = (
        "import asyncio, sys\n"
        "from chatsession import open_store, SessionRecord\n"
        "async def main():\n"
        "    async with open_store(sys.argv[1]) as s:\n"
        "        await s.create(SessionRecord(id=sys.argv[2]))\n"
        "asyncio.run(main())\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url, f"s{n}"], stderr=subprocess.PIPE)
        for n in range(6)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    db = sqlite3.connect(tmp_path / "race.db")
    assert db.execute("SELECT count(*) FROM chatsession_migrations").fetchone()[0] == len(
        MIGRATIONS
    )
    assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 6
    db.close()


async def test_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = open_store(f"sqlite:///{blocker}/sub/s.db")
    with pytest.raises(StoreUnavailableError, match="cannot create the directory"):
        await store.get("s")
    await store.aclose()


async def test_event_loop_keeps_running_during_a_large_read(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/big.db") as store:
        await store.create(SessionRecord(id="s"))
        rows = [NewEvent("message", '{"content": "' + "x" * 500 + '"}', 1.0)] * 1000
        head = 0
        for _ in range(20):
            head = await store.append("s", rows, head)
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        n = 0
        async for batch in store.read("s", batch_size=500):
            n += len(batch)
        stop = True
        await task
    assert n == 20_000
    assert ticks > 20  # the loop ran between batches while the worker thread read


async def test_a_missing_event_inside_a_batch_is_reported(tmp_path: Path) -> None:
    from chatsession import CorruptDataError

    url = f"sqlite:///{tmp_path}/gap.db"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [NewEvent("message", f'{{"n": {i}}}', 1.0) for i in range(10)], 0)
    db = sqlite3.connect(tmp_path / "gap.db")
    db.execute("DELETE FROM events WHERE seq = 5")
    db.commit()
    db.close()
    async with open_store(url) as store:
        for batch_size in (3, 4, 100):  # the gap falls inside a batch, at its start, anywhere
            with pytest.raises(CorruptDataError, match="incomplete"):
                [r async for b in store.read("s", batch_size=batch_size) for r in b]


async def test_listing_by_state_uses_its_index(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/s.db") as store:
        await store.create(SessionRecord(id="a", state="archived"))
        plan = await store._run(  # type: ignore[attr-defined]
            lambda db: db.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM sessions WHERE state = 'archived' "
                "ORDER BY created_at DESC, id DESC"
            ).fetchall()
        )
    assert "sessions_by_state" in " ".join(str(row) for row in plan)


async def test_a_session_deleted_during_a_read_is_not_found_not_damaged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with open_store(url) as reader, open_store(url) as deleter:
        await reader.create(SessionRecord(id="s"))
        events = [NewEvent("message", json.dumps({"n": i}), float(i)) for i in range(100)]
        await reader.append("s", events, 0)
        batches = reader.read("s", batch_size=10)
        first = await anext(batches)
        assert [r.seq for r in first] == list(range(1, 11))
        await deleter.delete("s")
        with pytest.raises(SessionNotFoundError):
            await anext(batches)
