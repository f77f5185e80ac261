"""What only the SQLite backend does: URLs, pragmas, migrations, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest

from chatsession import (
    BlobNotFoundError,
    CorruptDataError,
    InvalidURLError,
    NewEvent,
    SessionArchivedError,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoreUnavailableError,
    open_store,
)
from chatsession.store.base import count_events, new_event_id
from chatsession.store.sqlite import MIGRATIONS, SQLiteStore
from chatsession.store.sqlite.schema import MAX_COUNTER
from chatsession.store.sqlite.store import COUNT_USER_SQL, listing_sql


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


# -- damage is CorruptDataError, never "retry" (issue 9) --------------------------------


async def _seeded(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/s.db"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s", user_id="u"))
        await store.append(
            "s", [NewEvent("message", f'{{"n":{i}}}', 1.5, "t") for i in range(4)], 0
        )
        await store.put_blob("s", b"blob")
        await store.create(SessionRecord(id="other", user_id="u", created_at=1.0))
    return url


def _edit(tmp_path: Path, *statements: str) -> None:
    db = sqlite3.connect(tmp_path / "s.db")
    try:
        for sql in statements:
            db.execute(sql)
        db.commit()
    finally:
        db.close()


async def _read(store: Store) -> list[int]:
    return [r.seq async for batch in store.read("s") for r in batch]


@pytest.mark.parametrize(
    "statements",
    [
        ["DROP TABLE events"],
        ["DROP TABLE blobs", "DROP TABLE events"],
        ["ALTER TABLE events RENAME COLUMN turn_id TO turn"],
        ["ALTER TABLE sessions RENAME COLUMN body TO old_body"],
    ],
    ids=["no-events-table", "no-blobs-table", "no-turn_id-column", "no-body-column"],
)
async def test_a_missing_table_or_column_is_damage_not_unavailable(
    tmp_path: Path, statements: list[str]
) -> None:
    url = await _seeded(tmp_path)
    _edit(tmp_path, *statements)
    async with open_store(url) as store:
        failures = 0
        for call in (
            lambda: store.get("s"),
            lambda: _read(store),
            lambda: store.append("s", [NewEvent("message", "{}", 1.0)], 4),
            lambda: store.put_blob("s", b"other"),
            lambda: store.get_blob("s", "ab" * 32),
        ):
            try:
                await call()
            except CorruptDataError as exc:
                failures += 1
                assert "schema" in str(exc) and "restore" in str(exc), str(exc)
            except (StoreUnavailableError, BlobNotFoundError) as exc:
                if isinstance(exc, StoreUnavailableError):
                    pytest.fail(f"damage reported as unavailable (retry forever): {exc}")
        assert failures >= 2


async def test_an_event_past_the_head_is_damage(tmp_path: Path) -> None:
    url = await _seeded(tmp_path)
    # an acknowledged event the head column no longer covers (a bad restore of one table)
    _edit(tmp_path, "UPDATE sessions SET head = 3 WHERE id = 's'")
    async with open_store(url) as store:
        with pytest.raises(CorruptDataError, match=r"'s'.*past its head 3, from seq 4") as info:
            await _read(store)
        assert "restore" in str(info.value)
        with pytest.raises(CorruptDataError, match="past its head 3"):
            await store.append("s", [NewEvent("message", "{}", 1.0)], 3)  # was "retry"
    _edit(tmp_path, "UPDATE sessions SET head = 4 WHERE id = 's'")
    async with open_store(url) as store:
        assert await _read(store) == [1, 2, 3, 4]
        assert await store.append("s", [NewEvent("message", "{}", 1.0)], 4) == 5


DAMAGED_SESSION_ROWS = {
    "body not JSON": "UPDATE sessions SET body = '{not json' WHERE id = 's'",
    "body a list": "UPDATE sessions SET body = '[]' WHERE id = 's'",
    "body NULL-like": "UPDATE sessions SET body = 'null' WHERE id = 's'",
    "body a blob": "UPDATE sessions SET body = x'7b7d' WHERE id = 's'",
    "body with NaN": """UPDATE sessions SET body = '{"metadata":{"x":NaN}}' WHERE id = 's'""",
    "body nested too deep": (
        'UPDATE sessions SET body = \'{"metadata":{"k":\' || '
        "replace(hex(zeroblob(5000)), '00', '[') || replace(hex(zeroblob(5000)), '00', ']') "
        "|| '}}' WHERE id = 's'"
    ),
    "body unknown key": """UPDATE sessions SET body = '{"colour":1}' WHERE id = 's'""",
    "metadata a string": """UPDATE sessions SET body = '{"metadata":"x"}' WHERE id = 's'""",
    "title a number": """UPDATE sessions SET body = '{"title":5}' WHERE id = 's'""",
    "user_id a blob": "UPDATE sessions SET user_id = x'75' WHERE id = 's'",
    "state unknown": "UPDATE sessions SET state = 'gone' WHERE id = 's'",
    "created_at text": "UPDATE sessions SET created_at = 'yesterday' WHERE id = 's'",
    "expires_at text": "UPDATE sessions SET expires_at = 'never' WHERE id = 's'",
    "head text": "UPDATE sessions SET head = 'four' WHERE id = 's'",
    "head NULL": "UPDATE sessions SET head = NULL WHERE id = 's'",
    "version text": "UPDATE sessions SET version = 'one' WHERE id = 's'",
    "parent row missing": "UPDATE sessions SET parent_pk = 999, parent_seq = 1 WHERE id = 's'",
}


@pytest.mark.parametrize("name", list(DAMAGED_SESSION_ROWS))
async def test_a_damaged_session_row_is_corrupt_data_naming_it(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = await _seeded(tmp_path)
    statement = DAMAGED_SESSION_ROWS[name]
    if "NULL" in name:  # head is NOT NULL: rebuild the constraint away, as a bad tool could
        _edit(
            tmp_path,
            "PRAGMA writable_schema = ON",
            "UPDATE sqlite_schema SET sql = replace(sql, 'head INTEGER NOT NULL', 'head INTEGER') "
            "WHERE name = 'sessions'",
        )
    _edit(tmp_path, statement)
    async with open_store(url) as store:
        with pytest.raises(CorruptDataError) as info:
            await store.get("s")
        message = str(info.value)
        assert "'s'" in message and "sessions row" in message and "restore" in message, message
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="chatsession.store"):
            page = await store.list_sessions(user_id="u")
        if name != "user_id a blob":  # that one no longer matches the filter
            assert any("'s'" in r.getMessage() for r in caplog.records)
        assert [r.id for r in page.records] == ["other"]


DAMAGED_EVENT_ROWS = {
    "ts text": "UPDATE events SET ts = 'noon' WHERE seq = 3",
    "type a blob": "UPDATE events SET type = x'6d' WHERE seq = 3",
    "data a blob": "UPDATE events SET data = x'7b7d' WHERE seq = 3",
    "v text": "UPDATE events SET v = 'one' WHERE seq = 3",
    "turn_id a blob": "UPDATE events SET turn_id = x'74' WHERE seq = 3",
}


@pytest.mark.parametrize("name", list(DAMAGED_EVENT_ROWS))
async def test_a_damaged_event_row_is_corrupt_data_naming_its_seq(
    tmp_path: Path, name: str
) -> None:
    url = await _seeded(tmp_path)
    _edit(tmp_path, DAMAGED_EVENT_ROWS[name])
    async with open_store(url) as store:
        with pytest.raises(CorruptDataError, match=r"'s'.*events row at seq 3.*restore"):
            await _read(store)
        assert [r.seq async for b in store.read("s", upto_seq=2) for r in b] == [1, 2]


async def test_a_new_database_is_its_owners_only(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [NewEvent("message", "{}", 1.0)], 0)
        for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert file.stat().st_mode & 0o777 == 0o600, file
    existing = tmp_path / "shared.db"
    existing.touch(mode=0o640)
    existing.chmod(0o640)
    async with open_store(f"sqlite:///{existing}") as store:
        await store.create(SessionRecord(id="s"))
    assert existing.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode


# -- issue 10: the fast path, the lease columns, the migration ---------------------------

_HOLD_THE_WRITE_LOCK = (
    "import sqlite3, sys\n"
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "db.execute('BEGIN IMMEDIATE')\n"
    "print('LOCKED', flush=True)\n"
    "sys.stdin.readline()\n"
    "db.execute('COMMIT')\n"
)


@pytest.mark.slow  # starts a process
async def test_an_append_waiting_for_another_process_does_not_block_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.create(SessionRecord(id="s"))
        assert await store.append("s", [NewEvent("message", "{}", 1.0)], 0) == 1
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_THE_WRITE_LOCK, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"LOCKED\n"
            ticks = 0
            stop = False

            async def ticker() -> None:
                nonlocal ticks
                while not stop:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticking = asyncio.create_task(ticker())
            waiting = asyncio.create_task(store.append("s", [NewEvent("message", "{}", 2.0)], 1))
            await asyncio.sleep(0.6)
            assert not waiting.done(), "the append did not wait for the other process's lock"
            assert ticks >= 20, f"the event loop stalled while the append waited ({ticks} ticks)"
            assert holder.stdin is not None
            holder.stdin.write(b"go\n")
            holder.stdin.flush()
            assert await asyncio.wait_for(waiting, 30) == 2
            stop = True
            await ticking
        finally:
            holder.kill()
            holder.communicate()
        assert [r.seq async for b in store.read("s") for r in b] == [1, 2]


def _old_database(path: Path) -> None:
    """A database as the store left it before migration 003 (no leases, ids or snapshots)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE chatsession_migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    for name, migration in MIGRATIONS[:2]:
        migration(db)
        db.execute("INSERT INTO chatsession_migrations VALUES (?, 0)", (name,))
    db.execute(
        "INSERT INTO sessions (id, state, created_at, updated_at, head, body) "
        "VALUES ('old', 'active', 1.0, 1.0, 2, '{\"title\":\"kept\"}')"
    )
    for seq in (1, 2):
        db.execute(
            "INSERT INTO events (session_pk, seq, type, ts, turn_id, v, data) "
            "VALUES (1, ?, 'message', 1.5, NULL, 2, ?)",
            (seq, f'{{"n":{seq}}}'),
        )
    db.close()


async def test_an_older_database_upgrades_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_database(path)
    async with open_store(f"sqlite:///{path}") as store:
        record = await store.get("old")
        assert (record.title, record.head) == ("kept", 2)
        rows = [r async for b in store.read("old") for r in b]
        assert [(r.seq, r.data, r.event_id) for r in rows] == [
            (1, '{"n":1}', None),
            (2, '{"n":2}', None),
        ]
        lease = await store.acquire_lease("old", "a", 30)
        assert lease.token == 1
        event_id = new_event_id()
        batch = [NewEvent("message", "{}", 3.0, event_id=event_id)]
        assert await store.append("old", batch, 2, lease=lease) == 3
        assert await store.append("old", batch, 2, lease=lease) == 3  # a retry: applied once
        await store.put_snapshot("old", 3, b"state")
        assert await store.get_snapshot("old") == (3, b"state")
    db = sqlite3.connect(path)
    names = [r[0] for r in db.execute("SELECT name FROM chatsession_migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    db.close()


async def test_a_damaged_snapshot_row_counts_as_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = await _seeded(tmp_path)
    async with open_store(url) as store:
        await store.put_snapshot("s", 4, b"good")
    _edit(tmp_path, "UPDATE snapshots SET data = 'text, not bytes'")
    async with open_store(url) as store:
        with caplog.at_level(logging.WARNING, logger="chatsession.store"):
            assert await store.get_snapshot("s") is None
        assert any("snapshot" in r.getMessage() and "'s'" in r.getMessage() for r in caplog.records)
        await store.put_snapshot("s", 2, b"rebuilt")  # a damaged one never wins over a new one
        assert await store.get_snapshot("s") == (2, b"rebuilt")


@pytest.mark.parametrize(
    ("column", "value"),
    [("lease_token", "'seven'"), ("lease_owner", "x'61'"), ("lease_expires", "'soon'")],
)
async def test_a_damaged_lease_column_is_corrupt_data(
    tmp_path: Path, column: str, value: str
) -> None:
    url = await _seeded(tmp_path)
    async with open_store(url) as store:
        await store.acquire_lease("s", "a", 30)
    _edit(tmp_path, f"UPDATE sessions SET {column} = {value} WHERE id = 's'")
    async with open_store(url) as store:
        for call in (
            lambda: store.acquire_lease("s", "b", 30),
            lambda: store.append("s", [NewEvent("message", "{}", 1.0)], 4),
        ):
            with pytest.raises(CorruptDataError, match=r"'s'.*lease"):
                await call()


async def test_options_are_strict_typed_and_never_show_a_secret(tmp_path: Path) -> None:
    for url in (
        f"sqlite:///{tmp_path}/a.db?busy_timeout=5&busy_timeout=6",  # repeated
        f"sqlite:///{tmp_path}/a.db?busy_timeout=-1",  # out of range
        f"sqlite:///{tmp_path}/a.db?busy_timeout=1.5",  # not whole
        f"sqlite:///{tmp_path}/a.db?synchronous",  # malformed query
    ):
        with pytest.raises(InvalidURLError, match="sqlite"):
            open_store(url)
    with pytest.raises(InvalidURLError, match="busy_timeout") as info:
        open_store(f"sqlite:///{tmp_path}/a.db?password=hunter2&busy_timeout=x")
    assert "hunter2" not in str(info.value)
    store = open_store(f"sqlite:///{tmp_path}/a.db?synchronous=FULL", busy_timeout="250")
    assert (store.synchronous, store.busy_timeout) == ("full", 250)  # type: ignore[attr-defined]


async def test_the_wal_is_checkpointed_while_appends_take_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    payload = json.dumps({"content": "x" * 10_000})
    async with open_store(f"sqlite:///{path}") as store:
        await store.create(SessionRecord(id="s"))
        head = 0
        for _ in range(1500):  # about 15 MB of events, one append at a time
            head = await store.append("s", [NewEvent("message", payload, 1.0)], head)
        wal = Path(f"{path}-wal").stat().st_size
    assert wal < 8 << 20, f"the WAL grew to {wal} bytes: nobody checkpoints it"


_APPENDER = (
    "import asyncio, sys\n"
    "from chatsession import NewEvent, open_store\n"
    "async def main():\n"
    "    async with open_store(sys.argv[1]) as store:\n"
    "        head = (await store.get('s')).head\n"
    "        print('GO', flush=True)\n"
    "        for _ in range(int(sys.argv[2])):\n"
    "            head = await store.append('s', [NewEvent('message', '{}', 1.0)] * 3, head)\n"
    "asyncio.run(main())\n"
)


@pytest.mark.slow  # starts a process
async def test_reads_racing_appends_of_another_process_never_see_damage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [NewEvent("message", "{}", 1.0)], 0)
        writer = subprocess.Popen(
            [sys.executable, "-c", _APPENDER, url, "2000"], stdout=subprocess.PIPE
        )
        try:
            assert writer.stdout is not None and writer.stdout.readline() == b"GO\n"
            reads = 0
            while writer.poll() is None:  # each read: head and events from one state of the file
                rows = [
                    r.seq async for b in store.read("s", after_seq=0, batch_size=5000) for r in b
                ]
                assert rows == list(range(1, len(rows) + 1))
                reads += 1
        finally:
            writer.kill()
            writer.communicate()
        assert reads > 10


# --------------------------------------------------------------------------
# many users: migration 004, counters, stats, limits, listing by user


def _usage(total: object) -> NewEvent:
    return NewEvent("usage", json.dumps({"total_tokens": total}, separators=(",", ":")), 2.0)


def _database_at_003(path: Path) -> list[NewEvent]:
    """A database as the store left it at migration 003, and the events its live sessions hold.

    ``a`` (ann) holds messages and usage, among them usage whose ``total_tokens``
    count_events does not count; ``f`` is a fork of ``a`` with events of its
    own; ``gone`` is deleted but kept for its fork ``g``.
    """
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE chatsession_migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    for name, migration in MIGRATIONS[:3]:
        migration(db)
        db.execute("INSERT INTO chatsession_migrations VALUES (?, 0)", (name,))
    own = {
        "a": [
            NewEvent("message", '{"role":"user","content":"héllo ✓"}', 1.0),
            _usage(120),
            _usage(True),  # a bool is not a count
            _usage(-4),
            _usage(2.5),
            NewEvent("usage", "[1,2]", 1.0),
            NewEvent("message", '{"role":"assistant","content":"hi"}', 1.0),
        ],
        "f": [NewEvent("message", '{"role":"user","content":"in the fork"}', 1.0), _usage(7)],
        "gone": [NewEvent("message", '{"content":"lost"}', 1.0), _usage(1000)],
        "g": [],
    }
    rows = [  # pk, id, user, parent_pk, parent_seq, head, deleted, children
        (1, "a", "ann", None, None, 7, 0, 1),
        (2, "f", "ann", 1, 2, 4, 0, 0),
        (3, "gone", "bob", None, None, 2, 1, 1),
        (4, "g", "bob", 3, 2, 2, 0, 0),
    ]
    for pk, sid, user, parent_pk, parent_seq, head, deleted, children in rows:
        db.execute(
            "INSERT INTO sessions (pk, id, user_id, state, created_at, updated_at, parent_pk, "
            "parent_seq, head, deleted, children, body) "
            "VALUES (?, ?, ?, 'active', ?, 1.0, ?, ?, ?, ?, ?, '{}')",
            (pk, sid, user, float(pk), parent_pk, parent_seq, head, deleted, children),
        )
        start = parent_seq or 0
        for seq, event in enumerate(own[sid], start=start + 1):
            db.execute(
                "INSERT INTO events (session_pk, seq, type, ts, turn_id, v, data) "
                "VALUES (?, ?, ?, ?, NULL, 3, ?)",
                (pk, seq, event.type, event.ts, event.data),
            )
    db.close()
    return own["a"] + own["f"] + own["g"]


async def test_a_database_at_migration_003_gets_its_counters_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    live = _database_at_003(path)
    expected = count_events(live)
    assert (expected.messages, expected.tokens) == (3, 127)
    async with open_store(f"sqlite:///{path}") as store:
        stats = await store.stats()
        assert (stats.messages, stats.tokens, stats.bytes) == tuple(expected)
        assert stats.sessions == 3 and stats.by_user == {"ann": 2, "bob": 1}
        await store.append("f", [_usage(3)], 4)  # the counters go on from there
        assert (await store.stats()).tokens == 130
        assert [
            r.id for r in (await store.list_sessions(user_id="ann", state="active")).records
        ] == [
            "f",
            "a",
        ]
    db = sqlite3.connect(path)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM chatsession_migrations ORDER BY name")]
        assert names == [name for name, _ in MIGRATIONS]
        kept = db.execute("SELECT id, messages, tokens, bytes FROM sessions ORDER BY pk").fetchall()
        assert [row[:3] for row in kept] == [
            ("a", 2, 120),
            ("f", 1, 10),
            ("gone", 1, 1000),  # kept for its fork, not counted by stats
            ("g", 0, 0),
        ]
        assert kept[0][3] == count_events(live[:7]).bytes  # UTF-8 bytes, not characters
    finally:
        db.close()


def _trace_reads(db: sqlite3.Connection, tables: set[str]) -> None:
    """Record in ``tables`` every table a statement prepared from now on reads."""

    def authorize(action: int, arg1: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_READ and arg1 is not None:
            tables.add(arg1)
        return sqlite3.SQLITE_OK

    db.set_authorizer(authorize)


async def test_stats_reads_no_event_row(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/s.db") as store:
        await store.create(SessionRecord(id="s", user_id="ann", agent_id="helper"))
        await store.append("s", [NewEvent("message", '{"content":"x"}', 1.0), _usage(9)], 0)
        read: set[str] = set()
        await store._run(lambda db: _trace_reads(db, read))  # type: ignore[attr-defined]
        stats = await store.stats()
        assert (stats.messages, stats.tokens, stats.sessions) == (1, 9, 1)
        assert read == {"sessions"}
        [e async for b in store.read("s") for e in b]
        assert "events" in read  # the trace does see a read of the events


@pytest.mark.parametrize("synchronous", ["normal", "full"])  # the fast path, the worker
async def test_appends_keep_the_counters_on_either_thread(tmp_path: Path, synchronous: str) -> None:
    url = f"sqlite:///{tmp_path}/s.db?synchronous={synchronous}"
    events = [NewEvent("message", '{"content":"ünïcode"}', 1.0), _usage(10**30)]
    async with open_store(url) as store, open_store(url) as other:
        await store.create(SessionRecord(id="s"))
        head = await store.append("s", events, 0)
        await other.append("s", events, head)  # a huge total_tokens saturates, never fails
        db = sqlite3.connect(tmp_path / "s.db")
        try:
            row = db.execute("SELECT messages, tokens, bytes FROM sessions").fetchone()
        finally:
            db.close()
        assert row == (2, MAX_COUNTER, 2 * count_events(events).bytes)
        assert (await store.stats()).tokens == MAX_COUNTER


def _plan(store: Store, sql: str, params: tuple[object, ...]) -> Awaitable[str]:
    return store._run(  # type: ignore[attr-defined,no-any-return]
        lambda db: " | ".join(str(r[3]) for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    )


async def test_listing_and_counting_a_users_sessions_use_the_user_indexes(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/s.db") as store:
        await store.create(SessionRecord(id="a", user_id="ann"))
        for filters, index in [
            (("user_id",), "sessions_by_user (user_id=?"),
            (("user_id", "state"), "sessions_by_user_state (user_id=? AND state=?"),
            (("user_id", "agent_id"), "sessions_by_user (user_id=?"),
            (("user_id", "window_id", "state"), "sessions_by_user_state (user_id=? AND state=?"),
        ]:
            for keyset in (False, True):
                sql = listing_sql(filters, keyset=keyset)
                params = (1.0, *["x"] * len(filters), *((1.0, "x") if keyset else ()), 5)
                plan = await _plan(store, sql, params)
                assert f"SEARCH s USING INDEX {index}" in plan, (filters, plan)
                assert "TEMP B-TREE" not in plan, plan  # the index gives the order
                if keyset:
                    assert "(created_at,id)<(?,?)" in plan, plan  # a range, not a filter
        plan = await _plan(store, COUNT_USER_SQL, ("ann", 1.0))
        assert "USING INDEX sessions_by_user" in plan, plan


async def test_listing_a_users_sessions_costs_the_same_among_ten_times_more(
    tmp_path: Path,
) -> None:
    """The work SQLite does (virtual machine steps) to list or count one user's sessions
    does not grow with the other users' sessions."""
    path = tmp_path / "s.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.create(SessionRecord(id="mine-0", user_id="me", agent_id="a0"))
        db = sqlite3.connect(path, isolation_level=None)
        steps = [0]

        def tick() -> int:
            steps[0] += 1
            return 0

        def fill(first: int, count: int, mine: int) -> None:
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO sessions (id, user_id, agent_id, state, created_at, updated_at) "
                "VALUES (?, ?, ?, 'active', ?, 1.0)",
                [
                    (f"s{n}", f"u{n % 100}", f"a{n % 3}", float(n))
                    for n in range(first, first + count)
                ],
            )
            db.executemany(
                "INSERT INTO sessions (id, user_id, agent_id, state, created_at, updated_at) "
                "VALUES (?, 'me', 'a0', ?, ?, 1.0)",
                [(f"mine-{n}", "archived" if n % 2 else "active", 1.0) for n in range(1, mine)],
            )
            db.execute("COMMIT")

        async def cost(round: str) -> list[int]:
            counts = []
            for call in (
                lambda: store.list_sessions(user_id="me", limit=20),
                lambda: store.list_sessions(user_id="me", state="active", limit=20),
                lambda: store.list_sessions(user_id="me", agent_id="a0", limit=20),
                lambda: store.create(
                    SessionRecord(id=f"new-{round}", user_id="me", state="archived"),
                    max_per_user=1000,
                ),
            ):
                for conn in (store._db._db, store._db._fast):  # type: ignore[attr-defined]
                    conn.set_progress_handler(tick, 100)  # the worker's and the loop's
                steps[0] = 0
                await call()
                counts.append(steps[0])
            return counts

        try:
            fill(0, 2_000, mine=40)
            small = await cost("small")
            fill(10_000, 20_000, mine=0)
            large = await cost("large")
        finally:
            db.close()
    for before, after in zip(small, large, strict=True):
        assert after <= before * 1.5 + 5, (small, large)


@pytest.mark.parametrize("synchronous", ["normal", "full"])  # the fast path, the worker
async def test_an_archived_session_refuses_appends_on_either_thread(
    tmp_path: Path, synchronous: str
) -> None:
    path = tmp_path / "s.db"
    async with open_store(f"sqlite:///{path}?synchronous={synchronous}") as store:
        await store.create(SessionRecord(id="s", user_id="ann"))
        head = await store.append("s", [_usage(5)], 0)
        record = await store.get("s")
        await store.update(record.model_copy(update={"state": "archived"}), record.version)
        with pytest.raises(SessionArchivedError):
            await store.append("s", [NewEvent("message", '{"content":"no"}', 1.0)], head)
        db = sqlite3.connect(path)
        try:
            row = db.execute("SELECT head, messages, tokens FROM sessions").fetchone()
            assert row == (1, 0, 5)  # nothing written, the figures untouched
            assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 1
        finally:
            db.close()
        # the store stays usable on that connection: the refusal rolled back
        await store.create(SessionRecord(id="t"))
        assert await store.append("t", [_usage(1)], 0) == 1


async def test_purges_by_several_store_objects_at_once_count_each_session_once(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    stores = [open_store(url) for _ in range(4)]
    try:
        expires = time.time() + 0.5
        for n in range(450):  # more than two batches
            await stores[0].create(SessionRecord(id=f"s{n}", expires_at=expires))
            await stores[0].append(f"s{n}", [_usage(n)], 0)
        await stores[0].fork("s0", 1, SessionRecord(id="kept"))
        await asyncio.sleep(max(0.0, expires - time.time() + 0.05))
        purged = await asyncio.gather(*(s.purge_expired() for s in stores))
        assert sum(purged) == 450, purged
        assert [r.id for r in (await stores[1].list_sessions()).records] == ["kept"]
        assert [e.seq async for b in stores[2].read("kept") for e in b] == [1]
        stats = await stores[3].stats()
        assert (stats.sessions, stats.tokens, stats.by_state["expired"]) == (1, 0, 0)
        assert await stores[0].purge_expired() == 0
    finally:
        for s in stores:
            await s.aclose()
