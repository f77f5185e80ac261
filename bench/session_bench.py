"""Session benchmark: what ChatSession adds on top of the store.

Usage:
    python bench/session_bench.py --sizes 100,1000,10000 --json OUT [--turns 200]

With the ``scripted`` model (no delay) on the SQLite default, per N (messages
already in the session):

- ``turn_p50`` / ``turn_p99``: one ``query()`` (a turn: turn_start + user
  message, then assistant message + usage + turn_end: two appends);
- ``raw_p50``: the same two appends done directly on the store;
- ``overhead_p50``: ``turn_p50 - raw_p50``, what the session and agent add;
- ``resume``: ``ChatSession.resume(...).open()`` with a new store object
  (read, decode and fold the whole log), then the first ``get_usage()`` and
  ``get_context_info()`` (usage totals are summed when first read, so they
  are part of the figure); ``resume_open`` is the ``open()`` alone;
- ``floor_read``: bare ``sqlite3`` reading the session's event rows
  (``fetchall``, no objects built): what reading the log costs at least;
- ``readme_read``: the README's read example, ``store.read`` then
  ``fold_rows(rows)`` (what a resume does, without the session);
  ``read_fold_decode``: the same read, then ``fold(decode(rows))``;
- ``resume_memory`` / ``memory_ratio``: bytes held by the resumed session
  (tracemalloc), and against the JSON size of its events.

Targets (issue 4): overhead <= 0.5 ms at 10,000 and flat; resume of 10,000
<= 50 ms; memory <= 3 x the JSON size.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

from chatsession import Agent, ChatSession, ScriptedLLM, SessionRecord, open_store
from chatsession.log import (
    Message,
    MessageEntry,
    TurnEndEntry,
    TurnStartEntry,
    Usage,
    UsageEntry,
    decode,
    encode,
    fold,
    fold_rows,
)

TEXT = "The quick brown fox jumps over the lazy dog while the session keeps every turn. " * 2

Row = dict[str, Any]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def turn_rows(i: int) -> tuple[list[Any], list[Any]]:
    """The two appends of one turn, as the session writes them."""
    turn = uuid.uuid4().hex
    first = [
        encode(TurnStartEntry(turn_id=turn)),
        encode(MessageEntry(turn_id=turn, data=Message(role="user", content=f"{i} {TEXT}"))),
    ]
    second = [
        encode(
            MessageEntry(
                turn_id=turn, data=Message(role="assistant", content=f"You said: {i} {TEXT}")
            )
        ),
        encode(
            UsageEntry(
                turn_id=turn,
                data=Usage(
                    model="scripted", prompt_tokens=30, completion_tokens=32, total_tokens=62
                ),
            )
        ),
        encode(TurnEndEntry(turn_id=turn)),
    ]
    return first, second


async def fill(url: str, session_id: str, messages: int) -> None:
    async with open_store(url) as store:
        await store.create(SessionRecord(id=session_id))
        head = 0
        batch: list[Any] = []
        for i in range(messages // 2):
            first, second = turn_rows(i)
            batch += first + second
            if len(batch) >= 1000:
                head = await store.append(session_id, batch, head)
                batch = []
        if batch:
            await store.append(session_id, batch, head)


def agent() -> Agent:
    # compaction is off: the benchmark measures the steady per-turn cost
    return Agent(ScriptedLLM(context_window=10**9))


async def bench_size(url: str, n: int, turns: int) -> list[Row]:
    rows: list[Row] = []

    def add(metric: str, value: float, unit: str) -> None:
        rows.append({"backend": "sqlite", "n": n, "metric": metric, "value": value, "unit": unit})

    session_id = f"bench-{n}"
    log(f"[n={n}] filling {n} messages")
    await fill(url, session_id, n)

    log(f"[n={n}] floor: bare sqlite3 read of the events")
    path = url.removeprefix("sqlite:///")
    floors = []
    for _ in range(7 if url.startswith("sqlite:///") else 0):
        db = sqlite3.connect(path)
        start = time.perf_counter_ns()
        got = db.execute(
            "SELECT seq, type, ts, turn_id, data, v FROM events WHERE session_pk = "
            "(SELECT pk FROM sessions WHERE id = ?) ORDER BY seq",
            (session_id,),
        ).fetchall()
        floors.append((time.perf_counter_ns() - start) / 1e6)
        db.close()
        assert len(got) == n // 2 * 5, len(got)
    if floors:
        add("floor_read", statistics.median(floors), "ms")

    log(f"[n={n}] resume")
    resumes, opens = [], []
    for _ in range(7):
        gc.collect()
        start = time.perf_counter_ns()
        session = await ChatSession.resume(
            agent(), session_id, store=url, compaction_threshold=None
        ).open()
        opened = time.perf_counter_ns()
        # what a client shows on resume: the usage totals and the context use
        usage = await session.get_usage()
        await session.get_context_info()
        done = time.perf_counter_ns()
        resumes.append((done - start) / 1e6)
        opens.append((opened - start) / 1e6)
        assert len(session.history) == n, len(session.history)
        assert usage.calls == n // 2, usage.calls
        await session.close()
    add("resume", statistics.median(resumes), "ms")
    add("resume_open", statistics.median(opens), "ms")

    log(f"[n={n}] the README's read: store.read + fold_rows (and fold(decode(rows)))")
    documented, decoded = [], []
    async with open_store(url) as store:
        for _ in range(7):
            gc.collect()
            start = time.perf_counter_ns()
            got = [row async for batch in store.read(session_id) for row in batch]
            read = time.perf_counter_ns()
            folded = fold_rows(got)
            documented.append((time.perf_counter_ns() - start) / 1e6)
            gc.collect()
            again = time.perf_counter_ns()
            assert len(fold(decode(got)).history) == len(folded.history) == n
            decoded.append((time.perf_counter_ns() - again + read - start) / 1e6)
    add("readme_read", statistics.median(documented), "ms")
    add("read_fold_decode", statistics.median(decoded), "ms")

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    session = await ChatSession.resume(
        agent(), session_id, store=url, compaction_threshold=None
    ).open()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    events = await session.read_events()
    json_bytes = sum(len(e.model_dump_json().encode()) for e in events)
    add("resume_memory", held, "bytes")
    add("memory_ratio", held / json_bytes, "x")

    log(f"[n={n}] {turns} turns")
    for i in range(10):  # warm-up
        await session.query(f"warm {i} {TEXT}")
    times = []
    for i in range(turns):
        start = time.perf_counter_ns()
        await session.query(f"{i} {TEXT}")
        times.append((time.perf_counter_ns() - start) / 1e6)
    await session.close()

    log(f"[n={n}] {turns} raw turns")
    raw = []
    async with open_store(url) as store:
        head = (await store.get(session_id)).head
        for i in range(turns):
            first, second = turn_rows(i)
            start = time.perf_counter_ns()
            head = await store.append(session_id, first, head)
            head = await store.append(session_id, second, head)
            raw.append((time.perf_counter_ns() - start) / 1e6)
    add("turn_p50", statistics.median(times), "ms")
    add("turn_p99", sorted(times)[int(0.99 * (len(times) - 1))], "ms")
    add("raw_p50", statistics.median(raw), "ms")
    add("overhead_p50", statistics.median(times) - statistics.median(raw), "ms")
    return rows


def report(rows: list[Row]) -> str:
    sizes = sorted({r["n"] for r in rows})
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    by = {(r["metric"], r["n"]): r for r in rows}
    lines = ["| metric | unit | " + " | ".join(f"N={n:,}" for n in sizes) + " |"]
    lines.append("| --- | --- | " + " | ".join("---:" for _ in sizes) + " |")
    for metric in metrics:
        unit = next(r["unit"] for r in rows if r["metric"] == metric)
        form = "{:,.0f}" if unit == "bytes" else "{:.3f}"
        cells = [form.format(by[(metric, n)]["value"]) if (metric, n) in by else "" for n in sizes]
        lines.append(f"| {metric} | {unit} | " + " | ".join(cells) + " |")
    top = sizes[-1]
    checks = [
        ("overhead_p50", 0.5, "turn overhead over the raw appends <= 0.5 ms"),
        ("resume", 50.0, "resume <= 50 ms"),
        ("memory_ratio", 3.0, "memory held <= 3 x the events' JSON"),
    ]
    lines.append("")
    for metric, limit, text in checks:
        if (metric, top) in by:
            value = by[(metric, top)]["value"]
            verdict = "PASS" if value <= limit else "FAIL"
            lines.append(f"- {verdict}: {text} at N={top:,} (measured {value:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument(
        "--store", help="a store URL (default: a new SQLite file in a temporary directory)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be integers")
    if not sizes or any(n < 2 or n % 2 for n in sizes):
        parser.error("--sizes must be even message counts of at least 2")
    url = args.store or f"sqlite:///{tempfile.mkdtemp(prefix='chatsession-bench-')}/bench.db"
    rows: list[Row] = []
    for n in sizes:
        rows.extend(asyncio.run(bench_size(url, n, args.turns)))
    print(report(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
