"""The session's privacy hooks where events are not the only thing stored: a large
tool output kept as a blob is redacted too, and a snapshot the store cannot read
(damaged) is rebuilt from the log instead of blocking the resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from chatsession import Agent, ChatSession, CorruptDataError, ScriptedLLM, open_store, tool
from chatsession.agent import Reply
from chatsession.privacy import Redactor

SECRET = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2


async def test_an_offloaded_tool_output_is_redacted_before_it_is_stored(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    big = ("line of output\n" * 200) + f"OPENAI_API_KEY={SECRET}\n" + ("more\n" * 200)

    @tool
    def dump() -> str:
        """Prints a lot, a key among it."""
        return big

    llm = ScriptedLLM([Reply.call("dump"), "done"])
    agent = Agent(llm, tools=[dump])
    async with ChatSession(agent, "s", store=url, offload_threshold=1000, redact=Redactor()) as s:
        await s.query("dump it")
        async with open_store(url) as store:
            rows = [e async for batch in store.read("s") for e in batch]
        (offload,) = [e for e in rows if e.type == "offload"]
        blob = (await s.read_blob(json.loads(offload.data)["blob_id"])).decode()
        assert SECRET not in blob and "[REDACTED" in blob and blob.startswith("line of output")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert SECRET.encode() not in raw  # neither in the events nor in the blob


class _DamagedSnapshots:
    """A store whose snapshots read as damaged (as a store reports a bad one)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def get_snapshot(self, session_id: str) -> object:
        raise CorruptDataError(f"session {session_id!r}: snapshot damaged (test)")


async def test_a_snapshot_that_cannot_be_read_is_rebuilt_from_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with ChatSession(Agent(ScriptedLLM()), "s", store=url, snapshot_every=2) as s:
        for n in range(3):
            await s.query(f"message {n}")
        expected = [m.text for m in s.messages]
    async with open_store(url) as store:
        assert await store.get_snapshot("s") is not None  # there is one to fail on
        with caplog.at_level(logging.WARNING):
            resumed = await ChatSession.resume(
                Agent(ScriptedLLM()),
                "s",
                store=_DamagedSnapshots(store),  # type: ignore[arg-type]
            )
            async with resumed:
                assert [m.text for m in resumed.messages] == expected
    assert "snapshot cannot be read" in caplog.text
