"""Several OS processes on one store, and a writer killed mid-append."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from chatsession import ConflictError, NewEvent, SessionRecord, StoreRepairWarning, open_store


def _acks(output: str) -> dict[int, str]:
    acked: dict[int, str] = {}
    for line in output.splitlines():
        if line.startswith("ACK "):
            _, seq, payload = line.split(" ", 2)
            acked[int(seq)] = payload
    return acked


def _ack_pairs(output: str) -> list[tuple[int, str]]:
    pairs = []
    for line in output.splitlines():
        if line.startswith("ACK "):
            _, seq, payload = line.split(" ", 2)
            pairs.append((int(seq), payload))
    return pairs


def _conflicts(output: str) -> int:
    counts = [int(line.split()[1]) for line in output.splitlines() if line.startswith("CONFLICTS ")]
    assert len(counts) == 1, f"the writer reported no conflict count: {output[-500:]!r}"
    return counts[0]


async def _wait_ready(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 120)
    if line.strip() != b"READY":
        _, err = await proc.communicate()
        raise AssertionError(f"writer did not get ready: {line!r} {err.decode()[-2000:]}")


async def test_four_processes_and_twenty_tasks_append_to_one_session(
    durable_url: str, writer_script: Path
) -> None:
    store = open_store(durable_url)
    await store.create(SessionRecord(id="shared"))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(writer_script),
            durable_url,
            "shared",
            f"p{n}",
            "15",
            "2",
            "--barrier",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for n in range(4)
    ]
    # every child has started, opened the store and read the session: now all go at once
    await asyncio.gather(*(_wait_ready(p) for p in procs))
    await asyncio.gather(*(store.get("shared") for _ in range(20)))  # fill the pool
    conflicts = 0
    first_heads: list[int] = []  # the head each task saw before its first append

    async def task(name: str) -> list[tuple[int, str]]:
        nonlocal conflicts
        acked = []
        for i in range(6):
            payload = f"{name}-{i}"
            data = json.dumps({"role": "user", "content": payload})
            head = (await store.get("shared")).head
            if i == 0:
                first_heads.append(head)
            while True:
                try:
                    seq = await store.append("shared", [NewEvent("message", data, 1.0)], head)
                    break
                except ConflictError as exc:
                    conflicts += 1
                    head = (
                        exc.actual if exc.actual is not None else (await store.get("shared")).head
                    )
            acked.append((seq, payload))
        return acked

    start_at = time.time() + 0.3  # everyone, this process too, starts at this instant
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"go {start_at!r}\n".encode())
    await asyncio.gather(*(p.stdin.drain() for p in procs if p.stdin is not None))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    local = await asyncio.gather(*(task(f"t{n}") for n in range(20)))
    outputs = [await p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()

    pairs = [pair for result in local for pair in result]
    for out, _ in outputs:
        pairs.extend(_ack_pairs(out.decode()))
        conflicts += _conflicts(out.decode())
    total = 4 * 2 * 15 + 20 * 6
    assert len(pairs) == total
    acked = dict(pairs)
    assert len(acked) == total, "a seq was acknowledged twice"
    assert len({payload for _, payload in pairs}) == total

    rows = [r async for batch in store.read("shared") for r in batch]
    await store.aclose()
    assert [r.seq for r in rows] == list(range(1, total + 1))
    contents = [json.loads(r.data)["content"] for r in rows]
    assert len(set(contents)) == len(contents), "an event is stored twice"
    assert dict(zip((r.seq for r in rows), contents, strict=True)) == acked

    # the writers really ran at the same time: they raced (conflicts), this process
    # started before the children were done, and the children's appends interleave
    assert conflicts > 0, "no append ever conflicted: the writers did not overlap"
    children = 4 * 2 * 15
    assert min(first_heads) < children, f"the children were done first: {sorted(first_heads)}"
    spans = {}
    for row, content in zip(rows, contents, strict=True):
        if content.startswith("p"):
            first, _ = spans.get(content[:2], (row.seq, row.seq))
            spans[content[:2]] = (first, row.seq)
    ordered = sorted(spans.values())
    assert any(a[1] > b[0] for a, b in itertools.pairwise(ordered)), (
        f"each child process ran alone: {spans}"
    )


async def test_writer_killed_with_sigkill_loses_nothing_acknowledged(
    durable_url: str, writer_script: Path
) -> None:
    store = open_store(durable_url)
    await store.create(SessionRecord(id="victim"))
    await store.aclose()
    proc = subprocess.Popen(
        [sys.executable, str(writer_script), durable_url, "victim", "w", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while len(lines) < 150 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    proc.send_signal(signal.SIGKILL)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    acked = _acks("".join(lines) + rest)
    assert len(acked) >= 150, err

    with warnings.catch_warnings():
        # a torn last line of the JSONL backend is moved aside and reported
        warnings.simplefilter("ignore", StoreRepairWarning)
        reopened = open_store(durable_url)
        rows = [r async for batch in reopened.read("victim") for r in batch]
        head = (await reopened.get("victim")).head
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert head == len(rows) >= max(acked)
    got = {r.seq: json.loads(r.data)["content"] for r in rows}
    for seq, payload in acked.items():
        assert got[seq] == payload
    assert (
        await reopened.append("victim", [NewEvent("message", '{"after": "crash"}', 1.0)], head)
        == head + 1
    )
    await reopened.aclose()


async def test_a_second_store_object_sees_appends_at_once(durable_url: str) -> None:
    a = open_store(durable_url)
    b = open_store(durable_url)
    await a.create(SessionRecord(id="s"))
    assert await a.append("s", [NewEvent("message", '{"n": 1}', 1.0)], 0) == 1
    assert (await b.get("s")).head == 1
    assert await b.append("s", [NewEvent("message", '{"n": 2}', 1.0)], 1) == 2
    try:
        await a.append("s", [NewEvent("message", '{"n": "stale"}', 1.0)], 1)
        raise AssertionError("a stale head must conflict")
    except ConflictError:
        pass
    rows = [r async for batch in a.read("s") for r in batch]
    assert [json.loads(r.data)["n"] for r in rows] == [1, 2]
    await a.aclose()
    await b.aclose()
