"""The session layer keeps its promises, on every backend where they apply.

Each test here failed on the code before issue 9: a step yielded before it was
stored, ``query()`` returning ``""`` for a failed model call, tokens of a
timed-out call never counted, unstorable agent state losing the turn, the
garbage collector switched off while a session loads, racing first opens,
``resume`` reporting a missing session only at the first query, a tool call
left without a result after a rewind, a turn ended twice.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from typing import Any

import pytest

from chatsession import (
    Agent,
    AssistantMessageEvent,
    ChatSession,
    ErrorEvent,
    FunctionLLM,
    ModelError,
    Reply,
    ScriptedLLM,
    SessionExistsError,
    SessionNotFoundError,
    SessionRecord,
    SessionTimeoutError,
    StopEvent,
    SyncChatSession,
    ToolCallEvent,
    ToolContext,
    ToolResultEvent,
    UnsupportedValueError,
    UsageEvent,
    open_store,
    tool,
)
from chatsession.log import (
    LogEvent,
    Message,
    MessageEntry,
    StateEntry,
    TurnEndEntry,
    UsageEntry,
    decode,
)
from tests.strategies import same
from tests.tools import add


async def stored(url: str, session_id: str) -> list[LogEvent]:
    """The session's log, read through a store object of its own."""
    async with open_store(url) as store:
        rows = [row async for batch in store.read(session_id) for row in batch]
    return decode(rows)


def statuses(events: Sequence[LogEvent]) -> list[str]:
    return [e.data.status for e in events if isinstance(e, TurnEndEntry)]


def assert_valid_context(messages: Sequence[Message]) -> None:
    """Every assistant tool call is followed, before the next non-tool message, by its result."""
    for i, message in enumerate(messages):
        if message.role != "assistant" or not message.tool_calls:
            continue
        answered = set()
        for later in messages[i + 1 :]:
            if later.role != "tool":
                break
            answered.add(later.tool_call_id)
        missing = {c.id for c in message.tool_calls} - answered
        assert not missing, f"tool calls without a result: {missing}"


# --------------------------------------------------------------------------
# stored first, then yielded


async def test_every_step_is_stored_before_its_event_is_yielded(durable_url: str) -> None:
    llm = ScriptedLLM([Reply.call("add", a=2, b=3), "It is 5."])
    checked: list[str] = []
    async with ChatSession(Agent(llm, tools=[add]), "s", store=durable_url) as session:
        async for event in session.query_stream("2+3?"):
            if isinstance(event, AssistantMessageEvent | UsageEvent | ToolCallEvent):
                log = await stored(durable_url, "s")
                if isinstance(event, AssistantMessageEvent):
                    messages = [e.data for e in log if isinstance(e, MessageEntry)]
                    assert event.message in messages
                elif isinstance(event, UsageEvent):
                    assert event.usage in [e.data for e in log if isinstance(e, UsageEntry)]
                else:
                    calls = [
                        c for e in log if isinstance(e, MessageEntry) for c in e.data.tool_calls
                    ]
                    assert event.call in calls
                checked.append(type(event).__name__)
            elif isinstance(event, ToolResultEvent | StopEvent):
                log = await stored(durable_url, "s")
                if isinstance(event, StopEvent):
                    assert statuses(log) == ["completed"]
                else:
                    assert log[-1].data == event.message  # type: ignore[union-attr]
                checked.append(type(event).__name__)
    # the final answer (the second AssistantMessageEvent) was checked too
    assert checked.count("AssistantMessageEvent") == 2 and checked[-1] == "StopEvent"


async def test_a_model_error_is_yielded_after_the_turn_recording_it(durable_url: str) -> None:
    llm = ScriptedLLM([ConnectionError("provider down")])
    async with ChatSession(Agent(llm), "s", store=durable_url) as session:
        async for event in session.query_stream("hi"):
            if isinstance(event, ErrorEvent):
                log = await stored(durable_url, "s")
                assert statuses(log) == ["error"]
                assert "provider down" in (log[-1].data.error or "")  # type: ignore[union-attr]


async def test_a_turn_read_to_its_stop_and_then_left_ends_once(durable_url: str) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=durable_url) as session:
        stream = session.query_stream("hi")
        async for event in stream:
            if isinstance(event, StopEvent):
                break
        await stream.aclose()
        assert await session.query("again") == "You said: again"
    assert statuses(await stored(durable_url, "s")) == ["completed", "completed"]


# --------------------------------------------------------------------------
# errors reach the caller


async def test_query_raises_the_models_error_and_the_session_continues(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    llm = ScriptedLLM([ConnectionError("provider down"), "back"])
    async with ChatSession(Agent(llm), "s", store=url) as session:
        with pytest.raises(ModelError, match="provider down"):
            await session.query("hi")
        assert await session.query("again") == "back"
    assert statuses(await stored(url, "s")) == ["error", "completed"]


def test_the_sync_query_raises_the_models_error_too(tmp_path: Any) -> None:
    llm = ScriptedLLM([ConnectionError("provider down"), "back"])
    with SyncChatSession(Agent(llm), "s", store=f"sqlite:///{tmp_path}/s.db") as session:
        with pytest.raises(ModelError, match="provider down"):
            session.query("hi")
        assert session.query("again") == "back"


# --------------------------------------------------------------------------
# usage


async def test_tokens_of_a_call_cut_off_by_the_timeout_are_counted_as_estimated(
    durable_url: str,
) -> None:
    answer = " ".join(f"word{i}" for i in range(40))
    llm = ScriptedLLM([answer, "fine"], chunk_delay=0.05)
    async with ChatSession(Agent(llm), "s", store=durable_url) as session:
        with pytest.raises(SessionTimeoutError):
            await session.query("talk", timeout=0.5)
        usage = await session.get_usage()
        assert usage.calls == 1 and usage.estimated and usage.total_tokens > 0
        assert usage.by_model["scripted"].estimated
        assert usage.total_completion_tokens > 0  # the words streamed before the cut
    log = await stored(durable_url, "s")
    cut = [e.data for e in log if isinstance(e, UsageEntry)]
    assert len(cut) == 1 and cut[0].estimated and statuses(log) == ["timeout"]
    resumed = await ChatSession.resume(
        Agent(ScriptedLLM(["fine"])), "s", store=durable_url, consistency="ignore"
    )
    try:
        assert (await resumed.get_usage()).estimated
        await resumed.query("again")  # the provider's own count: the total stays marked
        after = await resumed.get_usage()
        assert after.calls == 2 and after.estimated
    finally:
        await resumed.close()


async def test_usage_of_completed_calls_is_not_marked_estimated(tmp_path: Any) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=f"sqlite:///{tmp_path}/s.db") as s:
        await s.query("hi")
        usage = await s.get_usage()
        assert usage.calls == 1 and not usage.estimated
        assert not usage.by_model["scripted"].estimated


# --------------------------------------------------------------------------
# the agent's state


async def test_a_tool_setting_unstorable_state_gets_an_error_and_the_turn_goes_on(
    durable_url: str,
) -> None:
    @tool
    def remember(ctx: ToolContext) -> str:
        """Remember things."""
        ctx.state["ok"] = [1, 2]
        ctx.state["bad"] = {1, 2}  # a set is not JSON
        return "remembered"

    llm = ScriptedLLM([Reply.call("remember"), "done"])
    async with ChatSession(Agent(llm, tools=[remember]), "s", store=durable_url) as session:
        assert await session.query("go") == "done"
        result = llm.requests[1].messages[-1]
        assert result.role == "tool" and result.is_error
        assert "UnsupportedValueError" in result.text
        assert session.state == {"ok": [1, 2]}
    resumed = await ChatSession.resume(
        Agent(ScriptedLLM()), "s", store=durable_url, consistency="ignore"
    )
    try:
        assert same(dict(resumed.state), {"ok": [1, 2]})
        assert statuses(await stored(durable_url, "s")) == ["completed"]
    finally:
        await resumed.close()


async def test_a_tool_changing_state_in_place_to_an_unstorable_value_is_undone(
    durable_url: str,
) -> None:
    @tool
    def stash(ctx: ToolContext) -> str:
        """Stash an object."""
        ctx.state["items"].append("kept")
        ctx.state["items"].append(object())  # changed in place: seen when the tool returns
        return "stashed"

    llm = ScriptedLLM([Reply.call("stash"), "done"])
    async with ChatSession(Agent(llm, tools=[stash]), "s", store=durable_url) as session:
        session.state["items"] = ["first"]
        await session.save_state()
        assert await session.query("go") == "done"
        assert llm.requests[1].messages[-1].is_error
        assert session.state == {"items": ["first"]}  # the tool's changes were undone
    resumed = await ChatSession.resume(
        Agent(ScriptedLLM()), "s", store=durable_url, consistency="ignore"
    )
    try:
        assert resumed.state == {"items": ["first"]}
    finally:
        await resumed.close()


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), (1, 2), {1: "a"}, b"bytes", object(), "\ud800"],
    ids=["nan", "inf", "tuple", "int-key", "bytes", "object", "surrogate"],
)
async def test_unstorable_state_is_refused_where_it_is_assigned(tmp_path: Any, value: Any) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=f"sqlite:///{tmp_path}/s.db") as s:
        with pytest.raises(UnsupportedValueError):
            s.state["x"] = value
        with pytest.raises(UnsupportedValueError):
            s.state.update(x=value)
        with pytest.raises(UnsupportedValueError):
            s.state.setdefault("x", value)
        with pytest.raises(UnsupportedValueError):
            s.state = {"x": value}
        assert s.state == {}
        with pytest.raises(UnsupportedValueError):
            await s.set_metadata(x=value)
        with pytest.raises(UnsupportedValueError):
            await s.checkpoint("c", data={"x": value})
        assert s.conversation.head == 0  # nothing was written


async def test_save_state_refuses_an_in_place_change_and_writes_nothing(durable_url: str) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=durable_url) as session:
        session.state["log"] = []
        await session.save_state()
        head = session.conversation.head
        session.state["log"].append(float("nan"))
        with pytest.raises(UnsupportedValueError, match=r"state\['log'\]\[0\]"):
            await session.save_state()
        assert session.conversation.head == head
        session.state["log"].pop()
        await session.save_state()  # nothing changed since the last save
        assert session.conversation.head == head


async def test_state_keeps_none_and_the_type_of_every_value_through_resume(
    durable_url: str,
) -> None:
    values = {"none": None, "t": True, "one": 1, "f": 1.0, "z": -0.0, "big": 10**40, "e": ""}
    async with ChatSession(Agent(ScriptedLLM()), "s", store=durable_url) as session:
        session.state.update(values)
        await session.save_state()
        session.state["one"] = True  # equal to 1 in Python, but another value when stored
        session.state["t"] = 1
        session.state["f"] = 1
        await session.save_state()
    expected = {**values, "one": True, "t": 1, "f": 1}
    resumed = await ChatSession.resume(
        Agent(ScriptedLLM()), "s", store=durable_url, consistency="ignore"
    )
    try:
        assert same(dict(resumed.state), expected)
    finally:
        await resumed.close()
    states = [e.data for e in await stored(durable_url, "s") if isinstance(e, StateEntry)]
    assert states[0].values["none"] is None and not states[0].removed


# --------------------------------------------------------------------------
# opening


async def test_loading_keeps_the_garbage_collector_on_and_leaves_no_cycles(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with ChatSession(Agent(ScriptedLLM()), "s", store=url, compaction_threshold=None) as s:
        for i in range(60):
            await s.query(f"message {i}")
    seen: list[bool] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            seen.append(gc.isenabled())
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    async with open_store(url) as store:
        for _ in range(5):
            async with ChatSession.resume(Agent(ScriptedLLM()), "s", store=store) as resumed:
                assert resumed.message_count == 120 == len(resumed.messages)
    stop.set()
    await watcher
    assert seen and all(seen), "the garbage collector was switched off while sessions loaded"

    gc.collect()
    gc.disable()
    try:
        async with open_store(url) as store:
            for _ in range(100):
                async with ChatSession.resume(Agent(ScriptedLLM()), "s", store=store):
                    pass
        unreachable = gc.collect()
    finally:
        gc.enable()
    # before: one cycle per open holding the last batch read (about 300 objects here)
    assert unreachable < 100, f"{unreachable} unreachable objects after 100 opens"


async def test_simultaneous_first_opens_of_one_new_id_all_succeed(durable_url: str) -> None:
    stores = [open_store(durable_url) for _ in range(6)]
    sessions = [ChatSession(Agent(ScriptedLLM()), "new", store=store) for store in stores]
    try:
        await asyncio.gather(*(s.open() for s in sessions))
        created = {s.record.created_at for s in sessions if s.record is not None}
        assert len(created) == 1
        page = await stores[0].list_sessions()
        assert [r.id for r in page.records] == ["new"]
    finally:
        for s in sessions:
            await s.close()
        for store in stores:
            await store.aclose()


async def test_opening_an_id_a_deleted_session_keeps_for_its_forks_says_so(
    durable_url: str,
) -> None:
    async with open_store(durable_url) as store:
        async with ChatSession(Agent(ScriptedLLM()), "parent", store=store) as parent:
            await parent.query("hi")
            fork = await parent.fork_session(session_id="child")
            await fork.close()
        await store.delete("parent")
        with pytest.raises(SessionExistsError, match="deleted"):
            await ChatSession(Agent(ScriptedLLM()), "parent", store=store).open()
        async with ChatSession.resume(Agent(ScriptedLLM()), "child", store=store) as child:
            assert [m.text for m in child.messages] == ["hi", "You said: hi"]


async def test_resume_reports_a_missing_session_where_it_is_awaited(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    agent = Agent(ScriptedLLM())
    with pytest.raises(SessionNotFoundError):
        await ChatSession.resume(agent, "chat-42", store=url)
    # the pattern users of the seed's ChatSession write
    try:
        session = await ChatSession.resume(agent, "chat-42", store=url)
    except SessionNotFoundError:
        session = await ChatSession(agent, "chat-42", store=url)
    try:
        assert session.record is not None and session.record.id == "chat-42"
        await session.query("hello")
    finally:
        await session.close()
    resumed = await ChatSession.resume(agent, "chat-42", store=url)
    try:
        assert (await resumed.read_history())[0].text == "hello"
    finally:
        await resumed.close()


# --------------------------------------------------------------------------
# the context the model sees stays valid


async def test_a_rewind_into_a_tool_call_still_gives_the_model_a_valid_context(
    durable_url: str,
) -> None:
    llm = ScriptedLLM([Reply.call("add", a=1, b=2), "3", "next"])
    async with ChatSession(Agent(llm, tools=[add]), "s", store=durable_url) as session:
        await session.query("1+2?")
        call_seq = next(
            seq for seq, m in session.conversation.context if m.role == "assistant" and m.tool_calls
        )
        await session.rewind(call_seq)  # the context now ends with an unanswered call
        assert session.conversation.dangling_tool_calls()
        assert await session.query("again") == "next"
        assert_valid_context(llm.requests[-1].messages)
        assert not session.conversation.dangling_tool_calls()


async def test_unstorable_text_from_the_model_and_tools_is_stored_with_replacements(
    durable_url: str,
) -> None:
    @tool
    def listdir() -> str:
        """List a folder with an undecodable file name."""
        return b"caf\xe9.txt".decode("utf-8", "surrogateescape")

    replies = iter([Reply.call("listdir"), "bad \ud800 text"])

    def model(messages: list[Message], tools: list[dict[str, Any]]) -> str | Reply:
        return next(replies)

    async with ChatSession(Agent(FunctionLLM(model), tools=[listdir]), "s", store=durable_url) as s:
        assert await s.query("ls") == "bad \ufffd text"
    texts = [e.data.text for e in await stored(durable_url, "s") if isinstance(e, MessageEntry)]
    assert texts[2] == "caf\ufffd.txt" and texts[3] == "bad \ufffd text"


async def test_a_user_message_that_cannot_be_stored_is_refused_before_anything_is_written(
    tmp_path: Any,
) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=f"sqlite:///{tmp_path}/s.db") as s:
        with pytest.raises(UnsupportedValueError, match="surrogate"):
            await s.query("half a pair: \ud83d")
        with pytest.raises(UnsupportedValueError):
            await s.send("\udc00")
        assert s.conversation.head == 0


async def test_a_store_that_lies_about_the_head_is_reported_not_asserted(tmp_path: Any) -> None:
    class OffByOne:
        """A store whose append reports a head one past the truth."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        async def append(
            self, session_id: str, events: Any, expected_seq: int, *, lease: Any = None
        ) -> int:
            return await self._inner.append(session_id, events, expected_seq, lease=lease) + 1

    from chatsession import CorruptDataError

    async with open_store(f"sqlite:///{tmp_path}/s.db") as real:
        await real.create(SessionRecord(id="s"))
        session = ChatSession(Agent(ScriptedLLM()), "s", store=OffByOne(real))  # type: ignore[arg-type]
        with pytest.raises(CorruptDataError, match="reports head"):
            await session.checkpoint("c")
        await session.close()
