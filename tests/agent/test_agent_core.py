"""The agent loop, @tool schemas, the scripted models, resolve_llm, pricing."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import enum
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel

from chatsession import (
    Agent,
    AssistantMessageEvent,
    ChatSession,
    ErrorEvent,
    FunctionLLM,
    Reply,
    ScriptedLLM,
    StopEvent,
    TextEvent,
    ToolResultEvent,
    UsageError,
    UsageEvent,
    resolve_llm,
    tool,
)
from chatsession.agent import DEFAULT_PRICES, PriceTable, ToolContext
from chatsession.agent.agent import CUT_CALL_RESULT
from chatsession.agent.llm import TextDelta
from chatsession.agent.llm.base import estimate_tokens
from chatsession.agent.llm.messages import check_empty_content, to_openai_messages
from chatsession.agent.pricing import cost_of
from chatsession.agent.tools import schema_hash
from chatsession.errors import InvalidArgumentError, ModelError, ToolError
from chatsession.log import Message, ToolCall, Usage, replace


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(BaseModel):
    x: int
    y: int


@tool
def everything(
    name: str,
    count: int,
    ratio: float,
    flag: bool,
    tags: list[str],
    scores: dict[str, int],
    mode: Literal["fast", "slow"] = "fast",
    color: Color = Color.RED,
    nickname: str | None = None,
    where: Point | None = None,
) -> str:
    """Exercise every kind of parameter.

    More text that is not the description.

    Args:
        name: Who to greet.
        count: How many times,
            across two lines.
        ratio: A fraction.
        flag: On or off.
        tags: Labels.
        scores: Named scores.
        mode: How fast.
        color: A color.
        nickname: Optional.
        where: A point.

    Returns:
        Nothing useful.
    """
    return f"{name}:{count}:{mode}:{color.value}:{where.x if where else '-'}"


def test_schema_from_hints_and_docstring() -> None:
    schema = everything.parameters
    props = schema["properties"]
    assert everything.description == "Exercise every kind of parameter."
    assert schema["required"] == ["name", "count", "ratio", "flag", "tags", "scores"]
    assert props["name"] == {"type": "string", "description": "Who to greet."}
    assert props["count"]["type"] == "integer"
    assert props["count"]["description"] == "How many times, across two lines."
    assert props["ratio"]["type"] == "number" and props["flag"]["type"] == "boolean"
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "description": "Labels."}
    assert props["scores"]["additionalProperties"] == {"type": "integer"}
    assert props["mode"]["enum"] == ["fast", "slow"] and props["mode"]["default"] == "fast"
    assert "$defs" in schema and "Color" in schema["$defs"] and "Point" in schema["$defs"]
    assert everything.to_openai()["function"]["name"] == "everything"


async def test_arguments_are_validated() -> None:
    ok = await everything.call(
        {
            "name": "a",
            "count": "3",
            "ratio": 0.5,
            "flag": True,
            "tags": [],
            "scores": {},
            "where": {"x": 1, "y": 2},
        }
    )
    assert ok == "a:3:fast:red:1"
    with pytest.raises(ToolError, match="count"):
        await everything.call(
            {"name": "a", "count": "many", "ratio": 1, "flag": True, "tags": [], "scores": {}}
        )
    with pytest.raises(ToolError, match="bogus: Extra inputs are not permitted"):
        await everything.call({"bogus": 1})


async def test_sync_tools_run_off_the_event_loop() -> None:
    import threading
    import time

    main = threading.get_ident()
    seen: list[int] = []

    @tool("Sleep a little and say where it ran.")
    def blocking() -> str:
        seen.append(threading.get_ident())
        time.sleep(0.1)
        return "done"

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(5):
            ticks += 1
            await asyncio.sleep(0.01)

    result, _ = await asyncio.gather(blocking.call({}), ticker())
    assert result == "done" and seen and seen[0] != main and ticks == 5
    assert blocking.description == "Sleep a little and say where it ran."


def test_bad_tools_are_refused() -> None:
    with pytest.raises(UsageError):
        tool(lambda *args: None)
    with pytest.raises(UsageError, match="share the name"):
        Agent(ScriptedLLM(), tools=[everything, everything])


async def run(agent: Agent, text: str = "hi") -> list[object]:
    return [e async for e in agent.run([Message(role="user", content=text)])]


async def test_tool_loop_events_in_order() -> None:
    @tool
    async def double(n: int) -> int:
        """Double a number.

        Args:
            n: The number.
        """
        return 2 * n

    llm = ScriptedLLM([Reply.call("double", n=21), "It is 42."])
    events = await run(Agent(llm, tools=[double], system_prompt="You add."))
    kinds = [type(e).__name__ for e in events]
    assert kinds[:4] == ["AssistantMessageEvent", "UsageEvent", "ToolCallEvent", "ToolResultEvent"]
    assert kinds[-1] == "StopEvent" and "TextEvent" in kinds
    result = next(e for e in events if isinstance(e, ToolResultEvent))
    assert (result.content, result.is_error, result.message.role) == ("42", False, "tool")
    assert events[-1] == StopEvent("end_turn", "It is 42.")
    # the system prompt goes first, the tool result goes back to the model
    assert llm.requests[0].messages[0].role == "system"
    assert llm.requests[1].messages[-1].text == "42"
    assert llm.requests[0].tools[0]["function"]["name"] == "double"


async def test_unknown_tool_and_bad_json_become_error_results() -> None:
    llm = ScriptedLLM([Reply.call("nope"), "recovered"])
    events = await run(Agent(llm))
    result = next(e for e in events if isinstance(e, ToolResultEvent))
    assert result.is_error and "no tool named 'nope'" in result.content
    assert isinstance(events[-1], StopEvent) and events[-1].text == "recovered"


async def test_max_steps_stops_the_loop() -> None:
    @tool
    def again() -> str:
        """Ask again."""
        return "again"

    llm = ScriptedLLM(rules=[(".*", Reply.call("again"))])
    events = await run(Agent(llm, tools=[again], max_steps=3))
    assert sum(isinstance(e, UsageEvent) for e in events) == 3
    assert isinstance(events[-1], StopEvent) and events[-1].reason == "max_steps"


async def test_model_failure_is_an_error_event_then_stop() -> None:
    events = await run(Agent(ScriptedLLM([RuntimeError("boom")])))
    assert isinstance(events[0], ErrorEvent) and "boom" in events[0].error
    assert events[-1] == StopEvent("error", "")


async def test_cancellation_propagates() -> None:
    agent = Agent(ScriptedLLM(["a b c d e f"], chunk_delay=0.2))

    async def consume() -> None:
        async for _ in agent.run([Message(role="user", content="x")]):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_scripted_is_deterministic_and_counts_words() -> None:
    async def once() -> list[object]:
        return await run(
            Agent(ScriptedLLM(rules=[("weather", "Sunny and warm.")])), "weather today?"
        )

    first, second = await once(), await once()
    assert first == second
    deltas = [e.content for e in first if isinstance(e, TextEvent)]
    assert deltas == ["Sunny ", "and ", "warm."]
    usage = next(e.usage for e in first if isinstance(e, UsageEvent))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cost) == (6, 3, 0.0)
    assert (await run(Agent(ScriptedLLM()), "echo this"))[-1] == StopEvent(
        "end_turn", "You said: echo this"
    )


async def test_function_llm_plays_the_model() -> None:
    def model(messages: list[Message], tools: list[dict]) -> str:  # type: ignore[type-arg]
        return f"{len(messages)} messages, last: {messages[-1].text}"

    events = await run(Agent(FunctionLLM(model), system_prompt="sys"), "hello")
    assert events[-1] == StopEvent("end_turn", "2 messages, last: hello")
    assert isinstance(events[-3], AssistantMessageEvent)


def test_resolve_llm() -> None:
    assert resolve_llm("scripted").provider == "scripted"
    assert resolve_llm("scripted:demo").model == "demo"
    llm = ScriptedLLM()
    assert resolve_llm(llm) is llm
    with pytest.raises(UsageError, match="'scripted', 'openai:MODEL' or 'local'"):
        resolve_llm("gpt-4o")
    with pytest.raises(UsageError, match="model name"):
        resolve_llm("openai:")
    with pytest.raises(UsageError):
        resolve_llm(42)  # type: ignore[arg-type]


def test_no_model_configured_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatsession.agent.llm.local as local

    monkeypatch.setattr(local, "available", lambda: False)
    with pytest.raises(UsageError) as info:
        resolve_llm(None)
    message = str(info.value)
    assert "chatsession[local]" in message and "openai:gpt-4o-mini" in message
    monkeypatch.setenv("CHATSESSION_MODEL", "scripted")
    assert resolve_llm(None).provider == "scripted"


def test_fingerprint_uses_full_hashes_and_sees_changes() -> None:
    base = Agent(ScriptedLLM(), tools=[everything], system_prompt="p").fingerprint()
    assert len(base["system_prompt_sha256"]) == 64 and len(base["tool_schema_sha256"]) == 64
    assert base == Agent(ScriptedLLM(), tools=[everything], system_prompt="p").fingerprint()
    assert base != Agent(ScriptedLLM(), tools=[everything], system_prompt="q").fingerprint()
    assert (
        base["tool_schema_sha256"]
        != Agent(ScriptedLLM(), system_prompt="p").fingerprint()["tool_schema_sha256"]
    )
    assert schema_hash([everything]) == base["tool_schema_sha256"]


def test_pricing() -> None:
    usage = Usage(model="gpt-4o-mini", prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert cost_of(usage) == pytest.approx(0.75)
    assert cost_of(replace(usage, model="gpt-4o-mini-2024-07-18")) == pytest.approx(0.75)
    mystery = replace(usage, model="mystery")
    assert cost_of(mystery) is None
    table = PriceTable({"mystery": (1.0, 2.0)})
    assert table.cost(mystery) == pytest.approx(3.0)
    assert table.cost(usage) == pytest.approx(0.75)  # the defaults are kept
    assert cost_of(mystery) is None  # no global table changed
    assert PriceTable(defaults=False).cost(usage) is None
    with pytest.raises(UsageError, match="negative"):
        table.set("x", -1, 0)
    with pytest.raises(TypeError):
        DEFAULT_PRICES["x"] = (1.0, 1.0)  # type: ignore[index]


async def test_an_agents_prices_give_its_usage_a_cost() -> None:
    llm = ScriptedLLM(model="house-model")
    priced = Agent(llm, prices={"house-model": (1_000_000.0, 0.0)})
    events = [e async for e in priced.run([Message(role="user", content="hi")])]
    (usage,) = [e.usage for e in events if isinstance(e, UsageEvent)]
    assert usage.cost == pytest.approx(usage.prompt_tokens)
    unpriced = Agent(ScriptedLLM(model="house-model"))
    events = [e async for e in unpriced.run([Message(role="user", content="hi")])]
    assert [e.usage.cost for e in events if isinstance(e, UsageEvent)] == [None]


async def test_a_tool_can_read_and_change_the_session_state_through_its_context() -> None:
    seen: list[ToolContext] = []

    @tool
    def remember(fact: str, ctx: ToolContext) -> str:
        """Remember a fact.

        Args:
            fact: What to remember.
        """
        seen.append(ctx)
        ctx.state.setdefault("facts", []).append(fact)
        return "noted"

    assert "ctx" not in remember.parameters["properties"]  # the model never sees it
    assert remember.parameters["required"] == ["fact"]
    state: dict[str, object] = {}
    llm = ScriptedLLM([Reply.call("remember", fact="sky is blue"), "done"])
    agent = Agent(llm, tools=[remember])
    context = ToolContext(state=state, session_id="s1", turn_id="t1")
    _ = [e async for e in agent.run([Message(role="user", content="hi")], tool_context=context)]
    assert state == {"facts": ["sky is blue"]} and seen[0].session_id == "s1"
    with pytest.raises(UsageError, match="more than one"):

        @tool
        def twice(a: ToolContext, b: ToolContext) -> str:
            """Twice."""
            return ""


# -- issue 9: finish reasons, estimates, typed errors -------------------------------


async def test_an_answer_cut_by_the_output_limit_ends_the_turn_as_length() -> None:
    events = await run(Agent(ScriptedLLM([Reply("Once upon a", finish_reason="length")])))
    message = next(e.message for e in events if isinstance(e, AssistantMessageEvent))
    assert message.truncated and message.text == "Once upon a"
    assert events[-1] == StopEvent("length", "Once upon a")
    plain = await run(Agent(ScriptedLLM(["Done."])))
    assert not next(e.message for e in plain if isinstance(e, AssistantMessageEvent)).truncated


async def test_tool_calls_cut_by_the_output_limit_are_not_run() -> None:
    ran: list[str] = []

    @tool
    def delete_file(path: str) -> str:
        """Delete a file.

        Args:
            path: Which file.
        """
        ran.append(path)
        return "deleted"

    cut = dataclasses.replace(
        Reply.call("delete_file", path="/tmp/important"), finish_reason="length"
    )
    llm = ScriptedLLM([cut, "Sorry, I will try again."])
    async with ChatSession(Agent(llm, tools=[delete_file]), store="memory://") as session:
        events = [e async for e in session.query_stream("Delete /tmp/important_file.txt")]
        kinds = [type(e) for e in events if not isinstance(e, TextEvent)]
        assert kinds == [AssistantMessageEvent, UsageEvent, ToolResultEvent, StopEvent]
        result = next(e for e in events if isinstance(e, ToolResultEvent))
        assert (
            result.is_error and result.content == CUT_CALL_RESULT and result.name == "delete_file"
        )
        assert events[-1] == StopEvent("length", "")
        assert ran == []  # never run with arguments that may be cut off
        stored = session.messages
        assert [m.role for m in stored] == ["user", "assistant", "tool"]
        assert stored[1].truncated and stored[2].is_error
        assert stored[2].tool_call_id == stored[1].tool_calls[0].id
        # every call has its answer: the next turn goes on normally
        assert await session.query("Try again.") == "Sorry, I will try again."
        assert llm.requests[-1].messages[2].content == CUT_CALL_RESULT


class _Unfinished:
    """An adapter whose answer ends without a Completion (no finish reason)."""

    provider = "test"
    model = "unfinished"
    context_window = 1000

    async def stream(self, messages: object, tools: object) -> AsyncIterator[TextDelta]:
        yield TextDelta("half an ans")

    def count_tokens(self, messages: object) -> int | None:
        return None


async def test_an_answer_without_a_finish_reason_is_an_error() -> None:
    events = await run(Agent(_Unfinished()))  # type: ignore[arg-type]
    assert [type(e) for e in events] == [TextEvent, ErrorEvent, StopEvent]
    error = events[1]
    assert isinstance(error, ErrorEvent) and isinstance(error.exception, ModelError)
    assert "without a finish reason" in error.error
    assert events[-1] == StopEvent("error", "half an ans")
    async with ChatSession(Agent(_Unfinished()), store="memory://") as session:  # type: ignore[arg-type]
        with pytest.raises(ModelError, match="without a finish reason"):
            await session.query("hi")
        assert session.conversation.turns == {"error": 1}
        assert session.messages[-1].partial and session.messages[-1].text == "half an ans"


def test_estimated_usage_of_an_interrupted_call() -> None:
    agent = Agent(
        ScriptedLLM(model="house-model"),
        tools=[everything],
        system_prompt="Be brief.",
        level="subagent",
        prices={"house-model": (2.0, 8.0)},
    )
    sent = [Message(role="user", content="Tell me about the sea. " * 20)]
    usage = agent.estimated_usage(sent, "The sea is large and")
    schema = len(json.dumps([everything.to_openai()]))
    system = Message(role="system", content="Be brief.")
    assert usage.estimated and usage.model == "house-model" and usage.level == "subagent"
    assert usage.prompt_tokens == estimate_tokens([system, *sent]) + math.ceil(schema / 4)
    assert usage.prompt_tokens > 100 + schema // 4  # the tool schemas are sent too
    assert usage.completion_tokens == estimate_tokens(
        [Message(role="assistant", content="The sea is large and")]
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.cost == pytest.approx(
        (usage.prompt_tokens * 2.0 + usage.completion_tokens * 8.0) / 1_000_000
    )
    nothing = agent.estimated_usage(sent, "")  # killed before the first token
    assert nothing.completion_tokens == 0 and nothing.prompt_tokens == usage.prompt_tokens


def test_bad_agent_arguments_are_typed_errors() -> None:
    for steps in (0, -1, 2.5, True, "3"):
        with pytest.raises(InvalidArgumentError, match="max_steps"):
            Agent(ScriptedLLM(), max_steps=steps)  # type: ignore[arg-type]
    for price in ((float("nan"), 1.0), (1.0, float("inf")), (-1.0, 0.0), ("a", 1)):
        with pytest.raises(InvalidArgumentError, match="house"):
            PriceTable({"house": price})  # type: ignore[dict-item]


def test_no_assert_guards_a_runtime_condition_in_agent_code() -> None:
    import chatsession.agent

    root = Path(chatsession.agent.__file__).parent
    found = [
        f"{path.relative_to(root)}:{node.lineno}"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert found == []  # they vanish under python -O: check and raise a typed error


def test_to_openai_messages_sends_empty_content_with_tool_calls() -> None:
    call = ToolCall(id="c1", name="f", arguments="{}")
    history = [
        Message(role="user", content="hi"),
        Message(role="assistant", content="", tool_calls=(call,)),
        Message(role="tool", content="ok", tool_call_id="c1", name="f"),
    ]
    default = to_openai_messages(history)
    assert default[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    assert default[2] == {"role": "tool", "content": "ok", "tool_call_id": "c1"}
    assert to_openai_messages(history, empty_content=None)[1]["content"] is None
    with pytest.raises(InvalidArgumentError, match="empty_content"):
        check_empty_content("nothing")
