"""The Store contract, checked the same way on every backend."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from chatsession import (
    BlobNotFoundError,
    ConflictError,
    InvalidIdError,
    InvalidURLError,
    NewEvent,
    SessionExistsError,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoredEvent,
    open_store,
)

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


async def test_every_event_type_round_trips_byte_for_byte(store: Store) -> None:
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
        assert (back.type, back.ts, back.turn_id, back.data, back.schema_version) == (
            sent.type,
            sent.ts,
            sent.turn_id,
            sent.data,
            sent.schema_version,
        )
        json.loads(back.to_json())


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


async def test_fork_copies_nothing(store: Store) -> None:
    await new(store, "p")
    rows = [event(data={"n": i}) for i in range(2000)]
    await store.append("p", rows, 0)
    await store.fork("p", 2000, SessionRecord(id="f"))
    # the fork's own part is empty: reading past the fork point finds nothing
    assert await read_all(store, "f", after_seq=2000) == []
    assert len(await read_all(store, "f")) == 2000


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
