"""One turn at a time across processes, on every durable backend.

Many writers on one session (processes, objects) take turns through the
session's lease: their turns never interleave, nothing acknowledged is lost,
no live turn is "repaired"; a killed holder's turn is closed as interrupted
once its lease runs out; a paused holder whose lease was taken over writes
nothing when it wakes up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from chatsession import (
    Agent,
    ChatSession,
    ScriptedLLM,
    SessionBusyError,
    TextEvent,
    open_store,
)
from chatsession.log import LogEvent, MessageEntry, TurnEndEntry, TurnStartEntry, decode

WRITER = Path(__file__).with_name("writer_proc.py")


async def log_of(url: str, session_id: str) -> list[LogEvent]:
    async with open_store(url) as store:
        rows = [r async for b in store.read(session_id) for r in b]
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1)), "seqs are not contiguous"
    return decode(rows)


def turns_of(log: list[LogEvent]) -> list[tuple[str, list[LogEvent]]]:
    """The log cut into turns; fails if two turns' events interleave."""
    turns: list[tuple[str, list[LogEvent]]] = []
    current: str | None = None
    for event in log:
        if isinstance(event, TurnStartEntry):
            assert current is None, f"turn {event.turn_id} started inside turn {current}"
            current = event.turn_id
            turns.append((current or "", [event]))
            continue
        assert current is not None and event.turn_id == current, (
            f"seq {event.seq} ({event.type}, turn {event.turn_id}) is outside its turn {current}"
        )
        turns[-1][1].append(event)
        if isinstance(event, TurnEndEntry):
            current = None
    return turns


def spawn(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_eight_processes_take_turns_without_interleaving(
    durable_url: str, tmp_path: Path
) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "shared", store=durable_url):
        pass  # created once, before the writers start
    barrier = tmp_path / "go"
    procs = [spawn(durable_url, "shared", f"p{n}", "turns", 100, 30, barrier) for n in range(8)]
    barrier.touch()
    acked: dict[str, list[int]] = {}
    for n, proc in enumerate(procs):
        out, err = await asyncio.to_thread(proc.communicate, timeout=540)
        assert proc.returncode == 0, err[-3000:]
        acked[f"p{n}"] = [
            int(line.split()[1]) for line in out.splitlines() if line.startswith("ACK")
        ]
    log = await log_of(durable_url, "shared")
    turns = turns_of(log)
    assert len(turns) == 800
    statuses = Counter(
        e.data.status for _, events in turns for e in events if isinstance(e, TurnEndEntry)
    )
    assert statuses == {"completed": 800}, statuses  # no spurious "interrupted"
    asked = Counter(
        e.data.text for e in log if isinstance(e, MessageEntry) and e.data.role == "user"
    )
    for name, done in acked.items():
        assert len(done) == 100
        for i in done:
            assert asked[f"{name}-{i}"] == 1, f"{name}-{i} stored {asked[f'{name}-{i}']} times"
    assert all(count == 1 for count in asked.values())
    for _, events in turns:  # each turn whole: start, question, answer, usage, end
        assert [e.type for e in events] == ["turn_start", "message", "message", "usage", "turn_end"]


async def test_a_second_writer_waits_for_the_first_or_is_told_busy(durable_url: str) -> None:
    agent = Agent(ScriptedLLM(["slow " * 30], chunk_delay=0.01))
    async with (
        open_store(durable_url) as store_a,
        open_store(durable_url) as store_b,
        ChatSession(agent, "s", store=store_a) as first,
        ChatSession(Agent(ScriptedLLM()), "s", store=store_b, busy_timeout=0) as impatient,
        ChatSession(Agent(ScriptedLLM()), "s", store=store_b, busy_timeout=30) as patient,
    ):
        async with first.stream("long") as events:
            async for event in events:
                if isinstance(event, TextEvent):
                    break  # the first turn is running: its lease is held
            with pytest.raises(SessionBusyError) as busy:
                await impatient.query("now")
            assert busy.value.holder is not None
            waiting = asyncio.create_task(patient.query("after you"))
            await asyncio.sleep(0.2)
            assert not waiting.done()  # it waits for the running turn
            async for _ in events:
                pass
        assert await waiting == "You said: after you"
    log = await log_of(durable_url, "s")
    turns = turns_of(log)
    assert [e.data.status for _, ev in turns for e in ev if isinstance(e, TurnEndEntry)] == [
        "completed",
        "completed",
    ]


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_killed_holder_is_closed_as_interrupted_once_its_lease_runs_out(
    durable_url: str,
) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=durable_url):
        pass
    holder = spawn(durable_url, "s", "a", "slow", 1, 1.5)
    assert holder.stdout is not None
    assert (await asyncio.to_thread(holder.stdout.readline)).strip() == "STARTED"
    holder.kill()
    await asyncio.to_thread(holder.wait)
    start = time.monotonic()
    async with ChatSession(Agent(ScriptedLLM()), "s", store=durable_url, busy_timeout=30) as next_:
        assert await next_.query("still there?") == "You said: still there?"
    waited = time.monotonic() - start
    assert waited < 15
    log = await log_of(durable_url, "s")
    turns = turns_of(log)
    ends = [e.data.status for _, ev in turns for e in ev if isinstance(e, TurnEndEntry)]
    assert ends == ["interrupted", "completed"]
    assert [m.text for m in next_.messages][-2:] == ["still there?", "You said: still there?"]
    for stream in (holder.stdout, holder.stderr):
        if stream is not None:
            stream.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_paused_holder_whose_lease_was_taken_writes_nothing(durable_url: str) -> None:
    async with ChatSession(Agent(ScriptedLLM()), "s", store=durable_url):
        pass
    holder = spawn(durable_url, "s", "a", "slow", 1, 1.0)
    assert holder.stdout is not None
    assert (await asyncio.to_thread(holder.stdout.readline)).strip() == "STARTED"
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(1.5)  # past its lease
        async with ChatSession(Agent(ScriptedLLM()), "s", store=durable_url) as taker:
            assert await taker.query("my turn") == "You said: my turn"
        before = await log_of(durable_url, "s")
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    out, err = await asyncio.to_thread(holder.communicate, timeout=60)
    assert holder.returncode == 3, (out, err[-3000:])
    assert "LOST" in out
    after = await log_of(durable_url, "s")
    assert [e.seq for e in after] == [e.seq for e in before]  # it wrote nothing
    turns = turns_of(after)
    ends = [e.data.status for _, ev in turns for e in ev if isinstance(e, TurnEndEntry)]
    assert ends == ["interrupted", "completed"]
