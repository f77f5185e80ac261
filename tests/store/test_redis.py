"""What only the Redis backend does: key layout, native expiry, processes, outages."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from chatsession import (
    InvalidURLError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    StoreUnavailableError,
    open_store,
)
from chatsession.store.redis import RedisStore

REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
WRITER = Path(__file__).with_name("turn_writer.py")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A unique key prefix, every key under it deleted afterwards."""
    value = f"cstest-{uuid.uuid4().hex[:10]}:"
    yield value
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{value}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def ev(n: int) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0)


def test_url_options_and_password_masking() -> None:
    store = open_store("redis://user:secret@127.0.0.1:6379/3?prefix=app:&socket_timeout=2")
    assert isinstance(store, RedisStore)
    assert store.prefix == "app:"
    assert "secret" not in store.url and "***" in store.url
    for bad in (
        "redis://127.0.0.1/0?prefx=a",
        "redis://127.0.0.1/0?socket_timeout=soon",
        "redis:///0",
    ):
        with pytest.raises(InvalidURLError):
            open_store(bad)
    with pytest.raises(InvalidURLError):
        open_store("redis://127.0.0.1/0?prefix={bad}")


async def test_every_key_is_under_the_prefix_and_hash_tagged(prefix: str) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="s1", user_id="alice", agent_id="bot", window_id="w"))
        await store.append("s1", [ev(1), ev(2)], 0)
        await store.put_blob("s1", b"blob")
        await store.fork("s1", 1, SessionRecord(id="s2", user_id="alice"))
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    keys = sorted([k async for k in client.scan_iter(match=f"{prefix}*", count=1000)])
    await client.aclose()
    session_keys = [k for k in keys if "{idx}" not in k]
    assert session_keys == sorted(
        [f"{prefix}{{s1}}:rec", f"{prefix}{{s1}}:ev", f"{prefix}{{s1}}:blob", f"{prefix}{{s2}}:rec"]
    )
    assert {k for k in keys if "{idx}" in k} == {
        f"{prefix}{{idx}}:all",
        f"{prefix}{{idx}}:user:alice",
        f"{prefix}{{idx}}:agent:bot",
        f"{prefix}{{idx}}:window:w",
    }


async def test_native_expiry_and_stale_index_members(prefix: str) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        soon = time.time() + 1.0
        await store.create(SessionRecord(id="brief", user_id="u", expires_at=soon))
        await store.append("brief", [ev(1)], 0)
        await store.create(SessionRecord(id="kept", user_id="u"))
        client = aioredis.Redis.from_url(REDIS_URL)
        ttl = await client.pttl(f"{prefix}{{brief}}:ev")
        assert 0 < ttl <= 1000
        assert await client.pttl(f"{prefix}{{kept}}:rec") == -1
        await asyncio.sleep(1.2)
        # Redis has evicted the keys; the index member is stale until cleanup
        assert await client.exists(f"{prefix}{{brief}}:rec") == 0
        assert await client.zscore(f"{prefix}{{idx}}:user:u", "brief") is not None
        assert [r.id for r in (await store.list_sessions(user_id="u")).records] == ["kept"]
        with pytest.raises(SessionNotFoundError):
            await store.get("brief")
        assert await store.purge_expired() == 1
        assert await client.zscore(f"{prefix}{{idx}}:user:u", "brief") is None
        await client.aclose()


async def test_a_parent_with_forks_never_expires_natively(prefix: str) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="p", expires_at=time.time() + 0.5))
        await store.append("p", [ev(1), ev(2)], 0)
        await store.fork("p", 2, SessionRecord(id="f"))
        await asyncio.sleep(0.8)
        with pytest.raises(SessionNotFoundError):
            await store.get("p")  # invisible: past its expires_at
        rows = [r async for b in store.read("f") for r in b]  # but its fork still reads it
        assert [r.seq for r in rows] == [1, 2]
        assert await store.purge_expired() == 1
        assert [r.seq async for b in store.read("f") for r in b] == [1, 2]
        await store.delete("f")
        client = aioredis.Redis.from_url(REDIS_URL)
        assert [k async for k in client.scan_iter(match=f"{prefix}{{p}}*")] == []
        await client.aclose()


@pytest.mark.parametrize("sessions", [1, 50])
async def test_four_processes_times_250_turns(prefix: str, sessions: int) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
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
            key = (sid, int(seq))
            assert key not in acked
            acked[key] = payload
    assert len(acked) == 4 * 250 * 2
    async with open_store(url) as store:
        total = 0
        for n in range(sessions):
            rows = [r async for b in store.read(f"s{n}") for r in b]
            assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
            for r in rows:
                assert acked[(f"s{n}", r.seq)] == json.loads(r.data)["p"]
            total += len(rows)
    assert total == len(acked)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A Redis server of this test's own, with an fsync-always append-only file."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed"
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    start()
    yield port, procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_server_killed_and_restarted(
    own_redis: tuple[int, list[subprocess.Popen[bytes]]], tmp_path: Path
) -> None:
    port, procs = own_redis
    url = f"redis://127.0.0.1:{port}/0?socket_timeout=1&socket_connect_timeout=1"
    store = open_store(url)
    await store.create(SessionRecord(id="s"))
    head = 0
    for n in range(50):
        head = await store.append("s", [ev(n)], head)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    for call in (store.get("s"), store.append("s", [ev(99)], head), store.list_sessions()):
        with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}"):
            await call
    # restart on the same port and data directory
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    procs.append(proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            record = await store.get("s")  # the same store object recovers
            break
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    assert record.head == 50
    rows = [r async for b in store.read("s") for r in b]
    assert [json.loads(r.data)["n"] for r in rows] == list(range(50))
    assert await store.append("s", [ev(50)], 50) == 51
    await store.aclose()
