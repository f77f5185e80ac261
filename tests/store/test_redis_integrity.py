"""Redis: what the store acknowledged reads back exactly, and damage is reported, never hidden.

These tests write under the store's back with a plain client (a hand edit, a
partial restore, another program under the same prefix) and check that every
call either works or raises ``CorruptDataError`` naming the session, never a
raw ``KeyError``/``TypeError``/``ValueError``/``IndexError`` and never a short
or long read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from chatsession import (
    ConflictError,
    CorruptDataError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    open_store,
)
from chatsession.store.base import MAX_SCHEMA_VERSION
from chatsession.store.redis import RedisStore
from chatsession.store.redis.scripts import NATIVE_EXPIRY_LIMIT
from tests.store.test_redis import assert_whole
from tests.strategies import SEPARATORS, same

REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStore]:
    """An open store under ``prefix``."""
    opened = open_store(f"{REDIS_URL}?prefix={prefix}")
    assert isinstance(opened, RedisStore)
    yield opened
    await opened.aclose()


def ev(n: int, turn_id: str | None = None) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0, turn_id)


async def read_all(store: Any, session_id: str, **kw: Any) -> list[Any]:
    return [r async for b in store.read(session_id, **kw) for r in b]


# -- exact round trip ----------------------------------------------------------------


async def test_empty_strings_read_back_as_empty_strings_not_none(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    record = SessionRecord(id="s", user_id="", agent_id="", window_id="", title="")
    created = await store.create(record)
    for got in (created, await store.get("s"), (await store.list_sessions()).records[0]):
        assert (got.user_id, got.agent_id, got.window_id, got.title) == ("", "", "", "")
    await store.append("s", [NewEvent("message", "{}", 1.0, ""), ev(2)], 0)
    assert [r.turn_id for r in await read_all(store, "s")] == ["", None]
    assert [r.id for r in (await store.list_sessions(user_id="")).records] == ["s"]
    assert (await store.list_sessions(user_id="someone")).records == []

    # and None stays None, also after an update that sets and clears them
    current = await store.get("s")
    changed = current.model_copy(update={"user_id": None, "agent_id": "a", "window_id": None})
    await store.update(changed, current.version)
    got = await store.get("s")
    assert (got.user_id, got.agent_id, got.window_id, got.title) == (None, "a", None, "")
    assert (await store.list_sessions(user_id="")).records == []
    forked = await store.fork("s", 1, SessionRecord(id="f", user_id="", title=None))
    assert (await store.get("f")).user_id == "" and forked.user_id == ""
    assert (await store.get("f")).title is None
    await assert_whole(raw, prefix)  # the index slot lists "" ids as ids


async def test_separators_controls_and_big_numbers_round_trip_exactly(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    odd = "".join(SEPARATORS).replace("\x00", "")  # NUL is refused in titles
    no_controls = 'a\x85b\u2028c\u2029d\ufeffe\\f"g{h}i#j:k'  # what ids without controls may hold
    record = SessionRecord(
        id="s",
        user_id=no_controls,
        agent_id="\u2028",
        window_id="\x85",
        title=odd,
        metadata={"k" + odd: [odd, 2**200, -(2**64), 1.5e300, -0.0, 5e-324, {}, []]},
        fingerprint={"": None, "deep": [[[[{}]]]]},
    )
    await store.create(record)
    got = await store.get("s")
    for name in ("user_id", "agent_id", "window_id", "title", "metadata", "fingerprint"):
        assert same(getattr(got, name), getattr(record, name)), name
    assert [r.id for r in (await store.list_sessions(user_id=no_controls)).records] == ["s"]

    # index keys hold the ids; the index scripts keep key lists as JSON (cjson): the
    # odd characters survive a move from one user's index to another's, and a delete
    other = no_controls[::-1] + "/\\u00e9"
    await store.create(SessionRecord(id="gone", user_id=no_controls, window_id="\u2028"))
    current = await store.get("s")
    await store.update(current.model_copy(update={"user_id": other}), current.version)
    assert [r.id for r in (await store.list_sessions(user_id=other)).records] == ["s"]
    assert [r.id for r in (await store.list_sessions(user_id=no_controls)).records] == ["gone"]
    await store.delete("gone")
    assert (await store.list_sessions(user_id=no_controls)).records == []
    await assert_whole(raw, prefix)

    payload = json.dumps({"s": odd, "big": 10**400, "f": 0.1, "e": [], "o": {}}, ensure_ascii=False)
    events = [
        NewEvent("message", payload, 1e16, no_controls),
        NewEvent("x_1", '"\u2028\x85"', 0.0, "\u2029"),
        NewEvent("t", "[]", 7.0, None, 0),
        NewEvent("t", "{}", 5e-324, "a" * 1024, MAX_SCHEMA_VERSION),
    ]
    await store.append("s", events, 0)
    rows = await read_all(store, "s", batch_size=3)
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    for row, event in zip(rows, events, strict=True):
        back = NewEvent(row.type, row.data, row.ts, row.turn_id, row.schema_version)
        assert same(list(back), list(event)), (row, event)


async def test_events_and_records_of_the_older_format_still_read(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    # what the store wrote before the header format: fields joined with \x1f,
    # and a record without ``unset`` (where "" meant None)
    await store.create(SessionRecord(id="s", user_id="u", title="t"))
    await raw.hdel(f"{prefix}{{s}}:rec", "unset")
    await raw.hset(f"{prefix}{{s}}:rec", "agent_id", "")
    old = ['message\x1f1.5\x1fturn-1\x1f1\x1f{"n":1}', "usage\x1f2.0\x1f\x1f1\x1f{}"]
    await raw.rpush(f"{prefix}{{s}}:ev", *old)
    await raw.hset(f"{prefix}{{s}}:rec", "head", 2)
    got = await store.get("s")
    assert (got.user_id, got.agent_id, got.title) == ("u", None, "t")
    rows = await read_all(store, "s")
    assert [(r.seq, r.type, r.ts, r.turn_id, r.data) for r in rows] == [
        (1, "message", 1.5, "turn-1", '{"n":1}'),
        (2, "usage", 2.0, None, "{}"),
    ]
    # new events follow the old ones
    assert await store.append("s", [ev(3, "")], 2) == 3
    rows = await read_all(store, "s")
    assert [(r.seq, r.turn_id) for r in rows] == [(1, "turn-1"), (2, None), (3, "")]


async def test_expiry_past_what_redis_can_hold_is_kept_exactly(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    far = 1.7e308  # once a PEXPIREAT error after the record was written
    created = await store.create(SessionRecord(id="far", expires_at=far))
    assert created.expires_at == far
    assert (await store.get("far")).expires_at == far
    assert await raw.pttl(f"{prefix}{{far}}:rec") == -1  # no native expiry
    await store.append("far", [ev(1)], 0)
    await store.put_blob("far", b"x")
    await store.fork("far", 1, SessionRecord(id="child", expires_at=NATIVE_EXPIRY_LIMIT))
    await store.delete("child")  # releases "far": the script must not set a native expiry
    assert await raw.pttl(f"{prefix}{{far}}:rec") == -1
    current = await store.get("far")
    await store.update(current.model_copy(update={"expires_at": 1e300}), current.version)
    assert (await store.get("far")).expires_at == 1e300
    assert [r.id for r in (await store.list_sessions()).records] == ["far"]
    soon = time.time() + 100
    current = await store.get("far")
    await store.update(current.model_copy(update={"expires_at": soon}), current.version)
    assert abs(await raw.pexpiretime(f"{prefix}{{far}}:rec") - soon * 1000) < 2


# -- the event list must end at the head ------------------------------------------------


async def test_a_stray_item_after_the_head_is_detected_and_nothing_is_appended(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(1), ev(2)], 0)
    await raw.rpush(f"{prefix}{{s}}:ev", "a stray item, left by a partial restore")
    with pytest.raises(CorruptDataError, match=r"'s'.*stray.*restore"):
        await read_all(store, "s")
    # an append would land after the stray item, and read back as the stray
    with pytest.raises(CorruptDataError, match=r"'s'.*nothing was written"):
        await store.append("s", [ev(3)], 2)
    assert (await store.get("s")).head == 2
    assert await raw.llen(f"{prefix}{{s}}:ev") == 3
    await raw.rpop(f"{prefix}{{s}}:ev")  # repaired by hand: everything works again
    assert await store.append("s", [ev(3)], 2) == 3
    assert [json.loads(r.data)["n"] for r in await read_all(store, "s")] == [1, 2, 3]


async def test_missing_moved_or_stray_events_anywhere_in_a_fork_chain_are_detected(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="p"))
    await store.append("p", [ev(i) for i in range(1, 5)], 0)
    await store.fork("p", 3, SessionRecord(id="f"))
    await store.append("f", [ev(10)], 3)
    await store.append("p", [ev(5)], 4)  # the parent goes on after the fork
    assert [json.loads(r.data)["n"] for r in await read_all(store, "f")] == [1, 2, 3, 10]

    damages: list[tuple[list[Any], list[Any]]] = [
        (["RPUSH", "{p}:ev", "stray"], ["RPOP", "{p}:ev"]),  # in the parent
        (["RPOP", "{p}:ev"], ["RPUSH", "{p}:ev", None]),  # an event of the parent missing
        (["LSET", "{p}:ev", 0, None], ["LSET", "{p}:ev", 0, None]),  # seq 2 moved to seq 1
        (["HSET", "{f}:rec", "parent_seq", 9], ["HSET", "{f}:rec", "parent_seq", 3]),
    ]
    items = await raw.lrange(f"{prefix}{{p}}:ev", 0, -1)
    for damage, repair in damages:
        if damage[0] == "LSET":
            damage[3] = items[1]
            repair[3] = items[0]
        if repair[0] == "RPUSH":
            repair[2] = items[-1]
        await raw.execute_command(damage[0], prefix + damage[1], *damage[2:])
        with pytest.raises(CorruptDataError) as info:
            await read_all(store, "f")
        assert "'f'" in str(info.value) and "restore" in str(info.value), info.value
        await raw.execute_command(repair[0], prefix + repair[1], *repair[2:])
        assert [json.loads(r.data)["n"] for r in await read_all(store, "f")] == [1, 2, 3, 10]


async def test_an_event_whose_header_is_damaged_names_its_seq(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(i) for i in range(1, 6)], 0)
    for bad in (
        b'[3,"message",1.0,null]\n{}',  # a field short
        b'[3,"message","1.0",null,1]\n{}',  # ts a string
        b'[3,"message",1.0,null,1]',  # no payload
        b"[3,\xff]\n{}",  # not UTF-8
        b'{"seq":3}\n{}',
        b"garbage",
    ):
        await raw.lset(f"{prefix}{{s}}:ev", 2, bad)
        with pytest.raises(CorruptDataError, match=r"'s', seq 3.*restore"):
            await read_all(store, "s")
        assert [r.seq for r in await read_all(store, "s", upto_seq=2)] == [1, 2]


# -- damaged records ---------------------------------------------------------------------

DAMAGED_RECORDS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("head not a number", {"head": "not-a-number"}, []),
    ("head missing", {}, ["head"]),
    ("head negative", {"head": "-1"}, []),
    ("version missing", {}, ["version"]),
    ("body not JSON", {"body": '{"title": ['}, []),
    ("body a list", {"body": "[1, 2]"}, []),
    ("body nested too deep for Python", {"body": "[" * 100_000 + "]" * 100_000}, []),
    ("title not a string", {"body": '{"title": 5, "metadata": {}, "fingerprint": null}'}, []),
    ("metadata a number", {"body": '{"title": null, "metadata": 5, "fingerprint": null}'}, []),
    ("expires_at garbage", {"expires_at": "soon"}, []),
    ("expires_at missing", {}, ["expires_at"]),
    ("parent_seq garbage", {"parent_seq": "x"}, []),
    ("parent id unsafe", {"parent_id": "../etc"}, []),
    ("state unknown", {"state": "sleeping"}, []),
    ("created_at garbage", {"created_at": "yesterday"}, []),
    ("id of another session", {"id": "other"}, []),
    ("a field not UTF-8", {"state": b"\xff\xfe"}, []),
]

Op = Callable[[RedisStore], Awaitable[Any]]
OPERATIONS: dict[str, Op] = {
    "get": lambda s: s.get("s"),
    "read": lambda s: read_all(s, "s"),
    "append": lambda s: s.append("s", [ev(3)], 2),
    "update": lambda s: s.update(SessionRecord(id="s", title="new"), 1),
    "fork": lambda s: s.fork("s", 1, SessionRecord(id="f")),
    "put_blob": lambda s: s.put_blob("s", b"blob"),
    "get_blob": lambda s: s.get_blob("s", "0" * 64),
    "delete": lambda s: s.delete("s"),
}


@pytest.mark.parametrize(
    ("damage", "fields", "removed"), DAMAGED_RECORDS, ids=[d[0] for d in DAMAGED_RECORDS]
)
async def test_a_damaged_record_is_corrupt_data_for_every_call(
    store: RedisStore,
    raw: aioredis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    damage: str,
    fields: dict[str, Any],
    removed: list[str],
) -> None:
    await store.create(SessionRecord(id="s", expires_at=time.time() + 3600))
    await store.append("s", [ev(1), ev(2)], 0)
    await store.create(SessionRecord(id="ok"))
    key = f"{prefix}{{s}}:rec"
    if fields:
        await raw.hset(key, mapping=fields)
    if removed:
        await raw.hdel(key, *removed)
    outcomes = {}
    for name, op in OPERATIONS.items():
        try:
            await op(store)
            outcomes[name] = "worked"
        except CorruptDataError as exc:
            assert "'s'" in str(exc) or "{s}" in str(exc), (name, exc)
            assert "restore" in str(exc) or "remove" in str(exc), (name, exc)
            outcomes[name] = "corrupt"
        except Exception as exc:
            pytest.fail(f"{damage}: {name} raised {type(exc).__name__}: {exc}")
    # a read, get and delete need the whole record: each reports the damage
    for name in ("get", "read", "delete"):
        assert outcomes[name] == "corrupt", (damage, outcomes)
    # the listing leaves it out, says so, and goes on (a fork made of it is listed)
    with caplog.at_level(logging.WARNING, logger="chatsession.store"):
        listed = [r.id for r in (await store.list_sessions()).records]
        assert await store.purge_expired(before=time.time() + 7200) in (0, 1)
    assert [sid for sid in listed if sid != "f"] == ["ok"]
    assert any("'s'" in r.getMessage() for r in caplog.records), damage
    listed = [r.id for r in (await store.list_sessions()).records]
    assert [sid for sid in listed if sid != "f"] == ["ok"]


async def test_a_key_of_the_wrong_type_is_named_and_left_out_of_listings(
    store: RedisStore, raw: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    await store.create(SessionRecord(id="s", expires_at=time.time() + 1))
    await store.create(SessionRecord(id="ok"))
    await store.create(SessionRecord(id="e"))
    await raw.delete(f"{prefix}{{s}}:rec")
    await raw.set(f"{prefix}{{s}}:rec", "not a hash")
    await raw.set(f"{prefix}{{e}}:ev", "not a list")
    with pytest.raises(CorruptDataError, match=r"\{s\}:rec"):
        await store.get("s")
    with pytest.raises(CorruptDataError, match=r"\{e\}:ev"):
        await read_all(store, "e")
    with pytest.raises(CorruptDataError, match=r"\{e\}:ev"):
        await store.append("e", [ev(1)], 0)
    with caplog.at_level(logging.WARNING, logger="chatsession.store"):
        assert [r.id for r in (await store.list_sessions()).records] == ["e", "ok"]
        assert await store.purge_expired(before=time.time() + 10) == 0
    assert any("'s'" in r.getMessage() for r in caplog.records)


# -- fork chains -------------------------------------------------------------------------


@pytest.mark.timeout(30)  # the old code looped forever, its memory growing
async def test_a_fork_cycle_of_three_and_a_missing_parent_are_corrupt_data(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    await store.create(SessionRecord(id="a"))
    await store.append("a", [ev(1), ev(2)], 0)
    await store.fork("a", 2, SessionRecord(id="b"))
    await store.fork("b", 2, SessionRecord(id="c"))
    blob = await store.put_blob("a", b"shared")
    assert await store.get_blob("c", blob) == b"shared"
    await raw.hset(f"{prefix}{{a}}:rec", mapping={"parent_id": "c", "parent_seq": "0"})
    for sid in ("a", "b", "c"):
        for call in (read_all(store, sid), store.get_blob(sid, blob)):
            with pytest.raises(CorruptDataError, match=rf"'{sid}'.*loop.*restore"):
                await call
    await raw.hset(f"{prefix}{{a}}:rec", "parent_id", "nobody")
    for call in (read_all(store, "c"), store.get_blob("c", blob)):
        with pytest.raises(CorruptDataError, match=r"'c'.*'nobody'.*missing.*restore"):
            await call


# -- a deletion during a read ----------------------------------------------------------------


async def test_a_session_deleted_while_being_read_is_not_found_not_corrupt(
    store: RedisStore,
) -> None:
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(i) for i in range(10)], 0)
    batches = store.read("s", batch_size=4)
    first = await anext(batches)
    assert [r.seq for r in first] == [1, 2, 3, 4]
    await store.delete("s")
    with pytest.raises(SessionNotFoundError):
        await anext(batches)
    await store.create(SessionRecord(id="s"))  # a new session with the same id
    await store.append("s", [ev(0), ev(1)], 0)
    batches = store.read("s", batch_size=1)
    await anext(batches)
    await store.delete("s")
    await store.create(SessionRecord(id="s"))
    with pytest.raises(SessionNotFoundError):
        await anext(batches)


async def test_appends_racing_a_read_never_look_like_damage(store: RedisStore) -> None:
    await store.create(SessionRecord(id="s"))
    head = await store.append("s", [ev(i) for i in range(50)], 0)
    for _ in range(20):
        reading = read_all(store, "s", batch_size=7)
        writing = store.append("s", [ev(head), ev(head + 1)], head)
        rows, head = await asyncio.gather(reading, writing)
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    with pytest.raises(ConflictError):
        await store.append("s", [ev(0)], 0)


async def test_a_damaged_index_entry_never_fails_a_call(
    store: RedisStore, raw: aioredis.Redis, prefix: str
) -> None:
    # the index slot is derived data: damage there must not break the sessions
    for i, garbage in enumerate(["not json", "[1, 2]", "[" * 5000 + "]" * 5000, '{"idx": 5}']):
        sid = f"s{i}"
        await store.create(SessionRecord(id=sid, user_id="u", expires_at=time.time() + 0.3))
        stamp = (await raw.hget(f"{prefix}{{{sid}}}:rec", "stamp")).decode()
        where = (f"{prefix}{{idx}}:where", f"{sid}#{stamp}")
        await raw.hset(*where, garbage)
        current = await store.get(sid)
        await store.update(current.model_copy(update={"title": "t"}), current.version)
        assert sid in {r.id for r in (await store.list_sessions(user_id="u")).records}
        await raw.hset(*where, garbage)  # what purge_expired reads
    await asyncio.sleep(0.4)
    assert await store.purge_expired() == 4
    assert (await store.list_sessions()).records == []
