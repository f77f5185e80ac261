"""The Store contract, checked the same way on every backend."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from chatsession import (
    BlobNotFoundError,
    ConflictError,
    InvalidIdError,
    InvalidURLError,
    Lease,
    NewEvent,
    SessionExistsError,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoredEvent,
    StoreUnavailableError,
    open_store,
)
from tests.conformance.conftest import BACKENDS, POSTGRES_URL, REDIS_URL

# payloads of every event type the log writes, with awkward JSON in them
PAYLOADS: list[tuple[str, Any]] = [
    ("turn_start", {}),
    ("message", {"role": "user", "content": 'héllo 👋 "quoted" back\\slash\nnew line'}),
    (
        "message",
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "name": "lookup", "arguments": '{"q": [1, 2]}'}],
        },
    ),
    ("message", {"role": "tool", "content": "result", "tool_call_id": "c1", "name": "lookup"}),
    (
        "message",
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "url": "data:image/png;base64,AAAA"},
            ],
        },
    ),
    (
        "usage",
        {
            "model": "m",
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "total_tokens": 15,
            "cost": 1.25e-05,
        },
    ),
    ("turn_end", {"status": "completed", "duration": 0.5, "steps": 2}),
    ("reset", {"reason": "user asked"}),
    ("rewind", {"to_seq": 2, "checkpoint": "start"}),
    ("checkpoint", {"name": "start", "data": {"nested": {"deep": [1, None, True]}}}),
    ("metadata", {"values": {"big": 123456789012345678901234567890, "neg": -1.5e300}}),
    ("state", {"values": {"todo": ["a", "b"], "gone": None}}),
    ("offload", {"blob_id": "ab" * 32, "size": 100000, "preview": "…"}),
    ("compaction", {"summary": "earlier: greetings", "upto_seq": 3}),
    ("message", {"role": "assistant", "content": "x" * 200_000}),
]


def decimal_json(text: str) -> Any:
    """JSON with every number as its exact decimal value."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def event(kind: str = "message", data: Any = None, turn: str | None = None) -> NewEvent:
    body = data if data is not None else {"role": "user", "content": "hi"}
    return NewEvent(kind, json.dumps(body, ensure_ascii=False), time.time(), turn)


async def read_all(store: Store, session_id: str, **kw: Any) -> list[StoredEvent]:
    return [row async for batch in store.read(session_id, **kw) for row in batch]


async def new(store: Store, session_id: str = "s1", **fields: Any) -> SessionRecord:
    return await store.create(SessionRecord(id=session_id, **fields))


# --------------------------------------------------------------------------
# events


async def test_is_a_store(store: Store) -> None:
    assert isinstance(store, Store)


async def test_every_event_type_round_trips(store: Store, backend: str) -> None:
    # byte for byte, except PostgreSQL (jsonb): equal JSON, whitespace and key order normalised
    await new(store)
    rows = [
        NewEvent(
            kind,
            json.dumps(data, ensure_ascii=False),
            1700000000.0 + i / 7,
            f"t{i % 3}" if i % 2 else None,
            1,
        )
        for i, (kind, data) in enumerate(PAYLOADS)
    ]
    head = await store.append("s1", rows, 0)
    assert head == len(rows)
    got = await read_all(store, "s1")
    assert [r.seq for r in got] == list(range(1, len(rows) + 1))
    for sent, back in zip(rows, got, strict=True):
        assert (back.type, back.ts, back.turn_id, back.schema_version) == (
            sent.type,
            sent.ts,
            sent.turn_id,
            sent.schema_version,
        )
        if backend == "postgres":
            # jsonb keeps each number's decimal value, not its spelling (1e300 reads
            # back as the same number written out), and normalises whitespace and key order
            assert decimal_json(back.data) == decimal_json(sent.data), back.seq
        else:
            assert back.data == sent.data, back.seq
        assert decimal_json(back.to_json())["data"] == decimal_json(sent.data)


async def test_read_windows_and_batches(store: Store) -> None:
    await new(store)
    await store.append("s1", [event(data={"n": i}) for i in range(1, 26)], 0)
    assert [r.seq for r in await read_all(store, "s1", after_seq=20)] == [21, 22, 23, 24, 25]
    assert [r.seq for r in await read_all(store, "s1", after_seq=3, upto_seq=6)] == [4, 5, 6]
    assert await read_all(store, "s1", after_seq=25) == []
    batches = [len(b) async for b in store.read("s1", batch_size=10)]
    assert batches == [10, 10, 5]


async def test_conditional_append_conflicts_and_writes_nothing(store: Store) -> None:
    await new(store)
    assert await store.append("s1", [event(), event()], 0) == 2
    with pytest.raises(ConflictError) as info:
        await store.append("s1", [event(data={"lost": True})], 1)
    assert info.value.expected == 1
    assert info.value.actual in (2, None)
    with pytest.raises(ConflictError):
        await store.append("s1", [event()], 5)
    assert [r.seq for r in await read_all(store, "s1")] == [1, 2]
    assert (await store.get("s1")).head == 2
    assert await store.append("s1", [event()], 2) == 3


async def test_empty_append_is_refused(store: Store) -> None:
    await new(store)
    with pytest.raises(ValueError):
        await store.append("s1", [], 0)


async def test_concurrent_tasks_never_interleave_or_lose(store: Store) -> None:
    await new(store)

    async def writer(name: str) -> list[tuple[int, str]]:
        acked = []
        for i in range(10):
            payload = f"{name}-{i}"
            head = (await store.get("s1")).head
            while True:
                try:
                    seq = await store.append("s1", [event(data={"p": payload})], head)
                    break
                except ConflictError:
                    head = (await store.get("s1")).head
            acked.append((seq, payload))
        return acked

    results = await asyncio.gather(*(writer(f"w{n}") for n in range(20)))
    acked = dict(pair for result in results for pair in result)
    rows = await read_all(store, "s1")
    assert [r.seq for r in rows] == list(range(1, 201))
    assert {r.seq: json.loads(r.data)["p"] for r in rows} == acked


async def test_missing_session(store: Store) -> None:
    with pytest.raises(SessionNotFoundError):
        await store.get("nobody")
    with pytest.raises(SessionNotFoundError):
        await store.append("nobody", [event()], 0)
    with pytest.raises(SessionNotFoundError):
        await read_all(store, "nobody")
    with pytest.raises(SessionNotFoundError):
        await store.delete("nobody")
    with pytest.raises(SessionNotFoundError):
        await store.fork("nobody", 0, SessionRecord(id="f"))


# --------------------------------------------------------------------------
# records


async def test_create_get_update_delete(store: Store) -> None:
    created = await new(store, user_id="alice", title="T", metadata={"k": [1, 2]})
    assert (created.version, created.head, created.parent) == (1, 0, None)
    assert created.created_at > 0
    got = await store.get("s1")
    assert got.user_id == "alice" and got.title == "T" and got.metadata == {"k": [1, 2]}
    with pytest.raises(SessionExistsError):
        await new(store)

    changed = got.model_copy(
        update={"title": "T2", "state": "idle", "metadata": {"x": 1}, "head": 99}
    )
    updated = await store.update(changed, expected_version=1)
    assert (updated.version, updated.title, updated.state, updated.head) == (2, "T2", "idle", 0)
    with pytest.raises(ConflictError):
        await store.update(changed.model_copy(update={"title": "stale"}), expected_version=1)
    again = await store.get("s1")
    assert (again.title, again.version, again.metadata) == ("T2", 2, {"x": 1})

    await store.append("s1", [event()], 0)
    assert (await store.get("s1")).head == 1
    await store.delete("s1")
    with pytest.raises(SessionNotFoundError):
        await store.get("s1")
    assert (await store.list_sessions()).records == []


async def test_expired_sessions_are_invisible_and_purged(store: Store) -> None:
    await new(store, "old", expires_at=time.time() - 1)
    await new(store, "live", expires_at=time.time() + 3600)
    await new(store, "forever")
    for call in (store.get("old"), store.append("old", [event()], 0), read_all(store, "old")):
        with pytest.raises(SessionNotFoundError):
            await call
    assert {r.id for r in (await store.list_sessions()).records} == {"live", "forever"}
    assert await store.purge_expired() == 1
    assert await store.purge_expired(before=time.time() + 7200) == 1
    assert {r.id for r in (await store.list_sessions()).records} == {"forever"}


# --------------------------------------------------------------------------
# forks


async def test_fork_shares_the_prefix_and_diverges(store: Store) -> None:
    await new(store, "p")
    await store.append("p", [event(data={"n": i}) for i in range(1, 6)], 0)
    fork = await store.fork("p", 3, SessionRecord(id="f", user_id="bob"))
    assert (fork.head, fork.parent and fork.parent.session_id, fork.parent and fork.parent.seq) == (
        3,
        "p",
        3,
    )
    assert (await store.get("f")).user_id == "bob"
    assert await store.append("f", [event(data={"n": "f4"})], 3) == 4
    assert await store.append("p", [event(data={"n": 6})], 5) == 6
    fork_rows = await read_all(store, "f")
    assert [json.loads(r.data)["n"] for r in fork_rows] == [1, 2, 3, "f4"]
    assert [r.seq for r in fork_rows] == [1, 2, 3, 4]
    assert [json.loads(r.data)["n"] for r in await read_all(store, "p")] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ConflictError):
        await store.append("f", [event()], 3)


async def test_forks_of_forks_and_deleting_ancestors(store: Store) -> None:
    await new(store, "g")
    await store.append("g", [event(data={"n": f"g{i}"}) for i in range(1, 11)], 0)
    await store.put_blob("g", b"from the grandparent")
    await store.fork("g", 6, SessionRecord(id="p"))
    await store.append("p", [event(data={"n": f"p{i}"}) for i in (7, 8, 9)], 6)
    await store.fork("p", 8, SessionRecord(id="c"))  # after p's own fork point
    await store.fork("p", 4, SessionRecord(id="early"))  # before p's own fork point
    await store.append("c", [event(data={"n": "c9"})], 8)
    expected_c = [f"g{i}" for i in range(1, 7)] + ["p7", "p8", "c9"]
    assert [json.loads(r.data)["n"] for r in await read_all(store, "c")] == expected_c
    assert [json.loads(r.data)["n"] for r in await read_all(store, "early")] == [
        f"g{i}" for i in range(1, 5)
    ]

    await store.delete("g")
    await store.delete("p")
    for gone in ("g", "p"):
        with pytest.raises(SessionNotFoundError):
            await store.get(gone)
    assert {r.id for r in (await store.list_sessions()).records} == {"c", "early"}
    assert [json.loads(r.data)["n"] for r in await read_all(store, "c")] == expected_c
    assert (
        await store.get_blob("c", __import__("hashlib").sha256(b"from the grandparent").hexdigest())
        == b"from the grandparent"
    )
    assert await store.append("c", [event(data={"n": "c10"})], 9) == 10
    with pytest.raises(SessionExistsError):  # a tombstone still holds its id
        await new(store, "p")

    await store.delete("c")
    assert [json.loads(r.data)["n"] for r in await read_all(store, "early")] == [
        f"g{i}" for i in range(1, 5)
    ]
    await store.delete("early")
    assert (await store.list_sessions()).records == []


async def test_fork_points_are_checked(store: Store) -> None:
    await new(store, "p")
    await store.append("p", [event(), event()], 0)
    for bad in (-1, 3):
        with pytest.raises(ValueError):
            await store.fork("p", bad, SessionRecord(id="f"))
    assert (await store.fork("p", 0, SessionRecord(id="f0"))).head == 0
    assert await read_all(store, "f0") == []
    assert (await store.fork("p", 2, SessionRecord(id="f2"))).head == 2
    with pytest.raises(SessionExistsError):
        await store.fork("p", 1, SessionRecord(id="f2"))


def _query(url: str, name: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))[name]


async def own_event_count(backend: str, store: Store, url: str, session_id: str) -> int:
    """How many events the backend itself stores under ``session_id`` (not inherited)."""
    if backend == "memory":
        return len(store._entries[session_id].events)  # type: ignore[attr-defined]
    if backend == "sqlite":
        db = sqlite3.connect(urlsplit(url).path[1:])
        try:
            (count,) = db.execute(
                "SELECT count(*) FROM events e JOIN sessions s ON s.pk = e.session_pk "
                "WHERE s.id = ?",
                (session_id,),
            ).fetchone()
        finally:
            db.close()
        return int(count)
    if backend == "file":
        log = Path(urlsplit(url).path) / session_id / "context.jsonl"
        return len(log.read_bytes().splitlines())
    if backend == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return int(await client.llen(f"{_query(url, 'prefix')}{{{session_id}}}:ev"))
        finally:
            await client.aclose()
    if backend == "postgres":
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            schema = _query(url, "schema")
            return int(
                await conn.fetchval(
                    f'SELECT count(*) FROM "{schema}".events e '
                    f'JOIN "{schema}".sessions s ON s.pk = e.session_pk WHERE s.id = $1',
                    session_id,
                )
            )
        finally:
            await conn.close()
    raise AssertionError(f"no way to count stored events for backend {backend!r}: add one")


def _bytes_on_disk(backend: str, url: str) -> int | None:
    if backend == "sqlite":
        db = Path(urlsplit(url).path[1:])
        return sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
    if backend == "file":
        root = Path(urlsplit(url).path)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return None


async def test_fork_copies_nothing(store: Store, backend: str, store_url: str) -> None:
    await new(store, "p")
    rows = [event(data={"n": i, "pad": "x" * 500}) for i in range(2000)]
    await store.append("p", rows, 0)
    payload_bytes = sum(len(r.data) for r in rows)
    # the counter sees the parent's events, so a zero for the fork means something
    assert await own_event_count(backend, store, store_url, "p") == 2000
    before = _bytes_on_disk(backend, store_url)

    await store.fork("p", 2000, SessionRecord(id="f"))

    assert await own_event_count(backend, store, store_url, "f") == 0
    after = _bytes_on_disk(backend, store_url)
    if before is not None and after is not None:
        assert after - before < payload_bytes // 20, (before, after, payload_bytes)
    # the fork's own part is empty: reading past the fork point finds nothing
    assert await read_all(store, "f", after_seq=2000) == []
    assert len(await read_all(store, "f")) == 2000
    # a fork of the fork copies nothing either, and the fork's own events are its own
    await store.fork("f", 1000, SessionRecord(id="ff"))
    assert await own_event_count(backend, store, store_url, "ff") == 0
    assert await store.append("f", [event(data={"n": "own"})], 2000) == 2001
    assert await own_event_count(backend, store, store_url, "f") == 1
    assert await own_event_count(backend, store, store_url, "p") == 2000


# --------------------------------------------------------------------------
# listing


async def test_listing_filters_newest_first(store: Store) -> None:
    specs = [
        ("a1", "alice", "bot", "w1", "active"),
        ("a2", "alice", "bot", "w2", "idle"),
        ("a3", "alice", "other", "w1", "archived"),
        ("b1", "bob", "bot", "w1", "active"),
    ]
    for i, (sid, user, agent, window, state) in enumerate(specs):
        await store.create(
            SessionRecord(
                id=sid,
                user_id=user,
                agent_id=agent,
                window_id=window,
                state=state,
                created_at=1000.0 + i,
            )
        )

    async def ids(**kw: Any) -> list[str]:
        return [r.id for r in (await store.list_sessions(**kw)).records]

    assert await ids() == ["b1", "a3", "a2", "a1"]
    assert await ids(user_id="alice") == ["a3", "a2", "a1"]
    assert await ids(user_id="alice", agent_id="bot") == ["a2", "a1"]
    assert await ids(window_id="w1") == ["b1", "a3", "a1"]
    assert await ids(state="active") == ["b1", "a1"]
    assert await ids(user_id="alice", window_id="w1", state="archived") == ["a3"]
    assert await ids(user_id="carol") == []


async def test_keyset_pagination_returns_each_once(store: Store) -> None:
    for i in range(23):
        # ties on created_at are broken by id
        await store.create(SessionRecord(id=f"s{i:02d}", created_at=1000.0 + i // 3))
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_sessions(limit=5, cursor=cursor)
        seen.extend(r.id for r in page.records)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen)) == 23
    keys = [(1000.0 + int(s[1:]) // 3, s) for s in seen]
    assert keys == sorted(keys, reverse=True)


async def test_pagination_under_concurrent_inserts(store: Store) -> None:
    for i in range(40):
        await store.create(SessionRecord(id=f"old{i:02d}"))
    stop = asyncio.Event()

    async def inserter() -> int:
        n = 0
        while not stop.is_set():
            await store.create(SessionRecord(id=f"new{n:04d}"))
            n += 1
            await asyncio.sleep(0)
        return n

    task = asyncio.create_task(inserter())
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_sessions(limit=7, cursor=cursor)
        seen.extend(r.id for r in page.records)
        await asyncio.sleep(0.001)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    stop.set()
    inserted = await task
    assert inserted > 0
    old = [s for s in seen if s.startswith("old")]
    assert len(seen) == len(set(seen))
    assert sorted(old) == [f"old{i:02d}" for i in range(40)]


async def test_bad_limit_and_cursor(store: Store) -> None:
    for bad in (0, -1, 1001, True):
        with pytest.raises(ValueError):
            await store.list_sessions(limit=bad)
    with pytest.raises(ValueError):
        await store.list_sessions(cursor="garbage!")


# --------------------------------------------------------------------------
# ids, URLs, blobs


BAD_IDS: list[Any] = ["../x", "", "a" * 129, "a\nb", "a/b", ".hidden", "nul\x00", 42]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
async def test_bad_ids_are_rejected_before_io(store: Store, bad: Any) -> None:
    await new(store, "ok")
    calls = [
        lambda: store.create(SessionRecord.model_construct(id=bad)),
        lambda: store.get(bad),
        lambda: store.update(SessionRecord.model_construct(id=bad), 1),
        lambda: store.delete(bad),
        lambda: store.append(bad, [event()], 0),
        lambda: read_all(store, bad),
        lambda: store.fork(bad, 0, SessionRecord(id="f")),
        lambda: store.fork("ok", 0, SessionRecord.model_construct(id=bad)),
        lambda: store.put_blob(bad, b"x"),
        lambda: store.get_blob(bad, "ab" * 32),
        lambda: store.get_blob("ok", bad),
    ]
    for call in calls:
        with pytest.raises(InvalidIdError) as info:
            await call()
        assert any(w in str(info.value) for w in ("letters, digits", "must", "limit is 128"))
    assert [r.id for r in (await store.list_sessions()).records] == ["ok"]


# stores whose first I/O would fail (or leave a trace): a bad id must be refused first
UNREACHABLE = [b for b in BACKENDS if b != "memory"]
PRE_IO_BAD_IDS = ["../x", "", "a" * 129, "a\x00b", "a\nb"]


def unreachable_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        (tmp_path / "plain-file").write_text("not a directory")
        return f"sqlite:///{tmp_path}/plain-file/store.db"
    if backend == "file":
        return f"file://{tmp_path}/not-yet/sessions"
    if backend == "redis":
        return "redis://127.0.0.1:1/0?socket_connect_timeout=2&socket_timeout=2"
    if backend == "postgres":
        return "postgresql://postgres@127.0.0.1:1/test?connect_timeout=2"
    raise AssertionError(f"no unreachable URL for backend {backend!r}: add one")


def id_calls(store: Store, bad: str) -> dict[str, Callable[[], Awaitable[object]]]:
    """Every method taking an id, called with ``bad`` in that id's place."""
    return {
        "create": lambda: store.create(SessionRecord(id=bad)),
        "get": lambda: store.get(bad),
        "update": lambda: store.update(SessionRecord(id=bad), 1),
        "delete": lambda: store.delete(bad),
        "append": lambda: store.append(bad, [event()], 0),
        "read": lambda: read_all(store, bad),
        "fork parent": lambda: store.fork(bad, 0, SessionRecord(id="f")),
        "fork child": lambda: store.fork("ok", 0, SessionRecord(id=bad)),
        "put_blob": lambda: store.put_blob(bad, b"x"),
        "get_blob session": lambda: store.get_blob(bad, "ab" * 32),
        "get_blob blob": lambda: store.get_blob("ok", bad),
        "acquire_lease": lambda: store.acquire_lease(bad, "owner", 30),
        "renew_lease": lambda: store.renew_lease(Lease(bad, "owner", 1, 0.0), 30),
        "release_lease": lambda: store.release_lease(Lease(bad, "owner", 1, 0.0)),
        "append(lease)": lambda: store.append("ok", [event()], 0, lease=Lease(bad, "o", 1, 0.0)),
        "put_snapshot": lambda: store.put_snapshot(bad, 0, b"x"),
        "get_snapshot": lambda: store.get_snapshot(bad),
    }


@pytest.mark.parametrize("backend", UNREACHABLE)
async def test_bad_ids_fail_before_any_io(backend: str, tmp_path: Path) -> None:
    store = open_store(unreachable_url(backend, tmp_path))
    try:
        for bad in PRE_IO_BAD_IDS:
            for name, call in id_calls(store, bad).items():
                try:
                    await asyncio.wait_for(call(), 30)
                except InvalidIdError:
                    continue
                except Exception as exc:
                    pytest.fail(f"{name}({bad!r}) raised {type(exc).__name__}, not InvalidIdError")
                pytest.fail(f"{name}({bad!r}) did not raise")
        if backend == "file":
            assert not (tmp_path / "not-yet").exists()
            # control: a valid id does reach the disk
            await store.create(SessionRecord(id="ok"))
            assert (tmp_path / "not-yet" / "sessions" / "ok").is_dir()
        else:
            # control: a valid id does reach the store, and fails there
            with pytest.raises(StoreUnavailableError):
                await asyncio.wait_for(store.get("ok"), 30)
    finally:
        await store.aclose()


BAD_READS: list[dict[str, int]] = [{"batch_size": 0}, {"batch_size": -1}, {"after_seq": -1}]


@pytest.mark.parametrize(
    "bad", BAD_READS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
)
async def test_bad_read_arguments_fail_before_any_io(
    store: Store, backend: str, bad: dict[str, int], tmp_path: Path
) -> None:
    await new(store, "s1")
    await store.append("s1", [event(), event()], 0)
    for session_id in ("s1", "nobody"):  # "nobody": a lookup would say not found
        with pytest.raises(ValueError) as info:
            await asyncio.wait_for(read_all(store, session_id, **bad), 10)
        assert not isinstance(info.value, InvalidIdError)
        assert next(iter(bad)) in str(info.value)
    if backend == "memory":
        return
    unreachable = open_store(unreachable_url(backend, tmp_path))
    try:
        with pytest.raises(ValueError) as info:
            await asyncio.wait_for(read_all(unreachable, "s1", **bad), 30)
        assert not isinstance(info.value, InvalidIdError)
    finally:
        await unreachable.aclose()
    if backend == "file":
        assert not (tmp_path / "not-yet").exists()


def test_unknown_scheme() -> None:
    with pytest.raises(InvalidURLError, match="sqlite://"):
        open_store("mongodb://127.0.0.1/x")


async def test_blobs(store: Store) -> None:
    await new(store, "a")
    await new(store, "b")
    data = bytes(range(256)) * 40 + b"\x00end"
    blob_id = await store.put_blob("a", data, "application/octet-stream")
    assert blob_id == __import__("hashlib").sha256(data).hexdigest()
    assert await store.put_blob("a", data) == blob_id
    assert await store.get_blob("a", blob_id) == data
    with pytest.raises(BlobNotFoundError):
        await store.get_blob("b", blob_id)
    with pytest.raises(BlobNotFoundError):
        await store.get_blob("a", "0" * 64)
    with pytest.raises(SessionNotFoundError):
        await store.put_blob("nobody", b"x")
