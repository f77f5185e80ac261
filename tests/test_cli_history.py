"""``/history all`` marks compactions, fork points and turns that never ended.

Rendered from the log of real sessions on a SQLite file (the REPL's own
tests in ``test_cli.py`` cover clear, rewind, checkpoints and timeouts in a
pseudo-terminal).
"""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.text import Text

from chatsession import ChatSession
from chatsession.agent import Agent
from chatsession.agent.llm.scripted import ScriptedLLM
from chatsession.cli.history import context_lines, record_lines
from chatsession.log import Message, MessageEntry, TurnStartEntry, encode


def render(lines: list[Text]) -> str:
    out = io.StringIO()
    console = Console(file=out, width=300, soft_wrap=True)
    for line in lines:
        console.print(line)
    return out.getvalue()


async def test_compaction_fork_point_and_an_unended_turn_are_marked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    llm = ScriptedLLM()
    async with ChatSession(Agent(llm), "parent", store=url) as session:
        for word in ("alpha", "beta", "gamma", "delta"):
            await session.query(f"tell me about {word}")
        assert await session.compact(keep_messages=2)
        in_context = {seq for seq, _ in session.conversation.context}
        shown = render(record_lines(await session.read_events(), in_context))
        assert (
            "── compacted: the model sees this summary instead of the messages up to seq" in shown
        )
        assert "user (not in context): tell me about alpha" in shown
        assert "assistant: You said: tell me about delta" in shown  # kept in context
        # the context view starts with the summary
        now = render(context_lines(session.conversation.context))
        assert now.splitlines()[0].split(": ", 1)[1].startswith("Summary of the earlier")

        fork = await session.fork_session(session_id="child")
        await fork.query("only in the fork")
        fork_point = fork.record.parent if fork.record else None
        assert fork_point is not None
        fork_shown = render(
            record_lines(
                await fork.read_events(), {s for s, _ in fork.conversation.context}, fork_point
            )
        )
        before, after = fork_shown.split(
            "── this session starts here, forked from session 'parent'"
        )
        assert "tell me about alpha" in before and "only in the fork" in after
        await fork.close()

        # a crash between a turn's start and its end: the turn never ended
        head = session.conversation.head
        turn = [
            TurnStartEntry(turn_id="crashed"),
            MessageEntry(turn_id="crashed", data=Message(role="user", content="lost answer?")),
        ]
        await session.store.append("parent", [encode(e) for e in turn], head)
    async with ChatSession(Agent(llm), "parent", store=url) as reopened:
        shown = render(record_lines(await reopened.read_events(), set()))
    assert "user (not in context): lost answer?" in shown
    assert f"the turn started at seq {head + 1} has not ended" in shown


def test_an_empty_context_and_an_empty_record_say_so() -> None:
    assert "the model's context is empty" in render(context_lines([]))
    assert "no messages recorded yet" in render(record_lines([], set()))
