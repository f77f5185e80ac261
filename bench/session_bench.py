"""Session benchmark: what ChatSession costs on top of the store, with floors in the same run.

Usage:
    python bench/session_bench.py --sizes 100,10000,100000 --json OUT [--turns 200]

On the SQLite default, per N (messages already in a session; a turn is five
events: turn_start, the user's message, the answer, its usage, turn_end):

- ``floor_read``: bare ``sqlite3`` reading every event row of the session
  (``fetchall``, no objects built): the least reading the log can cost;
- ``load_messages``: the README's read, ``store.read`` then ``fold_rows`` into
  messages; ``load_vs_floor`` against ``floor_read`` (target <= 1.5);
- ``resume_cold``: ``await ChatSession.resume(...)`` of a session with no
  snapshot (the whole log is read; a snapshot is then stored);
- ``resume``: the same with the snapshot there (it names where the context's
  messages are; they and the events after the snapshot are read);
  ``resume_vs_floor`` against the bare read of those rows, for an uncompacted
  session all of them (target <= 1.5);
- ``resume_compacted``: resume of a session of N messages whose context was
  compacted (a summary and the last 4 messages) (target <= 10 ms and flat);
  ``compacted_memory``: bytes it holds once resumed (flat: proportional to the
  context, not the history);
- ``fork``: ``fork_session()`` at the head of an open session (target <= 1 ms
  and flat: nothing of the shared history is read);
- ``turn_p50`` / ``turn_p99``: one ``query()`` with the ``scripted`` model,
  taking and giving up the session's lease as by default; ``raw_p50``: the
  same two appends done directly on the store; ``overhead_p50`` their
  difference (target <= 0.25 ms); ``overhead_linger_p50`` the same with
  ``lease_linger=5`` (turns in quick succession keep the lease);
- ``memory_ratio``: bytes held by a resumed uncompacted session against the
  JSON size of its events (target <= 3).
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

from chatsession import Agent, ChatSession, ScriptedLLM, SessionRecord, Store, open_store
from chatsession.log import (
    Compaction,
    CompactionEntry,
    Message,
    MessageEntry,
    TurnEndEntry,
    TurnStartEntry,
    Usage,
    UsageEntry,
    encode,
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


async def fill(url: str, session_id: str, messages: int, *, compacted: bool = False) -> None:
    """A session of ``messages`` messages; ``compacted``: all but the last 4 summarised."""
    async with open_store(url) as store:
        await store.create(SessionRecord(id=session_id))
        head = 0
        batch: list[Any] = []
        turns = messages // 2
        for i in range(turns):
            if compacted and i == turns - 2:  # a summary, then the last two turns
                batch.append(
                    encode(
                        CompactionEntry(data=Compaction(summary=TEXT, upto_seq=head + len(batch)))
                    )
                )
            first, second = turn_rows(i)
            batch += first + second
            if len(batch) >= 1000:
                head = await store.append(session_id, batch, head)
                batch = []
        if batch:
            await store.append(session_id, batch, head)


def agent() -> Agent:
    # compaction is off: the benchmark measures the steady cost
    return Agent(ScriptedLLM(context_window=10**9, keep_requests=0))


def median_ms(samples: list[int]) -> float:
    return statistics.median(samples) / 1e6


def floor_read(path: str, session_id: str) -> tuple[float, int]:
    """Bare sqlite3 reading every event row of a session (median ms, rows)."""
    times = []
    count = 0
    for _ in range(5):
        db = sqlite3.connect(path)
        start = time.perf_counter_ns()
        got = db.execute(
            "SELECT seq, type, ts, turn_id, data, v, event_id FROM events WHERE session_pk = "
            "(SELECT pk FROM sessions WHERE id = ?) ORDER BY seq",
            (session_id,),
        ).fetchall()
        times.append(time.perf_counter_ns() - start)
        count = len(got)
        db.close()
    return median_ms(times), count


async def resume_once(store: Store, session_id: str) -> tuple[int, ChatSession]:
    """Resume on an open store object, as a server does (its connection is made)."""
    gc.collect()
    start = time.perf_counter_ns()
    session = await ChatSession.resume(agent(), session_id, store=store, compaction_threshold=None)
    return time.perf_counter_ns() - start, session


async def bench_size(url: str, path: str, n: int, turns: int) -> list[Row]:
    rows: list[Row] = []
    samples = 7 if n <= 10_000 else 3

    def add(metric: str, value: float, unit: str) -> None:
        rows.append({"backend": "sqlite", "n": n, "metric": metric, "value": value, "unit": unit})

    plain, packed = f"u-{n}", f"c-{n}"
    log(f"[n={n}] filling two sessions of {n} messages (one compacted)")
    await fill(url, plain, n)
    await fill(url, packed, n, compacted=True)

    floor, count = floor_read(path, plain)
    assert count == n // 2 * 5, count
    add("floor_read", floor, "ms")

    log(f"[n={n}] the README's read: store.read + fold_rows")
    loads = []
    async with open_store(url) as store:
        for _ in range(samples):
            gc.collect()
            start = time.perf_counter_ns()
            got = [row async for batch in store.read(plain) for row in batch]
            messages = fold_rows(got).messages
            loads.append(time.perf_counter_ns() - start)
            assert len(messages) == n
    add("load_messages", median_ms(loads), "ms")
    add("load_vs_floor", median_ms(loads) / floor, "x")

    log(f"[n={n}] resume: cold (no snapshot), then from the snapshot")
    async with open_store(url) as store:
        await store.get(plain)  # connect
        cold, session = await resume_once(store, plain)
        await session.close()
        add("resume_cold", cold / 1e6, "ms")
        warm = []
        for _ in range(samples):
            took, session = await resume_once(store, plain)
            assert len(session.messages) == n and session.conversation.history is None
            warm.append(took)
            await session.close()
        add("resume", median_ms(warm), "ms")
        add("resume_vs_floor", median_ms(warm) / floor, "x")

        log(f"[n={n}] resume of a compacted session")
        _, session = await resume_once(store, packed)  # the first open stores the snapshot
        await session.close()
        packed_times = []
        for _ in range(samples):
            took, session = await resume_once(store, packed)
            assert len(session.messages) == 5, len(session.messages)
            packed_times.append(took)
            await session.close()
        add("resume_compacted", median_ms(packed_times), "ms")
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        _, session = await resume_once(store, packed)
        gc.collect()
        add("compacted_memory", tracemalloc.get_traced_memory()[0] - before, "bytes")
        tracemalloc.stop()
        await session.close()

        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        _, session = await resume_once(store, plain)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        json_bytes = sum(
            [len(row.to_json().encode()) async for batch in store.read(plain) for row in batch]
        )
        add("memory_ratio", held / json_bytes, "x")

        log(f"[n={n}] fork at the head")
        forks = []
        for _ in range(samples):
            gc.collect()  # as for resume: time the fork, not a collection it happens to set off
            start = time.perf_counter_ns()
            fork = await session.fork_session()
            forks.append(time.perf_counter_ns() - start)
            assert len(fork.messages) == n
            await fork.close()
        add("fork", median_ms(forks), "ms")
        await session.close()

    for linger, metric in ((0.0, "overhead_p50"), (5.0, "overhead_linger_p50")):
        log(f"[n={n}] {turns} turns (lease_linger={linger})")
        async with ChatSession(
            agent(), plain, store=url, compaction_threshold=None, lease_linger=linger
        ) as session:
            for i in range(10):  # warm-up
                await session.query(f"warm {i} {TEXT}")
            times = []
            for i in range(turns):
                start = time.perf_counter_ns()
                await session.query(f"{i} {TEXT}")
                times.append(time.perf_counter_ns() - start)
        raw = []
        async with open_store(url) as store:
            head = (await store.get(plain)).head
            for i in range(turns):
                first, second = turn_rows(i)
                start = time.perf_counter_ns()
                head = await store.append(plain, first, head)
                head = await store.append(plain, second, head)
                raw.append(time.perf_counter_ns() - start)
        if linger == 0.0:
            add("turn_p50", median_ms(times), "ms")
            add("turn_p99", sorted(times)[int(0.99 * (len(times) - 1))] / 1e6, "ms")
            add("raw_p50", median_ms(raw), "ms")
        add(metric, median_ms(times) - median_ms(raw), "ms")
    return rows


TARGETS = [
    ("load_vs_floor", 1.5, "loading the history into messages <= 1.5 x the bare read"),
    ("resume_vs_floor", 1.5, "resume <= 1.5 x the bare read of the rows it needs"),
    ("resume_compacted", 10.0, "resume of a compacted session <= 10 ms"),
    ("fork", 1.0, "fork_session() <= 1 ms"),
    ("overhead_p50", 0.25, "turn overhead over the raw appends <= 0.25 ms"),
    ("memory_ratio", 3.0, "memory held <= 3 x the events' JSON"),
]


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
    lines.append("")
    for metric, limit, text in TARGETS:
        values = [by[(metric, n)]["value"] for n in sizes if (metric, n) in by]
        if values:
            worst = max(values)
            verdict = "PASS" if worst <= limit else "FAIL"
            lines.append(f"- {verdict}: {text} at every N (worst {worst:.3f})")
    for metric in ("resume_compacted", "fork", "compacted_memory"):
        values = [by[(metric, n)]["value"] for n in sizes if (metric, n) in by]
        if len(values) > 1:
            flat = values[-1] <= 2 * max(values[0], 1e-9)
            verdict = "PASS" if flat else "FAIL"
            lines.append(
                f"- {verdict}: {metric} flat in N (largest N {values[-1]:.3f} vs smallest "
                f"{values[0]:.3f}, limit 2 x)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100,10000,100000")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be integers")
    if not sizes or any(n < 12 or n % 2 for n in sizes):
        parser.error("--sizes must be even message counts of at least 12")
    path = f"{tempfile.mkdtemp(prefix='chatsession-bench-')}/bench.db"
    url = f"sqlite:///{path}"
    rows: list[Row] = []
    for n in sizes:
        rows.extend(asyncio.run(bench_size(url, path, n, args.turns)))
    print(report(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
