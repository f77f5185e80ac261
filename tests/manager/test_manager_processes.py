"""SessionManager across processes and with real clocks: a lock another process
holds (turns and locks wait or fail; a killed holder frees the session when its
lease runs out), and real short TTLs (Redis expires natively; SQLite hides the
session at once and cleanup removes every row)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from chatsession import Agent, ScriptedLLM, SessionBusyError, SessionManager

from ..conformance.conftest import BACKENDS, REDIS_URL, cleanup, make_url, sqlite_path

WORKER = Path(__file__).with_name("lock_worker.py")
pytestmark = pytest.mark.slow


def start_holder(url: str, session_id: str, user_id: str, ttl: float) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, str(WORKER), url, session_id, user_id, str(ttl)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.startswith("LOCKED "):
        child.kill()
        _, err = child.communicate()
        raise AssertionError(f"the holder did not lock: {line!r} {err!r}")
    return child


async def test_a_lock_held_by_another_process_holds_off_turns_and_locks(
    durable_url: str,
) -> None:
    async with SessionManager(durable_url, busy_timeout=0) as manager:
        session = await manager.create_session("ann", "assistant")
        sid = session.session_id
        child = await asyncio.to_thread(start_holder, durable_url, sid, "ann", 5.0)
        try:
            with pytest.raises(SessionBusyError) as caught:
                async with manager.lock(sid, "ann", timeout=0):
                    raise AssertionError("took a lock another process holds")
            assert caught.value.holder is not None and "lock-worker" in caught.value.holder

            chat = await manager.chat(sid, "ann", Agent(ScriptedLLM(["never said"])))
            async with chat:
                with pytest.raises(SessionBusyError):
                    await chat.query("hello?")
            # held past the lease's first 5 s: it is renewed while held
            await asyncio.sleep(6)
            with pytest.raises(SessionBusyError):
                async with manager.lock(sid, "ann", timeout=0.2):
                    raise AssertionError("took a renewed lock")

            # released by its owner: a waiting lock gets it
            async def release_soon() -> None:
                await asyncio.sleep(0.3)
                assert child.stdin is not None
                child.stdin.write("release\n")
                child.stdin.flush()

            releaser = asyncio.create_task(release_soon())
            async with manager.lock(sid, "ann", timeout=10) as lock:
                assert lock.token > 0
            await releaser
            assert child.stdout is not None
            assert (await asyncio.to_thread(child.stdout.readline)).strip() == "RELEASED"
        finally:
            child.kill()
            child.communicate()

        chat = await manager.chat(sid, "ann", Agent(ScriptedLLM(["now it works"])))
        async with chat:
            assert await chat.query("hello") == "now it works"


async def test_a_killed_lock_holder_frees_the_session_when_its_lease_runs_out(
    durable_url: str,
) -> None:
    async with SessionManager(durable_url, busy_timeout=0) as manager:
        sid = (await manager.create_session("ann", "assistant")).session_id
        child = await asyncio.to_thread(start_holder, durable_url, sid, "ann", 2.0)
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        with pytest.raises(SessionBusyError):
            async with manager.lock(sid, "ann", timeout=0):
                pass
        started = time.monotonic()
        async with manager.lock(sid, "ann", timeout=10):
            waited = time.monotonic() - started
        assert 0.2 < waited < 8, waited  # the dead holder's lease ran out; not at once


@pytest.mark.skipif("sqlite" not in BACKENDS, reason="CHATSESSION_TEST_BACKENDS leaves out sqlite")
async def test_a_real_short_ttl_on_sqlite(tmp_path: Path) -> None:
    url, _ = make_url("sqlite", tmp_path)
    async with SessionManager(url, ttl=1.0) as manager:
        gone = await manager.create_session("ann", "assistant", metadata={"k": "v"})
        kept = await manager.create_session("ann", "assistant", ttl=3600)
        assert await manager.session_exists(gone.session_id, "ann")
        await asyncio.sleep(1.3)
        assert not await manager.session_exists(gone.session_id, "ann")
        assert [s.session_id for s in await manager.get_sessions_by_user("ann")] == [
            kept.session_id
        ]
        assert await manager.get_active_session_count("ann") == 1
        assert (await manager.stats()).by_state["expired"] == 1
        assert await manager.cleanup_expired() == 1
        db = sqlite3.connect(sqlite_path(url))
        try:
            ids = [row[0] for row in db.execute("SELECT id FROM sessions")]
        finally:
            db.close()
        assert ids == [kept.session_id]


@pytest.mark.skipif("redis" not in BACKENDS, reason="CHATSESSION_TEST_BACKENDS leaves out redis")
async def test_a_real_short_ttl_on_redis_expires_natively(tmp_path: Path) -> None:
    import redis.asyncio as aioredis

    url, namespace = make_url("redis", tmp_path)
    prefix = dict(parse_qsl(urlsplit(url).query))["prefix"]
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        async with SessionManager(url, ttl=1.0) as manager:
            gone = await manager.create_session("ann", "assistant")
            kept = await manager.create_session("ann", "assistant", ttl=3600)
            chat = await manager.chat(gone.session_id, "ann", Agent(ScriptedLLM(["hi"])))
            async with chat:
                await chat.query("hello")

            def session_keys(session_id: str) -> list[bytes]:
                return [k for k in keys if session_id.encode() in k]

            keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
            assert session_keys(gone.session_id)  # its record and events are stored
            await asyncio.sleep(1.6)
            assert not await manager.session_exists(gone.session_id, "ann")
            assert [s.session_id for s in await manager.get_sessions_by_user("ann")] == [
                kept.session_id
            ]
            keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
            # Redis removed the session's own keys by itself, before any cleanup ran
            assert session_keys(gone.session_id) == [], session_keys(gone.session_id)
            assert session_keys(kept.session_id)
            await manager.cleanup_expired()  # the index entries go too
            for key in [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]:
                kind = (await client.type(key)).decode()
                if kind == "zset":
                    assert await client.zscore(key, gone.session_id) is None, key
                elif kind == "set":
                    assert not await client.sismember(key, gone.session_id), key
    finally:
        await client.aclose()
        await cleanup("redis", namespace)
