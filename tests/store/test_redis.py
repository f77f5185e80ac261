"""What only the Redis backend does: key layout, native expiry, processes, outages."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection

import chatsession.store.redis as redis_module
from chatsession import (
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    StoreError,
    StoreUnavailableError,
    open_store,
)
from chatsession.store.redis import RedisStore

REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
WRITER = Path(__file__).with_name("turn_writer.py")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A unique key prefix, every key under it deleted afterwards."""
    value = f"cstest-{uuid.uuid4().hex[:10]}:"  # no glob characters: safe in MATCH
    yield value
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{value}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the shared test server, for looking under the store."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


def ev(n: int) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0)


async def read_all(store: Any, session_id: str) -> list[Any]:
    return [r async for b in store.read(session_id) for r in b]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- URLs --------------------------------------------------------------------------


def test_url_options_and_password_masking() -> None:
    store = open_store("redis://user:secret@127.0.0.1:6379/3?prefix=app:&socket_timeout=2")
    assert isinstance(store, RedisStore)
    assert store.prefix == "app:"
    assert "secret" not in store.url and "***" in store.url
    for bad in (
        "redis://127.0.0.1/0?prefx=a",
        "redis://127.0.0.1/0?socket_timeout=soon",
        "redis://127.0.0.1/0?pool_timeout=soon",
        "redis://127.0.0.1/0?max_connections=0",
        "redis:///0",
        "redis://127.0.0.1/0?prefix={bad}",
        "redis://127.0.0.1/0?ssl_ca_certs=/ca.pem",  # TLS options need rediss://
        "rediss://127.0.0.1/0?ssl_cert_reqs=maybe",
        "rediss://127.0.0.1/0?ssl_check_hostname=perhaps",
        "rediss://127.0.0.1/0?ssl_min_version=SSLv2",
    ):
        with pytest.raises(InvalidURLError):
            open_store(bad)


async def test_tls_and_pool_options_reach_the_connection_pool() -> None:
    url = (
        "rediss://u:pw@cache.example:6380/2?prefix=app:&max_connections=7&pool_timeout=1.5"
        "&ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem&ssl_certfile=/etc/c.pem"
        "&ssl_keyfile=/etc/k.pem&ssl_check_hostname=false&ssl_min_version=TLSv1_2"
    )
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert "pw" not in store.url
    pool = store._redis().connection_pool  # builds the pool; connects nothing
    try:
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.connection_class is SSLConnection
        assert (pool.max_connections, pool.timeout) == (7, 1.5)
        kw = pool.connection_kwargs
        assert (kw["host"], kw["port"], kw["db"], kw["username"], kw["password"]) == (
            "cache.example",
            6380,
            2,
            "u",
            "pw",
        )
        assert kw["ssl_cert_reqs"] == "required"
        assert kw["ssl_ca_certs"] == "/etc/ca.pem"
        assert (kw["ssl_certfile"], kw["ssl_keyfile"]) == ("/etc/c.pem", "/etc/k.pem")
        assert kw["ssl_check_hostname"] is False
        assert kw["ssl_min_version"] is ssl.TLSVersion.TLSv1_2
        assert kw["retry"].get_retries() == 0  # a lost reply is never re-sent
    finally:
        await store.aclose()


# -- layout and expiry ---------------------------------------------------------------


async def test_every_key_is_under_the_prefix_and_hash_tagged(prefix: str) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="s1", user_id="alice", agent_id="bot", window_id="w"))
        await store.append("s1", [ev(1), ev(2)], 0)
        await store.put_blob("s1", b"blob")
        await store.fork("s1", 1, SessionRecord(id="s2", user_id="alice"))
        await store.create(SessionRecord(id="s3", expires_at=time.time() + 60))
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    keys = sorted([k async for k in client.scan_iter(match=f"{prefix}*", count=1000)])
    await client.aclose()
    session_keys = [k for k in keys if "{idx}" not in k]
    assert session_keys == sorted(
        [
            f"{prefix}{{s1}}:rec",
            f"{prefix}{{s1}}:ev",
            f"{prefix}{{s1}}:blob",
            f"{prefix}{{s2}}:rec",
            f"{prefix}{{s3}}:rec",
        ]
    )
    assert {k for k in keys if "{idx}" in k} == {
        f"{prefix}{{idx}}:all",
        f"{prefix}{{idx}}:user:alice",
        f"{prefix}{{idx}}:agent:bot",
        f"{prefix}{{idx}}:window:w",
        f"{prefix}{{idx}}:expiry",
        f"{prefix}{{idx}}:where",
    }


async def test_native_expiry_and_stale_index_members(prefix: str, raw: aioredis.Redis) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        soon = time.time() + 1.0
        await store.create(SessionRecord(id="brief", user_id="u", expires_at=soon))
        await store.append("brief", [ev(1)], 0)
        await store.put_blob("brief", b"x")
        await store.create(SessionRecord(id="kept", user_id="u"))
        for key in ("rec", "ev", "blob"):
            assert 0 < await raw.pttl(f"{prefix}{{brief}}:{key}") <= 1000
        assert await raw.pttl(f"{prefix}{{kept}}:rec") == -1
        await asyncio.sleep(1.2)
        # Redis has evicted the keys; the index member is stale until cleanup
        assert await raw.exists(f"{prefix}{{brief}}:rec") == 0
        assert await raw.zscore(f"{prefix}{{idx}}:user:u", "brief") is not None
        assert [r.id for r in (await store.list_sessions(user_id="u")).records] == ["kept"]
        with pytest.raises(SessionNotFoundError):
            await store.get("brief")
        assert await store.purge_expired() == 1
        for index in ("user:u", "all", "expiry"):
            assert await raw.zscore(f"{prefix}{{idx}}:{index}", "brief") is None
        assert await raw.hexists(f"{prefix}{{idx}}:where", "brief") == 0
        assert await store.purge_expired() == 0


async def test_listings_hide_an_expired_parent_whose_keys_remain(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="p", user_id="u", expires_at=time.time() + 0.5))
        await store.append("p", [ev(1)], 0)
        await store.fork("p", 1, SessionRecord(id="f", user_id="u"))
        await asyncio.sleep(0.7)
        # a parent with forks never gets a native expiry: its keys are all still there
        assert await raw.pttl(f"{prefix}{{p}}:rec") == -1
        assert await raw.exists(f"{prefix}{{p}}:ev") == 1
        for kw in ({}, {"user_id": "u"}, {"state": "active"}):
            assert [r.id for r in (await store.list_sessions(**kw)).records] == ["f"]
        with pytest.raises(SessionNotFoundError):
            await store.get("p")


async def test_a_parent_with_forks_never_expires_natively(prefix: str, raw: aioredis.Redis) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="p", expires_at=time.time() + 0.5))
        await store.append("p", [ev(1), ev(2)], 0)
        await store.fork("p", 2, SessionRecord(id="f"))
        await asyncio.sleep(0.8)
        with pytest.raises(SessionNotFoundError):
            await store.get("p")  # invisible: past its expires_at
        rows = await read_all(store, "f")  # but its fork still reads it
        assert [r.seq for r in rows] == [1, 2]
        assert await store.purge_expired() == 1
        assert [r.seq for r in await read_all(store, "f")] == [1, 2]
        await store.delete("f")
        assert [k async for k in raw.scan_iter(match=f"{prefix}{{p}}*")] == []


async def test_a_fork_evicted_by_redis_releases_its_parent(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(1)], 0)
        await store.fork("p", 1, SessionRecord(id="brief", expires_at=time.time() + 0.5))
        await store.fork("p", 1, SessionRecord(id="kept"))
        await store.delete("p")  # a tombstone, for its two forks
        assert await raw.hget(f"{prefix}{{p}}:rec", "children") == b"2"
        await asyncio.sleep(0.7)
        assert await raw.exists(f"{prefix}{{brief}}:rec") == 0  # gone natively
        assert await store.purge_expired() == 1
        assert await raw.hget(f"{prefix}{{p}}:rec", "children") == b"1"
        await store.delete("kept")  # the last fork: the tombstone goes too
        left = [k async for k in raw.scan_iter(match=f"{prefix}*")]
        assert left == [], left


async def test_an_id_reused_after_native_expiry_starts_clean(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="s", user_id="old", expires_at=time.time() + 0.3))
        await store.append("s", [ev(1)], 0)
        await asyncio.sleep(0.5)
        await store.create(SessionRecord(id="s", user_id="new"))
        assert (await store.list_sessions(user_id="old")).records == []
        assert await raw.zscore(f"{prefix}{{idx}}:user:old", "s") is None
        assert await raw.zscore(f"{prefix}{{idx}}:expiry", "s") is None
        assert [r.id for r in (await store.list_sessions(user_id="new")).records] == ["s"]
        assert await read_all(store, "s") == []
        assert await store.purge_expired() == 0
        assert (await store.get("s")).user_id == "new"


async def test_update_moves_indexes_and_expiry_in_one_step(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        rec = await store.create(SessionRecord(id="s", user_id="a"))
        await store.append("s", [ev(1)], 0)
        later = time.time() + 100
        rec = await store.update(rec.model_copy(update={"user_id": "b", "expires_at": later}), 1)
        assert [r.id for r in (await store.list_sessions(user_id="b")).records] == ["s"]
        assert await raw.zscore(f"{prefix}{{idx}}:user:a", "s") is None
        for key in ("rec", "ev"):
            assert abs(await raw.pexpiretime(f"{prefix}{{s}}:{key}") - later * 1000) < 2
        assert await raw.zscore(f"{prefix}{{idx}}:expiry", "s") == pytest.approx(later)
        await store.fork("s", 1, SessionRecord(id="f"))
        rec = await store.get("s")
        await store.update(rec.model_copy(update={"expires_at": time.time() + 0.2}), rec.version)
        assert await raw.pttl(f"{prefix}{{s}}:rec") == -1  # it has a fork: no native expiry
        rec = await store.get("f")
        await store.update(rec.model_copy(update={"expires_at": None}), rec.version)
        assert await raw.zscore(f"{prefix}{{idx}}:expiry", "f") is None


# -- listing -------------------------------------------------------------------------


async def test_listing_work_is_bounded_and_pages_still_progress(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        assert isinstance(store, RedisStore)
        await store.create(SessionRecord(id="wanted", created_at=1000.0))
        past = time.time() - 10
        for i in range(120):  # expired at once: stale members Redis already evicted
            await store.create(
                SessionRecord(id=f"gone{i:03d}", created_at=2000.0 + i, expires_at=past)
            )
        for i in range(150):  # rejected by the state filter
            await store.create(
                SessionRecord(id=f"idle{i:03d}", state="idle", created_at=3000.0 + i)
            )
        reads: list[int] = []
        real = store._hgetall_many

        async def counting(r: Any, ids: list[str]) -> Any:
            reads.append(len(ids))
            return await real(r, ids)

        monkeypatch.setattr(store, "_hgetall_many", counting)
        pages = []
        cursor = None
        while True:
            reads.clear()
            page = await store.list_sessions(state="active", limit=2, cursor=cursor)
            assert sum(reads) <= 100  # max(10 * limit, 100)
            pages.append([r.id for r in page.records])
            if page.next_cursor is None:
                break
            assert page.next_cursor != cursor, "the cursor must move past what was read"
            cursor = page.next_cursor
        assert pages[0] == [] and len(pages) == 3
        assert [s for p in pages for s in p] == ["wanted"]


async def test_listing_keyset_with_ties_under_deletes(prefix: str) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        for i in range(30):
            await store.create(SessionRecord(id=f"s{i:02d}", created_at=1000.0 + i // 10))
        first = await store.list_sessions(limit=4)
        assert [r.id for r in first.records] == ["s29", "s28", "s27", "s26"]
        await store.delete("s26")  # the cursor's own member goes away
        await store.delete("s25")
        rest: list[str] = []
        cursor = first.next_cursor
        while cursor:
            page = await store.list_sessions(limit=4, cursor=cursor)
            rest.extend(r.id for r in page.records)
            cursor = page.next_cursor
        assert rest == [f"s{i:02d}" for i in range(24, -1, -1)]


# -- writes that fail half way ------------------------------------------------------


class ReplyDropper:
    """A TCP proxy in front of Redis that can lose the reply to the next EVALSHA.

    The script still runs on the server: this is a connection dropped (or a
    timeout) after Redis did the work and before the client heard of it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        drop = False

        async def upstream() -> None:
            nonlocal drop
            try:
                while data := await creader.read(65536):
                    if self.armed and b"EVALSHA" in data.upper():
                        self.armed, drop = False, True
                    swriter.write(data)
                    await swriter.drain()
            finally:
                swriter.close()

        async def downstream() -> None:
            try:
                while data := await sreader.read(65536):
                    if drop:
                        self.dropped += 1
                        return  # lose the reply and hang up
                    cwriter.write(data)
                    await cwriter.drain()
            finally:
                cwriter.close()
                swriter.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


def _redis_port() -> int:
    from urllib.parse import urlsplit

    return urlsplit(REDIS_URL).port or 6379


@pytest.fixture
async def dropper() -> AsyncIterator[ReplyDropper]:
    proxy = ReplyDropper(_redis_port())
    yield proxy
    await proxy.close()


async def _lost_reply(store: Any, proxy: ReplyDropper, call: Any) -> StoreUnavailableError:
    """Run ``call`` with the reply to its script lost; return the error it raised."""
    proxy.armed, before = True, proxy.dropped
    with pytest.raises(StoreUnavailableError) as info:
        await call
    assert proxy.dropped == before + 1, "the proxy did not intercept the script"
    assert "may or may not have been applied" in str(info.value)
    return info.value


async def _proxied(prefix: str, proxy: ReplyDropper) -> RedisStore:
    db = REDIS_URL.rsplit("/", 1)[-1]
    port = await proxy.start()
    store = open_store(f"redis://127.0.0.1:{port}/{db}?prefix={prefix}")
    assert isinstance(store, RedisStore)
    # load every script first, so the dropped reply is the script's, not a NOSCRIPT
    loader = aioredis.Redis.from_url(REDIS_URL)
    for source in redis_module._SCRIPTS.values():
        await loader.script_load(source)
    await loader.aclose()
    return store


async def test_a_lost_append_reply_is_never_retried(prefix: str, dropper: ReplyDropper) -> None:
    store = await _proxied(prefix, dropper)
    try:
        await store.create(SessionRecord(id="s"))
        await _lost_reply(store, dropper, store.append("s", [ev(1)], 0))
        # the script ran exactly once: a client retry would have run it again and
        # answered our own write with a ConflictError
        assert (await store.get("s")).head == 1
        assert [json.loads(r.data)["n"] for r in await read_all(store, "s")] == [1]
        with pytest.raises(ConflictError):
            await store.append("s", [ev(1)], 0)
        assert await store.append("s", [ev(2)], 1) == 2
    finally:
        await store.aclose()


async def test_lost_replies_leave_every_write_whole(
    prefix: str, dropper: ReplyDropper, raw: aioredis.Redis
) -> None:
    store = await _proxied(prefix, dropper)
    try:
        # create: the record and its index entries land together
        await _lost_reply(store, dropper, store.create(SessionRecord(id="p", user_id="u")))
        assert [r.id for r in (await store.list_sessions(user_id="u")).records] == ["p"]
        await store.append("p", [ev(1), ev(2)], 0)

        # fork: the fork exists exactly when the parent counts it
        await _lost_reply(store, dropper, store.fork("p", 1, SessionRecord(id="f", user_id="u")))
        assert (await store.get("f")).parent is not None
        assert await raw.hget(f"{prefix}{{p}}:rec", "children") == b"1"
        assert [r.seq for r in await read_all(store, "f")] == [1]

        # update: the native expiry moves with the record
        rec = await store.get("f")
        later = time.time() + 100
        await _lost_reply(
            store, dropper, store.update(rec.model_copy(update={"expires_at": later}), rec.version)
        )
        assert abs(await raw.pexpiretime(f"{prefix}{{f}}:rec") - later * 1000) < 2

        # put_blob: the blob gets its session's expiry with it
        await _lost_reply(store, dropper, store.put_blob("f", b"data"))
        assert abs(await raw.pexpiretime(f"{prefix}{{f}}:blob") - later * 1000) < 2

        # delete: the fork, its index entries and its hold on the parent go together
        await _lost_reply(store, dropper, store.delete("f"))
        assert await raw.hget(f"{prefix}{{p}}:rec", "children") == b"0"
        assert [r.id for r in (await store.list_sessions(user_id="u")).records] == ["p"]
    finally:
        await store.aclose()


# -- pool, errors, reads ------------------------------------------------------------


async def test_a_burst_waits_for_a_free_connection(prefix: str) -> None:
    url = f"{REDIS_URL}?prefix={prefix}&max_connections=2&pool_timeout=10"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        records = await asyncio.gather(*(store.get("s") for _ in range(40)))
        assert {r.id for r in records} == {"s"}


async def test_a_pool_busy_past_its_timeout_is_unavailable(prefix: str) -> None:
    url = f"{REDIS_URL}?prefix={prefix}&max_connections=1&pool_timeout=0.2"
    store = open_store(url)
    assert isinstance(store, RedisStore)
    try:
        await store.create(SessionRecord(id="s"))
        pool = store._redis().connection_pool
        held = await pool.get_connection()
        try:
            with pytest.raises(StoreUnavailableError, match="max_connections"):
                await store.get("s")
        finally:
            await pool.release(held)
        assert (await store.get("s")).id == "s"
    finally:
        await store.aclose()


async def test_read_checks_its_arguments_before_any_io() -> None:
    store = open_store(f"redis://127.0.0.1:{_free_port()}/0?socket_connect_timeout=1")
    try:
        for kw in ({"after_seq": -1}, {"upto_seq": -2}, {"batch_size": 0}, {"after_seq": True}):
            with pytest.raises(ValueError):
                await read_all_kw(store, "s", **kw)
        with pytest.raises(StoreUnavailableError):  # a good call does reach for the server
            await read_all_kw(store, "s")
    finally:
        await store.aclose()


async def read_all_kw(store: Any, session_id: str, **kw: Any) -> list[Any]:
    return [r async for b in store.read(session_id, **kw) for r in b]


async def test_a_key_of_the_wrong_type_is_corrupt_data(prefix: str, raw: aioredis.Redis) -> None:
    await raw.set(f"{prefix}{{s}}:rec", "not a hash")
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        with pytest.raises(CorruptDataError, match="prefix"):
            await store.get("s")
        with pytest.raises(CorruptDataError):
            await store.append("s", [ev(1)], 0)


class FakeRedis:
    """A RESP server that answers INFO with a version and chosen commands with an error."""

    def __init__(self, version: str = "7.0.15", errors: dict[str, bytes] | None = None) -> None:
        self.version = version
        self.errors = errors or {}
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                args = []
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(size + 2))[:-2])
                name = args[0].decode().upper()
                if name in self.errors:
                    writer.write(self.errors[name] + b"\r\n")
                elif name == "INFO":
                    body = f"# Server\r\nredis_version:{self.version}\r\n".encode()
                    writer.write(b"$%d\r\n%s\r\n" % (len(body), body))
                elif name == "SCRIPT":
                    writer.write(b"$40\r\n" + b"0" * 40 + b"\r\n")
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def test_an_old_server_is_refused_clearly() -> None:
    async with FakeRedis(version="6.2.14") as port:
        store = open_store(f"redis://127.0.0.1:{port}/0")
        try:
            for _ in range(2):
                with pytest.raises(StoreError, match=r"7\.0 or later") as info:
                    await store.get("s")
                assert not isinstance(info.value, StoreUnavailableError | SessionNotFoundError)
        finally:
            await store.aclose()


OOM = b"-OOM command not allowed when used memory > 'maxmemory'."
REPLIES: list[tuple[str, bytes, type[Exception], str]] = [
    ("HGETALL", OOM, StoreUnavailableError, "out of memory"),
    ("EVALSHA", OOM + b" script: 1234, on @user_script:5.", StoreUnavailableError, "memory"),
    ("HGETALL", b"-READONLY You can't write against a read only replica.", StoreUnavailableError, "read-only"),
    ("HGETALL", b"-NOPERM User u has no permissions to run the 'hgetall' command", StoreUnavailableError, "ACL"),
    ("HGETALL", b"-NOAUTH Authentication required.", StoreUnavailableError, "password"),
    ("HGETALL", b"-MISCONF Redis is configured to save RDB snapshots", StoreUnavailableError, "MISCONF"),
    ("HGETALL", b"-LOADING Redis is loading the dataset in memory", StoreUnavailableError, "loading"),
    ("HGETALL", b"-BUSY Redis is busy running a script.", StoreUnavailableError, "busy"),
    ("HGETALL", b"-MASTERDOWN Link with MASTER is down", StoreUnavailableError, "primary"),
    ("EVALSHA", b"-NOSCRIPT No matching script. Please use EVAL.", StoreUnavailableError, "scripts"),
    ("HGETALL", b"-WRONGTYPE Operation against a key holding the wrong kind of value", CorruptDataError, "prefix"),
    ("HGETALL", b"-ERR unknown command 'HGETALL', with args beginning with: ", StoreError, r"7\.0"),
    ("EVALSHA", b"-ERR Unknown Redis command called from script script: x", StoreError, r"7\.0"),
    ("HGETALL", b"-ERR something nobody expected", StoreError, "answered with an error"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "reply", "expected", "words"), REPLIES)
async def test_error_replies_are_translated(
    command: str, reply: bytes, expected: type[Exception], words: str
) -> None:
    async with FakeRedis(errors={command: reply}) as port:
        store = open_store(f"redis://127.0.0.1:{port}/0")
        try:
            call = store.get("s") if command == "HGETALL" else store.append("s", [ev(1)], 0)
            with pytest.raises(StoreError, match=words) as info:
                await call
            assert type(info.value) is expected, repr(info.value)
            assert f"127.0.0.1:{port}" in str(info.value)
        finally:
            await store.aclose()


def test_no_scan_or_keys_anywhere() -> None:
    source = Path(redis_module.__file__).read_text()
    for word in ("SCAN", "KEYS"):
        assert not re.search(rf"redis\.call\(\s*'{word}'", source, re.IGNORECASE)
    assert not re.search(r"\.(scan|scan_iter|keys)\(", source)


# -- processes and outages ---------------------------------------------------------


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
            if not line.startswith("ACK "):
                continue
            _, sid, seq, payload = line.split(" ")
            key = (sid, int(seq))
            assert key not in acked
            acked[key] = payload
    assert len(acked) == 4 * 250 * 2
    async with open_store(url) as store:
        total = 0
        for n in range(sessions):
            rows = await read_all(store, f"s{n}")
            assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
            for r in rows:
                assert acked[(f"s{n}", r.seq)] == json.loads(r.data)["p"]
            total += len(rows)
    assert total == len(acked)


class OwnRedis:
    """A Redis server of a test's own, with an fsync-always append-only file."""

    def __init__(self, directory: Path) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.exe, self.directory, self.port = exe, directory, _free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Start it (again) on the same port and data directory; wait until it listens."""
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir"]
        args += [str(self.directory), "--appendonly", "yes", "--appendfsync", "always"]
        self.procs.append(subprocess.Popen([self.exe, *args], stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL every running server process (no shutdown, no final fsync)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A started :class:`OwnRedis`, killed at the end of the test."""
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_server_killed_while_appends_are_in_flight(own_redis: OwnRedis) -> None:
    port = own_redis.port
    prefix = f"cstest-{uuid.uuid4().hex[:10]}:"
    url = f"redis://127.0.0.1:{port}/0?socket_timeout=1&socket_connect_timeout=1&prefix={prefix}"
    store = open_store(url)
    assert isinstance(store, RedisStore)
    sessions = ["a", "b", "c"]
    acked: dict[str, list[tuple[int, int]]] = {sid: [] for sid in sessions}
    try:
        for sid in sessions:
            await store.create(SessionRecord(id=sid))
        await store.put_blob("a", b"before")

        async def appender(sid: str) -> StoreUnavailableError:
            head, n = 0, 0
            while True:
                try:
                    head = await store.append(sid, [ev(n)], head)
                except StoreUnavailableError as exc:
                    return exc
                acked[sid].append((head, n))
                n += 1

        tasks = [asyncio.create_task(appender(sid)) for sid in sessions]
        while min(len(a) for a in acked.values()) < 30:
            await asyncio.sleep(0.002)
        own_redis.kill()  # the appenders are awaiting their replies right now
        errors = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert all(f"127.0.0.1:{port}" in str(e) for e in errors)

        record = SessionRecord(id="a")
        outage = [
            lambda: store.get("a"),
            lambda: store.append("a", [ev(999)], acked["a"][-1][0]),
            lambda: read_all(store, "a"),
            lambda: store.fork("a", 1, SessionRecord(id="f")),
            lambda: store.put_blob("a", b"during"),
            lambda: store.get_blob("a", "00" * 32),
            lambda: store.list_sessions(),
            lambda: store.update(record, 1),
            lambda: store.create(SessionRecord(id="new")),
            lambda: store.delete("b"),
            lambda: store.purge_expired(),
        ]
        for call in outage:
            with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{port}"):
                await call()

        own_redis.start()  # the same port and data directory
        deadline = time.monotonic() + 10
        while True:
            try:
                await store.get("a")  # the same store object recovers
                break
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

        for sid in sessions:
            rows = await read_all(store, sid)
            got = [(r.seq, json.loads(r.data)["n"]) for r in rows]
            # every acknowledged append is there; at most the one in flight landed unacknowledged
            assert got[: len(acked[sid])] == acked[sid]
            assert len(got) - len(acked[sid]) in (0, 1)
            head = (await store.get(sid)).head
            assert head == len(got)
            assert await store.append(sid, [ev(head)], head) == head + 1
        await store.fork("a", 1, SessionRecord(id="f"))
        assert await store.get_blob("f", await store.put_blob("a", b"after")) == b"after"
        assert {r.id for r in (await store.list_sessions()).records} == {"a", "b", "c", "f"}
    finally:
        await store.aclose()
