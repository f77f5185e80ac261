"""Write leases across OS processes on every durable backend.

Two processes racing for one lease: one wins. A holder paused (SIGSTOP) past
its lease while another process takes the lease over and appends, then
continued (SIGCONT): its append is refused with ``LeaseLostError`` and writes
nothing, so the log holds exactly the second process's events.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from chatsession import SessionRecord, open_store

pytestmark = pytest.mark.slow  # starts processes

WORKER = Path(__file__).with_name("lease_worker.py")


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _line(proc: asyncio.subprocess.Process, want: str) -> str:
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().strip()
    if not line.startswith(want):
        _, err = await proc.communicate()
        raise AssertionError(f"expected {want!r} from the worker, got {line!r}: {err.decode()}")
    return line


async def test_processes_racing_for_a_lease_give_it_to_one(durable_url: str) -> None:
    async with open_store(durable_url) as store:
        await store.create(SessionRecord(id="s"))
    racers = [await _spawn("race", durable_url, "s", f"p{n}") for n in range(4)]
    await asyncio.gather(*(_line(p, "READY") for p in racers))
    start_at = time.time() + 0.3
    for proc in racers:
        assert proc.stdin is not None
        proc.stdin.write(f"go {start_at!r}\n".encode())
    outputs = [await p.communicate() for p in racers]
    results = [out.decode().strip() for out, _ in outputs]
    for proc, (_, err) in zip(racers, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    winners = [r for r in results if r.startswith("WON ")]
    assert len(winners) == 1, results
    holder = f"p{results.index(winners[0])}"
    assert all(r == f"BUSY {holder}" for r in results if r not in winners), results


async def test_a_paused_holder_past_its_lease_writes_nothing_after_a_takeover(
    durable_url: str,
) -> None:
    async with open_store(durable_url) as store:
        await store.create(SessionRecord(id="s"))
    first = await _spawn("hold", durable_url, "s", "first", "1.0")
    token = int((await _line(first, "LEASED")).split()[1])
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.stdin is not None
        first.stdin.write(b"append\n")  # read once it runs again
        await asyncio.sleep(1.3)  # past its lease, by every store's clock
        second = await _spawn("take", durable_url, "s", "second", "5")
        out, err = await asyncio.wait_for(second.communicate(), 120)
        assert second.returncode == 0, err.decode()
        lines = out.decode().split()
        assert int(lines[lines.index("LEASED") + 1]) > token
        assert "DONE" in lines
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = await asyncio.wait_for(first.communicate(), 120)
    assert first.returncode == 0, err.decode()
    assert out.decode().split()[-1] == "LOST", out.decode() + err.decode()

    async with open_store(durable_url) as store:
        rows = [r async for batch in store.read("s") for r in batch]
        assert (await store.get("s")).head == 5
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert [json.loads(r.data) for r in rows] == [{"owner": "second", "n": n} for n in range(5)]
