"""Damaged storage gives a clear error or a reported repair, never silent loss.

Each durable backend damages its own storage the way a crash, a bad disk or a
bad hand edit would, using its own on-disk (or in-server) format.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from chatsession import (
    CorruptDataError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoreRepairWarning,
    StoreUnavailableError,
    open_store,
)
from chatsession.store.base import now
from tests.conformance.conftest import damage_record, make_fork_cycle


async def _seed(url: str, n: int = 20) -> None:
    store = open_store(url)
    await store.create(SessionRecord(id="s"))
    await store.append("s", [NewEvent("message", json.dumps({"n": i}), 1.0) for i in range(n)], 0)
    await store.aclose()


def _sqlite_path(url: str) -> Path:
    return Path(urlsplit(url).path[1:])


def _file_dir(url: str) -> Path:
    return Path(urlsplit(url).path) / "s"


async def _read(url: str) -> list[int]:
    store = open_store(url)
    try:
        await store.get("s")
        return [r.seq async for batch in store.read("s") for r in batch]
    finally:
        await store.aclose()


# -- sqlite ---------------------------------------------------------------------


async def sqlite_garbage(url: str) -> None:
    path = _sqlite_path(url)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.write_bytes(b"this is not a database at all" * 200)


async def sqlite_missing_rows(url: str) -> None:
    db = sqlite3.connect(_sqlite_path(url))
    db.execute("DELETE FROM events WHERE seq IN (5, 6)")
    db.commit()
    db.close()


async def sqlite_truncated(url: str) -> None:
    path = _sqlite_path(url)
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


# -- file ------------------------------------------------------------------------


async def file_middle_line(url: str) -> None:
    path = _file_dir(url) / "context.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[7] = '{"seq": 8, "type": "mess\n'
    path.write_text("".join(lines))


async def file_bad_header(url: str) -> None:
    (_file_dir(url) / "session.json").write_text("{ not json")


# -- redis -----------------------------------------------------------------------


async def _redis_call(url: str, *command: object) -> None:
    import redis.asyncio as aioredis

    from tests.conformance.conftest import REDIS_URL

    prefix = dict(parse_qsl(urlsplit(url).query))["prefix"]
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.execute_command(*[str(c).replace("PREFIX", prefix) for c in command])
    finally:
        await client.aclose()


async def redis_garbage_event(url: str) -> None:
    await _redis_call(url, "LSET", "PREFIX{s}:ev", 4, "garbage without separators")


async def redis_missing_events(url: str) -> None:
    await _redis_call(url, "LTRIM", "PREFIX{s}:ev", 0, 9)


async def redis_bad_record(url: str) -> None:
    await _redis_call(url, "HSET", "PREFIX{s}:rec", "head", "not-a-number")


# -- postgres --------------------------------------------------------------------


async def _pg_execute(url: str, sql: str) -> None:
    import asyncpg

    from tests.conformance.conftest import POSTGRES_URL

    schema = dict(parse_qsl(urlsplit(url).query))["schema"]
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(sql.replace("SCHEMA", f'"{schema}"'))
    finally:
        await conn.close()


async def postgres_missing_rows(url: str) -> None:
    await _pg_execute(url, "DELETE FROM SCHEMA.events WHERE seq IN (5, 6)")


async def postgres_bad_record(url: str) -> None:
    await _pg_execute(url, """UPDATE SCHEMA.sessions SET body = '{"metadata": 5}'""")


DAMAGE: dict[str, list[Callable[[str], Awaitable[None]]]] = {
    "sqlite": [sqlite_garbage, sqlite_missing_rows, sqlite_truncated],
    "file": [file_middle_line, file_bad_header],
    "redis": [redis_garbage_event, redis_missing_events, redis_bad_record],
    "postgres": [postgres_missing_rows, postgres_bad_record],
}


def _damage_cases(backend: str) -> list[Callable[[str], Awaitable[None]]]:
    cases = DAMAGE.get(backend)
    assert cases, f"no damage recipe for backend {backend!r}: add one to DAMAGE"
    return cases


#: Words of a message that tells the user what to do about damage.
REMEDIES = ("restore", "backup", "salvage", "repair", "recover", "delete", "remove", "move")


def _names_the_damage(message: str, url: str, backend: str) -> bool:
    """Whether ``message`` names the damaged session (``'s'``) or where it is stored."""
    if "'s'" in message or '"s"' in message or "{s}" in message:
        return True
    if backend == "sqlite":
        return str(_sqlite_path(url)) in message
    if backend == "file":
        return str(_file_dir(url)) in message
    return False


async def test_damage_is_reported_never_silent(durable_backend: str, tmp_path: Path) -> None:
    from tests.conformance.conftest import cleanup, make_url

    for damage in _damage_cases(durable_backend):
        url, namespace = make_url(durable_backend, tmp_path / damage.__name__)
        (tmp_path / damage.__name__).mkdir()
        try:
            await _seed(url)
            await damage(url)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", StoreRepairWarning)
                try:
                    seqs = await _read(url)
                except CorruptDataError as exc:
                    message = str(exc)
                    assert _names_the_damage(message, url, durable_backend), (
                        f"{damage.__name__}: the error names neither the session nor its "
                        f"storage: {message}"
                    )
                    assert any(word in message.lower() for word in REMEDIES), (
                        f"{damage.__name__}: the error says nothing to do: {message}"
                    )
                except (SessionNotFoundError, StoreUnavailableError) as exc:
                    pytest.fail(
                        f"{damage.__name__}: damage reported as {type(exc).__name__}: {exc}"
                    )
                else:
                    repaired = [w for w in caught if issubclass(w.category, StoreRepairWarning)]
                    assert repaired, (
                        f"{damage.__name__}: read {len(seqs)} events with no error or repair report"
                    )
                    assert seqs == list(range(1, len(seqs) + 1))
        finally:
            await cleanup(durable_backend, namespace)


# -- damage every backend must survive (the hooks live in conftest.py) ------------


async def _read_all(store: Store, session_id: str) -> list[int]:
    return [r.seq async for batch in store.read(session_id) for r in batch]


@pytest.mark.timeout(60, method="thread")  # old code looped forever: end the run, loudly
async def test_a_fork_parent_cycle_is_corrupt_data_not_an_endless_loop(
    store: Store, backend: str, store_url: str
) -> None:
    await store.create(SessionRecord(id="a"))
    await store.append("a", [NewEvent("message", json.dumps({"n": i}), 1.0) for i in range(3)], 0)
    await store.fork("a", 2, SessionRecord(id="b"))
    await store.append("b", [NewEvent("message", "{}", 2.0)], 2)
    await store.create(SessionRecord(id="bystander"))
    await make_fork_cycle(backend, store, store_url, "a", "b")

    stores = [store] if backend == "memory" else [store, open_store(store_url)]
    try:
        for current in stores:
            for session_id in ("a", "b"):
                with pytest.raises(CorruptDataError) as info:
                    await _read_all(current, session_id)
                message = str(info.value)
                assert f"'{session_id}'" in message, message
                assert "loop" in message or "cycle" in message, message
                assert any(word in message.lower() for word in REMEDIES), message
                with pytest.raises(CorruptDataError):
                    await current.get_blob(session_id, "0" * 64)
            assert await _read_all(current, "bystander") == []
            assert "bystander" in {r.id for r in (await current.list_sessions()).records}
    finally:
        for other in stores[1:]:
            await other.aclose()


async def test_one_damaged_session_does_not_break_the_listing(
    durable_backend: str, durable_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(durable_url)
    try:
        for i in range(5):
            await store.create(SessionRecord(id=f"s{i}", user_id="u", created_at=1000.0 + i))
        await store.create(SessionRecord(id="old", created_at=999.0, expires_at=now() + 1000))
        await damage_record(durable_backend, store, durable_url, "s2")
    finally:
        await store.aclose()

    store = open_store(durable_url)  # a fresh object: nothing cached from before the damage
    try:
        with pytest.raises(CorruptDataError) as info:
            await store.get("s2")
        assert "'s2'" in str(info.value) or _names_the_damage(
            str(info.value), durable_url, durable_backend
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="chatsession.store"):
            page = await store.list_sessions()
        assert [r.id for r in page.records] == ["s4", "s3", "s1", "s0", "old"]
        warned = [
            r
            for r in caplog.records
            if r.name.startswith("chatsession.store") and r.levelno == logging.WARNING
        ]
        assert any("s2" in r.getMessage() for r in warned), [r.getMessage() for r in warned]

        for limit in (1, 2, 3):  # a page never stops short of the sessions after the damage
            seen: list[str] = []
            cursor = None
            while True:
                page = await store.list_sessions(user_id="u", limit=limit, cursor=cursor)
                seen.extend(r.id for r in page.records)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert seen == ["s4", "s3", "s1", "s0"], (limit, seen)

        assert await store.purge_expired(before=now() + 2000) == 1  # the damage stops no cleanup
        assert [r.id for r in (await store.list_sessions()).records] == ["s4", "s3", "s1", "s0"]
    finally:
        await store.aclose()
