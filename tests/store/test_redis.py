"""What only the Redis backend does: key layout, native expiry, processes, outages."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
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
from redis.crc import key_slot

import chatsession.store.redis as redis_package
from chatsession import (
    ChatSessionClosedError,
    CorruptDataError,
    InvalidURLError,
    NewEvent,
    SessionArchivedError,
    SessionLimitError,
    SessionNotFoundError,
    SessionRecord,
    StoreError,
    StoreUnavailableError,
    open_store,
)
from chatsession.store.base import ParentRef, count_events, initial_record, new_event_id
from chatsession.store.redis import RedisStore, index, records
from chatsession.store.redis import layout as redis_layout
from chatsession.store.redis import scripts as redis_scripts
from chatsession.store.redis import stats as redis_stats

REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
WRITER = Path(__file__).with_name("turn_writer.py")


def ev(n: int, event_id: str | None = None) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0, event_id=event_id)


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
    pool = store._conn.client().connection_pool  # builds the pool; connects nothing
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
        assert kw["retry"].get_retries() == 0  # the driver never re-sends: the store decides
        assert store._conn._retry.get_retries() == 3  # the default, for calls safe to repeat
    finally:
        await store.aclose()
    store = open_store(url, retries=0)
    try:
        assert isinstance(store, RedisStore) and store._conn._retry.get_retries() == 0
    finally:
        await store.aclose()


# -- layout and expiry ---------------------------------------------------------------


async def ids_in(raw: aioredis.Redis, key: str) -> dict[str, float]:
    """The session ids in an index sorted set (members are ``ID#STAMP``), with scores."""
    return {m.decode().split("#")[0]: s for m, s in await raw.zrange(key, 0, -1, withscores=True)}


async def keys_left(raw: aioredis.Redis, prefix: str) -> list[bytes]:
    """Every key under ``prefix`` but the layout number (``{idx}:meta``), which stays."""
    meta = f"{prefix}{{idx}}:meta".encode()
    return [k async for k in raw.scan_iter(match=f"{prefix}*") if k != meta]


async def assert_whole(raw: aioredis.Redis, prefix: str) -> None:
    """The index slot agrees exactly with the records, and no fork dangles.

    Call it once every change has finished or been cleaned up: each live
    session is in exactly the indexes its record names, under its own
    incarnation; tombstones are in none and have forks; nothing else is due.
    """
    keys = {k.decode() async for k in raw.scan_iter(match=f"{prefix}*", count=1000)}
    idx = f"{prefix}{{idx}}"
    recs: dict[str, dict[str, str]] = {}
    for key in sorted(k for k in keys if k.endswith(":rec") and not k.startswith(idx)):
        r = {a.decode(): b.decode() for a, b in (await raw.hgetall(key)).items()}
        recs[r["id"]] = r
    member = {sid: f"{sid}#{r['stamp']}" for sid, r in recs.items()}
    live = {sid for sid, r in recs.items() if r["deleted"] != "1"}
    tombs = set(recs) - live
    for key in keys - {k for k in keys if k.startswith(idx)}:
        assert key.split("{")[1].split("}")[0] in recs, f"{key} belongs to no record"
    where = {m.decode() for m in await raw.hkeys(f"{idx}:where")}
    assert where == {member[sid] for sid in recs}, "where lists exactly the stored incarnations"
    due = {m.decode() for m in await raw.zrange(f"{idx}:due", 0, -1)}
    assert due <= {member[sid] for sid in tombs}, f"unfinished changes: {due}"
    expected: dict[str, set[str]] = {}
    for sid in live:
        r = recs[sid]
        names = [f"{idx}:all"]
        unset = (
            r["unset"].split() if "unset" in r else [n for n in r if n.endswith("_id") and not r[n]]
        )
        names += [
            f"{idx}:{k}:{r[k + '_id']}"
            for k in ("user", "agent", "window")
            if k + "_id" not in unset
        ]
        for name in names:
            expected.setdefault(name, set()).add(member[sid])
    listing = {
        k
        for k in keys
        if k == f"{idx}:all"
        or k.removeprefix(f"{idx}:").split(":")[0] in ("user", "agent", "window")
    }
    actual = {k: {m.decode() for m in await raw.zrange(k, 0, -1)} for k in listing}
    assert actual == expected
    # each user's live set: their sessions that are not archived, by expires_at
    lives: dict[str, dict[str, float]] = {}
    for sid in live:
        r = recs[sid]
        if "user_id" in r.get("unset", "").split() or r["state"] == "archived":
            continue
        score = float(r["expires_at"]) if r["expires_at"] else float("inf")
        lives.setdefault(f"{idx}:live:{r['user_id']}", {})[member[sid]] = score
    live_keys = {k for k in keys if k.startswith(f"{idx}:live:")}
    actual_lives = {
        k: {m.decode(): s for m, s in await raw.zrange(k, 0, -1, withscores=True)}
        for k in live_keys
    }
    assert actual_lives == lives
    expiring = {m.decode() for m in await raw.zrange(f"{idx}:expiry", 0, -1)}
    assert expiring == {member[sid] for sid in live if recs[sid]["expires_at"]}
    for sid in recs:
        forks = {m.decode() for m in await raw.zrange(f"{prefix}{{{sid}}}:forks", 0, -1)}
        for fork in forks:
            child = fork.split("#")[0]
            assert child in recs and member[child] == fork, f"{sid} holds a dangling fork {fork}"
            assert recs[child]["parent_id"] == sid
        if sid in tombs:
            assert forks, f"the tombstone {sid} has no forks left and should be gone"


async def test_every_key_is_under_the_prefix_and_hash_tagged(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="s1", user_id="alice", agent_id="bot", window_id="w"))
        await store.append("s1", [ev(1), ev(2)], 0)
        await store.put_blob("s1", b"blob")
        await store.fork("s1", 1, SessionRecord(id="s2", user_id="alice"))
        await store.create(SessionRecord(id="s3", expires_at=time.time() + 60))
        await store.acquire_lease("s1", "writer", 60)
        await store.put_snapshot("s1", 2, b"folded")
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    keys = sorted([k async for k in client.scan_iter(match=f"{prefix}*", count=1000)])
    await client.aclose()
    session_keys = [k for k in keys if "{idx}" not in k]
    assert session_keys == sorted(
        [
            f"{prefix}{{s1}}:rec",
            f"{prefix}{{s1}}:ev",
            f"{prefix}{{s1}}:blob",
            f"{prefix}{{s1}}:forks",
            f"{prefix}{{s1}}:lease",
            f"{prefix}{{s1}}:snap",
            f"{prefix}{{s2}}:rec",
            f"{prefix}{{s3}}:rec",
        ]
    )
    assert {k for k in keys if "{idx}" in k} == {
        f"{prefix}{{idx}}:all",
        f"{prefix}{{idx}}:user:alice",
        f"{prefix}{{idx}}:agent:bot",
        f"{prefix}{{idx}}:window:w",
        f"{prefix}{{idx}}:live:alice",  # what create(max_per_user=) counts
        f"{prefix}{{idx}}:expiry",
        f"{prefix}{{idx}}:where",
        f"{prefix}{{idx}}:meta",  # the layout number
    }  # and no :due: every change finished
    await assert_whole(raw, prefix)


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
        assert "brief" in await ids_in(raw, f"{prefix}{{idx}}:user:u")
        assert [r.id for r in (await store.list_sessions(user_id="u")).records] == ["kept"]
        with pytest.raises(SessionNotFoundError):
            await store.get("brief")
        assert await store.purge_expired() == 1
        for index in ("user:u", "all", "expiry"):
            assert "brief" not in await ids_in(raw, f"{prefix}{{idx}}:{index}")
        assert not [m for m in await raw.hkeys(f"{prefix}{{idx}}:where") if m.startswith(b"brief")]
        assert await store.purge_expired() == 0
        await assert_whole(raw, prefix)


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
        await assert_whole(raw, prefix)
        await store.delete("f")
        assert [k async for k in raw.scan_iter(match=f"{prefix}{{p}}*")] == []
        await assert_whole(raw, prefix)


async def test_a_fork_evicted_by_redis_releases_its_parent(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(1)], 0)
        await store.fork("p", 1, SessionRecord(id="brief", expires_at=time.time() + 0.5))
        await store.fork("p", 1, SessionRecord(id="kept"))
        await store.delete("p")  # a tombstone, for its two forks
        assert await raw.zcard(f"{prefix}{{p}}:forks") == 2
        await asyncio.sleep(0.7)
        assert await raw.exists(f"{prefix}{{brief}}:rec") == 0  # gone natively
        assert await store.purge_expired() == 1
        assert await raw.zcard(f"{prefix}{{p}}:forks") == 1
        await assert_whole(raw, prefix)
        await store.delete("kept")  # the last fork: the tombstone goes too
        left = await keys_left(raw, prefix)
        assert left == [], left


async def test_an_id_reused_after_native_expiry_starts_clean(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="s", user_id="old", expires_at=time.time() + 0.3))
        await store.append("s", [ev(1)], 0)
        await asyncio.sleep(0.5)
        await store.create(SessionRecord(id="s", user_id="new"))
        # the old incarnation's entries are still there, but never shown as the new one
        assert "s" in await ids_in(raw, f"{prefix}{{idx}}:user:old")
        assert (await store.list_sessions(user_id="old")).records == []
        assert [r.id for r in (await store.list_sessions(user_id="new")).records] == ["s"]
        assert [r.id for r in (await store.list_sessions()).records] == ["s"]
        assert await read_all(store, "s") == []
        assert await store.purge_expired() == 1  # the old incarnation's leftovers
        assert "s" not in await ids_in(raw, f"{prefix}{{idx}}:user:old")
        assert "s" not in await ids_in(raw, f"{prefix}{{idx}}:expiry")
        assert (await store.get("s")).user_id == "new"
        await assert_whole(raw, prefix)


async def test_update_moves_indexes_and_expiry(prefix: str, raw: aioredis.Redis) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        rec = await store.create(SessionRecord(id="s", user_id="a"))
        await store.append("s", [ev(1)], 0)
        later = time.time() + 100
        rec = await store.update(rec.model_copy(update={"user_id": "b", "expires_at": later}), 1)
        assert [r.id for r in (await store.list_sessions(user_id="b")).records] == ["s"]
        assert "s" not in await ids_in(raw, f"{prefix}{{idx}}:user:a")
        for key in ("rec", "ev"):
            assert abs(await raw.pexpiretime(f"{prefix}{{s}}:{key}") - later * 1000) < 2
        assert (await ids_in(raw, f"{prefix}{{idx}}:expiry"))["s"] == pytest.approx(later)
        await store.fork("s", 1, SessionRecord(id="f"))
        rec = await store.get("s")
        await store.update(rec.model_copy(update={"expires_at": time.time() + 0.2}), rec.version)
        assert await raw.pttl(f"{prefix}{{s}}:rec") == -1  # it has a fork: no native expiry
        rec = await store.get("f")
        await store.update(rec.model_copy(update={"expires_at": None}), rec.version)
        assert "f" not in await ids_in(raw, f"{prefix}{{idx}}:expiry")
        await assert_whole(raw, prefix)


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
        real = records._hgetall_many

        async def counting(conn: Any, r: Any, ids: list[str]) -> Any:
            reads.append(len(ids))
            return await real(conn, r, ids)

        monkeypatch.setattr(records, "_hgetall_many", counting)
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


# -- limits, stats, figures and the layout upgrade -----------------------------------


def usage(total: int) -> NewEvent:
    return NewEvent("usage", json.dumps({"total_tokens": total}), 1.0)


@pytest.mark.parametrize("names", [5000, 1, 0], ids=["in-client", "in-server", "each-batch"])
async def test_stats_read_in_batches_rank_ties_by_name_and_leave_no_tally(
    prefix: str, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, names: int
) -> None:
    monkeypatch.setattr(redis_stats, "_BATCH", 3)  # many batches from a few sessions
    monkeypatch.setattr(redis_stats, "_NAMES", names)  # counts sent to the server, or not
    monkeypatch.setattr(redis_stats, "_PAIRS", 2)  # several tally calls per flush
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        written: list[NewEvent] = []
        for n, user in enumerate(["dan", "bea", "cal", "bea", "cal", "dan", "al", None]):
            sid = f"s{n}"
            await store.create(SessionRecord(id=sid, user_id=user, agent_id=f"a{n % 3}"))
            events = [ev(n), usage(n)]
            await store.append(sid, events, 0)
            written += events
        stats = await store.stats(top=2)
        assert stats.sessions == 8 and stats.by_state["active"] == 8
        assert (stats.users, stats.agents) == (4, 3)
        assert stats.by_user == {"bea": 2, "cal": 2}  # dan has 2 as well: ties by name
        assert stats.by_agent == {"a0": 3, "a1": 3}
        counts = count_events(written)
        assert (stats.messages, stats.tokens, stats.bytes) == tuple(counts)
        assert (await store.stats(top=10)).by_user == {"bea": 2, "cal": 2, "dan": 2, "al": 1}
    assert [k async for k in raw.scan_iter(match=f"{prefix}{{idx}}:tally*")] == []


async def test_stats_leave_out_damaged_records_and_read_who_as_records_do(
    prefix: str, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        old = time.time() - 100
        await store.create(SessionRecord(id="empty", user_id="", agent_id="a b"))  # "" is a name
        await store.create(SessionRecord(id="none"))  # no user, no agent
        await store.create(SessionRecord(id="quiet", user_id="u", agent_id="a"))
        await store.append("quiet", [ev(1)], 0)
        await raw.hset(f"{prefix}{{quiet}}:rec", "updated_at", repr(old))
        await store.create(SessionRecord(id="kept", user_id="u", state="archived"))
        # written before `unset`: "" was None
        await store.create(SessionRecord(id="older", user_id="v"))
        await raw.hset(f"{prefix}{{older}}:rec", "user_id", "")
        await raw.hdel(f"{prefix}{{older}}:rec", "unset")
        for sid, field, value in [
            ("bad-state", "state", "sleeping"),
            ("bad-time", "updated_at", "soon"),
            ("bad-figure", "tokens", "1.5"),
            ("bad-name", "user_id", b"\xff\xfe"),
        ]:
            await store.create(SessionRecord(id=sid, user_id="w"))
            await raw.hset(f"{prefix}{{{sid}}}:rec", field, value)
        with caplog.at_level("WARNING", logger="chatsession.store"):
            stats = await store.stats(idle_before=old + 1)
        assert stats.sessions == 5
        assert stats.by_state == {"active": 3, "idle": 1, "archived": 1, "expired": 0}
        assert stats.by_user == {"u": 2, "": 1} and stats.users == 2
        assert stats.by_agent == {"a": 1, "a b": 1} and stats.agents == 2
        assert stats.messages == 1 and stats.bytes == len(ev(1).data.encode())
        left_out = {m for m in caplog.messages if "left out session" in m}
        assert len(left_out) == 4, left_out
        assert all(f"'bad-{what}'" in " ".join(left_out) for what in ("state", "time", "figure"))


async def test_stats_load_their_script_when_the_server_lacks_it(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    unknown = redis_scripts.SCRIPTS["count_one"] + f"\n-- {uuid.uuid4().hex}\n"
    monkeypatch.setitem(redis_scripts.SCRIPTS, "count_one", unknown)  # a SHA never loaded
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="s", user_id="u"))
        assert (await store.stats()).by_user == {"u": 1}


async def test_stats_after_an_error_reply_leave_the_connection_in_step(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}&max_connections=1") as store:
        for sid in ("a", "b", "c"):
            await store.create(SessionRecord(id=sid, user_id=sid))
        await raw.delete(f"{prefix}{{b}}:rec")
        await raw.rpush(f"{prefix}{{b}}:rec", "not a hash")
        with pytest.raises(CorruptDataError):
            await store.stats()
        assert (await store.get("a")).user_id == "a"  # no reply of the batch left unread
        await raw.delete(f"{prefix}{{b}}:rec")
        assert (await store.stats()).by_user == {"a": 1, "c": 1}


async def test_an_expired_parent_kept_for_its_forks_counts_as_expired(prefix: str) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        await store.create(SessionRecord(id="p", user_id="u", expires_at=time.time() + 0.4))
        await store.append("p", [ev(1)], 0)
        await store.fork("p", 1, SessionRecord(id="f", user_id="u"))
        await store.create(SessionRecord(id="gone", user_id="u", expires_at=time.time() + 0.4))
        await asyncio.sleep(0.6)
        stats = await store.stats()  # "gone" was evicted natively: Redis forgot it
        assert stats.sessions == 1 and stats.by_state["expired"] == 1
        assert stats.by_user == {"u": 1} and stats.messages == 0
        assert await store.purge_expired() == 2
        assert (await store.stats()).by_state["expired"] == 0


async def test_append_figures_are_checked_and_capped_in_the_append_script(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        rec = f"{prefix}{{s}}:rec"
        await store.create(SessionRecord(id="s"))
        head = await store.append("s", [usage(10**30)], 0)  # more than HINCRBY could add
        assert await raw.hget(rec, "tokens") == str(redis_scripts.FIGURE_MAX).encode()
        head = await store.append("s", [usage(5), ev(1)], head)  # stays at the cap
        assert await raw.hmget(rec, "tokens", "messages") == [
            str(redis_scripts.FIGURE_MAX).encode(),
            b"1",
        ]
        await raw.hset(rec, "messages", "1e400")  # damaged: refused before anything is written
        with pytest.raises(CorruptDataError, match="messages"):
            await store.append("s", [ev(2)], head)
        assert await raw.llen(f"{prefix}{{s}}:ev") == head
        await raw.hset(rec, "messages", "1")
        record = await store.get("s")
        await store.update(record.model_copy(update={"state": "archived"}), record.version)
        with pytest.raises(SessionArchivedError):
            await store.append("s", [ev(2)], head)
        assert await raw.hget(rec, "messages") == b"1"  # the figures did not move either
        assert await raw.llen(f"{prefix}{{s}}:ev") == head


async def test_a_create_cut_short_counts_until_cleanup_settles_it(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        assert isinstance(store, RedisStore)
        store._conn.grace = GRACE
        # a create that listed its session and stopped (a crash before its commit)
        stored = initial_record(SessionRecord(id="half", user_id="ann"))
        await index.intent(store._conn, stored, secrets.token_hex(8))
        with pytest.raises(SessionLimitError) as caught:  # it may still commit: it counts
            await store.create(SessionRecord(id="a1", user_id="ann"), max_per_user=1)
        assert caught.value.count == 1
        await asyncio.sleep(GRACE + 0.1)
        # past due: it never will commit; the refused count settles it and counts again
        await store.create(SessionRecord(id="a1", user_id="ann"), max_per_user=1)
        assert [r.id for r in (await store.list_sessions(user_id="ann")).records] == ["a1"]
        await assert_whole(raw, prefix)


async def test_archiving_and_restoring_move_a_session_out_of_and_into_the_count(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        live = f"{prefix}{{idx}}:live:ann"
        await store.create(SessionRecord(id="a0", user_id="ann"), max_per_user=1)
        record = await store.get("a0")
        record = await store.update(record.model_copy(update={"state": "archived"}), 1)
        assert await raw.zcard(live) == 0
        await store.create(SessionRecord(id="a1", user_id="ann"), max_per_user=1)
        await store.update(record.model_copy(update={"state": "active"}), record.version)
        assert await raw.zcard(live) == 2  # a restore may take a user past a limit
        with pytest.raises(SessionLimitError) as caught:
            await store.create(SessionRecord(id="a2", user_id="ann"), max_per_user=2)
        assert caught.value.count == 2
        await assert_whole(raw, prefix)


async def _as_layout_1(raw: aioredis.Redis, prefix: str) -> None:
    """Make the data look as a version before layout 2 left it: no number, live sets, figures."""
    idx = f"{prefix}{{idx}}"
    await raw.delete(f"{idx}:meta")
    async for key in raw.scan_iter(match=f"{idx}:live:*"):
        await raw.delete(key)
    for member, value in (await raw.hgetall(f"{idx}:where")).items():
        info = json.loads(value)
        for name in ("idx", "cur"):
            if isinstance(info.get(name), list):
                info[name] = [k for k in info[name] if ":live:" not in k]
        await raw.hset(f"{idx}:where", member, json.dumps(info))
    async for key in raw.scan_iter(match=f"{prefix}{{*}}:rec"):
        await raw.hdel(key, "messages", "tokens", "bytes", "counted")


async def test_data_of_layout_1_is_upgraded_once_before_a_limit_or_stats(
    prefix: str, raw: aioredis.Redis
) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="a0", user_id="ann", expires_at=time.time() + 99))
        await store.create(SessionRecord(id="a1", user_id="ann"))
        await store.create(SessionRecord(id="old", user_id="ann"))
        record = await store.get("old")
        await store.update(record.model_copy(update={"state": "archived"}), record.version)
        events = [ev(1), usage(40), ev(2)]
        await store.append("a0", events, 0)
        await store.fork("a0", 2, SessionRecord(id="f", user_id="bob"))
        await store.append("f", [usage(2)], 2)
        await store.create(SessionRecord(id="b0", user_id="bob"))
        expected = await store.stats()
    await _as_layout_1(raw, prefix)
    async with open_store(url) as store:
        assert isinstance(store, RedisStore)
        # an append before the upgrade starts the figures; the count replaces them
        await store.append("b0", [ev(9)], 0)
        with pytest.raises(SessionLimitError) as caught:
            await store.create(SessionRecord(id="a2", user_id="ann"), max_per_user=2)
        assert caught.value.count == 2  # a0 and a1 adopted; "old" is archived
        assert await raw.hget(f"{prefix}{{idx}}:meta", "layout") == str(index.LAYOUT).encode()
        stats = await store.stats()
        assert stats.messages == expected.messages + 1
        assert (stats.tokens, stats.bytes - len(ev(9).data)) == (expected.tokens, expected.bytes)
        assert await raw.hget(f"{prefix}{{f}}:rec", "tokens") == b"2"  # a fork: its own only
        await assert_whole(raw, prefix)
    async with open_store(url) as store:  # upgraded: another store object skips the walk
        assert isinstance(store, RedisStore)
        assert await redis_layout.upgrade(store._conn) == 0  # nothing left to change
        await store.stats()


async def test_several_store_objects_purging_at_once_delete_each_session_once(
    prefix: str, raw: aioredis.Redis
) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
    stores = [open_store(url) for _ in range(4)]
    try:
        expires = time.time() + 1.0
        for n in range(40):
            sid = f"s{n}"
            await stores[0].create(
                SessionRecord(id=sid, user_id=f"u{n % 3}", expires_at=expires), max_per_user=99
            )
            await stores[0].append(sid, [ev(n)], 0)
        await asyncio.sleep(max(0.0, expires - time.time() + 0.1))
        purged = await asyncio.gather(*(s.purge_expired() for s in stores))
        assert sum(purged) == 40, purged
        assert await keys_left(raw, prefix) == []  # live sets, indexes, where: all gone
    finally:
        for s in stores:
            await s.aclose()


# -- writes across slots, and writes that fail half way ------------------------------

GRACE = 1.0  # a short grace for the tests that wait for cleanup (the default is 300 s)


class Recording:
    """Stands in for one registered script: records the keys of every call."""

    def __init__(self, name: str, script: Any, calls: list[tuple[str, list[str]]]) -> None:
        self.name, self.script, self.calls = name, script, calls

    async def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        self.calls.append((self.name, [k if isinstance(k, str) else k.decode() for k in keys]))
        return await self.script(keys=keys, args=args, client=client)


def _recording(store: RedisStore) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []
    store._conn.client()  # registers the scripts
    for name, script in list(store._conn._scripts.items()):
        store._conn._scripts[name] = Recording(name, script, calls)
    in_order = store._conn.in_order

    async def recording_in_order(steps: Any) -> Any:
        calls.extend((name, [str(k) for k in keys]) for name, _, keys in steps)
        return await in_order(steps)

    store._conn.in_order = recording_in_order  # type: ignore[method-assign]
    script_each = store._conn.script_each

    async def recording_script_each(name: str, each: Any, *args: Any, **kwargs: Any) -> Any:
        calls.extend((name, [key.decode()]) for key, _ in each)
        return await script_each(name, each, *args, **kwargs)

    store._conn.script_each = recording_script_each  # type: ignore[method-assign]
    return calls


async def _half_fork(store: RedisStore, parent: str, at_seq: int, child: str) -> str:
    """Run a fork's first two steps only (index lists it, parent holds it): a crash after them."""
    stored = initial_record(SessionRecord(id=child), ParentRef(session_id=parent, seq=at_seq))
    change = await index.intent(store._conn, stored, secrets.token_hex(8))
    args = [repr(time.time()), at_seq, change.member]
    assert int((await store._conn.script("hold", args, store._conn.session_keys(parent)))[0]) >= 0
    return change.member


async def test_every_script_call_stays_in_one_hash_slot(
    prefix: str, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_stats, "_NAMES", 0)  # stats() tallies in the server too
    store = open_store(f"{REDIS_URL}?prefix={prefix}")
    assert isinstance(store, RedisStore)
    store._conn.grace, store._conn.recheck = GRACE, 0.0
    calls = _recording(store)
    try:
        await store.create(SessionRecord(id="root", user_id="alice", agent_id="bot", window_id="w"))
        await store.append("root", [ev(1), ev(2), ev(3)], 0)
        await store.fork("root", 2, SessionRecord(id="f1", user_id="bob"))
        await store.fork("f1", 1, SessionRecord(id="f2", user_id="bob"))  # a fork of a fork
        f1 = await store.get("f1")
        changed = f1.model_copy(update={"user_id": "carol", "expires_at": time.time() + 0.5})
        await store.update(changed, f1.version)
        await store.put_blob("root", b"blob")
        lease = await store.acquire_lease("root", "writer", 30)
        await store.append("root", [ev(4)], 3, lease=await store.renew_lease(lease, 30))
        await store.put_snapshot("root", 4, b"folded")
        assert await store.get_snapshot("root") == (4, b"folded")
        await store.release_lease(lease)
        page = await store.list_sessions(limit=1)
        await store.list_sessions(limit=1, cursor=page.next_cursor)
        await store.list_sessions(user_id="bob")
        await store.create(SessionRecord(id="brief", expires_at=time.time() + 0.3))
        await _half_fork(store, "root", 1, "half")  # a fork cut short
        # an update cut short after its commit: the expiry set keeps the earlier time
        stale = await store.create(SessionRecord(id="stale", expires_at=time.time() + 0.3))
        real_place = index.place
        index.place = _skip  # type: ignore[assignment]
        try:
            await store.update(stale.model_copy(update={"expires_at": time.time() + 100}), 1)
        finally:
            index.place = real_place
        # an expiry entry earlier than its record says (no change under way): a
        # purge claims it, finds it not expired and puts it back (unclaim)
        later = await store.create(SessionRecord(id="later", expires_at=time.time() + 100))
        stamp = (await raw.hget(f"{prefix}{{later}}:rec", "stamp")).decode()
        await raw.zadd(f"{prefix}{{idx}}:expiry", {f"later#{stamp}": time.time() - 1})
        assert await store.purge_expired() == 0
        assert await raw.zscore(f"{prefix}{{idx}}:expiry", f"later#{stamp}") == later.expires_at
        # data of an earlier layout: no layout number, no live sets, no figures
        await raw.delete(f"{prefix}{{idx}}:meta", f"{prefix}{{idx}}:live:alice")
        await raw.hdel(f"{prefix}{{root}}:rec", "messages", "tokens", "bytes", "counted")
        store._conn.layout_ready = False
        assert (await store.stats()).messages == 4  # root's own; the forks have none
        assert await raw.zcard(f"{prefix}{{idx}}:live:alice") == 1
        await store.create(SessionRecord(id="limited", user_id="bob"), max_per_user=5)
        await store.delete("root")  # a tombstone: f1 and half hold it
        await asyncio.sleep(GRACE + 0.1)
        assert await store.purge_expired() == 2  # brief (evicted), f1 (now a tombstone)
        await store.delete("f2")  # the last fork: f1, then root go too
        await store.delete("stale")
        await store.delete("later")
        await store.delete("limited")
        assert await store.purge_expired() == 0
    finally:
        await store.aclose()
    assert {name for name, _ in calls} == set(redis_scripts.SCRIPTS), "exercise every script"
    for name, keys in calls:
        assert keys, f"{name} was called with no keys"
        slots = {key_slot(k.encode()) for k in keys}
        assert len(slots) == 1, f"{name} touched {len(slots)} hash slots: {keys}"
    await assert_whole(raw, prefix)
    assert await keys_left(raw, prefix) == []


async def _skip(*args: Any, **kwargs: Any) -> None:
    return None


def test_the_scripts_are_the_lua_files_of_the_package() -> None:
    files = _sources("*.lua")
    names = {name.removesuffix(".lua") for name in files if not name.startswith("lua/lib/")}
    assert names == {f"lua/{name}" for name in redis_scripts.SCRIPTS}
    for name, source in redis_scripts.SCRIPTS.items():
        assert files[f"lua/{name}.lua"].split("\n", 1)[1] in source  # libraries first
        assert "--! uses" not in source, name
    session_lib = files["lua/lib/session.lua"]
    assert f"local NATIVE_LIMIT = {redis_scripts.NATIVE_EXPIRY_LIMIT!r}" in session_lib


def test_no_script_builds_a_key_name() -> None:
    for name, source in redis_scripts.SCRIPTS.items():
        assert "{" + "idx}" not in source and "'{'" not in source and '"{"' not in source, name
        assert "ARGV[1] .." not in source, name


async def test_a_fork_cut_short_after_two_steps_is_cleaned_up(
    prefix: str, raw: aioredis.Redis
) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        assert isinstance(store, RedisStore)
        store._conn.grace = GRACE
        await store.create(SessionRecord(id="p", user_id="u"))
        await store.append("p", [ev(1), ev(2)], 0)
        member = await _half_fork(store, "p", 1, "half")
        # the half-made fork is never shown
        for kw in ({}, {"user_id": "u"}):
            assert [r.id for r in (await store.list_sessions(**kw)).records] == ["p"]
        with pytest.raises(SessionNotFoundError):
            await store.get("half")
        # cleanup leaves a change inside its grace alone: it may still commit
        assert await store.purge_expired() == 0
        assert await raw.zscore(f"{prefix}{{p}}:forks", member) is not None
        await asyncio.sleep(GRACE + 0.1)
        assert await store.purge_expired() == 0
        assert await raw.zcard(f"{prefix}{{p}}:forks") == 0
        await assert_whole(raw, prefix)
        await store.delete("p")  # nothing holds it any more: really deleted
        assert await keys_left(raw, prefix) == []


async def test_cleanup_leaves_a_change_under_way_alone(prefix: str, raw: aioredis.Redis) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        assert isinstance(store, RedisStore)
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(1)], 0)
        stored = initial_record(SessionRecord(id="slow"), ParentRef(session_id="p", seq=1))
        stamp = secrets.token_hex(8)
        change = await index.intent(store._conn, stored, stamp)
        await store._conn.script(
            "hold", [repr(time.time()), 1, change.member], store._conn.session_keys("p")
        )
        assert await store.purge_expired() == 0  # meanwhile, cleanup runs
        assert await records.commit_record(store._conn, stored, stamp, change.t) == 1
        await index.disarm(store._conn, change)
        assert [r.seq for r in await read_all(store, "slow")] == [1]
        await assert_whole(raw, prefix)


async def test_a_commit_past_its_deadline_writes_nothing(prefix: str, raw: aioredis.Redis) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        assert isinstance(store, RedisStore)
        await store.create(SessionRecord(id="p"))
        store._conn.grace = 1e-6  # every commit comes too late
        for call in (
            store.fork("p", 0, SessionRecord(id="f")),
            store.create(SessionRecord(id="c")),
            store.update(await store.get("p"), 1),
            store.delete("p"),
        ):
            with pytest.raises(StoreUnavailableError, match="retry"):
                await call
        store._conn.grace = GRACE
        await asyncio.sleep(0.01)
        assert await store.purge_expired() == 0
        assert (await store.get("p")).version == 1
        assert [r.id for r in (await store.list_sessions()).records] == ["p"]
        await assert_whole(raw, prefix)


async def test_a_repeated_hold_counts_once(prefix: str, raw: aioredis.Redis) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        assert isinstance(store, RedisStore)
        await store.create(SessionRecord(id="p"))
        args = [repr(time.time()), 0, "f#0123456789abcdef"]
        first = await store._conn.script("hold", args, store._conn.session_keys("p"))
        again = await store._conn.script("hold", args, store._conn.session_keys("p"))
        assert first == again  # the same fork, stamped once
        assert await raw.zcard(f"{prefix}{{p}}:forks") == 1


async def test_cleanup_checks_the_forks_of_tombstones(prefix: str, raw: aioredis.Redis) -> None:
    async with open_store(f"{REDIS_URL}?prefix={prefix}") as store:
        assert isinstance(store, RedisStore)
        store._conn.grace, store._conn.recheck = GRACE, 0.0
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(1)], 0)
        await store.fork("p", 1, SessionRecord(id="kept"))
        # a crash right after the hold: the only leftover no mark points at
        ghost = "ghost#0123456789abcdef"
        await store._conn.script(
            "hold", [repr(time.time()), 1, ghost], store._conn.session_keys("p")
        )
        await store.delete("p")
        assert await raw.zcard(f"{prefix}{{p}}:forks") == 2
        await store.purge_expired()  # the ghost is inside its grace: kept
        assert await raw.zscore(f"{prefix}{{p}}:forks", ghost) is not None
        await asyncio.sleep(GRACE + 0.1)
        await store.purge_expired()
        assert await raw.zscore(f"{prefix}{{p}}:forks", ghost) is None
        assert [r.seq for r in await read_all(store, "kept")] == [1]
        await assert_whole(raw, prefix)
        await store.delete("kept")
        assert await keys_left(raw, prefix) == []


class ReplyDropper:
    """A TCP proxy in front of Redis that can lose the reply to an EVALSHA.

    The script still runs on the server: this is a connection dropped (or a
    timeout) after Redis did the work and before the client heard of it.
    ``armed`` is True for the next EVALSHA, or the SHA1 of the script to hit.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed: bool | tuple[bytes, ...] = False
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def _hits(self, data: bytes) -> bool:
        if not self.armed or b"EVAL" not in data.upper():
            return False
        return self.armed is True or (
            isinstance(self.armed, tuple) and any(marker in data for marker in self.armed)
        )

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        drop = False

        async def upstream() -> None:
            nonlocal drop
            try:
                while data := await creader.read(65536):
                    if self._hits(data):
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


def _script_markers(name: str) -> tuple[bytes, ...]:
    """What a call of the script ``name`` carries: its SHA1 (EVALSHA) or its own text (EVAL)."""
    source = redis_scripts.SCRIPTS[name].encode()
    return hashlib.sha1(source).hexdigest().encode(), source[-300:]


async def _lost_reply(proxy: ReplyDropper, call: Any, step: str | None = None) -> Any:
    """Run ``call`` with the reply to its script (or to its ``step``) lost once; its result."""
    proxy.armed, before = (_script_markers(step) if step else True), proxy.dropped
    result = await call
    assert proxy.dropped == before + 1, "the proxy did not intercept the script"
    return result


async def _lost_reply_error(
    proxy: ReplyDropper, call: Any, step: str | None = None
) -> StoreUnavailableError:
    """Run ``call`` with the reply to its script lost; the error it raises (it is not re-sent)."""
    proxy.armed, before = (_script_markers(step) if step else True), proxy.dropped
    with pytest.raises(StoreUnavailableError) as info:
        await call
    assert proxy.dropped == before + 1, "the proxy did not intercept the script"
    assert "may or may not have been applied" in str(info.value)
    return info.value


async def _proxied(prefix: str, proxy: ReplyDropper, options: str = "") -> RedisStore:
    db = REDIS_URL.rsplit("/", 1)[-1]
    port = await proxy.start()
    store = open_store(f"redis://127.0.0.1:{port}/{db}?prefix={prefix}{options}")
    assert isinstance(store, RedisStore)
    # load every script first, so the dropped reply is the script's, not a NOSCRIPT
    loader = aioredis.Redis.from_url(REDIS_URL)
    for source in redis_scripts.SCRIPTS.values():
        await loader.script_load(source)
    await loader.aclose()
    return store


async def test_a_lost_append_reply_is_sent_again_and_applied_once(
    prefix: str, dropper: ReplyDropper
) -> None:
    store = await _proxied(prefix, dropper)
    try:
        await store.create(SessionRecord(id="s"))
        batch = [ev(1, new_event_id()), ev(2, new_event_id())]
        # the script ran, its reply was lost: the store sends it again, and the
        # second run recognises the first (the event id at seq 1) and writes nothing
        assert await _lost_reply(dropper, store.append("s", batch, 0)) == 2
        assert (await store.get("s")).head == 2
        assert [json.loads(r.data)["n"] for r in await read_all(store, "s")] == [1, 2]
        # under a lease, too (the re-sent call is recognised before the lease is looked at)
        lease = await store.acquire_lease("s", "writer", 30)
        assert await _lost_reply(dropper, store.append("s", [ev(3, "e3")], 2, lease=lease)) == 3
        # an append without event ids cannot be recognised: it is never sent twice
        await _lost_reply_error(dropper, store.append("s", [ev(4)], 3, lease=lease))
        assert [json.loads(r.data)["n"] for r in await read_all(store, "s")] == [1, 2, 3, 4]
        assert [r.event_id for r in await read_all(store, "s")] == [
            batch[0].event_id,
            batch[1].event_id,
            "e3",
            None,
        ]
    finally:
        await store.aclose()


async def test_with_retries_0_nothing_is_ever_sent_twice(
    prefix: str, dropper: ReplyDropper
) -> None:
    store = await _proxied(prefix, dropper, "&retries=0")
    try:
        await store.create(SessionRecord(id="s"))
        await _lost_reply_error(dropper, store.append("s", [ev(1, new_event_id())], 0))
        assert (await store.get("s")).head == 1  # it ran once
        proxy_reads = dropper.dropped
        dropper.armed = True
        with pytest.raises(StoreUnavailableError):
            await store.get_snapshot("s")  # a read, lost: not sent again either
        assert dropper.dropped == proxy_reads + 1
    finally:
        await store.aclose()


async def test_lost_replies_to_lease_and_snapshot_calls_are_sent_again(
    prefix: str, dropper: ReplyDropper
) -> None:
    store = await _proxied(prefix, dropper)
    try:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1)], 0)
        lease = await _lost_reply(dropper, store.acquire_lease("s", "a", 30))
        assert lease.token == 1  # the re-sent call found "a" holding it: the same token
        renewed = await _lost_reply(dropper, store.renew_lease(lease, 60))
        assert renewed.token == 1 and renewed.expires_at > lease.expires_at
        await _lost_reply(dropper, store.put_snapshot("s", 1, b"folded"))
        assert await _lost_reply(dropper, store.get_snapshot("s")) == (1, b"folded")
        await _lost_reply(dropper, store.release_lease(renewed))
        assert (await store.acquire_lease("s", "b", 30)).token == 3  # 2 went with the release
    finally:
        await store.aclose()


async def _listed(store: Any, **kw: Any) -> set[str]:
    return {r.id for r in (await store.list_sessions(**kw)).records}


async def _exists(store: Any, session_id: str) -> bool:
    try:
        await store.get(session_id)
    except SessionNotFoundError:
        return False
    return True


async def test_a_lost_reply_at_any_step_of_a_write_is_sent_again_and_the_write_completes(
    prefix: str, dropper: ReplyDropper, raw: aioredis.Redis
) -> None:
    store = await _proxied(prefix, dropper)
    try:
        await store.create(SessionRecord(id="p", user_id="u"))
        await store.append("p", [ev(1), ev(2)], 0)

        # create: every step re-sent; the session exists and is listed
        for step in ("intent", "create_record", "disarm"):
            sid = f"c-{step}"
            made = await _lost_reply(
                dropper, store.create(SessionRecord(id=sid, user_id="u")), step
            )
            assert made.id == sid and await _exists(store, sid)
            assert sid in await _listed(store, user_id="u")
        await assert_whole(raw, prefix)

        # fork: the fork exists, reads its parent, and its parent holds it once
        for step in ("intent", "hold", "create_record", "disarm"):
            sid = f"f-{step}"
            call = store.fork("p", 1, SessionRecord(id=sid, user_id="u"))
            assert (await _lost_reply(dropper, call, step)).parent == ParentRef(
                session_id="p", seq=1
            )
            assert sid in await _listed(store)
            assert [r.seq for r in await read_all(store, sid)] == [1]
            stamp = (await raw.hget(f"{prefix}{{{sid}}}:rec", "stamp")).decode()
            assert await raw.zscore(f"{prefix}{{p}}:forks", f"{sid}#{stamp}") is not None
        assert await raw.zcard(f"{prefix}{{p}}:forks") == 4
        await assert_whole(raw, prefix)

        # update: applied once (the version moves by one), and the listings follow
        for step in ("widen", "update_record", "place"):
            rec = await store.get("c-disarm")
            moved = rec.model_copy(update={"user_id": f"u-{step}", "expires_at": time.time() + 99})
            done = await _lost_reply(dropper, store.update(moved, rec.version), step)
            assert done.version == rec.version + 1 == (await store.get("c-disarm")).version
            assert "c-disarm" in await _listed(store, user_id=f"u-{step}")
        await assert_whole(raw, prefix)

        # create with a limit: a re-sent count-and-list is admitted (its entry is
        # there), so the session is made once and counts once
        limited = store.create(SessionRecord(id="c-limited", user_id="lim"), max_per_user=1)
        assert (await _lost_reply(dropper, limited, "intent")).id == "c-limited"
        with pytest.raises(SessionLimitError):
            await store.create(SessionRecord(id="c-limited2", user_id="lim"), max_per_user=1)
        await store.delete("c-limited")
        await assert_whole(raw, prefix)

        # put_blob: the blob gets its session's expiry with it
        await _lost_reply(dropper, store.put_blob("c-disarm", b"data"))
        at = await raw.pexpiretime(f"{prefix}{{c-disarm}}:rec")
        assert await raw.pexpiretime(f"{prefix}{{c-disarm}}:blob") == at

        # delete: gone, and never listed
        for step, sid in (
            ("widen", "c-intent"),
            ("delete_record", "c-create_record"),
            ("forget", "f-create_record"),
            ("release", "f-disarm"),
        ):
            await _lost_reply(dropper, store.delete(sid), step)
            assert not await _exists(store, sid) and sid not in await _listed(store)
        await assert_whole(raw, prefix)
        # a delete that leaves a tombstone (it has a fork): recognised when re-sent
        await store.fork("f-hold", 1, SessionRecord(id="grandchild"))
        await _lost_reply(dropper, store.delete("f-hold"), "delete_record")
        await store.fork("grandchild", 1, SessionRecord(id="great"))
        await _lost_reply(dropper, store.delete("grandchild"), "bury")
        assert [r.seq for r in await read_all(store, "great")] == [1]
        await assert_whole(raw, prefix)
        # the one step that cannot tell a re-send from a first run: a release that
        # removed a tombstone; the rest of the chain is left to cleanup, due at once
        await _lost_reply(dropper, store.delete("great"), "release")
        assert await store.purge_expired() == 0
        await assert_whole(raw, prefix)
        for sid in ("c-disarm", "f-intent", "f-hold", "p"):
            if await _exists(store, sid):
                await store.delete(sid)
        assert await keys_left(raw, prefix) == []
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
        pool = store._conn.client().connection_pool
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
    ("EVAL", OOM + b" script: 1234, on @user_script:5.", StoreUnavailableError, "memory"),
    ("EVAL", b"-READONLY You can't write against a read only replica.", StoreUnavailableError, "read-only"),
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
            calls = {
                "HGETALL": lambda: store.get("s"),
                "EVALSHA": lambda: store.append("s", [ev(1)], 0),
                "EVAL": lambda: store.fork("s", 0, SessionRecord(id="f")),  # its first two steps
            }
            call = calls[command]()
            with pytest.raises(StoreError, match=words) as info:
                await call
            assert type(info.value) is expected, repr(info.value)
            assert f"127.0.0.1:{port}" in str(info.value)
        finally:
            await store.aclose()


PACKAGE = Path(redis_package.__file__ or "").parent


def _sources(pattern: str) -> dict[str, str]:
    """The text of the package's files matching ``pattern`` (``*.py``, ``*.lua``), by path."""
    found = {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob(pattern))}
    assert found, f"no {pattern} in {PACKAGE}"
    return found


def test_no_scan_or_keys_anywhere() -> None:
    source = "\n".join(_sources("*.py").values()) + "\n".join(_sources("*.lua").values())
    for word in ("SCAN", "SSCAN", "HSCAN", "ZSCAN", "KEYS"):
        assert not re.search(rf"redis\.call\(\s*'{word}'", source, re.IGNORECASE)
    assert not re.search(r"\.(scan|scan_iter|keys)\(", source)


# -- processes and outages ---------------------------------------------------------


@pytest.mark.slow  # starts processes
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

    def __init__(self, directory: Path, *extra: str) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.exe, self.directory, self.port = exe, directory, _free_port()
        self.extra = list(extra)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Start it (again) on the same port and data directory; wait until it listens."""
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir"]
        args += [str(self.directory), "--appendonly", "yes", "--appendfsync", "always"]
        args += self.extra
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


@pytest.mark.slow  # starts processes
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


@pytest.mark.slow  # starts processes
async def test_the_same_store_object_works_at_once_after_its_connections_are_killed(
    own_redis: OwnRedis,
) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0?socket_timeout=2&prefix=k:"
    async with open_store(url) as store, aioredis.Redis(port=own_redis.port) as admin:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1)], 0)
        for _ in range(3):
            # fill the pool with connections, then have the server drop all of them
            # (an idle timeout, a proxy, a failover does the same)
            await asyncio.gather(*(store.get("s") for _ in range(8)))
            assert await admin.client_kill_filter(_type="normal", skipme=True) >= 2
            await asyncio.sleep(0.05)
            # the server is reachable: every call works on its first try, none is
            # re-sent (the pool reconnects before it sends anything)
            records = await asyncio.gather(*(store.get("s") for _ in range(8)))
            assert {r.head for r in records} == {1}
            assert [r.seq for r in await read_all(store, "s")] == [1]
        head = (await store.get("s")).head
        assert await store.append("s", [ev(2)], head) == head + 1


@pytest.mark.slow  # starts processes
async def test_the_same_store_object_works_on_the_next_call_after_a_restart(
    own_redis: OwnRedis,
) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0?socket_timeout=1&socket_connect_timeout=1"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1)], 0)
        await asyncio.gather(*(store.get("s") for _ in range(8)))  # a pool of connections
        own_redis.kill()
        for call in (lambda: store.get("s"), lambda: read_all(store, "s")):
            with pytest.raises(StoreUnavailableError, match="unreachable"):
                await call()
        own_redis.start()  # returns once the port accepts connections
        # the very next calls work, however many pooled connections the restart broke
        records = await asyncio.gather(*(store.get("s") for _ in range(8)))
        assert {r.head for r in records} == {1}
        assert await store.append("s", [ev(2)], 1) == 2
        assert [r.seq for r in await read_all(store, "s")] == [1, 2]


# -- URLs and credentials -----------------------------------------------------------------

BAD_URLS = [
    "redis://127.0.0.1:port/0",  # a port that is not a number
    "redis://127.0.0.1:99999/0",  # out of range
    "redis://127.0.0.1:0/0",
    "redis://127.0.0.1:6379/abc",  # a database that is not a number (redis-py used db 0)
    "redis://127.0.0.1:6379/1/2",  # (redis-py used db 12)
    "redis://127.0.0.1:6379/-1",
    "redis://127.0.0.1:6379/99999999999",
    "redis://[::1/0",  # a broken IPv6 address
    "redis://127.0.0.1/0#part",
    "redis://127.0.0.1/0?socket_timeout=-1",
    "redis://127.0.0.1/0?socket_timeout=0",
    "redis://127.0.0.1/0?socket_timeout=nan",
    "redis://127.0.0.1/0?socket_connect_timeout=inf",
    "redis://127.0.0.1/0?pool_timeout=-0.5",
    "redis://127.0.0.1/0?max_connections=1.5",
    "redis://127.0.0.1/0?max_connections=-3",
    "redis://127.0.0.1/0?max_connections=",
    "redis://127.0.0.1/0?prefix=a&prefix=b",  # given twice: which one?
    "redis://127.0.0.1/0?prefix",  # not name=value
    "redis://127.0.0.1/0?prefix=a%00b",
    "redis://127.0.0.1/0?prefix=a%7Bb",
    "rediss://127.0.0.1/0?ssl_check_hostname=",
    "redis://127.0.0.1/0?retries=-1",
    "redis://127.0.0.1/0?retries=101",
    "redis://127.0.0.1/0?retries=some",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_url_parts_and_option_values_are_invalid_url_errors(url: str) -> None:
    with pytest.raises(InvalidURLError) as info:
        RedisStore.from_url(url)
    assert "redis" in str(info.value)
    if "[" not in url:  # open_store reads the scheme first (a ValueError for a broken IPv6)
        with pytest.raises(InvalidURLError):
            open_store(url)


@pytest.mark.parametrize(
    "options",
    [
        {"socket_timeout": float("nan")},
        {"socket_timeout": "soon"},
        {"pool_timeout": -1},
        {"max_connections": 0},
        {"max_connections": True},
        {"max_connections": 2.5},
        {"prefix": "a\nb"},
    ],
)
def test_bad_option_values_given_as_arguments_are_invalid_url_errors(
    options: dict[str, Any],
) -> None:
    with pytest.raises(InvalidURLError):
        open_store("redis://127.0.0.1:6379/0", **options)
    with pytest.raises(InvalidURLError):  # the class itself checks them too
        RedisStore("redis://127.0.0.1:6379/0", **options)


def test_no_assert_guards_a_runtime_condition() -> None:
    for name, source in _sources("*.py").items():
        assert not re.search(r"^\s*assert\b", source, re.MULTILINE), name


SECRETS = ("s3cret-pw", "t0ken-pw", "opt-pw")


def _shows_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


async def test_credentials_never_appear_in_urls_reprs_or_messages() -> None:
    stores = [
        open_store("redis://user:s3cret-pw@127.0.0.1:1/0?socket_connect_timeout=0.5"),
        open_store("redis://127.0.0.1:1/0?password=s3cret-pw&socket_connect_timeout=0.5"),
        open_store("redis://:s3cret-pw@127.0.0.1:1/0", password="opt-pw"),
        open_store("rediss://u:s3cret-pw@127.0.0.1:1/0?ssl_password=t0ken-pw"),
        open_store("rediss://127.0.0.1:1/0", ssl_password="t0ken-pw", password="opt-pw"),
    ]
    try:
        for store in stores:
            _shows_no_secret(store.url)
            _shows_no_secret(repr(store))
            assert "127.0.0.1:1" in store.url and "127.0.0.1:1" in repr(store)
            with pytest.raises(StoreUnavailableError) as info:
                await store.get("s")
            _shows_no_secret(str(info.value))
            await store.aclose()
            with pytest.raises(ChatSessionClosedError) as closed:
                await store.get("s")
            _shows_no_secret(str(closed.value))
    finally:
        for store in stores:
            await store.aclose()
    assert "user:***@" in stores[0].url
    assert RedisStore.from_url("redis://h/0?prefix=a@b:").prefix == "a@b:"  # '@' in a value
    # a URL refused for another reason does not show its secrets either
    for url, options in [
        ("redis://user:s3cret-pw@127.0.0.1:6379/0?socket_timeout=soon", {}),
        ("redis://user:s3cret-pw@127.0.0.1:port/0", {}),
        ("redis://user:s3cret-pw@127.0.0.1/0?ssl_ca_certs=/ca.pem", {}),
        ("redis://user:s3cret-pw@/0", {}),
        ("redis://user:s3cret/pw@127.0.0.1/0", {}),  # an unencoded '/' in the password
        ("redis://user:s3cret?pw@127.0.0.1/0", {}),
        ("redis://user:s3cret#pw@127.0.0.1/0", {}),
        ("redis://user:s3cret-pw@127.0.0.1/x?password=t0ken-pw", {}),
        ("rediss://h/0?ssl_password=t0ken-pw&ssl_cert_reqs=maybe", {"password": "opt-pw"}),
        ("redis://h/0?password=t0ken-pw", {"max_connections": "many"}),
        ("http://user:s3cret-pw@h/0", {}),
    ]:
        with pytest.raises(InvalidURLError) as refused:
            RedisStore.from_url(url, **options)
        _shows_no_secret(str(refused.value))


@pytest.mark.slow  # starts processes
async def test_a_password_given_as_an_option_is_used(tmp_path: Path) -> None:
    server = OwnRedis(tmp_path, "--requirepass", "opt-pw")
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0?socket_timeout=2"
        async with open_store(url, password="opt-pw") as store:
            await store.create(SessionRecord(id="s"))
            assert (await store.get("s")).id == "s"
        async with open_store(f"{url}&password=opt-pw") as store:
            assert (await store.get("s")).id == "s"
        for wrong in (open_store(url), open_store(url, password="s3cret-pw")):
            async with wrong as store:
                with pytest.raises(StoreUnavailableError) as info:
                    await store.get("s")
                assert "password" in str(info.value)
                _shows_no_secret(str(info.value))
    finally:
        server.kill()
