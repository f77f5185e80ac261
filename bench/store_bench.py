"""Storage benchmark: append, load, fork and size, per history length.

Usage:
    python bench/store_bench.py --backend URL_OR_NAME --sizes 100,1000,10000 --json OUT

``--backend`` takes a store URL or a shorthand: ``memory``, ``sqlite`` and
``file`` (in a temporary directory), ``redis`` (``CHATSESSION_TEST_REDIS_URL``
or redis://127.0.0.1:6379/15, under a unique key prefix removed afterwards),
``postgres`` (``CHATSESSION_TEST_POSTGRES_URL`` or
postgresql://postgres@127.0.0.1:5432/test, in a unique schema dropped
afterwards). Add ``?synchronous_commit=off`` to a PostgreSQL URL to measure
that mode (the floor uses the same setting).

For each N (messages already in the session) it measures:

- ``append_p50`` / ``append_p99``: one turn (a user and an assistant message,
  ~200-byte texts in chatsession's real event format) in one ``append`` call,
  over ``--appends`` sequential appends;
- ``load``: reading the whole history with a new store object (its
  connection is opened and warmed on a tiny read first, reported as ``open``);
- ``fork`` and ``fork_bytes``: forking at the head, and what it adds to the
  storage;
- ``bytes_per_message`` and ``size_ratio``: storage used per message, and
  against the bytes of the events' JSON (``StoredEvent.to_json``).

On Redis and PostgreSQL it also measures the floor in the same run: a bare
round trip storing a turn (``RPUSH`` of two items; an ``INSERT`` of two rows in
one transaction) and a bare read of the whole history (``LRANGE``; ``SELECT``),
and reports ratios to it.

It prints a table with the targets and writes JSON lines
``{"backend", "n", "metric", "value", "unit"}`` to ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from chatsession import NewEvent, SessionRecord, Store, open_store
from chatsession.log import Message, MessageEntry, encode

REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get(
    "CHATSESSION_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TEXT = (
    "The quick brown fox jumps over the lazy dog while the session keeps every turn; "
    "nothing acknowledged is lost, and a fork costs the same at any length of history. "
)[:200]

Row = dict[str, Any]


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays the table."""
    print(message, file=sys.stderr, flush=True)


def turn_events(i: int) -> list[NewEvent]:
    """One turn: a user and an assistant message in the real event format."""
    turn = uuid.uuid4().hex
    return [
        encode(MessageEntry(turn_id=turn, data=Message(role="user", content=f"{i}: {TEXT}"))),
        encode(MessageEntry(turn_id=turn, data=Message(role="assistant", content=f"{i}: {TEXT}"))),
    ]


def with_query(url: str, **query: str) -> str:
    parts = urlsplit(url)
    merged = dict(parse_qsl(parts.query))
    merged.update(query)
    return urlunsplit(parts._replace(query="&".join(f"{k}={v}" for k, v in merged.items())))


class Target:
    """Where the data lives, how big it is, and how to clean it up."""

    def __init__(self, spec: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="chatsession-bench-"))
        self.namespace = ""
        shorthand = {
            "memory": "memory://",
            "sqlite": f"sqlite:///{self.tmp}/bench.db",
            "file": f"file://{self.tmp}/sessions",
        }
        if spec in shorthand:
            self.url = shorthand[spec]
        elif spec == "redis" or spec.startswith(("redis://", "rediss://")):
            self.namespace = f"csbench-{uuid.uuid4().hex[:8]}:"
            self.url = with_query(REDIS_URL if spec == "redis" else spec, prefix=self.namespace)
        elif spec == "postgres" or spec.startswith(("postgresql://", "postgres://")):
            self.namespace = f"csbench_{uuid.uuid4().hex[:8]}"
            self.url = with_query(
                POSTGRES_URL if spec == "postgres" else spec, schema=self.namespace
            )
        else:
            self.url = spec
        self.scheme = urlsplit(self.url).scheme
        self.name = {"postgresql": "postgres", "rediss": "redis"}.get(self.scheme, self.scheme)
        if self.scheme == "sqlite":
            self.name = "sqlite"

    def fresh(self, n: int) -> None:
        """Measure each size in its own file or folder (sizes stay comparable)."""
        if self.scheme == "sqlite" and str(self.tmp) in self.url:
            self.url = f"sqlite:///{self.tmp}/bench-{n}.db"
        elif self.scheme == "file" and str(self.tmp) in self.url:
            self.url = f"file://{self.tmp}/sessions-{n}"

    def options(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.url).query))

    async def size(self) -> int:
        """Bytes of storage in use (files, Redis memory, PostgreSQL relations)."""
        if self.scheme == "sqlite":
            # the WAL is a transient journal (checkpointed back into the file
            # every ~4 MB): measure the database after a checkpoint, and report
            # the WAL's size separately (wal_bytes)
            import sqlite3

            db = sqlite3.connect(urlsplit(self.url).path[1:])
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            size = db.execute("PRAGMA page_size").fetchone()[0]
            db.close()
            return int((pages - free) * size)
        if self.scheme == "file":
            root = Path(urlsplit(self.url).path)
            return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        if self.name == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(REDIS_URL)
            total = 0
            async for key in client.scan_iter(match=f"*{self.namespace}*", count=1000):
                total += int(await client.memory_usage(key) or 0)
            await client.aclose()
            return total
        if self.name == "postgres":
            import asyncpg

            conn = await asyncpg.connect(POSTGRES_URL)
            total = await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relkind = 'r'",
                self.namespace,
            )
            await conn.close()
            return int(total)
        return 0

    async def cleanup(self) -> None:
        if self.name == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(REDIS_URL)
            keys = [k async for k in client.scan_iter(match=f"*{self.namespace}*", count=1000)]
            if keys:
                await client.delete(*keys)
            await client.aclose()
        elif self.name == "postgres":
            import asyncpg

            conn = await asyncpg.connect(POSTGRES_URL)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.namespace}" CASCADE')
            await conn.close()


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter_ns()
    await fn()
    return (time.perf_counter_ns() - start) / 1e6


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def fill(store: Store, session_id: str, n_messages: int) -> int:
    await store.create(SessionRecord(id=session_id))
    head = 0
    batch: list[NewEvent] = []
    for i in range(n_messages // 2):
        batch.extend(turn_events(i))
        if len(batch) >= 1000:
            head = await store.append(session_id, batch, head)
            batch = []
    if batch:
        head = await store.append(session_id, batch, head)
    return head


class Floor:
    """Bare driver round trips: the least a backend could cost."""

    def __init__(self, target: Target) -> None:
        self.target = target

    async def measure(self, n: int, appends: int) -> dict[str, float]:
        if self.target.name == "redis":
            return await self._redis(n, appends)
        if self.target.name == "postgres":
            return await self._postgres(n, appends)
        return {}

    async def _redis(self, n: int, appends: int) -> dict[str, float]:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        key = f"{self.target.namespace}floor:{n}"
        items = [e.data for i in range(n // 2) for e in turn_events(i)]
        for start in range(0, len(items), 1000):
            await client.rpush(key, *items[start : start + 1000])
        turn = [e.data for e in turn_events(0)]
        times = [await timed(lambda: client.rpush(key, *turn)) for _ in range(appends)]
        await client.ltrim(key, 0, n - 1)
        reads = [await timed(lambda: client.lrange(key, 0, -1)) for _ in range(5)]
        await client.delete(key)
        await client.aclose()
        return {"append_p50": statistics.median(times), "load": statistics.median(reads)}

    async def _postgres(self, n: int, appends: int) -> dict[str, float]:
        import asyncpg

        sync = self.target.options().get("synchronous_commit")
        conn = await asyncpg.connect(POSTGRES_URL)
        if sync:
            await conn.execute(f"SET synchronous_commit = {sync}")
        table = f"floor_{uuid.uuid4().hex[:8]}"
        # the same row shape as chatsession's events table, without its logic
        await conn.execute(
            f"CREATE TABLE {table} (id bigint NOT NULL, seq bigint NOT NULL, type text NOT NULL, "
            "ts double precision NOT NULL, turn_id text, v smallint NOT NULL, data text NOT NULL, "
            "PRIMARY KEY (id, seq))"
        )
        rows = [
            (1, i + 1, e.type, e.ts, e.turn_id, e.schema_version, e.data)
            for i, e in enumerate(e for t in range(n // 2) for e in turn_events(t))
        ]
        await conn.copy_records_to_table(table, records=rows)
        seq = len(rows)
        turn = turn_events(0)
        times = []
        for _ in range(appends):

            async def insert() -> None:
                nonlocal seq
                async with conn.transaction():
                    await conn.executemany(
                        f"INSERT INTO {table} (id, seq, type, ts, turn_id, v, data) "
                        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        [
                            (1, seq + k + 1, e.type, e.ts, e.turn_id, e.schema_version, e.data)
                            for k, e in enumerate(turn)
                        ],
                    )
                seq += 2

            times.append(await timed(insert))
        await conn.execute(f"DELETE FROM {table} WHERE seq > $1", n)
        reads = [
            await timed(
                lambda: conn.fetch(
                    f"SELECT seq, type, ts, turn_id, data, v FROM {table} WHERE id = 1 ORDER BY seq"
                )
            )
            for _ in range(5)
        ]
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()
        return {"append_p50": statistics.median(times), "load": statistics.median(reads)}


async def bench_size(target: Target, n: int, appends: int) -> list[Row]:
    rows: list[Row] = []

    def add(metric: str, value: float, unit: str) -> None:
        rows.append(
            {"backend": target.name, "n": n, "metric": metric, "value": value, "unit": unit}
        )

    session_id = f"bench-{n}-{uuid.uuid4().hex[:6]}"
    target.fresh(n)
    store = open_store(target.url)
    log(f"[{target.name} n={n}] filling {n} messages")
    head = await fill(store, session_id, n)

    log(f"[{target.name} n={n}] {appends} appends of one turn")
    turns = [turn_events(i) for i in range(appends + 20)]
    for events in turns[:20]:  # warm-up
        head = await store.append(session_id, events, head)
    times = []
    for events in turns[20:]:
        start = time.perf_counter_ns()
        head = await store.append(session_id, events, head)
        times.append((time.perf_counter_ns() - start) / 1e6)
    add("append_p50", statistics.median(times), "ms")
    add("append_p99", percentile(times, 99), "ms")

    # the measured session now holds n + 2 * (appends + 20) messages: trim the
    # load measurement to exactly n messages with upto_seq
    gc.collect()
    log(f"[{target.name} n={n}] loading {n} messages with a new store object")
    loads, opens = [], []
    for _ in range(5):
        # memory:// lives in one object only: it is reloaded from itself
        fresh = store if target.scheme == "memory" else open_store(target.url)
        opens.append(await timed(lambda fresh=fresh: fresh.get(session_id)))

        async def load(fresh: Store = fresh) -> int:
            count = 0
            async for batch in fresh.read(session_id, upto_seq=n):
                count += len(batch)
            assert count == n, count
            return count

        loads.append(await timed(load))
        if fresh is not store:
            await fresh.aclose()
    add("open", statistics.median(opens), "ms")
    add("load", statistics.median(loads), "ms")

    log(f"[{target.name} n={n}] fork")
    await asyncio.sleep(0.05)
    before = await target.size()
    fork_times = []
    for i in range(5):
        fork_id = f"{session_id}-f{i}"
        fork_times.append(
            await timed(lambda fid=fork_id: store.fork(session_id, head, SessionRecord(id=fid)))
        )
    after = await target.size()
    add("fork", statistics.median(fork_times), "ms")
    add("fork_bytes", max(0, after - before) / 5, "bytes")

    events = [r async for batch in store.read(session_id) for r in batch]
    json_bytes = sum(len(r.to_json().encode()) for r in events)
    size = await target.size()
    if size:
        add("bytes_per_message", size / len(events), "bytes")
        add("size_ratio", size / json_bytes, "x")
    await store.delete(session_id)
    for i in range(5):
        await store.delete(f"{session_id}-f{i}")
    await store.aclose()

    floor = await Floor(target).measure(n, appends)
    for metric, value in floor.items():
        add(f"floor_{metric}", value, "ms")
        mine = next(r["value"] for r in rows if r["metric"] == metric)
        add(f"{metric}_vs_floor", mine / value if value else 0.0, "x")
    return rows


TARGETS: dict[str, list[tuple[str, str, float, str]]] = {
    # backend -> (metric, comparison, limit, description)
    "sqlite": [
        ("append_p50@10000", "<=", 0.3, "append p50 <= 0.3 ms at N=10,000"),
        ("append_flat", "<=", 1.5, "append p50(10,000) <= 1.5 x p50(100)"),
        ("load@10000", "<=", 20.0, "load of 10,000 messages <= 20 ms"),
        ("fork_max", "<=", 1.0, "fork <= 1 ms at every N"),
        ("fork_bytes_max", "<=", 4096, "fork <= 4 KB extra at every N"),
        ("size_ratio@10000", "<=", 1.5, "bytes on disk <= 1.5 x the events' JSON"),
    ],
    "redis": [
        ("append_vs_floor_max", "<=", 5.0, "append p50 <= 5 x floor (RPUSH of 2)"),
        ("append_flat", "<=", 1.5, "append p50 flat in N"),
        ("load_vs_floor@10000", "<=", 2.0, "load of 10,000 <= 2 x floor (LRANGE)"),
        ("fork_max", "<=", 2.0, "fork <= 2 ms, constant in N"),
    ],
    "postgres": [
        ("append_vs_floor_max", "<=", 1.3, "append p50 <= 1.3 x floor (INSERT of 2 rows)"),
        ("append_flat", "<=", 1.5, "append p50 flat in N"),
        ("load_vs_floor@10000", "<=", 2.0, "load of 10,000 <= 2 x floor (SELECT)"),
        ("fork_max", "<=", 2.0, "fork <= 2 ms, constant in N"),
    ],
}


def derived(rows: list[Row]) -> dict[str, float]:
    """The figures the targets talk about."""
    by: dict[tuple[str, int], float] = {(r["metric"], r["n"]): r["value"] for r in rows}
    sizes = sorted({r["n"] for r in rows})
    out: dict[str, float] = {}
    for (metric, n), value in by.items():
        out[f"{metric}@{n}"] = value
    if sizes:
        lo, hi = sizes[0], sizes[-1]
        if ("append_p50", lo) in by and ("append_p50", hi) in by:
            out["append_flat"] = by[("append_p50", hi)] / by[("append_p50", lo)]
        for metric, name in (
            ("fork", "fork_max"),
            ("fork_bytes", "fork_bytes_max"),
            ("append_p50_vs_floor", "append_vs_floor_max"),
        ):
            values = [by[(metric, n)] for n in sizes if (metric, n) in by]
            if values:
                out[name] = max(values)
    return out


def report(target: Target, rows: list[Row]) -> str:
    sizes = sorted({r["n"] for r in rows})
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    units = {r["metric"]: r["unit"] for r in rows}
    by = {(r["metric"], r["n"]): r["value"] for r in rows}
    lines = [f"backend: {target.name} ({target.url})", ""]
    lines.append("| metric | unit | " + " | ".join(f"N={n:,}" for n in sizes) + " |")
    lines.append("| --- | --- | " + " | ".join("---:" for _ in sizes) + " |")
    for metric in metrics:
        cells = [f"{by[(metric, n)]:.3f}" if (metric, n) in by else "" for n in sizes]
        lines.append(f"| {metric} | {units[metric]} | " + " | ".join(cells) + " |")
    checks = TARGETS.get(target.name, [])
    if checks:
        values = derived(rows)
        lines.append("")
        for key, _, limit, text in checks:
            value = values.get(key)
            verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
            shown = "-" if value is None else f"{value:.3f}"
            lines.append(f"- {verdict}: {text} (measured {shown})")
    return "\n".join(lines)


async def run(spec: str, sizes: list[int], appends: int) -> tuple[Target, list[Row]]:
    target = Target(spec)
    rows: list[Row] = []
    try:
        for n in sizes:
            rows.extend(await bench_size(target, n, appends))
    finally:
        await target.cleanup()
    return target, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend", default="sqlite", help="store URL or memory/sqlite/file/redis/postgres"
    )
    parser.add_argument("--sizes", default="100,1000,10000", help="comma-separated message counts")
    parser.add_argument("--appends", type=int, default=200, help="timed appends per size (>= 200)")
    parser.add_argument("--json", type=Path, help="write JSON lines here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers, got {args.sizes!r}")
    if not sizes or any(n < 2 for n in sizes):
        parser.error("--sizes needs message counts of at least 2")
    if args.appends < 1:
        parser.error("--appends must be positive")
    target, rows = asyncio.run(run(args.backend, sizes, args.appends))
    print(report(target, rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
