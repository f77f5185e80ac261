"""What a multi-user service needs of every store: per-user limits, read-only archived
sessions, store-computed stats, and cleanup that is safe from several processes.

``create(record, max_per_user=N)`` counts and writes in one atomic step, also
against other store objects and other processes; an archived session refuses
appends; ``stats()`` sums figures the store keeps as events are appended;
``purge_expired()`` run by two processes at once deletes, and counts, each
expired session once, leaving nothing of it behind.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from chatsession import (
    InvalidArgumentError,
    NewEvent,
    SessionArchivedError,
    SessionLimitError,
    SessionRecord,
    SessionState,
    Store,
    StoreStats,
    open_store,
)
from chatsession.store.base import count_events

from .conftest import POSTGRES_URL, REDIS_URL, file_root, sqlite_path

WORKER = Path(__file__).with_name("manager_worker.py")


def message(text: str, turn: str | None = None) -> NewEvent:
    data = json.dumps({"role": "user", "content": text}, separators=(",", ":"))
    return NewEvent("message", data, time.time(), turn)


def usage(total: int) -> NewEvent:
    data = json.dumps(
        {"model": "m", "prompt_tokens": total - 1, "completion_tokens": 1, "total_tokens": total},
        separators=(",", ":"),
    )
    return NewEvent("usage", data, time.time())


async def archive(store: Store, session_id: str) -> None:
    record = await store.get(session_id)
    await store.update(record.model_copy(update={"state": "archived"}), record.version)


async def restore(store: Store, session_id: str) -> None:
    record = await store.get(session_id)
    await store.update(record.model_copy(update={"state": SessionState.ACTIVE}), record.version)


# --------------------------------------------------------------------------
# limits


async def test_a_user_limit_counts_visible_sessions_that_are_not_archived(store: Store) -> None:
    for n in range(3):
        await store.create(SessionRecord(id=f"a{n}", user_id="ann"), max_per_user=3)
    with pytest.raises(SessionLimitError) as caught:
        await store.create(SessionRecord(id="a3", user_id="ann"), max_per_user=3)
    assert (caught.value.user_id, caught.value.limit, caught.value.count) == ("ann", 3, 3)
    assert "3" in str(caught.value) and "ann" in str(caught.value)
    with pytest.raises(Exception, match="not found"):
        await store.get("a3")  # nothing written

    await store.create(SessionRecord(id="b0", user_id="bob"), max_per_user=1)  # others: own count
    await store.create(SessionRecord(id="a-free", user_id="ann"))  # no limit asked: not checked

    await archive(store, "a0")  # archived sessions do not count
    await store.delete("a-free")  # nor deleted ones
    await store.create(SessionRecord(id="a4", user_id="ann"), max_per_user=3)
    with pytest.raises(SessionLimitError):
        await store.create(SessionRecord(id="a5", user_id="ann"), max_per_user=3)

    # nor expired ones
    expiring = SessionRecord(id="a-exp", user_id="cat", expires_at=time.time() + 0.6)
    await store.create(expiring, max_per_user=1)
    with pytest.raises(SessionLimitError):
        await store.create(SessionRecord(id="c1", user_id="cat"), max_per_user=1)
    await asyncio.sleep(0.8)
    await store.create(SessionRecord(id="c1", user_id="cat"), max_per_user=1)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "3"])
async def test_a_bad_limit_is_refused_before_anything_is_written(store: Store, bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="max_per_user"):
        await store.create(SessionRecord(id="x", user_id="u"), max_per_user=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="user_id"):
        await store.create(SessionRecord(id="x"), max_per_user=2)
    assert (await store.list_sessions()).records == []


async def test_creates_racing_at_a_limit_from_several_store_objects_leave_the_limit(
    store_url: str,
) -> None:
    stores = [open_store(store_url) for _ in range(5)] if "memory" not in store_url else []
    if not stores:  # memory:// is one store per object: race tasks on one
        shared = open_store(store_url)
        stores = [shared] * 5
    try:
        for s in stores:
            await s.list_sessions(limit=1)
        results = await asyncio.gather(
            *(
                s.create(SessionRecord(id=f"s{n}", user_id="ann"), max_per_user=3)
                for n, s in enumerate(stores)
            ),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, SessionLimitError)]
        created = [r for r in results if isinstance(r, SessionRecord)]
        assert len(created) == 3 and len(refused) == 2, results
        page = await stores[0].list_sessions(user_id="ann")
        assert sorted(r.id for r in page.records) == sorted(r.id for r in created)
    finally:
        for s in set(stores):
            await s.aclose()


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _run_together(procs: list[asyncio.subprocess.Process]) -> list[str]:
    """Wait until every worker is READY, start them at one instant, return their answers."""
    for proc in procs:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().strip()
        if line != "READY":
            _, err = await proc.communicate()
            raise AssertionError(f"worker said {line!r}: {err.decode()}")
    start_at = time.time() + 0.3
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"go {start_at!r}\n".encode())
    outputs = [await proc.communicate() for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    return [out.decode().strip() for out, _ in outputs]


@pytest.mark.slow
async def test_processes_creating_at_a_limit_leave_exactly_the_limit(durable_url: str) -> None:
    procs = [await _spawn("create", durable_url, "ann", "3", f"p{n}") for n in range(5)]
    answers = await _run_together(procs)
    assert sorted(answers) == ["CREATED"] * 3 + ["LIMIT 3"] * 2, answers
    async with open_store(durable_url) as store:
        assert len((await store.list_sessions(user_id="ann")).records) == 3


# --------------------------------------------------------------------------
# archived sessions are read-only


async def test_an_archived_session_refuses_appends_and_a_restored_one_takes_them(
    store: Store,
) -> None:
    await store.create(SessionRecord(id="s", user_id="ann"))
    head = await store.append("s", [message("before")], 0)
    await archive(store, "s")
    with pytest.raises(SessionArchivedError) as caught:
        await store.append("s", [message("while archived")], head)
    assert caught.value.session_id == "s" and "restore" in str(caught.value)
    lease = await store.acquire_lease("s", "me", 5)  # a lease does not unlock it
    with pytest.raises(SessionArchivedError):
        await store.append("s", [message("while archived")], head, lease=lease)
    await store.release_lease(lease)
    record = await store.get("s")
    assert record.head == head and record.state == SessionState.ARCHIVED
    assert [e.seq async for batch in store.read("s") for e in batch] == [1]

    fork = await store.fork("s", head, SessionRecord(id="f", user_id="ann"))  # reading works
    assert fork.state == "active"
    await store.append("f", [message("in the fork")], head)

    await restore(store, "s")
    assert await store.append("s", [message("after")], head) == head + 1


# --------------------------------------------------------------------------
# stats


def _expected(events: list[NewEvent]) -> tuple[int, int, int]:
    counts = count_events(events)
    return counts.messages, counts.tokens, counts.bytes


async def test_stats_are_computed_by_the_store(store: Store, backend: str) -> None:
    fresh = await store.stats()
    assert fresh == StoreStats()
    assert fresh.by_state == {"active": 0, "idle": 0, "archived": 0, "expired": 0}

    written: list[NewEvent] = []

    async def add(session_id: str, events: list[NewEvent]) -> None:
        head = (await store.get(session_id)).head
        await store.append(session_id, events, head)
        written.extend(events)

    await store.create(SessionRecord(id="a1", user_id="ann", agent_id="helper"))
    await store.create(SessionRecord(id="a2", user_id="ann", agent_id="coder"))
    await store.create(SessionRecord(id="b1", user_id="bob", agent_id="helper"))
    await store.create(SessionRecord(id="n1"))  # no owner, no agent
    await add("a1", [message("héllo ✓ \u2028"), usage(120), message("hi")])
    await add("b1", [message("x" * 1000), usage(7)])
    await add("b1", [NewEvent("checkpoint", '{"name":"c","data":null}', time.time())])
    # a fork counts only its own events
    await store.fork("a1", 2, SessionRecord(id="a1-fork", user_id="ann", agent_id="helper"))
    await add("a1-fork", [message("in the fork"), usage(5)])
    # a deleted session does not count, nor do its events
    await store.create(SessionRecord(id="gone", user_id="bob", agent_id="helper"))
    await store.append("gone", [message("lost"), usage(1000)], 0)
    await store.delete("gone")
    await archive(store, "a2")
    await asyncio.sleep(0.05)
    idle_before = time.time()
    await asyncio.sleep(0.05)
    await add("a1", [message("still here")])  # a1 is active; the others went quiet
    # an expired session is counted apart
    await store.create(
        SessionRecord(id="old", user_id="cat", agent_id="helper", expires_at=time.time() + 0.5)
    )
    await store.append("old", [message("expiring"), usage(9)], 0)
    await asyncio.sleep(0.7)

    stats = await store.stats(idle_before=idle_before)
    messages, tokens, size = _expected(written)
    assert (stats.messages, stats.tokens, stats.bytes) == (messages, tokens, size)
    assert (stats.messages, stats.tokens) == (5, 132)
    assert stats.sessions == 5
    expired = 0 if backend == "redis" else 1  # Redis expires records natively
    assert stats.by_state == {"active": 1, "idle": 3, "archived": 1, "expired": expired}
    assert (stats.users, stats.agents) == (2, 2)
    assert stats.by_user == {"ann": 3, "bob": 1}
    assert stats.by_agent == {"helper": 3, "coder": 1}
    assert list(stats.by_user) == ["ann", "bob"]  # most first

    top = await store.stats(top=1)
    assert top.by_user == {"ann": 3} and top.by_agent == {"helper": 3}
    assert top.users == 2 and top.by_state["idle"] == 0 and top.by_state["active"] == 4
    assert (await store.stats(top=0)).by_user == {}

    await store.purge_expired()
    assert (await store.stats()).by_state["expired"] == 0


@pytest.mark.parametrize(
    ("idle_before", "top"),
    [(float("nan"), 10), (float("inf"), 10), ("1", 10), (True, 10), (None, -1), (None, 10_001)],
)
async def test_bad_stats_arguments_are_refused(
    store: Store, idle_before: object, top: object
) -> None:
    with pytest.raises(InvalidArgumentError):
        await store.stats(idle_before=idle_before, top=top)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# cleanup from several processes


async def leftovers(backend: str, url: str) -> int:
    """Rows, keys or folders of sessions still kept in the backend's own storage."""
    if backend == "sqlite":
        db = sqlite3.connect(sqlite_path(url))
        try:
            return sum(
                db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("sessions", "events", "blobs", "snapshots")
            )
        finally:
            db.close()
    if backend == "file":
        root = file_root(url)
        return sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if backend == "redis":
        import redis.asyncio as aioredis

        prefix = dict(parse_qsl(urlsplit(url).query))["prefix"]
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
            listed = await client.zcard(f"{prefix}{{idx}}:all")
        finally:
            await client.aclose()
        return listed + sum(1 for k in keys if not k.startswith(f"{prefix}{{idx}}"))
    if backend == "postgres":
        import asyncpg

        schema = dict(parse_qsl(urlsplit(url).query))["schema"]
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            total = 0
            for table in ("sessions", "events", "blobs", "snapshots"):
                total += await conn.fetchval(f'SELECT count(*) FROM "{schema}".{table}')
            return int(total)
        finally:
            await conn.close()
    raise AssertionError(backend)


@pytest.mark.slow
async def test_two_processes_purging_at_once_delete_each_session_once(
    durable_url: str, durable_backend: str
) -> None:
    count = 60
    async with open_store(durable_url) as store:
        expires = time.time() + 2.0
        for n in range(count):
            sid = f"s{n}"
            await store.create(SessionRecord(id=sid, user_id=f"u{n % 7}", expires_at=expires))
            head = await store.append(sid, [message(f"m{n}"), usage(3)], 0)
            await store.put_blob(sid, f"blob {n}".encode())
            await store.put_snapshot(sid, head, b"snap")
            lease = await store.acquire_lease(sid, "holder", 30)
            assert lease.token >= 1
        await store.create(SessionRecord(id="keep", user_id="u0"))
        await store.append("keep", [message("kept")], 0)
        await asyncio.sleep(max(0.0, expires - time.time() + 0.1))
    procs = [await _spawn("purge", durable_url) for _ in range(2)]
    answers = await _run_together(procs)
    purged = [int(a.split()[1]) for a in answers]
    assert sum(purged) == count, answers
    async with open_store(durable_url) as store:
        assert [r.id for r in (await store.list_sessions()).records] == ["keep"]
        stats = await store.stats()
        assert stats.sessions == 1 and stats.by_state["expired"] == 0 and stats.messages == 1
        await store.delete("keep")
    assert await leftovers(durable_backend, durable_url) == 0
