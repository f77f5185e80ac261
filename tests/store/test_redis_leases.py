"""Redis: leases, fencing, event ids and snapshots, beyond the shared contract.

Where they live (the session's hash slot), whose clock decides (the
server's), what the append script reads of an event to recognise a re-sent
append (the id closing its header), and what becomes of them when the session
goes (deleted, kept as a tombstone, expired natively, its id reused).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from chatsession import (
    ConflictError,
    CorruptDataError,
    LeaseLostError,
    NewEvent,
    SessionBusyError,
    SessionRecord,
    open_store,
)
from chatsession.store.base import EVENT_SCHEMA_VERSION
from chatsession.store.redis import RedisStore, events, leases
from tests.store.test_redis import assert_whole

REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStore]:
    """An open store under ``prefix``."""
    opened = open_store(f"{REDIS_URL}?prefix={prefix}")
    assert isinstance(opened, RedisStore)
    yield opened
    await opened.aclose()


def ev(n: int, event_id: str | None = None) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0, event_id=event_id)


async def server_time(raw: aioredis.Redis) -> float:
    seconds, micros = await raw.time()
    return float(seconds) + micros / 1e6


async def test_the_lease_is_a_key_of_the_session_slot_set_with_px(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="s"))
    lease = await store.acquire_lease("s", "host:1:abc def", 2.5)
    rec, key = f"{prefix}{{s}}:rec", f"{prefix}{{s}}:lease"
    assert key_slot(key.encode()) == key_slot(rec.encode())
    assert await raw.get(key) == f"{lease.token} host:1:abc def".encode()
    assert 2300 < await raw.pttl(key) <= 2500
    assert await raw.hget(rec, "fence") == str(lease.token).encode()  # the token counter
    assert abs(lease.expires_at - (await server_time(raw) + 2.5)) < 0.2
    renewed = await store.renew_lease(lease, 9)
    assert 8800 < await raw.pttl(key) <= 9000 and renewed.token == lease.token
    await store.release_lease(renewed)
    assert await raw.exists(key) == 0


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
async def test_the_servers_clock_decides_lease_expiry_not_the_clients(
    store: RedisStore, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    # this client's clock is an hour off: a lease still lasts its ttl, by the server
    for module in (leases, events):
        monkeypatch.setattr(module, "now", lambda: time.time() + skew)
    await store.create(SessionRecord(id="s"))
    lease = await store.acquire_lease("s", "a", 0.6)
    assert abs(lease.expires_at - (await server_time(raw) + 0.6)) < 0.2
    with pytest.raises(SessionBusyError) as busy:
        await store.acquire_lease("s", "b", 30)
    assert busy.value.holder == "a"
    assert busy.value.retry_after is not None and 0 < busy.value.retry_after <= 0.6
    with pytest.raises(SessionBusyError):
        await store.append("s", [ev(1)], 0)
    assert await store.append("s", [ev(1)], 0, lease=lease) == 1
    await asyncio.sleep(0.8)
    with pytest.raises(LeaseLostError, match="expired"):
        await store.append("s", [ev(2)], 1, lease=lease)
    taken = await store.acquire_lease("s", "b", 30)
    assert taken.token == lease.token + 1
    with pytest.raises(LeaseLostError, match="taken over"):
        await store.append("s", [ev(2)], 1, lease=lease)


async def test_each_session_counts_its_own_tokens(store: RedisStore) -> None:
    await store.create(SessionRecord(id="a"))
    await store.create(SessionRecord(id="b"))
    tokens = []
    for _ in range(3):
        lease = await store.acquire_lease("a", "w", 30)
        tokens.append(lease.token)
        await store.release_lease(lease)
    assert tokens == [1, 3, 5]  # each release moves the counter on: a released lease is dead
    assert (await store.acquire_lease("b", "w", 30)).token == 1


async def test_the_lease_and_the_snapshot_go_with_the_session(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="p"))
    await store.append("p", [ev(1)], 0)
    await store.acquire_lease("p", "w", 60)
    await store.put_snapshot("p", 1, b"folded")
    await store.fork("p", 1, SessionRecord(id="f"))
    await store.delete("p")  # a tombstone, kept for f: no lease, no snapshot
    assert await raw.exists(f"{prefix}{{p}}:lease", f"{prefix}{{p}}:snap") == 0
    assert await raw.exists(f"{prefix}{{p}}:rec", f"{prefix}{{p}}:ev") == 2
    await store.acquire_lease("f", "w", 60)
    await store.put_snapshot("f", 1, b"fork")
    await store.delete("f")  # the last fork: both go, every key with them
    meta = f"{prefix}{{idx}}:meta".encode()  # the layout number stays
    assert [k async for k in raw.scan_iter(match=f"{prefix}{{*") if k != meta] == []
    await assert_whole(raw, prefix)


async def test_the_snapshot_and_lease_keys_expire_no_later_than_the_session(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    soon = time.time() + 5
    await store.create(SessionRecord(id="s", expires_at=soon))
    await store.append("s", [ev(1)], 0)
    await store.put_snapshot("s", 1, b"folded")
    await store.acquire_lease("s", "w", 3600)
    at = await raw.pexpiretime(f"{prefix}{{s}}:rec")
    assert abs(at - soon * 1000) < 2
    assert await raw.pexpiretime(f"{prefix}{{s}}:snap") == at
    assert await raw.pexpiretime(f"{prefix}{{s}}:lease") == at  # not an hour
    rec = await store.get("s")
    sooner = time.time() + 3
    rec = await store.update(rec.model_copy(update={"expires_at": sooner}), rec.version)
    at = await raw.pexpiretime(f"{prefix}{{s}}:rec")
    assert abs(at - sooner * 1000) < 2
    for key in ("snap", "lease"):
        assert await raw.pexpiretime(f"{prefix}{{s}}:{key}") == at
    await store.update(rec.model_copy(update={"expires_at": None}), rec.version)
    assert await raw.pttl(f"{prefix}{{s}}:snap") == -1  # the session lives on: so does it
    assert await raw.pttl(f"{prefix}{{s}}:lease") > 0  # and the lease, for its own ttl


async def test_leftovers_of_an_earlier_session_with_the_id_never_reach_a_new_one(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    # what a session Redis evicted can leave behind (its lease outlives it by PX)
    await raw.set(f"{prefix}{{s}}:lease", "7 ghost", px=60_000)
    await raw.hset(f"{prefix}{{s}}:snap", mapping={"seq": "9", "data": "old"})
    await store.create(SessionRecord(id="s"))
    assert await store.get_snapshot("s") is None
    assert (await store.acquire_lease("s", "w", 30)).token == 1


async def test_a_damaged_lease_key_is_corrupt_data_naming_it(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="s"))
    await raw.set(f"{prefix}{{s}}:lease", "not a lease")
    for call in (store.acquire_lease("s", "w", 30), store.append("s", [ev(1)], 0)):
        with pytest.raises(CorruptDataError, match=r"\{s\}:lease"):
            await call
    await raw.delete(f"{prefix}{{s}}:lease")  # what the message says to do
    assert await store.append("s", [ev(1)], 0) == 1


async def test_a_damaged_snapshot_reads_as_none_and_is_replaced(
    store: RedisStore, raw: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(1), ev(2)], 0)
    snap = f"{prefix}{{s}}:snap"
    for fields in ({"seq": "two", "data": "x"}, {"seq": "1"}, {"seq": "5", "data": "x"}):
        await raw.delete(snap)
        await raw.hset(snap, mapping=fields)
        with caplog.at_level(logging.WARNING, logger="chatsession.store"):
            assert await store.get_snapshot("s") is None  # rebuilt from the log instead
        assert "snap" in caplog.text and "'s'" in caplog.text
        caplog.clear()
    await raw.hset(snap, mapping={"seq": "x", "data": "x"})
    await store.put_snapshot("s", 2, b"good")  # a damaged one never blocks a new one
    assert await store.get_snapshot("s") == (2, b"good")


async def test_each_event_header_ends_with_its_id(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(1, "id-1"), ev(2)], 0)
    items = await raw.lrange(f"{prefix}{{s}}:ev", 0, -1)
    v = EVENT_SCHEMA_VERSION
    assert items[0].split(b"\n")[0] == f'[1,"message",1.0,null,{v},"id-1"]'.encode()
    assert items[1].split(b"\n")[0] == f'[2,"message",1.0,null,{v}]'.encode()
    assert [r.event_id async for b in store.read("s") for r in b] == ["id-1", None]


async def test_a_retry_is_recognised_by_its_whole_id_only(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(1, "xabc")], 0)
    for other in ("abc", "bc", "xab", "c"):
        with pytest.raises(ConflictError):
            await store.append("s", [ev(9, other)], 0)
    # a header written before event ids (spaces, five fields) is never taken for one
    await raw.rpush(f"{prefix}{{s}}:ev", '[2, "message", 1.0, "2", 2]\n{"n": 2}')
    await raw.hset(f"{prefix}{{s}}:rec", "head", 2)
    with pytest.raises(ConflictError):
        await store.append("s", [ev(9, "2")], 1)
    assert await store.append("s", [ev(1, "xabc")], 0) == 1  # the real retry
    assert [r.seq async for b in store.read("s") for r in b] == [1, 2]
