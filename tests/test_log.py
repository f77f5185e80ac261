"""The event log: stored form, schema upgrades, and fold's properties."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatsession.errors import CorruptDataError
from chatsession.log import (
    EVENT_SCHEMA_VERSION,
    Checkpoint,
    CheckpointEntry,
    Compaction,
    CompactionEntry,
    ConversationState,
    LogEvent,
    Message,
    MessageEntry,
    Metadata,
    MetadataEntry,
    Offload,
    OffloadEntry,
    Reset,
    ResetEntry,
    Rewind,
    RewindEntry,
    StateChange,
    StateEntry,
    ToolCall,
    TurnEnd,
    TurnEndEntry,
    TurnStartEntry,
    Usage,
    UsageEntry,
    UsageTotals,
    decode,
    decode_payloads,
    encode,
    fold,
    fold_rows,
    replace,
    to_builtins,
)
from chatsession.store import NewEvent, SessionRecord, open_store
from chatsession.store.base import StoredEvent

FIXTURES = Path(__file__).parent / "fixtures"

# --------------------------------------------------------------------------
# strategies: well-formed logs of every event type

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_keys = st.sampled_from(["todo", "cache", "mode", "x"])
_values = st.one_of(st.none(), st.integers(-5, 5), _text, st.lists(st.integers(0, 3), max_size=3))


@st.composite
def logs(draw: st.DrawFn, max_events: int = 40) -> list[LogEvent]:
    """A log of 0..max_events events with seqs 1..n; rewinds and compactions point backwards."""
    n = draw(st.integers(0, max_events))
    events: list[LogEvent] = []
    for seq in range(1, n + 1):
        kind = draw(
            st.sampled_from(
                [
                    "user",
                    "assistant",
                    "tool_call",
                    "tool",
                    "usage",
                    "turn_start",
                    "turn_end",
                    "reset",
                    "rewind",
                    "checkpoint",
                    "metadata",
                    "state",
                    "offload",
                    "compaction",
                ]
            )
        )
        turn = draw(st.sampled_from([None, "t1", "t2"]))
        ts = float(seq)
        event: LogEvent
        if kind in ("user", "assistant"):
            event = MessageEntry(
                seq=seq, ts=ts, turn_id=turn, data=Message(role=kind, content=draw(_text))
            )
        elif kind == "tool_call":
            call = ToolCall(id=f"c{seq}", name="lookup", arguments='{"q": 1}')
            event = MessageEntry(
                seq=seq, ts=ts, turn_id=turn, data=Message(role="assistant", tool_calls=(call,))
            )
        elif kind == "tool":
            event = MessageEntry(
                seq=seq,
                ts=ts,
                turn_id=turn,
                data=Message(role="tool", content=draw(_text), tool_call_id=f"c{seq - 1}"),
            )
        elif kind == "usage":
            p, c = draw(st.integers(0, 500)), draw(st.integers(0, 500))
            event = UsageEntry(
                seq=seq,
                ts=ts,
                data=Usage(
                    model=draw(st.sampled_from(["m1", "m2"])),
                    level=draw(st.sampled_from(["main", "subagent"])),
                    prompt_tokens=p,
                    completion_tokens=c,
                    total_tokens=p + c,
                    cost=draw(st.sampled_from([None, 0.5])),
                ),
            )
        elif kind == "turn_start":
            event = TurnStartEntry(seq=seq, ts=ts, turn_id=turn)
        elif kind == "turn_end":
            status = draw(st.sampled_from(["completed", "interrupted", "timeout", "error"]))
            event = TurnEndEntry(seq=seq, ts=ts, turn_id=turn, data=TurnEnd(status=status))
        elif kind == "reset":
            event = ResetEntry(seq=seq, ts=ts, data=Reset(clear_state=draw(st.booleans())))
        elif kind == "rewind":
            event = RewindEntry(seq=seq, ts=ts, data=Rewind(to_seq=draw(st.integers(0, seq - 1))))
        elif kind == "checkpoint":
            event = CheckpointEntry(
                seq=seq, ts=ts, data=Checkpoint(name=draw(st.sampled_from(["a", "b"])), data=seq)
            )
        elif kind == "metadata":
            event = MetadataEntry(
                seq=seq, ts=ts, data=Metadata(values=draw(st.dictionaries(_keys, _values)))
            )
        elif kind == "state":
            event = StateEntry(
                seq=seq, ts=ts, data=StateChange(values=draw(st.dictionaries(_keys, _values)))
            )
        elif kind == "offload":
            event = OffloadEntry(
                seq=seq, ts=ts, data=Offload(blob_id=f"{seq:064x}", size=seq, preview="…")
            )
        else:
            event = CompactionEntry(
                seq=seq,
                ts=ts,
                data=Compaction(summary=draw(_text), upto_seq=draw(st.integers(0, seq - 1))),
            )
        events.append(event)
    return events


def _totals(totals: UsageTotals) -> dict[str, Any]:
    return msgspec.structs.asdict(totals)


def snapshot(state: ConversationState) -> dict[str, Any]:
    """Everything observable about a state, as plain data copied out of it.

    Nothing in the result is shared with ``state``, so a later change to the
    state (a fold that mutates its input) shows as a difference.
    """
    return {
        "head": state.head,
        "messages": [to_builtins(m) for m in state.messages],
        "context": [(s, to_builtins(m)) for s, m in state.context],
        "history": [(s, to_builtins(m)) for s, m in state.history or []],
        "count": state.message_count,
        "segments": (state.segments, state.summary_seq),
        "usage": _totals(state.usage),
        "by_model": {k: _totals(v) for k, v in state.usage_by_model.items()},
        "by_level": {k: _totals(v) for k, v in state.usage_by_level.items()},
        "checkpoints": {
            k: (s, copy.deepcopy(to_builtins(c))) for k, (s, c) in state.checkpoints.items()
        },
        "state": copy.deepcopy(state.state),
        "metadata": copy.deepcopy(state.metadata),
        "turns": dict(state.turns),
        "open_turn": state.open_turn,
        "offloads": {k: to_builtins(v) for k, v in state.offloads.items()},
        "counts": (state.resets, state.rewinds, state.compactions),
        "dangling": [to_builtins(c) for c in state.dangling_tool_calls()],
        "steps": (state.steps, state.turn_seconds),
    }


def stored(events: list[LogEvent]) -> list[StoredEvent]:
    """The rows a store would hand back for these events."""
    rows = []
    for event in events:
        new = encode(event)
        rows.append(
            StoredEvent(event.seq, new.type, new.ts, new.turn_id, new.data, new.schema_version)
        )
    return rows


# --------------------------------------------------------------------------
# fold properties


@settings(max_examples=150, deadline=None)
@given(logs(), st.data())
def test_fold_is_incremental(events: list[LogEvent], data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(events)))
    assert snapshot(fold(events[k:], fold(events[:k]))) == snapshot(fold(events))


@settings(max_examples=100, deadline=None)
@given(logs(), logs())
def test_fold_does_not_change_its_initial_state(
    first: list[LogEvent], more: list[LogEvent]
) -> None:
    initial = fold(first)
    before = snapshot(initial)
    offset = len(first)
    shifted = [replace(e, seq=e.seq + offset) for e in more]
    result = fold(shifted, initial)
    snapshot(result)  # reading the result (its usage and message caches) must not touch initial
    assert snapshot(initial) == before
    # and folding more into the result does not reach back either
    result.apply(MetadataEntry(seq=result.head + 1, ts=1.0, data=Metadata(values={"x": [1]})))
    assert snapshot(initial) == before


@settings(max_examples=150, deadline=None)
@given(logs())
def test_clear_empties_context_but_keeps_the_full_record(events: list[LogEvent]) -> None:
    before = fold(events)
    after = fold([ResetEntry(seq=len(events) + 1, ts=1.0)], before)
    assert after.context == []
    assert after.history == before.history
    assert len(after.history) == sum(isinstance(e, MessageEntry) for e in events)
    assert after.usage == before.usage
    assert after.state == before.state  # clear_state defaults to False


@settings(max_examples=150, deadline=None)
@given(logs(), st.data())
def test_rewind_returns_context_and_state_to_the_prefix(
    events: list[LogEvent], data: st.DataObject
) -> None:
    target = data.draw(st.integers(0, len(events)))
    full = fold(events)
    rewound = fold([RewindEntry(seq=len(events) + 1, ts=1.0, data=Rewind(to_seq=target))], full)
    prefix = fold(events[:target])
    assert rewound.context == prefix.context
    assert rewound.state == prefix.state
    # the record, usage and checkpoints are kept
    assert rewound.history == full.history
    assert rewound.usage == full.usage
    assert rewound.checkpoints == full.checkpoints


@settings(max_examples=100, deadline=None)
@given(logs())
def test_usage_totals_are_the_sum_of_every_usage_event(events: list[LogEvent]) -> None:
    state = fold(events)
    usages = [e.data for e in events if isinstance(e, UsageEntry)]
    assert state.usage.total_tokens == sum(u.total_tokens for u in usages)
    assert state.usage.calls == len(usages)
    assert sum(t.total_tokens for t in state.usage_by_model.values()) == state.usage.total_tokens
    assert sum(t.calls for t in state.usage_by_level.values()) == len(usages)


@settings(max_examples=100, deadline=None)
@given(logs())
def test_stored_form_round_trips(events: list[LogEvent]) -> None:
    rows = stored(events)
    assert all(r.schema_version == EVENT_SCHEMA_VERSION for r in rows)
    assert decode(rows) == events
    for row in rows:
        assert json.loads(row.to_json())["seq"] == row.seq


@settings(max_examples=200, deadline=None)
@given(logs(), st.data())
def test_resume_fast_path_matches_decode_and_fold(
    events: list[LogEvent], data: st.DataObject
) -> None:
    # what Session._load does: decode_payloads + apply_stored, batch by batch
    rows = stored(events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rows)), max_size=6)))
    fast = ConversationState()
    start = 0
    for cut in [*cuts, len(rows)]:
        batch = rows[start:cut]
        fast.apply_stored(batch, decode_payloads(batch, "s"))
        start = cut
        # read between batches too: the usage and message caches must keep up
        assert snapshot(fast) == snapshot(fold(decode(rows[:cut], "s")))
    assert snapshot(fast) == snapshot(fold(decode(rows, "s")))


@settings(max_examples=200, deadline=None)
@given(logs())
def test_dangling_tool_calls_kept_as_events_fold_equal_a_scan_of_the_context(
    events: list[LogEvent],
) -> None:
    state = fold(events)
    answered = {m.tool_call_id for _, m in state.context if m.role == "tool"}
    scanned = [
        call
        for _, m in state.context
        if m.role == "assistant"
        for call in m.tool_calls
        if call.id not in answered
    ]
    assert state.dangling_tool_calls() == scanned


@settings(max_examples=100, deadline=None)
@given(logs())
def test_fold_rows_is_fold_of_decode(events: list[LogEvent]) -> None:
    rows = stored(events)
    assert snapshot(fold_rows(rows)) == snapshot(fold(decode(rows)))


def test_version_1_state_events_keep_meaning_a_removed_key_by_none() -> None:
    rows = [
        StoredEvent(1, "state", 1.0, None, '{"values":{"a":1,"b":2}}', 1),
        StoredEvent(2, "state", 2.0, None, '{"values":{"a":null,"c":[null]}}', 1),
        StoredEvent(3, "message", 3.0, None, '{"role":"user","content":"hi"}', 1),
        StoredEvent(4, "state", 4.0, None, '{"values":{"d":null}}', 2),
    ]
    events = decode(rows)
    assert events[1].data == StateChange(values={"c": [None]}, removed=("a",))
    assert events[2].data == Message(role="user", content="hi")
    state = fold_rows(rows)
    assert state.state == {"b": 2, "c": [None], "d": None}  # version 2 keeps a None value
    assert snapshot(state) == snapshot(fold(events))


def test_compaction_replaces_older_messages_in_context_only() -> None:
    events: list[LogEvent] = [
        MessageEntry(seq=i, ts=1.0, data=Message(role="user", content=f"m{i}")) for i in (1, 2, 3)
    ]
    events.append(CompactionEntry(seq=4, ts=1.0, data=Compaction(summary="S", upto_seq=2)))
    state = fold(events)
    assert [m.text for m in state.messages] == ["Summary of the earlier conversation:\nS", "m3"]
    assert [m.text for _, m in state.history] == ["m1", "m2", "m3"]


def test_open_turn_and_dangling_tool_calls_are_reported() -> None:
    call = ToolCall(id="c1", name="lookup")
    events: list[LogEvent] = [
        TurnStartEntry(seq=1, ts=1.0, turn_id="t1"),
        MessageEntry(seq=2, ts=1.0, turn_id="t1", data=Message(role="user", content="hi")),
        MessageEntry(
            seq=3, ts=1.0, turn_id="t1", data=Message(role="assistant", tool_calls=(call,))
        ),
    ]
    state = fold(events)
    assert state.open_turn == "t1"
    assert state.dangling_tool_calls() == [call]
    answered = MessageEntry(
        seq=4, ts=1.0, turn_id="t1", data=Message(role="tool", content="ok", tool_call_id="c1")
    )
    done = fold([answered, TurnEndEntry(seq=5, ts=1.0, turn_id="t1")], state)
    assert done.dangling_tool_calls() == []
    assert done.open_turn is None
    assert done.turns == {"completed": 1}


# --------------------------------------------------------------------------
# stored versions


def _fixture_rows(name: str) -> list[StoredEvent]:
    rows = []
    for line in (FIXTURES / name).read_text().splitlines():
        raw = json.loads(line)
        rows.append(
            StoredEvent(
                raw["seq"],
                raw["type"],
                raw["ts"],
                raw["turn_id"],
                json.dumps(raw["data"]),
                raw["v"],
            )
        )
    return rows


def test_version_0_log_is_upgraded_when_read() -> None:
    events = decode(_fixture_rows("events_v0.jsonl"), "legacy")
    state = fold(events)
    assert [m.text for m in state.messages] == [
        "My name is Alice.",
        "Hello Alice!",
        "What is my name?",
    ]
    assert state.usage.prompt_tokens == 12
    assert state.usage.completion_tokens == 3
    assert state.usage.total_tokens == 15
    assert state.turns == {"completed": 1, "error": 1}
    assert state.checkpoints["greeted"][0] == 6
    # re-encoding writes the current version
    assert {encode(e).schema_version for e in events} == {EVENT_SCHEMA_VERSION}


@pytest.mark.parametrize("backend", ["sqlite", "file"])
async def test_version_0_log_read_back_from_a_real_store(backend: str, tmp_path: Path) -> None:
    rows = _fixture_rows("events_v0.jsonl")
    url = f"sqlite:///{tmp_path}/v0.db" if backend == "sqlite" else f"file://{tmp_path}/v0"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="legacy"))
        events = [NewEvent(r.type, r.data, r.ts, r.turn_id, r.schema_version) for r in rows]
        assert await store.append("legacy", events, 0) == len(rows)
    async with open_store(url) as store:  # a fresh store object reads what is on disk
        back = [row async for batch in store.read("legacy", batch_size=4) for row in batch]
    assert back == rows
    assert {r.schema_version for r in back} == {0}

    state = fold(decode(back, "legacy"))
    assert [m.text for m in state.messages] == [
        "My name is Alice.",
        "Hello Alice!",
        "What is my name?",
    ]
    assert (state.usage.prompt_tokens, state.usage.completion_tokens) == (12, 3)
    assert state.usage.total_tokens == 15
    assert state.usage_by_model["gpt-4o-mini"].calls == 1
    assert state.turns == {"completed": 1, "error": 1}
    assert state.checkpoints["greeted"][0] == 6
    assert state.open_turn is None
    # the resume fast path reads the old version the same way
    fast = ConversationState()
    fast.apply_stored(back, decode_payloads(back, "legacy"))
    assert snapshot(fast) == snapshot(state)


def test_unknown_type_is_corrupt_data() -> None:
    row = StoredEvent(1, "teleport", 1.0, None, "{}", EVENT_SCHEMA_VERSION)
    with pytest.raises(CorruptDataError, match="unknown event type 'teleport'"):
        decode([row], "s1")


def test_invalid_payload_names_the_seq() -> None:
    good = stored([MessageEntry(seq=1, ts=1.0, data=Message(role="user", content="x"))])[0]
    bad = StoredEvent(2, "message", 1.0, None, '{"role": "wizard"}', EVENT_SCHEMA_VERSION)
    with pytest.raises(CorruptDataError, match=r"session 's1', seq 2"):
        decode([good, bad], "s1")


def test_newer_schema_version_is_refused_with_advice() -> None:
    row = StoredEvent(1, "message", 1.0, None, '{"role": "user"}', EVENT_SCHEMA_VERSION + 1)
    with pytest.raises(CorruptDataError, match="upgrade chatsession"):
        decode([row])


def test_non_json_payload_of_old_version_is_corrupt_data() -> None:
    row = StoredEvent(3, "message", 1.0, None, "{not json", 0)
    with pytest.raises(CorruptDataError, match="seq 3: payload is not JSON"):
        decode([row], "s1")
