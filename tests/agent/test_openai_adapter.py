"""The ``openai`` adapter against llama.cpp's OpenAI-compatible server on loopback.

Where llama.cpp cannot produce a condition on demand (a 503 then success, a
stream cut before its first token, a server that reports its context size),
a small loopback server from ``loopback.py`` plays it, forwarding to the real
llama.cpp server where an answer is needed.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import pytest

from chatsession import (
    Agent,
    AssistantMessageEvent,
    ChatSession,
    ErrorEvent,
    StopEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
    UsageEvent,
    tool,
)
from chatsession.agent.events import AgentEvent
from chatsession.agent.llm import Completion
from chatsession.agent.llm.openai import UNKNOWN_CONTEXT_WINDOW, OpenAILLM
from chatsession.errors import InvalidArgumentError, ModelError
from chatsession.log import Message, ToolCall
from tests.agent.loopback import (
    Forward,
    Request,
    Respond,
    ScriptedHTTP,
    Stream,
    TCPCounter,
    chunk,
    sse,
)

FORCED = {"type": "function", "function": {"name": "get_weather"}}
CHAT = "/v1/chat/completions"


@tool
def get_weather(city: str) -> str:
    """Get the weather for a city.

    Args:
        city: The city's name.
    """
    return f"Sunny in {city.strip(' ,.')}"


def say(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


async def run(agent: Agent, messages: list[Message]) -> list[AgentEvent]:
    return [e async for e in agent.run(messages)]


def status_of(error: BaseException | None) -> int | None:
    assert isinstance(error, ModelError), error
    return error.status_code


# -- 1. tool loops: the tool-call message goes out with content "" ------------------


async def test_two_tool_rounds_then_resume(
    llama_server: str, llama_address: tuple[str, int], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'tools.db'}"
    with ScriptedHTTP(lambda r, n: Forward(), upstream=llama_address) as wire:

        def agent() -> Agent:
            llm = OpenAILLM(
                "smollm2", base_url=wire.url, max_tokens=40, temperature=0, tool_choice=FORCED
            )
            return Agent(llm, tools=[get_weather], max_steps=4)

        async with ChatSession(agent(), "tool-rounds", store=url) as session:
            for city in ("Paris", "Rome"):
                events = [e async for e in session.query_stream(f"What is the weather in {city}?")]
                kinds = [type(e) for e in events if not isinstance(e, TextEvent)]
                assert kinds == [
                    AssistantMessageEvent,
                    UsageEvent,
                    ToolCallEvent,
                    ToolResultEvent,
                    AssistantMessageEvent,
                    UsageEvent,
                    StopEvent,
                ]
                result = next(e for e in events if isinstance(e, ToolResultEvent))
                assert not result.is_error and result.content == f"Sunny in {city}"
                stop = events[-1]
                assert isinstance(stop, StopEvent) and stop.reason == "end_turn"
                assert stop.text.strip()
            assert session.conversation.turns == {"completed": 2}

        # what went over the wire: "" for the tool-only message, no forced choice after results
        sent = [r.json() for r in wire.requests if r.path == CHAT]
        assert len(sent) == 4
        after_tool = sent[1]["messages"]
        assert after_tool[-2]["tool_calls"] and after_tool[-2]["content"] == ""
        assert after_tool[-1]["role"] == "tool"
        assert "tool_choice" not in after_tool and sent[1].get("tool_choice") is None
        assert sent[0]["tool_choice"] == FORCED == sent[2]["tool_choice"]

        # resume: a new agent and session re-send the stored tool calls and carry on
        async with ChatSession(agent(), "tool-rounds", store=url) as again:
            roles = [m.role for m in again.messages]
            assert roles == ["user", "assistant", "tool", "assistant"] * 2
            text = await again.query("And in Oslo?")
            assert text.strip()
            assert again.conversation.turns == {"completed": 3}
        resent = wire.requests[-1].json()["messages"]  # the answer after the third tool call
        assert sum(1 for m in resent if m.get("tool_calls")) == 3
        assert all(m["content"] == "" for m in resent if m.get("tool_calls"))


async def test_null_content_is_an_option_and_llama_cpp_refuses_it(llama_server: str) -> None:
    call = ToolCall(id="call_paris", name="get_weather", arguments='{"city": "Paris"}')
    history = [
        *say("What is the weather in Paris?"),
        Message(role="assistant", content="", tool_calls=(call,)),
        Message(role="tool", content="Sunny", tool_call_id=call.id, name="get_weather"),
    ]
    null = OpenAILLM(
        "smollm2", base_url=llama_server, max_tokens=8, empty_content=None, max_retries=0
    )
    events = await run(Agent(null, tools=[get_weather]), history)
    error = next(e for e in events if isinstance(e, ErrorEvent))
    assert status_of(error.exception) == 500 and "HTTP 500" in error.error
    assert events[-1] == StopEvent("error", "")
    await null.aclose()

    empty = OpenAILLM("smollm2", base_url=llama_server, max_tokens=8)
    events = await run(Agent(empty, tools=[get_weather]), history)
    assert isinstance(events[-1], StopEvent) and events[-1].reason in ("end_turn", "length")
    await empty.aclose()

    with pytest.raises(InvalidArgumentError, match="empty_content"):
        OpenAILLM("smollm2", base_url=llama_server, empty_content="-")


# -- 2. finish reasons: length is visible, no finish reason is an error -------------


async def test_length_is_visible_and_recorded(llama_server: str, tmp_path: Path) -> None:
    llm = OpenAILLM("smollm2", base_url=llama_server, max_tokens=5, temperature=0)
    url = f"sqlite:///{tmp_path / 'length.db'}"
    async with ChatSession(Agent(llm), "cut", store=url) as session:
        events = [e async for e in session.query_stream("Write a long poem about the sea.")]
        message = next(e.message for e in events if isinstance(e, AssistantMessageEvent))
        stop = events[-1]
        assert message.truncated and message.text.strip()
        assert isinstance(stop, StopEvent) and stop.reason == "length"
        assert stop.text == message.text
    async with ChatSession(Agent(llm), "cut", store=url) as again:
        assert again.messages[-1].truncated and again.messages[-1].text == message.text
    await llm.aclose()


async def test_a_prompt_over_the_context_window_is_an_error(llama_server: str) -> None:
    # llama.cpp answers 200, then ends the stream with nothing: no finish reason
    llm = OpenAILLM("smollm2", base_url=llama_server, max_tokens=8)
    events = await run(Agent(llm), say("word " * 3000))
    assert [type(e) for e in events] == [ErrorEvent, StopEvent]
    error = events[0]
    assert isinstance(error, ErrorEvent) and isinstance(error.exception, ModelError)
    assert "no finish reason" in error.error and "context window" in error.error
    assert status_of(error.exception) is None
    assert events[1] == StopEvent("error", "")

    async with ChatSession(Agent(llm), store="memory://") as session:
        with pytest.raises(ModelError, match="no finish reason"):
            await session.query("word " * 3000)
        assert session.conversation.turns == {"error": 1}
    await llm.aclose()


async def test_streaming_auto_tool_choice_on_llama_cpp_is_an_error(llama_server: str) -> None:
    llm = OpenAILLM("smollm2", base_url=llama_server, max_tokens=8, tool_choice="auto")
    events = await run(Agent(llm, tools=[get_weather]), say("What is the weather in Paris?"))
    assert [type(e) for e in events] == [ErrorEvent, StopEvent]
    assert isinstance(events[0], ErrorEvent) and "tool_choice" in events[0].error
    assert events[-1] == StopEvent("error", "")
    await llm.aclose()


async def test_a_stream_without_finish_reason_keeps_its_text() -> None:
    def handler(request: Request, n: int) -> Respond | Stream:
        events = [sse(chunk(role="assistant")), sse(chunk("Hello")), sse(chunk(" there"))]
        return Stream([*events, sse("[DONE]")])

    with ScriptedHTTP(handler) as server:
        llm = OpenAILLM("loopback", base_url=server.url)
        events = await run(Agent(llm), say("hi"))
        await llm.aclose()
    assert [type(e) for e in events] == [TextEvent, TextEvent, ErrorEvent, StopEvent]
    assert isinstance(events[2], ErrorEvent) and "without a finish reason" in events[2].error
    assert events[-1] == StopEvent("error", "Hello there")
    assert len(server.requests) == 1  # not retried: output had been produced


async def test_an_error_event_or_garbage_in_the_stream_is_a_model_error() -> None:
    streams = {
        1: [sse(chunk("Hel")), sse({"error": {"message": "the GPU fell over"}})],
        2: [sse(chunk("Hel")), b"data: {not json\n\n"],
    }
    with ScriptedHTTP(lambda r, n: Stream(streams[n])) as server:
        llm = OpenAILLM("loopback", base_url=server.url)
        reported = await run(Agent(llm), say("hi"))
        garbled = await run(Agent(llm), say("hi"))
        await llm.aclose()
    assert isinstance(reported[1], ErrorEvent) and "the GPU fell over" in reported[1].error
    assert isinstance(garbled[1], ErrorEvent) and "could not be read" in garbled[1].error
    assert reported[-1] == garbled[-1] == StopEvent("error", "Hel")
    assert len(server.requests) == 2


async def test_tool_calls_without_an_index_are_kept_apart() -> None:
    def calls(*items: tuple[str, str, str]) -> bytes:
        tool_calls = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in items
        ]
        data = chunk()
        data["choices"][0]["delta"]["tool_calls"] = tool_calls
        return sse(data)

    # some servers send no index: calls are told apart by id; a delta without one continues
    events = [
        calls(("c1", "get_weather", '{"city": "Paris"}'), ("c2", "get_weather", '{"city": ')),
        calls(("", "", '"Rome"}')),
        sse(chunk(finish="tool_calls")),
    ]
    with ScriptedHTTP(lambda r, n: Stream([*events, sse("[DONE]")])) as server:
        llm = OpenAILLM("loopback", base_url=server.url)
        answer = [c async for c in llm.stream(say("weather?"), [get_weather.to_openai()])]
        await llm.aclose()
    completion = answer[-1]
    assert isinstance(completion, Completion) and completion.finish_reason == "tool_calls"
    assert [(c.id, c.arguments) for c in completion.message.tool_calls] == [
        ("c1", '{"city": "Paris"}'),
        ("c2", '{"city": "Rome"}'),
    ]


# -- 4. retries before the first token, never after ---------------------------------


async def test_503_twice_then_the_real_answer(llama_address: tuple[str, int]) -> None:
    def handler(request: Request, n: int) -> Respond | Forward:
        if n == 1:
            return Respond(503, {"error": {"message": "loading"}}, {"retry-after": "1"})
        if n == 2:
            return Respond(503, {"error": {"message": "still loading"}}, {"retry-after": "0"})
        return Forward()

    with ScriptedHTTP(handler, upstream=llama_address) as server:
        llm = OpenAILLM("smollm2", base_url=server.url, max_tokens=8, temperature=0)
        started = time.monotonic()
        events = await run(Agent(llm), say("Say yes."))
        elapsed = time.monotonic() - started
        await llm.aclose()
    assert isinstance(events[-1], StopEvent) and events[-1].reason in ("end_turn", "length")
    assert events[-1].text.strip()
    assert not any(isinstance(e, ErrorEvent) for e in events)
    assert server.paths() == [CHAT] * 3
    assert elapsed >= 1.0  # Retry-After: 1 was honoured


async def test_retries_give_up_with_the_status() -> None:
    def handler(request: Request, n: int) -> Respond:
        return Respond(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "10"})

    with ScriptedHTTP(handler) as server:
        llm = OpenAILLM("loopback", base_url=server.url, max_retries=2)
        events = await run(Agent(llm), say("hi"))
        await llm.aclose()
    error = events[0]
    assert isinstance(error, ErrorEvent) and status_of(error.exception) == 429
    assert "after 3 attempts" in error.error and "slow down" in error.error
    assert len(server.requests) == 3


async def test_what_is_not_retried() -> None:
    answers = {
        "/v1/chat/completions": Respond(401, {"error": {"message": "Invalid API key"}}),
    }
    with ScriptedHTTP(lambda r, n: answers[r.path]) as server:
        llm = OpenAILLM("loopback", base_url=server.url, api_key="sk-wrong")
        events = await run(Agent(llm), say("hi"))
        error = events[0]
        assert isinstance(error, ErrorEvent) and status_of(error.exception) == 401
        assert "check the key" in error.error and "sk-wrong" not in error.error
        assert len(server.requests) == 1

        # a Retry-After longer than the adapter waits for: raised at once
        answers[CHAT] = Respond(503, {"error": {"message": "maintenance"}}, {"retry-after": "3600"})
        events = await run(Agent(llm), say("hi"))
        assert isinstance(events[0], ErrorEvent) and status_of(events[0].exception) == 503
        assert "asks to wait 3600 s" in events[0].error
        assert len(server.requests) == 2

        # x-should-retry: false overrides a retryable status
        answers[CHAT] = Respond(500, {"error": "no"}, {"x-should-retry": "false"})
        events = await run(Agent(llm), say("hi"))
        assert isinstance(events[0], ErrorEvent) and status_of(events[0].exception) == 500
        assert len(server.requests) == 3
        await llm.aclose()


async def test_a_stream_cut_before_its_first_token_is_retried(
    llama_address: tuple[str, int],
) -> None:
    def handler(request: Request, n: int) -> Stream | Forward:
        if n == 1:  # the headers and an empty first chunk, then the connection drops
            return Stream([sse(chunk(role="assistant"))], cut=True)
        return Forward()

    with ScriptedHTTP(handler, upstream=llama_address) as server:
        llm = OpenAILLM("smollm2", base_url=server.url, max_tokens=8, temperature=0)
        events = await run(Agent(llm), say("Say yes."))
        await llm.aclose()
    assert not any(isinstance(e, ErrorEvent) for e in events)
    assert isinstance(events[-1], StopEvent) and events[-1].text.strip()
    assert server.paths() == [CHAT, CHAT]


async def test_a_stream_cut_after_output_is_not_retried(
    llama_address: tuple[str, int],
) -> None:
    # the real server's answer, cut once some tokens have gone through
    with TCPCounter(llama_address, cut_after=1600) as proxy:
        # context_window given: the session asks no /v1/models on the counted connection
        llm = OpenAILLM(
            "smollm2", base_url=proxy.url, max_tokens=200, temperature=0, context_window=2048
        )
        async with ChatSession(Agent(llm), store="memory://") as session:
            events = [e async for e in session.query_stream("Write a long story about a ship.")]
            deltas = "".join(e.content for e in events if isinstance(e, TextEvent))
            error = next(e for e in events if isinstance(e, ErrorEvent))
            assert status_of(error.exception) is None
            assert "broke after the answer had started" in error.error
            assert deltas and events[-1] == StopEvent("error", deltas)
            # the session keeps what was produced
            assert session.conversation.turns == {"error": 1}
            kept = session.messages[-1]
            assert kept.role == "assistant" and kept.partial and kept.text == deltas
        await llm.aclose()
    assert proxy.cuts == 1 and proxy.connections == 1  # no second attempt


async def test_an_unreachable_server_is_retried_then_reported() -> None:
    llm = OpenAILLM("smollm2", base_url="http://127.0.0.1:1/v1", max_retries=1)
    events = await run(Agent(llm), say("hi"))
    assert isinstance(events[0], ErrorEvent) and status_of(events[0].exception) is None
    assert "127.0.0.1:1" in events[0].error and "after 2 attempts" in events[0].error
    await llm.aclose()


def test_option_checks() -> None:
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(InvalidArgumentError, match="max_retries"):
            OpenAILLM("m", base_url="http://127.0.0.1:1/v1", max_retries=bad)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="context_window"):
            OpenAILLM("m", base_url="http://127.0.0.1:1/v1", context_window=bad)
    with pytest.raises(InvalidArgumentError, match="timeout"):
        OpenAILLM("m", base_url="http://127.0.0.1:1/v1", timeout=float("nan"))
    with pytest.raises(InvalidArgumentError, match="stream"):
        OpenAILLM("m", base_url="http://127.0.0.1:1/v1", stream=False)
    assert OpenAILLM("m", base_url="http://127.0.0.1:1/v1").max_retries == 2


# -- 5. one client per adapter and event loop ---------------------------------------


async def test_calls_reuse_one_connection(llama_address: tuple[str, int]) -> None:
    with TCPCounter(llama_address) as proxy:
        llm = OpenAILLM("smollm2", base_url=proxy.url, max_tokens=4, temperature=0)
        agent = Agent(llm)
        for question in ("Say yes.", "Say no.", "Say maybe."):
            events = await run(agent, say(question))
            assert isinstance(events[-1], StopEvent) and events[-1].reason != "error"
        assert proxy.connections == 1
        await agent.aclose()
        for _ in range(100):
            if proxy.open_connections == 0:
                break
            await asyncio.sleep(0.02)
        assert proxy.open_connections == 0
        # still usable after aclose: a new client
        events = await run(agent, say("Say yes."))
        assert isinstance(events[-1], StopEvent) and events[-1].reason != "error"
        assert proxy.connections == 2
        await agent.aclose()


def test_one_adapter_in_several_event_loops(llama_address: tuple[str, int]) -> None:
    with TCPCounter(llama_address) as proxy:
        llm = OpenAILLM("smollm2", base_url=proxy.url, max_tokens=4, temperature=0)
        agent = Agent(llm)
        for _ in range(3):  # each asyncio.run is a new loop; each closes its client at its end
            events = asyncio.run(run(agent, say("Say yes.")))
            assert isinstance(events[-1], StopEvent) and events[-1].reason != "error"
            deadline = time.monotonic() + 5
            while proxy.open_connections and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proxy.open_connections == 0
        assert proxy.connections == 3
        gc.collect()  # an unclosed transport would warn here (warnings are errors)


# -- 6. the context window: the option, or what the server reports ------------------


async def test_context_window_from_the_server() -> None:
    vllm = {"data": [{"id": "other", "max_model_len": 1}, {"id": "m", "max_model_len": 4096}]}
    props = {"default_generation_settings": {"n_ctx": 3072}}
    ollama = {"parameters": "temperature 0.7\nnum_ctx 6144", "model_info": {}}
    servers = {
        "vllm": {"/v1/models": Respond(200, vllm)},
        "llama-server": {
            "/v1/models": Respond(200, {"data": [{"id": "m"}]}),
            "/props": Respond(200, props),
        },
        "ollama": {"/v1/models": Respond(200, {"data": []}), "/api/show": Respond(200, ollama)},
        "silent": {},
    }
    expected = {"vllm": 4096, "llama-server": 3072, "ollama": 6144, "silent": None}
    for name, routes in servers.items():
        with ScriptedHTTP(lambda r, n, routes=routes: routes.get(r.path, Respond(404))) as srv:
            llm = OpenAILLM("m", base_url=srv.url)
            assert llm.context_window == UNKNOWN_CONTEXT_WINDOW  # nothing asked yet
            assert srv.requests == []  # no network I/O in __init__ or the property
            window = await llm.get_context_window()
            assert window == (expected[name] or UNKNOWN_CONTEXT_WINDOW), name
            assert llm.context_window == window and await Agent(llm).get_context_window() == window
            asked = len(srv.requests)
            assert await llm.get_context_window() == window
            assert len(srv.requests) == asked  # cached, also "the server does not say"
            fixed = OpenAILLM("m", base_url=srv.url, context_window=1234)
            assert await fixed.get_context_window() == 1234 and len(srv.requests) == asked
            await llm.aclose()
            await fixed.aclose()


async def test_context_window_against_llama_cpp(llama_server: str) -> None:
    # llama-cpp-python's server reports no size (no /props, nothing in /v1/models):
    # the documented default applies; the option wins
    llm = OpenAILLM("smollm2", base_url=llama_server)
    assert await llm.get_context_window() == UNKNOWN_CONTEXT_WINDOW
    fixed = OpenAILLM("smollm2", base_url=llama_server, context_window=2048)
    assert await Agent(fixed).get_context_window() == 2048
    await llm.aclose()
    await fixed.aclose()


async def test_context_window_learned_from_a_refusal() -> None:
    message = (
        "This model's maximum context length is 2048 tokens. However, you requested 3030 "
        "tokens (3010 in the messages, 20 in the completion)."
    )
    error = {"error": {"message": message, "code": "context_length_exceeded"}}
    with ScriptedHTTP(lambda r, n: Respond(400, error)) as server:
        llm = OpenAILLM("m", base_url=server.url)
        events = await run(Agent(llm), say("word " * 10))
        assert isinstance(events[0], ErrorEvent) and status_of(events[0].exception) == 400
        assert "longer than the model's context window" in events[0].error
        assert llm.context_window == 2048
        assert len(server.requests) == 1  # a 400 is not retried
        await llm.aclose()
