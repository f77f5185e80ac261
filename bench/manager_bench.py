"""SessionManager benchmark: many users' sessions on one store.

Usage::

    python bench/manager_bench.py --backend sqlite|redis|postgres|URL \\
        [--sessions 100000] [--users 1000] [--checkpoint 10000] [--concurrency 16] \\
        [--lists 200] [--page 10] [--json OUT]

Sessions are made with ``SessionManager.create_session`` for ``--users``
users in turn (user ``i % users``), ``--concurrency`` creates in flight at a
time; every tenth gets a TTL of 900 s (long enough that none expires by
the real clock during the run: Redis expires natively), the rest 3600 s.
Figures:

- ``create_rate``: sessions created per second (the whole fill, and the fill
  up to ``--checkpoint`` as ``create_rate`` at that N);
- at N = ``--checkpoint`` and at N = ``--sessions``: ``list_p50`` / ``list_p99``,
  ``get_sessions_by_user(user, limit=--page)`` of ``--lists`` random users,
  one at a time (every user has at least a page at both sizes, so the same
  work is asked at both); ``stats_ms``, one ``stats()`` (median of 3); ``stats_peak_bytes`` and
  ``list_peak_bytes``, the peak of ``tracemalloc`` during them (memory the
  process holds must not grow with the number of sessions);
- at N = ``--sessions``: ``cleanup_rate``, expired sessions removed per second
  by ``cleanup_expired()`` once the manager's clock is 901 s ahead (the 10 %
  with a 900 s TTL);
- times are taken without ``tracemalloc`` (it slows allocation-heavy code
  several times); the peaks come from separate traced calls;
- ``rss_mb``: the process's peak resident memory at the end.

Targets (issue 11): ``list_p50`` <= 5 ms at ``--sessions``, and at most
1.5 x its value at ``--checkpoint``; memory flat: each peak at
``--sessions`` at most 1.5 x its value at ``--checkpoint``.

On Redis and PostgreSQL the run uses its own key prefix / schema, removed at
the end; SQLite a temporary file.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from store_bench import Backend

from chatsession import SessionManager

Row = dict[str, Any]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Clock:
    """The manager's clock: real time plus an offset the benchmark moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def peak(call: Callable[[], Awaitable[Any]]) -> tuple[float, int]:
    """(milliseconds, peak bytes traced) of one call."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    await call()
    took = (time.perf_counter() - start) * 1000
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return took, top


async def fill(
    manager: SessionManager, start: int, stop: int, users: int, concurrency: int
) -> float:
    """Create sessions ``start..stop``; returns sessions per second."""
    began = time.perf_counter()
    next_i = start
    done = 0

    async def worker() -> None:
        nonlocal next_i, done
        while next_i < stop:
            i = next_i
            next_i += 1
            await manager.create_session(
                f"user{i % users}",
                f"agent{i % 7}",
                ttl=900 if i % 10 == 0 else 3600,
                metadata={"n": i},
            )
            done += 1
            if done % 5000 == 0:
                log(f"  {start + done:,} sessions")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (stop - start) / (time.perf_counter() - began)


async def measure_at(
    manager: SessionManager, n: int, args: argparse.Namespace, add: Callable[..., None]
) -> None:
    users, lists, size = args.users, args.lists, args.page
    rng = random.Random(n)
    times = []
    for _ in range(lists):
        user = f"user{rng.randrange(users)}"
        start = time.perf_counter()
        page = await manager.get_sessions_by_user(user, limit=size)
        times.append((time.perf_counter() - start) * 1000)
        assert len(page.sessions) == size, (user, len(page.sessions))
    times.sort()
    add(n, "list_p50", statistics.median(times), "ms")
    add(n, "list_p99", times[int(0.99 * (len(times) - 1))], "ms")
    _, list_peak = await peak(lambda: manager.get_sessions_by_user("user1", limit=size))
    add(n, "list_peak_bytes", list_peak, "bytes")
    stats_times = []
    for _ in range(3):  # timed without tracing (tracemalloc slows allocations several x)
        start = time.perf_counter()
        await manager.stats()
        stats_times.append((time.perf_counter() - start) * 1000)
    add(n, "stats_ms", statistics.median(stats_times), "ms")
    _, stats_peak = await peak(manager.stats)  # the memory it holds, traced apart
    add(n, "stats_peak_bytes", stats_peak, "bytes")
    stats = await manager.stats()
    assert stats.sessions >= n, (stats.sessions, n)


async def run(args: argparse.Namespace) -> list[Row]:
    backend = Backend(args.backend)
    rows: list[Row] = []

    def add(n: int, metric: str, value: float, unit: str) -> None:
        rows.append(
            {"backend": backend.label, "n": n, "metric": metric, "value": value, "unit": unit}
        )
        log(f"  {metric} at {n:,}: {value:,.3f} {unit}")

    clock = Clock()
    url = backend.url_for(args.sessions, 0)
    try:
        async with SessionManager(url, clock=clock, idle_after=300) as manager:
            await manager.stop()  # no background cleanup: the benchmark runs it
            log(f"[{backend.label}] filling {args.checkpoint:,} sessions of {args.users:,} users")
            rate = await fill(manager, 0, args.checkpoint, args.users, args.concurrency)
            add(args.checkpoint, "create_rate", rate, "per_s")
            await measure_at(manager, args.checkpoint, args, add)
            log(f"[{backend.label}] filling up to {args.sessions:,}")
            rate = await fill(manager, args.checkpoint, args.sessions, args.users, args.concurrency)
            add(args.sessions, "create_rate", rate, "per_s")
            await measure_at(manager, args.sessions, args, add)
            log(f"[{backend.label}] cleanup of the expired tenth")
            clock.offset = 901.0
            start = time.perf_counter()  # timed without tracing; its memory is in rss_mb
            removed = await manager.cleanup_expired()
            took = (time.perf_counter() - start) * 1000
            expired = args.sessions // 10
            assert removed == expired, (removed, expired)
            assert await manager.cleanup_expired() == 0  # nothing left: counts 0
            add(args.sessions, "cleanup_rate", expired / (took / 1000), "per_s")
            stats = await manager.stats()
            assert stats.sessions == args.sessions - expired, stats.sessions
    finally:
        await backend.cleanup()
    add(args.sessions, "rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")
    return rows


def report(rows: list[Row], small: int, large: int) -> str:
    by = {(r["metric"], r["n"]): r["value"] for r in rows}
    sizes = sorted({r["n"] for r in rows})
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    units = {r["metric"]: r["unit"] for r in rows}
    lines = ["| metric | unit | " + " | ".join(f"N={n:,}" for n in sizes) + " |"]
    lines.append("| --- | --- | " + " | ".join("---:" for _ in sizes) + " |")
    for metric in metrics:
        form = "{:,.0f}" if units[metric] in ("bytes", "per_s") else "{:,.3f}"
        cells = [form.format(by[(metric, n)]) if (metric, n) in by else "" for n in sizes]
        lines.append(f"| {metric} | {units[metric]} | " + " | ".join(cells) + " |")
    lines.append("")
    checks = [
        ("get_sessions_by_user p50 <= 5 ms", by.get(("list_p50", large)), 5.0),
        (
            "get_sessions_by_user p50 flat: N=large <= 1.5 x N=small",
            by.get(("list_p50", large), 0) / max(by.get(("list_p50", small), 1e-9), 1e-9),
            1.5,
        ),
    ]
    for metric in ("stats_peak_bytes", "list_peak_bytes"):
        checks.append(
            (
                f"memory flat: {metric} N=large <= 1.5 x N=small",
                by.get((metric, large), 0) / max(by.get((metric, small), 1), 1),
                1.5,
            )
        )
    for text, value, limit in checks:
        if value is None:
            continue
        verdict = "PASS" if value <= limit else "FAIL"
        lines.append(f"- {verdict}: {text} (measured {value:.3f}, limit {limit:g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="sqlite")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--checkpoint", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--lists", type=int, default=200)
    parser.add_argument("--page", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not 0 < args.checkpoint < args.sessions or args.users < 1 or args.concurrency < 1:
        parser.error("need 0 < --checkpoint < --sessions, --users >= 1, --concurrency >= 1")
    if args.page < 1 or args.checkpoint < args.users * args.page:
        parser.error("need --page >= 1 and --checkpoint >= --users x --page (a full page each)")
    rows = asyncio.run(run(args))
    print(report(rows, args.checkpoint, args.sessions))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
