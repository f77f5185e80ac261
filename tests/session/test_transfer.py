"""Export and import: exact round trips, all or nothing, streamed.

Failed before issue 9: a JSONL export holding U+2028, U+2029 or NEL could not
be imported back; an import that failed half-way left a partial session and a
retry got ``SessionExistsError``; a crafted file could carry ``ts: Infinity``
into a store; export and import held many times the file in memory.
"""

from __future__ import annotations

import asyncio
import io
import json
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsession import (
    Agent,
    ChatSession,
    CorruptDataError,
    Reply,
    ScriptedLLM,
    SessionExistsError,
    SessionNotFoundError,
    StoreUnavailableError,
    open_store,
)
from chatsession.log import (
    Message,
    MessageEntry,
    TurnEndEntry,
    TurnStartEntry,
    encode,
    to_builtins,
)
from chatsession.store.base import SessionRecord
from chatsession.transfer import IMPORTING, import_into_store
from tests.strategies import json_values, same, texts
from tests.tools import add

TRICKY = "line\u2028para\u2029nel\x85 fs\x1c gs\x1d rs\x1e us\x1f vt\x0b ff\x0c cr\r nul\x00 é 😀"


def dump(events: list[Any]) -> list[Any]:
    return [to_builtins(e) for e in events]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
async def test_separators_and_controls_survive_export_and_import_on_every_backend(
    durable_url: str, tmp_path: Path, fmt: str
) -> None:
    llm = ScriptedLLM([Reply.call("add", TRICKY, a=1, b=2), TRICKY])
    path = tmp_path / f"export.{fmt}"
    async with ChatSession(Agent(llm, tools=[add]), "src", store=durable_url) as session:
        await session.query(TRICKY)
        session.state[TRICKY] = {TRICKY: [TRICKY, None, 1.5, 10**30]}
        await session.save_state()
        await session.set_metadata(note=TRICKY)
        await session.checkpoint(TRICKY, data=TRICKY)
        await session.export(path, fmt)  # type: ignore[arg-type]
        original = await session.read_events()
    imported = await ChatSession.import_session(
        path, Agent(ScriptedLLM(), tools=[add]), store=durable_url, session_id="copy"
    )
    try:
        assert same(dump(await imported.read_events()), dump(original))
        assert same(dict(imported.state), {TRICKY: {TRICKY: [TRICKY, None, 1.5, 10**30]}})
        assert imported.record is not None and IMPORTING not in imported.record.metadata
        assert imported.record.metadata["imported_from"] == "src"
    finally:
        await imported.close()


def _jsonl(tmp_path: Path, events: list[Any], *, session_id: str = "orig") -> Path:
    header = {
        "format": "chatsession/1",
        "session": SessionRecord(id=session_id, created_at=1.0, updated_at=1.0).model_dump(
            mode="json"
        ),
    }
    lines = [json.dumps(header)] + [json.dumps(e) for e in events]
    path = tmp_path / "crafted.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _event(seq: int, kind: str, data: dict[str, Any], ts: Any = 1.0) -> dict[str, Any]:
    return {"seq": seq, "type": kind, "ts": ts, "turn_id": "t", "data": data}


async def test_a_damaged_line_in_the_middle_writes_nothing_and_is_named(
    durable_url: str, tmp_path: Path
) -> None:
    good = _event(1, "message", {"role": "user", "content": "hi"})
    bad = _event(2, "message", {"role": "wizard", "content": "boo"})
    later = _event(3, "message", {"role": "assistant", "content": "never"})
    path = _jsonl(tmp_path, [good, bad, later])
    async with open_store(durable_url) as store:
        with pytest.raises(CorruptDataError, match=r"crafted\.jsonl, line 3"):
            await import_into_store(path, store, session_id="imp")
        with pytest.raises(SessionNotFoundError):
            await store.get("imp")
        assert (await store.list_sessions()).records == []


@pytest.mark.parametrize("ts", ["Infinity", "NaN", "1e999"])
async def test_a_non_finite_timestamp_is_refused_before_anything_is_written(
    tmp_path: Path, ts: str
) -> None:
    path = _jsonl(tmp_path, [_event(1, "turn_start", {})])
    text = path.read_text(encoding="utf-8").replace('"ts": 1.0', f'"ts": {ts}')
    path.write_text(text, encoding="utf-8")
    async with open_store(f"sqlite:///{tmp_path}/s.db") as store:
        with pytest.raises(CorruptDataError, match="line 2"):
            await import_into_store(path, store, session_id="imp")
        assert (await store.list_sessions()).records == []


async def test_events_not_numbered_one_to_n_are_refused(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [_event(1, "turn_start", {}), _event(3, "turn_start", {})])
    async with open_store("memory://") as store:
        with pytest.raises(CorruptDataError, match=r"numbered 1\.\.n"):
            await import_into_store(path, store, session_id="imp")


async def test_an_imported_tool_call_without_a_result_is_answered_before_the_next_turn(
    tmp_path: Path,
) -> None:
    call = {"id": "c1", "name": "add", "arguments": '{"a": 1, "b": 2}'}
    path = _jsonl(
        tmp_path,
        [
            _event(1, "turn_start", {}),
            _event(2, "message", {"role": "user", "content": "1+2?"}),
            _event(3, "message", {"role": "assistant", "content": "", "tool_calls": [call]}),
            _event(4, "turn_end", {"status": "completed"}),
        ],
    )
    llm = ScriptedLLM(["fine"])
    url = f"sqlite:///{tmp_path}/s.db"
    session = await ChatSession.import_session(path, Agent(llm, tools=[add]), store=url)
    try:
        assert await session.query("next") == "fine"
        sent = llm.requests[0].messages
        roles = [m.role for m in sent]
        assert roles == ["user", "assistant", "tool", "user"], roles
        assert sent[2].tool_call_id == "c1" and sent[2].is_error
    finally:
        await session.close()


class _FailingStore:
    """A real store that fails the second append (and, optionally, every delete)."""

    def __init__(self, inner: Any, *, fail_delete: bool = False) -> None:
        self._inner = inner
        self._appends = 0
        self._fail_delete = fail_delete

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def append(
        self, session_id: str, events: Any, expected_seq: int, *, lease: Any = None
    ) -> int:
        self._appends += 1
        if self._appends == 2:
            raise StoreUnavailableError("the store went away (test)")
        return int(await self._inner.append(session_id, events, expected_seq, lease=lease))

    async def delete(self, session_id: str) -> None:
        if self._fail_delete:
            raise StoreUnavailableError("the store is still away (test)")
        await self._inner.delete(session_id)


async def _long_export(url: str, path: Path, turns: int) -> list[Any]:
    async with ChatSession(Agent(ScriptedLLM()), "src", store=url, compaction_threshold=None) as s:
        for i in range(turns):
            await s.query(f"message {i}")
        await s.export(path, "jsonl")
        return await s.read_events()


async def test_an_import_cut_off_half_way_leaves_nothing(durable_url: str, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    original = await _long_export(durable_url, path, 300)  # 1,800 events: two appends
    async with open_store(durable_url) as store:
        with pytest.raises(StoreUnavailableError):
            await import_into_store(path, _FailingStore(store), session_id="imp")  # type: ignore[arg-type]
        with pytest.raises(SessionNotFoundError):
            await store.get("imp")
        record = await import_into_store(path, store, session_id="imp")  # the retry works
        assert record.head == len(original) and IMPORTING not in record.metadata


async def test_an_unfinished_import_cannot_be_opened_and_a_retry_replaces_it(
    durable_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "long.jsonl"
    original = await _long_export(durable_url, path, 300)
    async with open_store(durable_url) as store:
        broken = _FailingStore(store, fail_delete=True)
        with pytest.raises(StoreUnavailableError):
            await import_into_store(path, broken, session_id="imp")  # type: ignore[arg-type]
        partial = await store.get("imp")
        assert IMPORTING in partial.metadata and 0 < partial.head < len(original)
        with pytest.raises(CorruptDataError, match="did not finish"):
            await ChatSession.resume(Agent(ScriptedLLM()), "imp", store=store)
        session = await ChatSession.import_session(
            path, Agent(ScriptedLLM()), store=store, session_id="imp"
        )
        try:
            assert len(await session.read_events()) == len(original)
        finally:
            await session.close()
        with pytest.raises(SessionExistsError):  # a finished import is never replaced
            await import_into_store(path, store, session_id="imp")


async def test_a_file_object_that_cannot_seek_is_read_twice_all_the_same(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    original = await _long_export(f"sqlite:///{tmp_path}/a.db", path, 5)

    class Pipe(io.StringIO):
        def seekable(self) -> bool:
            return False

    async with open_store("memory://") as store:
        record = await import_into_store(
            Pipe(path.read_text(encoding="utf-8")), store, session_id="imp"
        )
        assert record.head == len(original)


async def test_old_pretty_printed_snapshots_still_import(tmp_path: Path) -> None:
    events = [
        TurnStartEntry(seq=1, ts=1.0, turn_id="t"),
        MessageEntry(seq=2, ts=1.0, turn_id="t", data=Message(role="user", content=TRICKY)),
        TurnEndEntry(seq=3, ts=1.0, turn_id="t"),
    ]
    doc = {
        "format": "chatsession/1",
        "session": SessionRecord(id="old").model_dump(mode="json"),
        "events": [to_builtins(e) for e in events],
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    async with open_store("memory://") as store:
        await import_into_store(path, store, session_id="imp")
        rows = [r async for b in store.read("imp") for r in b]
        assert [r.data for r in rows] == [encode(e).data for e in events]


def _measure(tmp_path: Path, turns: int) -> tuple[int, int, int]:
    """(file size, peak bytes of importing it, peak bytes of exporting an open session)."""
    url = f"sqlite:///{tmp_path}/{turns}.db"
    path = tmp_path / f"{turns}.jsonl"
    asyncio.run(_long_export(url, path, turns))

    async def importing() -> None:
        async with open_store(url) as store:
            await import_into_store(path, store, session_id="imp")

    async def exporting() -> int:
        async with (
            open_store(url) as store,
            ChatSession(Agent(ScriptedLLM()), "src", store=store) as session,
        ):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            await session.export(tmp_path / f"again-{turns}.json", "json")
            return tracemalloc.get_traced_memory()[1] - before

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        asyncio.run(importing())
        import_peak = tracemalloc.get_traced_memory()[1] - before
        export_peak = asyncio.run(exporting())
    finally:
        tracemalloc.stop()
    return path.stat().st_size, import_peak, export_peak


def test_export_and_import_memory_does_not_grow_with_the_session(tmp_path: Path) -> None:
    """A streamed export/import of 4x the events peaks well under 2x the memory."""
    small_file, small_import, small_export = _measure(tmp_path, 400)
    big_file, big_import, big_export = _measure(tmp_path, 1600)
    assert big_file > 3.5 * small_file
    # before: 11 to 15 times the file, growing with it
    assert big_import < 2 * small_import, (small_import, big_import)
    assert big_export < 2 * small_export, (small_export, big_export)
    assert big_import < big_file and big_export < big_file, (big_file, big_import, big_export)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    state=st.dictionaries(texts(max_size=8), json_values(4), max_size=4),
    metadata=st.dictionaries(texts(max_size=8), json_values(3).filter(lambda v: v is not None)),
    message=texts(max_size=40),
    checkpoint=json_values(3),
    fmt=st.sampled_from(["json", "jsonl"]),
)
async def test_any_storable_session_round_trips_through_both_formats_on_every_backend(
    store_url: str,
    state: dict[str, Any],
    metadata: dict[str, Any],
    message: str,
    checkpoint: Any,
    fmt: str,
) -> None:
    # the store's data outlives the examples: each one uses ids of its own
    source, copy_id = f"src-{uuid.uuid4().hex}", f"copy-{uuid.uuid4().hex}"
    async with open_store(store_url) as store:
        async with ChatSession(Agent(ScriptedLLM()), source, store=store) as session:
            await session.query(message or "hi")
            session.state.update(state)
            await session.save_state()
            await session.set_metadata(**metadata)
            await session.checkpoint("c", data=checkpoint)
            out = io.StringIO()
            await session.export(out, fmt)  # type: ignore[arg-type]
            original = await session.read_events()
        out.seek(0)
        await import_into_store(out, store, session_id=copy_id)
        async with ChatSession.resume(Agent(ScriptedLLM()), copy_id, store=store) as copy:
            assert same(dump(await copy.read_events()), dump(original))
            assert same(dict(copy.state), state)
