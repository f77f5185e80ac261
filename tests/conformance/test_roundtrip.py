"""Acknowledged means readable, exactly: a property-based round trip on every backend.

Arbitrary records (create, update, fork, listing), events (append, read, forks,
a second store object), blobs, and the values inside payloads read back with
the same values, the same types and in the same order. Values no store can
keep exactly are refused with a typed error, and nothing is written.

Payload text comes back byte for byte, except on PostgreSQL, whose ``jsonb``
may re-serialise it: there the parsed JSON must be the same (type-strict,
see :func:`tests.strategies.same`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsession import (
    InvalidArgumentError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoredEvent,
    open_store,
)
from chatsession.store.base import EDITABLE_FIELDS
from tests.strategies import (
    new_events,
    records,
    same,
    texts,
    unstorable_payloads,
    unstorable_values,
)

#: Modest example counts: five backends, one store each, a fresh session per example.
FEW = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEPT_FIELDS = ("id", *sorted(EDITABLE_FIELDS))


def fresh() -> str:
    return "rt-" + uuid.uuid4().hex


async def read_all(store: Store, session_id: str, **kw: Any) -> list[StoredEvent]:
    return [row async for batch in store.read(session_id, **kw) for row in batch]


def assert_same_record(back: SessionRecord, sent: SessionRecord, fields: tuple[str, ...]) -> None:
    for name in fields:
        want, got = getattr(sent, name), getattr(back, name)
        assert same(got, want), f"{name}: sent {want!r}, read back {got!r}"


def assert_created(back: SessionRecord, sent: SessionRecord) -> None:
    assert_same_record(back, sent, KEPT_FIELDS)
    if sent.created_at:  # 0 means "now"
        assert same(back.created_at, sent.created_at), (sent.created_at, back.created_at)
        assert same(back.updated_at, sent.updated_at or sent.created_at)
    assert (back.version, type(back.head)) == (1, int)


def assert_same_events(
    backend: str, back: list[StoredEvent], sent: list[NewEvent], first_seq: int = 1
) -> None:
    assert [r.seq for r in back] == list(range(first_seq, first_seq + len(sent)))
    for row, event in zip(back, sent, strict=True):
        where = f"seq {row.seq}"
        assert same(row.type, event.type), where
        assert same(row.ts, event.ts), (where, event.ts, row.ts)
        assert same(row.turn_id, event.turn_id), (where, event.turn_id, row.turn_id)
        assert same(row.schema_version, event.schema_version), where
        if backend == "postgres":  # jsonb may re-serialise: the same JSON, type for type
            assert same(json.loads(row.data), json.loads(event.data)), (where, event.data, row.data)
        else:
            assert row.data == event.data, (where, event.data, row.data)


async def find_listed(store: Store, record: SessionRecord) -> SessionRecord | None:
    cursor = None
    while True:
        page = await store.list_sessions(
            user_id=record.user_id,
            agent_id=record.agent_id,
            window_id=record.window_id,
            state=record.state,
            limit=1000,
            cursor=cursor,
        )
        for listed in page.records:
            if listed.id == record.id:
                return listed
        if page.next_cursor is None:
            return None
        cursor = page.next_cursor


@FEW
@given(record=records(), change=records(), fork_record=records())
async def test_records_round_trip(
    store: Store, record: SessionRecord, change: SessionRecord, fork_record: SessionRecord
) -> None:
    sid = fresh()
    sent = record.model_copy(update={"id": sid})
    created = await store.create(sent)
    assert_created(created, sent)
    assert same(await store.get(sid), created)

    edit = change.model_copy(update={"id": sid})
    updated = await store.update(edit, expected_version=1)
    assert_same_record(updated, edit, KEPT_FIELDS)
    assert updated.version == 2
    assert same(updated.created_at, created.created_at)
    got = await store.get(sid)
    assert same(got, updated)
    assert same(await find_listed(store, got), got)

    fork_id = fresh()
    fork_sent = fork_record.model_copy(update={"id": fork_id})
    forked = await store.fork(sid, 0, fork_sent)
    assert_created(forked, fork_sent)
    assert forked.parent is not None and (forked.parent.session_id, forked.parent.seq) == (sid, 0)
    assert same(await store.get(fork_id), forked)


@FEW
@given(
    batches=st.lists(st.lists(new_events(), min_size=1, max_size=4), min_size=1, max_size=3),
    fork_batch=st.lists(new_events(), min_size=1, max_size=3),
    data=st.data(),
)
async def test_events_round_trip(
    store: Store,
    store_url: str,
    backend: str,
    batches: list[list[NewEvent]],
    fork_batch: list[NewEvent],
    data: st.DataObject,
) -> None:
    sid = fresh()
    await store.create(SessionRecord(id=sid))
    sent: list[NewEvent] = []
    for batch in batches:
        head = await store.append(sid, batch, len(sent))
        sent.extend(batch)
        assert head == len(sent)
    assert (await store.get(sid)).head == len(sent)
    assert_same_events(backend, await read_all(store, sid), sent)

    after = data.draw(st.integers(0, len(sent)), label="after_seq")
    upto = data.draw(st.integers(after, len(sent)), label="upto_seq")
    window = await read_all(store, sid, after_seq=after, upto_seq=upto, batch_size=2)
    assert_same_events(backend, window, sent[after:upto], first_seq=after + 1)

    at = data.draw(st.integers(0, len(sent)), label="fork at")
    fork_id = fresh()
    await store.fork(sid, at, SessionRecord(id=fork_id))
    assert await store.append(fork_id, fork_batch, at) == at + len(fork_batch)
    assert_same_events(backend, await read_all(store, fork_id), sent[:at] + fork_batch)

    if backend != "memory":  # another store object: read from storage, not from a cache
        async with open_store(store_url) as other:
            assert_same_events(backend, await read_all(other, sid), sent)
            assert_same_events(backend, await read_all(other, fork_id), sent[:at] + fork_batch)


@FEW
@given(
    blob=st.binary(max_size=4096),
    media_type=texts(controls=False, max_size=40),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
async def test_blobs_round_trip(store: Store, blob: bytes, media_type: str, kind: type) -> None:
    sid = fresh()
    await store.create(SessionRecord(id=sid))
    blob_id = await store.put_blob(sid, kind(blob), media_type)
    assert blob_id == hashlib.sha256(blob).hexdigest()
    back = await store.get_blob(sid, blob_id)
    assert type(back) is bytes and back == blob


@FEW
@given(
    bad=unstorable_values(),
    field=st.sampled_from(["metadata", "fingerprint"]),
    operation=st.sampled_from(["create", "update", "fork"]),
)
async def test_unstorable_record_values_are_refused_and_nothing_is_written(
    store: Store, bad: Any, field: str, operation: str
) -> None:
    sid = fresh()
    # model_copy skips validation, as a caller's own model subclass or construct() would
    bad_record = SessionRecord(id=sid).model_copy(update={field: {"k": bad}})
    if operation == "create":
        with pytest.raises(InvalidArgumentError):
            await store.create(bad_record)
        with pytest.raises(SessionNotFoundError):
            await store.get(sid)
        return
    parent = await store.create(SessionRecord(id=sid, metadata={"kept": 1}))
    if operation == "update":
        with pytest.raises(InvalidArgumentError):
            await store.update(bad_record, expected_version=1)
    else:
        fork_id = fresh()
        with pytest.raises(InvalidArgumentError):
            await store.fork(sid, 0, bad_record.model_copy(update={"id": fork_id}))
        with pytest.raises(SessionNotFoundError):
            await store.get(fork_id)
    assert same(await store.get(sid), parent)


@FEW
@given(bad=unstorable_payloads(), before=st.integers(0, 2), good_first=st.booleans())
async def test_unstorable_payloads_are_refused_and_nothing_is_written(
    store: Store, backend: str, bad: Any, before: int, good_first: bool
) -> None:
    sid = fresh()
    await store.create(SessionRecord(id=sid))
    kept = [NewEvent("message", json.dumps({"n": n}), 1.5) for n in range(before)]
    if kept:
        await store.append(sid, kept, 0)
    bad_event = NewEvent("message", bad, 2.5)
    batch = [NewEvent("message", "{}", 2.0), bad_event] if good_first else [bad_event]
    with pytest.raises(InvalidArgumentError):
        await store.append(sid, batch, before)
    assert (await store.get(sid)).head == before
    assert_same_events(backend, await read_all(store, sid), kept)


async def test_caller_objects_changed_after_a_write_do_not_change_stored_data(
    store: Store,
) -> None:
    metadata: dict[str, Any] = {"list": [1, 2], "inner": {"a": "b"}}
    record = SessionRecord(id="mut", metadata=metadata, fingerprint={"model": ["m"]})
    created = await store.create(record)
    metadata["list"].append(3)
    metadata["inner"]["a"] = "changed"
    metadata["new"] = True
    record.fingerprint["model"].append("x")  # type: ignore[index]
    created.metadata["list"].append(4)
    events = [NewEvent("message", '{"n":1}', 1.0, "t")]
    await store.append("mut", events, 0)
    events.append(NewEvent("message", '{"n":2}', 2.0))
    events[0] = NewEvent("message", '{"n":"swapped"}', 1.0)

    got = await store.get("mut")
    assert got.metadata == {"list": [1, 2], "inner": {"a": "b"}}
    assert got.fingerprint == {"model": ["m"]}
    got.metadata["list"].append(5)
    listed = (await store.list_sessions()).records[0]
    listed.metadata["inner"]["a"] = "from a listing"

    change = got.model_copy(update={"metadata": {"v": [1]}})
    updated = await store.update(change, expected_version=1)
    change.metadata["v"].append(2)
    updated.metadata["v"].append(3)

    forked = await store.fork("mut", 1, SessionRecord(id="mut-f", metadata={"f": [0]}))
    forked.metadata["f"].append(1)

    assert (await store.get("mut")).metadata == {"v": [1]}
    assert (await store.get("mut-f")).metadata == {"f": [0]}
    rows = await read_all(store, "mut")
    assert [(r.seq, json.loads(r.data)) for r in rows] == [(1, {"n": 1})]
    blob = bytearray(b"blob")
    blob_id = await store.put_blob("mut", blob)
    blob[:] = b"BLOB"
    assert await store.get_blob("mut", blob_id) == b"blob"
