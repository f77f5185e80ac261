"""Resume from snapshots, O(1) forks, memory bounded by the context.

A snapshot is derived data: a resume from it must mean exactly what folding
the whole log means, and a missing, damaged or mismatched one is rebuilt from
the log, never trusted over it.
"""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsession import (
    Agent,
    ChatSession,
    FunctionLLM,
    ScriptedLLM,
    SessionRecord,
    Store,
    open_store,
)
from chatsession.log import (
    ConversationState,
    LogEvent,
    Message,
    decode,
    encode,
    fold,
    replace,
    to_builtins,
)
from tests.test_log import logs


def meaning(state: ConversationState) -> dict[str, Any]:
    """What a resumed session must agree on with a fold of the whole log."""
    return {
        "head": state.head,
        "context": [(s, to_builtins(m)) for s, m in state.context],
        "state": state.state,
        "metadata": state.metadata,
        "usage": {f"{k}": to_builtins(v) for k, v in sorted(state.usage_groups.items())},
        "checkpoints": {k: (s, to_builtins(c)) for k, (s, c) in state.checkpoints.items()},
        "turns": state.turns,
        "open_turn": state.open_turn,
        "dangling": sorted(c.id for c in state.dangling_tool_calls()),
        "count": state.message_count,
        "counts": (state.resets, state.rewinds, state.compactions, state.steps),
        "segments": (state.segments, state.summary_seq),
    }


async def append_all(store: Store, session_id: str, events: list[LogEvent]) -> None:
    head = (await store.get(session_id)).head
    rows = [encode(replace(e, seq=0)) for e in events]
    for start in range(0, len(rows), 50):
        head = await store.append(session_id, rows[start : start + 50], head)


async def whole(store: Store, session_id: str) -> ConversationState:
    rows = [r async for b in store.read(session_id) for r in b]
    return fold(decode(rows))


def agent() -> Agent:
    return Agent(ScriptedLLM())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(first=logs(max_events=30), then=logs(max_events=30), data=st.data())
async def test_a_resume_from_a_snapshot_means_what_the_whole_log_means(
    first: list[LogEvent], then: list[LogEvent], data: st.DataObject
) -> None:
    # the second part's rewinds and compactions point into the first part as well
    shift = len(first)
    later = [replace(e, seq=e.seq + shift) for e in then]
    later = [
        replace(e, data=replace(e.data, to_seq=e.data.to_seq + data.draw(st.integers(0, shift))))
        if e.type == "rewind"
        else e
        for e in later
    ]
    async with open_store("memory://") as store:
        await store.create(SessionRecord(id="s"))
        await append_all(store, "s", first)
        async with ChatSession(agent(), "s", store=store, consistency="ignore") as cold:
            assert meaning(cold.conversation) == meaning(await whole(store, "s"))
        snap = await store.get_snapshot("s")
        assert snap is None or snap[0] == len(first)  # stored by the cold open (or nothing)
        await append_all(store, "s", later)
        async with ChatSession(agent(), "s", store=store, consistency="ignore") as warm:
            assert meaning(warm.conversation) == meaning(await whole(store, "s"))


async def test_a_damaged_or_mismatched_snapshot_is_rebuilt_from_the_log(
    durable_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with ChatSession(agent(), "s", store=durable_url) as session:
        for i in range(5):
            await session.query(f"message {i}")
    async with open_store(durable_url) as store:
        expected = meaning(await whole(store, "s"))
        head = (await store.get("s")).head
        for bad in (b"not json", b'{"version": 99}', b"{}", b"\xff\xfe"):
            await store.put_snapshot("s", head, bad)
            with caplog.at_level(logging.WARNING, logger="chatsession.session"):
                caplog.clear()
                async with ChatSession(agent(), "s", store=store) as resumed:
                    assert meaning(resumed.conversation) == expected
                assert "snapshot" in caplog.text
        # a well-formed snapshot that disagrees with the log (its context is not there)
        async with ChatSession(agent(), "s", store=store) as resumed:
            good = resumed.conversation.snapshot()
        lying = good.replace(b'"context_size":', b'"context_size":1', 1)
        await store.put_snapshot("s", head, lying)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="chatsession.session"):
            async with ChatSession(agent(), "s", store=store) as resumed:
                assert meaning(resumed.conversation) == expected
        assert "does not match the log" in caplog.text


async def test_a_fork_at_the_head_reads_nothing_of_the_shared_history(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        async with ChatSession(agent(), "p", store=store) as parent:
            for i in range(5):
                await parent.query(f"message {i}")
            reads = 0
            real_read = store.read

            def counting_read(*args: Any, **kwargs: Any) -> Any:
                nonlocal reads
                reads += 1
                return real_read(*args, **kwargs)

            store.read = counting_read  # type: ignore[method-assign]
            try:
                fork = await parent.fork_session(session_id="f")
            finally:
                store.read = real_read  # type: ignore[method-assign]
            assert reads == 0
            assert [m.text for m in fork.messages] == [m.text for m in parent.messages]
            assert await fork.query("only in the fork") == "You said: only in the fork"
            usage = await fork.get_usage()
            assert usage.calls == 1 and usage.inherited.calls == 5
            await fork.close()
        # the fork resumes from the snapshot it was given, with its inherited usage apart
        async with ChatSession(agent(), "f", store=store) as again:
            assert meaning(again.conversation) == meaning(await whole(store, "f"))
            usage = await again.get_usage()
            assert usage.calls == 1 and usage.inherited.calls == 5


async def test_memory_after_resume_follows_the_context_not_the_history(tmp_path: Any) -> None:
    def model(messages: list[Message], tools: list[dict[str, Any]]) -> str:
        if messages[0].role == "system":  # the compaction's request: a short summary
            return "the user counted messages"
        return "noted: " + messages[-1].text[:20]

    url = f"sqlite:///{tmp_path}/s.db"
    held: dict[int, int] = {}
    for turns in (50, 800):
        session_id = f"s{turns}"
        summarizing = Agent(FunctionLLM(model))
        async with ChatSession(summarizing, session_id, store=url, compaction_threshold=None) as s:
            for i in range(turns):
                await s.query(f"message number {i} " + "with words " * 20)
            await s.compact(keep_messages=4)
        async with open_store(url) as store:
            await store.get(session_id)
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            resumed = await ChatSession.resume(summarizing, session_id, store=store)
            held[turns] = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            assert len(resumed.messages) == 5 and resumed.message_count == 2 * turns
            await resumed.close()
    # 16 x the history; memory held stays within 2 x (the context is the same size)
    assert held[800] < 2 * held[50], held


async def test_snapshots_are_written_as_the_log_grows_and_on_close(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with open_store(url) as store:
        async with ChatSession(agent(), "s", store=store, snapshot_every=20) as session:
            for i in range(10):  # 50 events: snapshots at 20 and 40 events or more
                await session.query(f"message {i}")
            seq, _ = await store.get_snapshot("s") or (0, b"")
            assert 40 <= seq <= 50
            await session.query("one more")
        seq, _ = await store.get_snapshot("s") or (0, b"")
        assert seq == (await store.get("s")).head  # written on close


def test_snapshot_resume_also_works_through_the_sync_facade(tmp_path: Any) -> None:
    from chatsession import SyncChatSession

    url = f"sqlite:///{tmp_path}/s.db"
    with SyncChatSession(agent(), "s", store=url) as s:
        s.query("hello")
    with SyncChatSession(agent(), "s", store=url) as s:
        assert [m.text for m in s.messages] == ["hello", "You said: hello"]
    asyncio.get_event_loop_policy()  # the facade left no loop running in this thread
