"""ChatSession: durable turns, interruptions, resume, fork, rewind, usage, input streams."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from chatsession import (
    Agent,
    ChatSession,
    ChatSessionClosedError,
    ConsistencyError,
    FunctionLLM,
    Reply,
    ScriptedLLM,
    SessionBusyError,
    SessionNotFoundError,
    SessionTimeoutError,
    StopEvent,
    SyncChatSession,
    TextEvent,
    ToolContext,
    ToolResultEvent,
    UsageError,
    open_store,
    tool,
)
from chatsession.log import Message, MessageEntry, TurnEndEntry, decode, fold
from tests.tools import add


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/sessions.db"


async def stored_log(url: str, session_id: str) -> list:  # type: ignore[type-arg]
    async with open_store(url) as store:
        rows = [r async for b in store.read(session_id) for r in b]
    return decode(rows)


def texts(events: Sequence[object]) -> list[str]:
    return [e.data.text for e in events if isinstance(e, MessageEntry)]  # type: ignore[attr-defined]


async def collect_answers(session: ChatSession, answers: list[str]) -> None:
    """Run ``session.events()`` to its end, keeping each turn's final text."""
    async for event in session.events():
        if isinstance(event, StopEvent):
            answers.append(event.text)


def statuses(events: Sequence[object]) -> list[str]:
    return [e.data.status for e in events if isinstance(e, TurnEndEntry)]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# persistence as it happens


async def test_user_message_is_stored_before_the_model_is_called(url: str) -> None:
    seen: list[list[str]] = []

    async def model(messages: list[Message], tools: list[dict]) -> str:  # type: ignore[type-arg]
        seen.append(texts(await stored_log(url, "s")))
        return "answer"

    async with ChatSession(Agent(FunctionLLM(model)), "s", store=url) as session:
        assert await session.query("question") == "answer"
    assert seen == [["question"]]
    assert texts(await stored_log(url, "s")) == ["question", "answer"]


async def test_steps_are_stored_before_their_events_are_yielded(url: str) -> None:
    llm = ScriptedLLM([Reply.call("add", a=2, b=3), "It is 5."])
    async with ChatSession(Agent(llm, tools=[add]), "s", store=url) as session:
        async for event in session.query_stream("2+3?"):
            log = await stored_log(url, "s")
            if isinstance(event, ToolResultEvent):
                assert texts(log)[-1] == "5"
            if isinstance(event, StopEvent):
                assert texts(log)[-1] == "It is 5."
                assert statuses(log) == ["completed"]
    tool_msgs = [e.data for e in await stored_log(url, "s") if isinstance(e, MessageEntry)]
    assert [m.role for m in tool_msgs] == ["user", "assistant", "tool", "assistant"]
    assert tool_msgs[1].tool_calls[0].name == "add"


async def test_resume_restores_everything_and_never_starts_fresh(url: str) -> None:
    llm = ScriptedLLM([Reply.call("add", a=1, b=1), "two"])
    async with ChatSession(Agent(llm, tools=[add]), "s", store=url, user_id="alice") as session:
        await session.query("1+1?")
        session.state["todo"] = ["a"]
        await session.checkpoint("after-first")
        await session.save_state()
        usage = await session.get_usage()
    resumed = ChatSession.resume(Agent(ScriptedLLM(), tools=[add]), "s", store=url)
    await resumed.open()
    assert [m.role for m in resumed.messages] == ["user", "assistant", "tool", "assistant"]
    assert resumed.messages[1].tool_calls[0].arguments == '{"a": 1, "b": 1}'
    assert resumed.state == {"todo": ["a"]}
    assert "after-first" in resumed.conversation.checkpoints
    assert (await resumed.get_usage()).total_tokens == usage.total_tokens > 0
    assert resumed.record is not None and resumed.record.user_id == "alice"
    await resumed.close()
    with pytest.raises(SessionNotFoundError):
        await ChatSession.resume(Agent(ScriptedLLM()), "missing", store=url).open()


# --------------------------------------------------------------------------
# failures keep history


async def test_tool_exception_goes_back_to_the_model(url: str) -> None:
    @tool
    def broken() -> str:
        """Always fails."""
        raise RuntimeError("disk on fire")

    llm = ScriptedLLM([Reply.call("broken"), "sorry"])
    async with ChatSession(Agent(llm, tools=[broken]), "s", store=url) as session:
        assert await session.query("go") == "sorry"
    result = [e.data for e in await stored_log(url, "s") if isinstance(e, MessageEntry)][2]
    assert result.is_error and "disk on fire" in result.text
    assert "disk on fire" in llm.requests[1].messages[-1].text


async def test_model_failure_is_recorded_and_the_session_continues(url: str) -> None:
    llm = ScriptedLLM([ConnectionError("provider down"), "back"])
    async with ChatSession(Agent(llm), "s", store=url) as session:
        events = [e async for e in session.query_stream("hi")]
        assert isinstance(events[-1], StopEvent) and events[-1].reason == "error"
        assert "provider down" in events[-2].error  # type: ignore[attr-defined]
        assert await session.query("again") == "back"
    assert statuses(await stored_log(url, "s")) == ["error", "completed"]


async def test_cancelled_turn_keeps_partial_text_and_history_stays_valid(url: str) -> None:
    llm = ScriptedLLM(["one two three four five six seven eight"], chunk_delay=0.05)
    async with ChatSession(Agent(llm), "s", store=url) as session:
        seen: list[str] = []

        async def consume() -> None:
            async for event in session.query_stream("count"):
                if isinstance(event, TextEvent):
                    seen.append(event.content)

        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        log = await stored_log(url, "s")
        assert statuses(log) == ["cancelled"]
        partial = [e.data for e in log if isinstance(e, MessageEntry)][-1]
        assert partial.partial and partial.text.startswith("one two three")
        assert await session.query("next") == "You said: next"


async def test_interrupt_during_a_tool_answers_the_dangling_call(url: str) -> None:
    started = asyncio.Event()

    @tool
    async def slow() -> str:
        """Takes a while."""
        started.set()
        await asyncio.sleep(30)
        return "never"

    llm = ScriptedLLM([Reply.call("slow"), "ok"])
    async with ChatSession(Agent(llm, tools=[slow]), "s", store=url) as session:
        task = asyncio.create_task(session.query("go"))
        await started.wait()
        task.cancel("interrupted")
        with pytest.raises(asyncio.CancelledError):
            await task
        state = fold(await stored_log(url, "s"))
        assert state.turns == {"interrupted": 1}
        assert state.dangling_tool_calls() == []
        assert state.messages[-1].role == "tool" and state.messages[-1].is_error
        assert await session.query("and now?") == "ok"
        # the model was given a valid history: every tool call answered
        roles = [m.role for m in llm.requests[-1].messages]
        assert roles == ["user", "assistant", "tool", "user"]


async def test_timeout_keeps_the_partial_turn(url: str) -> None:
    llm = ScriptedLLM(["a b c d e f g h i j"], chunk_delay=0.1)
    async with ChatSession(Agent(llm), "s", store=url, timeout=0.35) as session:
        with pytest.raises(SessionTimeoutError, match=r"0\.35 s"):
            await session.query("slow please")
        log = await stored_log(url, "s")
        assert statuses(log) == ["timeout"]
        assert [e.data for e in log if isinstance(e, MessageEntry)][-1].partial
        assert await session.query("fast", timeout=5) == "You said: fast"


def test_timeout_works_in_a_worker_thread(url: str) -> None:
    outcome: list[BaseException | str] = []

    def run() -> None:
        async def main() -> None:
            llm = ScriptedLLM(["x " * 50], chunk_delay=0.05)
            async with ChatSession(Agent(llm), "s", store=url) as session:
                try:
                    await session.query("hi", timeout=0.2)
                except SessionTimeoutError as exc:
                    outcome.append(exc)

        asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], SessionTimeoutError)


async def test_a_killed_process_leaves_a_resumable_session(url: str, tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(
        "import asyncio, sys\n"
        "from chatsession import Agent, ChatSession, ScriptedLLM, Reply\n"
        "async def main():\n"
        "    llm = ScriptedLLM(['w ' * 1000], chunk_delay=0.01)\n"
        "    async with ChatSession(Agent(llm), 's', store=sys.argv[1], lease_ttl=1) as s:\n"
        "        async for e in s.query_stream('tell me everything'):\n"
        "            print('EVENT', flush=True)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(5):
        proc.stdout.readline()
    proc.kill()
    proc.wait()
    proc.stdout.close()
    llm = ScriptedLLM()
    resumed = ChatSession.resume(Agent(llm), "s", store=url)
    await resumed.open()
    assert resumed.conversation.open_turn is not None  # started, never ended
    # the dead writer's lease (1 s) runs out; then its turn is closed as interrupted
    assert await resumed.query("are you there?") == "You said: are you there?"
    state = fold(await stored_log(url, "s"))
    assert state.turns == {"interrupted": 1, "completed": 1}
    assert [m.text for m in llm.requests[0].messages] == ["tell me everything", "are you there?"]
    await resumed.close()


# --------------------------------------------------------------------------
# fork, rewind, clear, usage


async def test_fork_is_independent_and_usage_is_not_counted_twice(url: str) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "p", store=url) as parent:
        await parent.query("one")
        point = await parent.checkpoint("branch")
        await parent.query("two")
        fork = await parent.fork_session("branch", session_id="child")
        assert fork.conversation.head == point
        assert [m.text for m in fork.messages] == ["one", "You said: one"]
        await fork.query("three")
        assert [m.text for m in parent.messages][-1] == "You said: two"
        parent_usage = await parent.get_usage()
        fork_usage = await fork.get_usage()
        log = await stored_log(url, "child")
        calls = [e.data for e in log if e.type == "usage"]
        inherited, own = calls[0], calls[1]  # one call before the fork point, one after
        assert (fork_usage.calls, fork_usage.total_tokens) == (1, own.total_tokens)
        assert fork_usage.total_prompt_tokens == own.prompt_tokens
        assert fork_usage.by_model["scripted"].total_tokens == own.total_tokens
        assert fork_usage.by_level["main"].calls == 1
        assert (fork_usage.inherited.calls, fork_usage.inherited.total_tokens) == (
            1,
            inherited.total_tokens,
        )
        assert fork_usage.including_inherited.calls == 2
        assert parent_usage.calls == 2
    # the parent opened the store and is closed: the fork still works, then releases it
    assert await fork.query("four") == "You said: four"
    await fork.close()
    reopened = ChatSession.resume(Agent(ScriptedLLM()), "child", store=url)
    assert (await reopened.get_usage()).calls == 2
    await reopened.close()


async def test_fork_and_rewind_by_turn_id(url: str) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=url) as session:
        await session.query("one")
        await session.query("two")
        log = await stored_log(url, "s")
        first_turn = next(e.turn_id for e in log if e.type == "turn_end")
        fork = await session.fork_session(first_turn)
        assert [m.text for m in fork.messages] == ["one", "You said: one"]
        assert await session.rewind(first_turn) == fold(log).head - 5  # the first turn's end
        assert [m.text for m in session.messages] == ["one", "You said: one"]
        with pytest.raises(UsageError, match="no checkpoint or turn"):
            await session.rewind("no-such-turn")
        await fork.close()


async def test_rewind_and_clear_change_the_context_not_the_record(url: str) -> None:
    llm = ScriptedLLM()
    async with ChatSession(Agent(llm), "s", store=url) as session:
        await session.query("first")
        session.state["step"] = 1
        await session.save_state()
        await session.checkpoint("cp")
        await session.query("second")
        session.state["step"] = 2
        await session.save_state()
        await session.rewind("cp")
        assert [m.text for m in session.messages] == ["first", "You said: first"]
        assert session.state == {"step": 1}
        await session.clear_history()
        assert session.messages == []
        await session.query("third")
        assert [m.text for m in llm.requests[-1].messages] == ["third"]
        assert session.message_count == 6 and len(await session.read_history()) == 6
        usage = await session.get_usage()  # money spent is not rewound or cleared
        assert usage.calls == 3
        stored = [e.data for e in await stored_log(url, "s") if e.type == "usage"]
        assert len(stored) == 3 and usage.total_tokens == sum(u.total_tokens for u in stored) > 0
        buffer = io.StringIO()
        await session.export(buffer, "json")
    exported = json.loads(buffer.getvalue())
    assert [e["data"].get("content") for e in exported["events"] if e["type"] == "message"][:2] == [
        "first",
        "You said: first",
    ]


# --------------------------------------------------------------------------
# context, offload, compaction, state, consistency


async def test_large_tool_output_is_offloaded_to_a_blob(url: str) -> None:
    big = "line of output\n" * 2000

    @tool
    def dump() -> str:
        """Prints a lot."""
        return big

    llm = ScriptedLLM([Reply.call("dump"), "done"])
    async with ChatSession(Agent(llm, tools=[dump]), "s", store=url, offload_threshold=1000) as s:
        await s.query("dump it")
        result = s.messages[2]
        assert len(result.text) < 1200 and "kept as blob" in result.text
        (blob_id,) = [e.data.blob_id for e in await stored_log(url, "s") if e.type == "offload"]
        assert (await s.read_blob(blob_id)).decode() == big
        assert llm.requests[1].messages[-1].text == result.text  # the model saw the preview


async def test_compaction_summarises_older_turns_by_tokens(url: str) -> None:
    llm = ScriptedLLM()
    async with ChatSession(
        Agent(llm), "s", store=url, budget_tokens=120, compaction_threshold=0.5
    ) as session:
        for n in range(6):
            await session.query(f"message number {n} with several words in it")
        assert session.conversation.compactions >= 1
        assert session.messages[0].text.startswith("Summary of the earlier conversation")
        assert session.message_count == 12 == len(await session.read_history())  # nothing deleted
        usage = await session.get_usage()
        assert usage.by_level["compaction"].calls == session.conversation.compactions


async def test_context_info_labels_its_method(url: str) -> None:
    async with ChatSession(Agent(ScriptedLLM(context_window=1000)), "s", store=url) as s:
        await s.query("hello world")
        info = await s.get_context_info()
        assert (info.method, info.estimated, info.budget_tokens) == ("tokenizer", False, 1000)
        assert info.current_tokens > 0 and info.utilisation == info.current_tokens / 1000
        assert [m.text for m in info.conversation_items] == ["hello world", "You said: hello world"]

    class NoTokenizer(ScriptedLLM):
        def count_tokens(self, messages: Sequence[Message]) -> int | None:
            return None

    async with ChatSession(Agent(NoTokenizer()), "p", store=url) as s:
        assert (await s.get_context_info()).method == "estimate"
        await s.query("hello")
        info = await s.get_context_info()
        assert info.method == "provider" and info.estimated


async def test_changed_agent_is_reported_on_resume(url: str) -> None:
    async with ChatSession(Agent(ScriptedLLM(), system_prompt="v1"), "s", store=url) as s:
        await s.query("hi")
    with pytest.warns(UserWarning, match="system_prompt_sha256"):
        warned = await ChatSession.resume(
            Agent(ScriptedLLM(), system_prompt="v2"), "s", store=url
        ).open()
    assert any("system_prompt" in c for c in warned.consistency_warnings)
    await warned.close()
    with pytest.raises(ConsistencyError, match="tool_schema_sha256"):
        await ChatSession.resume(
            Agent(ScriptedLLM(), tools=[add], system_prompt="v1"),
            "s",
            store=url,
            consistency="strict",
        ).open()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = ChatSession.resume(
            Agent(ScriptedLLM(), system_prompt="v3"), "s", store=url, consistency="ignore"
        )
        await quiet.open()
        await quiet.close()


# --------------------------------------------------------------------------
# streaming input


async def test_message_sources(url: str) -> None:
    async def agen() -> AsyncIterator[str]:
        for text in ("a1", "a2"):
            await asyncio.sleep(0)
            yield text

    def blocking() -> Iterator[str]:
        for text in ("b1", "b2"):
            time.sleep(0.2)  # would freeze the loop if iterated on it
            yield text

    queue: asyncio.Queue[str | None] = asyncio.Queue()
    for text in ("q1", "q2", None):
        queue.put_nowait(text)
    for n, source in enumerate([["l1", "l2"], iter(["i1", "i2"]), agen(), blocking(), queue]):
        ticks = 0
        stop = asyncio.Event()

        async def ticker(stop: asyncio.Event = stop) -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        session = ChatSession(Agent(ScriptedLLM()), f"s{n}", store=url, message_source=source)
        answers = [e.text async for e in session.events() if isinstance(e, StopEvent)]
        stop.set()
        await tick_task
        await session.close()
        assert len(answers) == 2 and all(a.startswith("You said: ") for a in answers)
        if n == 3:
            assert ticks > 10  # the loop kept running while the iterator blocked
        with pytest.raises(UsageError):  # a source-fed (and now closed) session takes no send()
            await session.send("x")


async def test_send_and_close(url: str) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=url) as session:
        answers: list[str] = []
        listener = asyncio.create_task(collect_answers(session, answers))
        await session.send("hello")
        await session.send("world")
        while len(answers) < 2:
            await asyncio.sleep(0.01)
        await session.close()
        await asyncio.wait_for(listener, 5)
    assert answers == ["You said: hello", "You said: world"]
    with pytest.raises(ChatSessionClosedError):
        await session.query("after close")
    with pytest.raises(ChatSessionClosedError):
        await session.send("after close")
    assert (await session.get_usage()).calls == 2  # still readable after close
    with pytest.raises(UsageError, match="message_source"):
        await ChatSession(Agent(ScriptedLLM()), store=url, message_source=["x"]).send("y")


# --------------------------------------------------------------------------
# two writers, export/import, the blocking facade


async def test_two_session_objects_on_one_session_lose_nothing(url: str) -> None:
    a = await ChatSession(Agent(ScriptedLLM()), "s", store=url).open()
    b = await ChatSession(Agent(ScriptedLLM()), "s", store=url).open()
    await a.query("from a")
    await b.query("from b")  # b's head was stale: it catches up, then appends
    await a.query("a again")
    log = await stored_log(url, "s")
    assert texts(log) == [
        "from a",
        "You said: from a",
        "from b",
        "You said: from b",
        "a again",
        "You said: a again",
    ]
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    await a.close()
    await b.close()


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
async def test_export_and_import_into_another_backend(url: str, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"export.{fmt}"
    async with ChatSession(Agent(ScriptedLLM(), tools=[add]), "s", store=url, title="T") as s:
        await s.query("remember me")
        s.state["k"] = "v"
        await s.save_state()
        s.state["unsaved"] = True  # not saved: not in the export, as an import would not see it
        await s.export(path, fmt)  # type: ignore[arg-type]
        await s.export(tmp_path / "t.md", "markdown")
    header = json.loads(path.read_text().splitlines()[0] if fmt == "jsonl" else path.read_text())
    assert header["format"] == "chatsession/1"
    assert header["tool_schema_hash"] and header["state"] == {"k": "v"}
    meta = header["metadata"]
    assert meta["tokens"]["total"] > 0 and meta["steps"] == 1 and meta["messages"] == 2
    assert 0 < meta["duration"] < 60 and meta["turns"] == {"completed": 1}
    assert 0 < meta["created_at"] <= meta["updated_at"] <= meta["exported_at"]
    assert header["agent"]["model"] == "scripted" and header["agent"]["tools"] == ["add"]
    assert "**User**: remember me" in (tmp_path / "t.md").read_text()
    imported = await ChatSession.import_session(
        path, Agent(ScriptedLLM(), tools=[add]), store=f"file://{tmp_path}/other"
    )
    assert [m.text for m in imported.messages] == ["remember me", "You said: remember me"]
    assert imported.state == {"k": "v"}
    assert imported.record is not None and imported.record.title == "T"
    await imported.close()


def test_sync_facade(url: str) -> None:
    with SyncChatSession(Agent(ScriptedLLM()), "s", store=url) as session:
        assert session.query("hi") == "You said: hi"
        deltas = [e.content for e in session.query_stream("stream me") if isinstance(e, TextEvent)]
        assert "".join(deltas) == "You said: stream me"
        session.checkpoint("cp")
        fork = session.fork_session("cp")
        assert fork.query("in fork") == "You said: in fork"
        assert session.get_usage().calls == 2
        fork.close()

    async def inside_a_loop() -> None:
        blocked = SyncChatSession(Agent(ScriptedLLM()), "t", store=url)
        with pytest.raises(UsageError, match="running event loop"):
            blocked.query("x")
        blocked.close()

    asyncio.run(inside_a_loop())


# --------------------------------------------------------------------------
# leaving early, closing mid-turn, timeouts outside the model call


async def test_a_slow_consumer_still_gets_a_timeout_not_an_error(url: str) -> None:
    # the deadline passes while the caller handles an event, not while waiting for one
    llm = ScriptedLLM(["one two three four five six"])
    async with ChatSession(Agent(llm), "s", store=url, timeout=0.3) as session:
        with pytest.raises(SessionTimeoutError, match=r"0\.3 s"):
            async for _ in session.query_stream("hi"):
                await asyncio.sleep(0.1)
        assert statuses(await stored_log(url, "s")) == ["timeout"]


async def test_breaking_out_of_a_stream_closes_the_turn_and_the_next_query_runs(
    url: str,
) -> None:
    llm = ScriptedLLM(["w " * 200], chunk_delay=0.001)
    async with ChatSession(Agent(llm), "s", store=url) as session:
        async for event in session.query_stream("long answer"):
            if isinstance(event, TextEvent):
                break
        assert await session.query("next") == "You said: next"  # not SessionBusyError
        log = await stored_log(url, "s")
        assert statuses(log) == ["interrupted", "completed"]
        first = [e for e in log if isinstance(e, MessageEntry)][1].data
        assert first.role == "assistant" and first.partial and first.text.startswith("w")


async def test_a_turn_that_is_held_but_not_read_still_reports_busy(url: str) -> None:
    llm = ScriptedLLM(["w " * 200], chunk_delay=0.001)
    async with ChatSession(Agent(llm), "s", store=url) as session:
        stream = session.query_stream("long answer")
        await anext(stream)  # holds the turn
        with pytest.raises(SessionBusyError):
            await session.query("second")
        await stream.aclose()
        assert statuses(await stored_log(url, "s")) == ["interrupted"]


async def test_close_ends_events_waiting_on_a_queue_source(url: str) -> None:
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    session = ChatSession(Agent(ScriptedLLM()), "s", store=url, message_source=queue)
    answers: list[str] = []
    listener = asyncio.create_task(collect_answers(session, answers))
    await queue.put("hello")
    while not answers:
        await asyncio.sleep(0.01)
    await session.close()  # no None in the queue: close() alone must end events()
    await asyncio.wait_for(listener, 2)
    assert answers == ["You said: hello"]


async def test_close_during_a_turn_records_it_and_then_releases_the_store(url: str) -> None:
    llm = ScriptedLLM(["w " * 500], chunk_delay=0.01)
    session = ChatSession(Agent(llm), "s", store=url)
    started = asyncio.Event()
    outcome: list[BaseException] = []

    async def run() -> None:
        try:
            async for event in session.query_stream("long answer"):
                if isinstance(event, TextEvent):
                    started.set()
        except BaseException as exc:
            outcome.append(exc)

    runner = asyncio.create_task(run())
    await started.wait()
    await asyncio.wait_for(session.close(), 5)
    await asyncio.wait_for(runner, 5)
    assert len(outcome) == 1 and isinstance(outcome[0], ChatSessionClosedError)
    log = await stored_log(url, "s")  # a new store object: the turn's end was written
    assert statuses(log) == ["cancelled"]
    assert [e for e in log if isinstance(e, MessageEntry)][-1].data.partial


async def test_close_from_inside_the_loop_ends_the_turn(url: str) -> None:
    llm = ScriptedLLM(["w " * 500], chunk_delay=0.001)
    session = ChatSession(Agent(llm), "s", store=url)
    with pytest.raises(ChatSessionClosedError):
        async for event in session.query_stream("long answer"):
            if isinstance(event, TextEvent):
                await session.close()
    assert statuses(await stored_log(url, "s")) == ["cancelled"]
    with pytest.raises(ChatSessionClosedError):
        await session.query("after")


async def test_a_failing_compaction_is_recorded_as_the_turns_error(url: str) -> None:
    def answer(messages: list[Message], tools: object) -> str:
        if messages and messages[0].role == "system" and "summar" in messages[0].text.lower():
            raise RuntimeError("summariser down")
        return "ok " * 20

    agent = Agent(FunctionLLM(answer))
    async with ChatSession(
        agent, "s", store=url, budget_tokens=100, compaction_threshold=0.3
    ) as session:
        for n in range(2):  # compaction keeps the newest 4 messages: two turns first
            await session.query(f"message {n} with a number of words in it")
        with pytest.raises(RuntimeError, match="summariser down"):
            await session.query("third message with a number of words in it")
        log = await stored_log(url, "s")
        ends = [e.data for e in log if isinstance(e, TurnEndEntry)]
        assert [e.status for e in ends] == ["completed", "completed", "error"]
        assert "summariser down" in (ends[-1].error or "")


async def test_a_hanging_compaction_respects_the_turn_timeout(url: str) -> None:
    async def answer(messages: list[Message], tools: object) -> str:
        if messages and messages[0].role == "system" and "summar" in messages[0].text.lower():
            await asyncio.sleep(30)
        return "ok " * 20

    agent = Agent(FunctionLLM(answer))
    async with ChatSession(
        agent, "s", store=url, budget_tokens=100, compaction_threshold=0.3
    ) as session:
        for n in range(2):
            await session.query(f"message {n} with a number of words in it")
        started = time.monotonic()
        with pytest.raises(SessionTimeoutError):
            await session.query("third message with a number of words in it", timeout=0.3)
        assert time.monotonic() - started < 5
        assert statuses(await stored_log(url, "s")) == ["completed", "completed", "timeout"]


async def test_a_tools_state_change_is_saved_with_its_turn_and_resumed(url: str) -> None:
    @tool
    def todo(item: str, ctx: ToolContext) -> str:
        """Add a todo item.

        Args:
            item: The item.
        """
        ctx.state.setdefault("todo", []).append(item)
        return f"{len(ctx.state['todo'])} items"

    llm = ScriptedLLM([Reply.call("todo", item="buy milk"), "added"])
    async with ChatSession(Agent(llm, tools=[todo]), "s", store=url) as session:
        await session.query("remember to buy milk")
        assert session.state == {"todo": ["buy milk"]}
    log = await stored_log(url, "s")
    (change,) = [e for e in log if e.type == "state"]
    (end,) = [e for e in log if isinstance(e, TurnEndEntry)]
    assert change.turn_id == end.turn_id and change.seq < end.seq  # saved with its turn
    resumed = await ChatSession.resume(Agent(ScriptedLLM(), tools=[todo]), "s", store=url).open()
    assert resumed.state == {"todo": ["buy milk"]}
    await resumed.close()
