"""The ``local`` adapter: no OpenAI SDK, nothing blocking the event loop, the output limit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from chatsession import Agent, AssistantMessageEvent, StopEvent
from chatsession.agent.llm.local import LocalLLM
from chatsession.errors import InvalidArgumentError
from chatsession.log import Message

NO_OPENAI = """
import asyncio, sys
from chatsession.agent.llm.local import LocalLLM
from chatsession.errors import InvalidArgumentError
from chatsession.agent import Agent
from chatsession.log import Message

async def main():
    llm = LocalLLM(max_tokens=4, threads=1)
    events = [e async for e in Agent(llm).run([Message(role="user", content="Hi")])]
    assert events[-1].reason in ("end_turn", "length"), events[-1]
    assert await llm.acount_tokens([Message(role="user", content="Hi")]) > 0

asyncio.run(main())
print(sorted(m for m in sys.modules if m == "openai" or m.startswith("openai.")))
"""


def test_the_local_adapter_does_not_import_the_openai_sdk() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_OPENAI], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@asynccontextmanager
async def ticking() -> AsyncIterator[list[float]]:
    """Tick every 5 ms while the body runs; yields the gaps between ticks."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(tick())
    try:
        yield gaps
    finally:
        done.set()
        await task


async def test_loading_and_tokenizing_do_not_block_the_loop() -> None:
    question = [Message(role="user", content="What is the capital of France?")]
    counting = LocalLLM(max_tokens=8, threads=1)  # not loaded yet: the first count loads it
    started = time.monotonic()
    async with ticking() as gaps:
        counted = await Agent(counting).acount_tokens(question)
    took = time.monotonic() - started
    assert counted == counting.count_tokens(question) and counted > 5
    # the load took a while (ticks went on during it: the loop was free); how long
    # depends on the disk cache, so it is not asserted against a fixed time
    assert took > 0.05 and len(gaps) >= 5 and max(gaps) < 0.25, (took, len(gaps), max(gaps))

    # loads inside the first call, then tokenizes for usage; 3 tokens: cut by the limit
    answering = LocalLLM(max_tokens=3, threads=1)
    async with ticking() as gaps:
        events = [e async for e in Agent(answering).run(question)]
    assert len(gaps) > 10 and max(gaps) < 0.25, max(gaps)
    message = next(e.message for e in events if isinstance(e, AssistantMessageEvent))
    assert message.truncated and events[-1] == StopEvent("length", message.text)
    assert await answering.get_context_window() == answering.context_window == 2048


def test_bad_local_options_are_typed_errors() -> None:
    bad = [
        {"context_window": 0},
        {"max_tokens": -1},
        {"threads": 0},
        {"max_tokens": 2.5},
        {"temperature": float("nan")},
        {"temperature": -1},
        {"seed": "1"},
    ]
    for options in bad:
        with pytest.raises(InvalidArgumentError, match=next(iter(options))):
            LocalLLM(**options)  # type: ignore[arg-type]
