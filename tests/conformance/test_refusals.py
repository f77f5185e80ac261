"""The concrete breakages of issue 9, section 1, checked on every backend.

Each value here was once acknowledged by some backend and then could not be
read back (or came back changed). Now every backend either keeps it exactly
or refuses it with a typed error before writing anything.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from chatsession import (
    InvalidArgumentError,
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoredEvent,
    UnsupportedValueError,
)
from chatsession.store.base import MAX_FIELD_LENGTH, MAX_JSON_DEPTH
from tests.strategies import SEPARATORS, compact_json, nested, same


async def read_all(store: Store, session_id: str) -> list[StoredEvent]:
    return [row async for batch in store.read(session_id) for row in batch]


async def assert_untouched(store: Store, session_id: str, head: int) -> None:
    assert (await store.get(session_id)).head == head
    assert [r.seq for r in await read_all(store, session_id)] == list(range(1, head + 1))


# --------------------------------------------------------------------------
# payloads


NOT_STORABLE_PAYLOADS = {
    "not JSON": "hello",
    "pretty printed": json.dumps({"a": [1, 2]}, indent=2),
    "a trailing newline": '{"a":1}\n',
    "a carriage return": '{"a":\r1}',
    "NaN": '{"ts":NaN}',
    "Infinity": '{"ts":Infinity}',
    "-Infinity": '{"ts":-Infinity}',
    "an overflowing number": '{"ts":1e400}',
    "two values": '{"a":1} {"b":2}',
    "empty": "",
    "a raw lone surrogate": '{"s":"\ud800"}',
    "an escaped lone surrogate": '{"s":"\\udfff"}',
    "bytes": b'{"a":1}',
    "a dict, not text": {"a": 1},
}


@pytest.mark.parametrize("name", list(NOT_STORABLE_PAYLOADS))
async def test_payloads_that_are_not_compact_json_are_refused(store: Store, name: str) -> None:
    await store.create(SessionRecord(id="s"))
    await store.append("s", [NewEvent("message", "{}", 1.0)], 0)
    bad = NewEvent("message", NOT_STORABLE_PAYLOADS[name], 2.0)
    with pytest.raises(UnsupportedValueError):
        await store.append("s", [NewEvent("message", "{}", 2.0), bad], 1)
    await assert_untouched(store, "s", 1)


async def test_separator_characters_in_payloads_round_trip(store: Store, backend: str) -> None:
    text = "".join(SEPARATORS) + " end"
    payloads = [
        compact_json({"text": text, text: [text]}, ensure_ascii=False),
        compact_json({"text": text}, ensure_ascii=True),
        compact_json(text),
    ]
    await store.create(SessionRecord(id="s"))
    await store.append("s", [NewEvent("message", p, 1.0, "t") for p in payloads], 0)
    back = await read_all(store, "s")
    for row, sent in zip(back, payloads, strict=True):
        if backend == "postgres":
            assert same(json.loads(row.data), json.loads(sent))
        else:
            assert row.data == sent


# --------------------------------------------------------------------------
# event fields


CONTROL_CHARACTERS = ["\x1f", "\x1e", "\x00", "\n", "\r", "\t", "\x7f", "\x0b", "\x1b"]


@pytest.mark.parametrize("char", CONTROL_CHARACTERS, ids=repr)
@pytest.mark.parametrize("field", ["type", "turn_id"])
async def test_control_characters_in_type_and_turn_id(store: Store, field: str, char: str) -> None:
    await store.create(SessionRecord(id="s"))
    value = f"a{char}b"
    event = (
        NewEvent(value, "{}", 1.0, "t")
        if field == "type"
        else NewEvent("message", "{}", 1.0, value)
    )
    try:
        await store.append("s", [event], 0)
    except UnsupportedValueError as exc:
        assert field in str(exc)
        await assert_untouched(store, "s", 0)
    else:  # acknowledged: then it reads back exactly
        (row,) = await read_all(store, "s")
        assert getattr(row, field) == value


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("ts", math.nan),
        ("ts", math.inf),
        ("ts", -math.inf),
        ("ts", -0.0),
        ("ts", 10**400),
        ("ts", "1.0"),
        ("ts", None),
        ("type", ""),
        ("type", "Message"),
        ("type", "x" * 65),
        ("type", 5),
        ("turn_id", "\ud800"),
        ("turn_id", "x" * (MAX_FIELD_LENGTH + 1)),
        ("turn_id", 5),
        ("schema_version", -1),
        ("schema_version", "1"),
        ("schema_version", 1.0),
        ("schema_version", True),
    ],
    ids=repr,
)
async def test_bad_event_fields_are_refused(store: Store, field: str, bad: Any) -> None:
    await store.create(SessionRecord(id="s"))
    event = NewEvent("message", "{}", 1.0, "t")._replace(**{field: bad})
    with pytest.raises(UnsupportedValueError):
        await store.append("s", [event], 0)
    await assert_untouched(store, "s", 0)


async def test_times_read_back_as_floats(store: Store) -> None:
    # StoredEvent.ts is a float on every backend, whichever number type was appended
    await store.create(SessionRecord(id="s"))
    await store.append("s", [NewEvent("message", "{}", 5), NewEvent("message", "{}", 2.5)], 0)
    assert [(type(r.ts), r.ts) for r in await read_all(store, "s")] == [(float, 5.0), (float, 2.5)]


async def test_empty_strings_read_back_as_empty_strings(store: Store) -> None:
    created = await store.create(
        SessionRecord(id="s", user_id="", agent_id="", window_id="", title="")
    )
    await store.append("s", [NewEvent("message", '""', 1.0, "")], 0)
    for record in (created, await store.get("s"), (await store.list_sessions()).records[0]):
        assert (record.user_id, record.agent_id, record.window_id, record.title) == ("",) * 4
    (row,) = await read_all(store, "s")
    assert row.turn_id == "" and row.data == '""'
    listed = await store.list_sessions(user_id="", agent_id="", window_id="")
    assert [r.id for r in listed.records] == ["s"]
    forked = await store.fork("s", 1, SessionRecord(id="f", user_id="", title=""))
    assert (forked.user_id, forked.title) == ("", "")
    assert ((await store.get("f")).user_id, (await store.get("f")).title) == ("", "")
    assert [r.turn_id for r in await read_all(store, "f")] == [""]


# --------------------------------------------------------------------------
# nesting


async def test_payload_nesting_at_the_limit_works_one_more_is_refused(
    store: Store, backend: str
) -> None:
    await store.create(SessionRecord(id="s"))
    at_limit = compact_json(nested(MAX_JSON_DEPTH))
    assert await store.append("s", [NewEvent("state", at_limit, 1.0)], 0) == 1
    (row,) = await read_all(store, "s")
    assert same(json.loads(row.data), nested(MAX_JSON_DEPTH))
    if backend != "postgres":
        assert row.data == at_limit
    for too_deep in (
        compact_json(nested(MAX_JSON_DEPTH + 1)),
        "[" * 600 + "]" * 600,
        "[" * 5000 + "]" * 5000,  # deeper than Python's own recursion limit
    ):
        with pytest.raises(UnsupportedValueError, match="nest"):
            await store.append("s", [NewEvent("state", too_deep, 2.0)], 1)
    await assert_untouched(store, "s", 1)


@pytest.mark.parametrize("field", ["metadata", "fingerprint"])
async def test_record_nesting_at_the_limit_works_one_more_is_refused(
    store: Store, field: str
) -> None:
    # the field's own object is the first level
    at_limit = {"k": nested(MAX_JSON_DEPTH - 1)}
    too_deep = {"k": nested(MAX_JSON_DEPTH)}
    created = await store.create(SessionRecord(id="s", **{field: at_limit}))
    assert same(getattr(created, field), at_limit)
    assert same(getattr(await store.get("s"), field), at_limit)

    with pytest.raises(UnsupportedValueError, match="nests deeper"):
        await store.create(SessionRecord(id="deep", **{field: too_deep}))
    with pytest.raises(SessionNotFoundError):
        await store.get("deep")
    with pytest.raises(UnsupportedValueError, match="nests deeper"):
        await store.update(created.model_copy(update={field: too_deep}), expected_version=1)
    with pytest.raises(UnsupportedValueError, match="nests deeper"):
        await store.fork("s", 0, SessionRecord(id="deep", **{field: too_deep}))
    with pytest.raises(SessionNotFoundError):
        await store.get("deep")
    assert same(await store.get("s"), created)

    updated = await store.update(created.model_copy(update={field: at_limit}), 1)
    assert same(getattr(updated, field), at_limit)
    assert same(getattr(await store.get("s"), field), at_limit)


# --------------------------------------------------------------------------
# record fields


BAD_RECORD_FIELDS: list[tuple[str, Any]] = [
    ("metadata", {"x": math.nan}),
    ("metadata", {"x": math.inf}),
    ("metadata", {"x": [1, -math.inf]}),
    ("metadata", {"x": (1, 2)}),
    ("metadata", {"x": {1, 2}}),
    ("metadata", {1: "int key"}),
    ("metadata", {"x": "\udc80"}),
    ("metadata", {"\ud800": 1}),
    ("metadata", {"x": b"bytes"}),
    ("metadata", {"x": object()}),
    ("metadata", [1, 2]),
    ("fingerprint", {"model": math.nan}),
    ("fingerprint", "not a dict"),
    ("user_id", "a\x1fb"),
    ("user_id", "a\nb"),
    ("user_id", "a\x00b"),
    ("user_id", "\ud800"),
    ("user_id", "x" * (MAX_FIELD_LENGTH + 1)),
    ("user_id", 5),
    ("agent_id", "a\x1fb"),
    ("window_id", "a\tb"),
    ("title", "a\x00b"),
    ("title", "\udfff"),
    ("state", "deleted"),
    ("created_at", math.nan),
    ("created_at", math.inf),
    ("created_at", -0.0),
    ("expires_at", -0.0),
    ("expires_at", 10**400),
    ("updated_at", -math.inf),
    ("expires_at", math.inf),
    ("expires_at", math.nan),
    ("expires_at", "tomorrow"),
]


@pytest.mark.parametrize(("field", "bad"), BAD_RECORD_FIELDS, ids=repr)
async def test_bad_record_fields_are_refused_and_nothing_is_written(
    store: Store, field: str, bad: Any
) -> None:
    parent = await store.create(SessionRecord(id="p", title="kept"))
    bad_new = SessionRecord(id="s").model_copy(update={field: bad})
    with pytest.raises(UnsupportedValueError):
        await store.create(bad_new)
    with pytest.raises(UnsupportedValueError):
        await store.fork("p", 0, bad_new)
    with pytest.raises(SessionNotFoundError):
        await store.get("s")
    if field not in ("created_at", "updated_at"):  # not editable: update ignores them
        with pytest.raises(UnsupportedValueError):
            await store.update(parent.model_copy(update={field: bad}), expected_version=1)
    assert same(await store.get("p"), parent)
    assert [r.id for r in (await store.list_sessions()).records] == ["p"]


async def test_unusual_text_in_record_fields_round_trips(store: Store) -> None:
    # everything but control characters in names, everything but NUL in titles
    name = "\u2028\u2029\x85\ufeff\u200b 👋 é \\ \" ' %s {} \U0010ffff"
    title = "".join(c for c in SEPARATORS if c != "\x00") + name
    metadata = {k: k for k in SEPARATORS} | {"n": 10**300, "f": -0.0, "t": 5e-324}
    record = SessionRecord(
        id="s", user_id=name, agent_id=name, window_id=name, title=title, metadata=metadata
    )
    created = await store.create(record)
    for got in (created, await store.get("s")):
        assert (got.user_id, got.agent_id, got.window_id, got.title) == (name,) * 3 + (title,)
        assert same(got.metadata, metadata)
    listed = await store.list_sessions(user_id=name, agent_id=name, window_id=name)
    assert [r.id for r in listed.records] == ["s"]
    assert same(listed.records[0].metadata, metadata)


async def test_refused_writes_are_typed_value_errors(store: Store) -> None:
    # old callers catching ValueError keep working; new ones catch the typed error
    await store.create(SessionRecord(id="s"))
    with pytest.raises(InvalidArgumentError) as info:
        await store.append("s", [NewEvent("message", "{", 1.0)], 0)
    assert isinstance(info.value, ValueError)
    assert "events[0].data" in str(info.value)
