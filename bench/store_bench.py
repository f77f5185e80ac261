"""Storage benchmark: append, load, fork and size, per history length.

Usage::

    python bench/store_bench.py --backend URL_OR_NAME --sizes 100,1000,10000 --json OUT
        [--appends 200] [--warmup 20] [--samples 15] [--repeat 1]

``--backend`` takes a store URL or a shorthand:

- ``memory``: ``memory://``;
- ``sqlite``: a new SQLite file per N in a temporary directory (removed afterwards);
- ``file``: a new JSONL folder per N in a temporary directory (removed afterwards);
- ``redis``: ``CHATSESSION_TEST_REDIS_URL`` or redis://127.0.0.1:6379/15;
- ``postgres``: ``CHATSESSION_TEST_POSTGRES_URL`` or postgresql://postgres@127.0.0.1:5432/test.

On Redis every N gets its own unique key ``prefix`` and on PostgreSQL its own
unique ``schema`` (also for full URLs: the benchmark never touches existing
data); all of them are removed at the end. A full ``sqlite:`` or ``file:`` URL
is used as given. Add ``?synchronous_commit=off`` to a PostgreSQL URL to
measure that mode (the floor's connection uses the same setting).

For each N (messages already in the measured session), in this order:

1. ``fill``: the session gets N messages (turns of a user and an assistant
   message, ~200-character texts, built with ``chatsession.log.encode`` so
   they are the real event format);
2. ``load``: ``--samples`` times, a new store object (``open_store(url)``)
   makes its first call (``get``: connection set-up, reported as ``open``),
   reads every batch of the history (``load``), reads it once more
   (``load_warm``) and is closed (``close``). ``load_cold`` is
   open + load + close. Medians; one untimed round first.
3. ``fork``: ``--samples`` timed forks at the head (N): ``fork`` is the
   median time; then ``--samples`` more with the storage measured around each:
   ``fork_bytes`` is the mean storage a fork adds, ``fork_bytes_max`` the
   largest single one.
4. ``append``: ``--warmup`` untimed then ``--appends`` timed appends of one
   turn (two events in one ``append`` call, ``expected_seq`` = the head):
   ``append_p50``, ``append_p99`` (nearest rank).
5. ``size``: storage in use for the whole store (the session, its forks and
   fixed overhead) as ``footprint``; ``bytes_per_message`` divides it by the
   session's messages (``messages``: N + 2 x (warmup + appends) by then) and ``size_ratio`` by the bytes of their JSON (the sum
   of ``len(StoredEvent.to_json())``).

How storage is measured:

- SQLite: ``footprint`` is the database file's size after
  ``PRAGMA wal_checkpoint(TRUNCATE)`` (so the WAL is empty and every page is
  in the file); ``footprint_raw`` is the database file plus its ``-wal`` file
  just before that checkpoint (the ``-shm`` index is not counted). Fork
  deltas are taken the same two ways (``fork_bytes`` / ``fork_bytes_raw``).
- file://: ``footprint`` is the allocated size of the folder (``du``:
  ``st_blocks * 512``), ``footprint_raw`` the sum of the files' sizes.
- Redis: the sum of ``MEMORY USAGE key SAMPLES 0`` over the prefix's keys.
- PostgreSQL: the sum of ``pg_total_relation_size`` (heap, indexes, TOAST)
  over the tables of the schema.
- memory://: not measured.

On SQLite, Redis and PostgreSQL a floor is measured in the same run,
interleaved with the store's own operations so that both see the same
background load. On SQLite it is bare ``sqlite3`` on the event loop's
thread, in a scratch file with the store's tables: one ``BEGIN IMMEDIATE``
transaction inserting the turn's two rows (with their event ids) and moving
the session's head, committed; one ``SELECT ... fetchall()`` of the N rows
from a new connection.
On Redis and PostgreSQL it is
one bare round trip that stores a turn (``RPUSH`` of the two events' JSON to a
scratch list; one ``INSERT`` statement of two rows into a scratch table
``(id bigint, seq bigint, data jsonb)``, i.e. one implicit transaction) and
one bare read of the N items (``LRANGE``; ``SELECT``). The floor's ``data``
column has the store's own column type (``jsonb``, as ``events.data``), so
the floor is the bare cost of storing and reading the same JSON, parsing and
printing by the server included. Every timing is also reported as its ratio
to the floor (``*_vs_floor``: appends and forks against the floor append,
loads against the floor read).

``--repeat R`` runs all of this R times (every size in turn, then again, so a
burst of load from other processes hits one run rather than one size), each
run on fresh storage, and reports for every figure the median over the runs
(ratios are taken within a run, where store and floor ran side by side).

Output: a plain-text (Markdown) table on stdout with PASS/FAIL per target,
progress on stderr, and JSON lines (one object
``{"backend", "n", "metric", "value", "unit"}`` per line) in ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from chatsession import NewEvent, SessionRecord, Store, StoredEvent, open_store
from chatsession.log import Message, MessageEntry, encode

REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get(
    "CHATSESSION_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
#: PostgreSQL URL options that the driver understands (kept for the floor).
PG_DRIVER_OPTIONS = {"sslmode", "application_name"}
TEXT = (
    "The quick brown fox jumps over the lazy dog while the session keeps every turn; "
    "nothing acknowledged is lost, and a fork costs the same at any length of history. "
    "Padding to two hundred characters."
)[:200]

Row = dict[str, Any]


def log(message: str) -> None:
    """Print progress on stderr (stdout is the table)."""
    print(message, file=sys.stderr, flush=True)


def ms_since(start: int) -> float:
    """Milliseconds since ``start`` (a ``perf_counter_ns`` reading)."""
    return (time.perf_counter_ns() - start) / 1e6


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    """Run ``fn`` once and return how long it took, in milliseconds."""
    start = time.perf_counter_ns()
    await fn()
    return ms_since(start)


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile ``p`` (0-100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(len * p / 100)
    return ordered[int(rank) - 1]


def turn_events(i: int) -> list[NewEvent]:
    """One turn: a user and an assistant message of ~200 characters, real format."""
    turn = uuid.uuid4().hex
    return [
        encode(MessageEntry(turn_id=turn, data=Message(role="user", content=f"{i:06d} {TEXT}"))),
        encode(
            MessageEntry(turn_id=turn, data=Message(role="assistant", content=f"{i:06d} {TEXT}"))
        ),
    ]


def history(n: int) -> list[NewEvent]:
    """``n`` messages: ``n // 2`` turns (and a lone user message when ``n`` is odd)."""
    events = [e for i in range(n // 2) for e in turn_events(i)]
    if n % 2:
        events.append(turn_events(n)[0])
    return events


def as_json(seq: int, event: NewEvent) -> str:
    """The JSON a store hands back for ``event`` at ``seq``, with its event id (the
    floors store this: every store must keep the id too)."""
    text = StoredEvent(
        seq, event.type, event.ts, event.turn_id, event.data, event.schema_version
    ).to_json()
    if event.event_id is None:
        return text
    return f'{text[:-1]},"id":{json.dumps(event.event_id)}}}'


def replace_query(url: str, drop: Callable[[str], bool], **extra: str) -> str:
    """``url`` without the query options ``drop`` selects, plus ``extra``."""
    parts = urlsplit(url)
    query = {k: v for k, v in parse_qsl(parts.query) if not drop(k)}
    query.update(extra)
    return urlunsplit(parts._replace(query=urlencode(query)))


def disk_usage(paths: Iterable[Path]) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the files under ``paths`` (like ``du``)."""
    apparent = allocated = 0
    for path in paths:
        if not path.exists():
            continue
        files = [path] if path.is_file() else [p for p in path.rglob("*")]
        dirs = [] if path.is_file() else [path]
        for p in files + dirs:
            st = p.lstat()
            if p.is_file():
                apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


# -- where the data lives ---------------------------------------------------------


class Footprint(Protocol):
    """Measures the storage a store object uses."""

    async def measure(self) -> tuple[int, int] | None:
        """(footprint, raw footprint) in bytes, or None when not measurable."""
        ...


@dataclass
class Backend:
    """A resolved ``--backend``: URLs per N, storage measurement and clean-up.

    Attributes:
        kind: memory, sqlite, file, redis, postgres (or another scheme).
        label: The ``backend`` field of the JSON rows.
        url: The URL as resolved (for one N, see ``url_for``).
    """

    spec: str
    kind: str = ""
    label: str = ""
    url: str = ""
    tmp: Path | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    namespaces: list[str] = field(default_factory=list)
    temporary: bool = False

    def __post_init__(self) -> None:
        spec = self.spec
        if spec in ("sqlite", "file"):
            self.tmp = Path(tempfile.mkdtemp(prefix="chatsession-bench-"))
            self.temporary = True
            spec = f"sqlite:///{self.tmp}/bench.db" if spec == "sqlite" else f"file://{self.tmp}"
        elif spec == "memory":
            spec = "memory://"
        elif spec == "redis":
            spec = REDIS_URL
        elif spec == "postgres":
            spec = POSTGRES_URL
        self.url = spec
        scheme = urlsplit(spec).scheme.lower()
        self.kind = {"postgresql": "postgres", "rediss": "redis"}.get(scheme, scheme)
        self.label = self.kind
        if self.kind == "postgres":
            sync = dict(parse_qsl(urlsplit(spec).query)).get("synchronous_commit", "on")
            if sync != "on":
                self.label = f"postgres-sync-{sync}"

    def url_for(self, n: int, run: int) -> str:
        """The URL to measure N with in run ``run`` (a fresh file, folder, prefix or schema)."""
        if self.kind == "sqlite" and self.temporary:
            return f"sqlite:///{self.tmp}/bench-{n}-{run}.db"
        if self.kind == "file" and self.temporary:
            return f"file://{self.tmp}/sessions-{n}-{run}"
        if self.kind == "redis":
            prefix = f"csbench-{self.run_id}-{n}-{run}:"
            self.namespaces.append(prefix)
            return replace_query(self.url, lambda k: k == "prefix", prefix=prefix)
        if self.kind == "postgres":
            schema = f"csbench_{self.run_id}_{n}_{run}"
            self.namespaces.append(schema)
            return replace_query(self.url, lambda k: k == "schema", schema=schema)
        return self.url

    def driver_url(self) -> str:
        """The server URL without chatsession's options (for floors and sizes)."""
        if self.kind == "redis":
            return replace_query(self.url, lambda k: True)
        return replace_query(self.url, lambda k: k not in PG_DRIVER_OPTIONS)

    def footprint(self, store: Store) -> Footprint:
        """A measurer of the storage ``store`` uses."""
        if self.kind == "sqlite":
            return SQLiteFootprint(Path(store.path))  # type: ignore[attr-defined]
        if self.kind == "file":
            return FolderFootprint(Path(store.root))  # type: ignore[attr-defined]
        if self.kind == "redis":
            return RedisFootprint(self.driver_url(), store.prefix)  # type: ignore[attr-defined]
        if self.kind == "postgres":
            return PostgresFootprint(self.driver_url(), store.schema)  # type: ignore[attr-defined]
        return NoFootprint()

    async def cleanup(self) -> None:
        """Remove every temporary file, Redis key and PostgreSQL schema made."""
        if self.kind == "redis" and self.namespaces:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(self.driver_url())
            for prefix in self.namespaces:
                keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
                for start in range(0, len(keys), 1000):
                    await client.delete(*keys[start : start + 1000])
            await client.aclose()
        elif self.kind == "postgres" and self.namespaces:
            import asyncpg

            conn = await asyncpg.connect(self.driver_url())
            for schema in self.namespaces:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class NoFootprint:
    """memory:// and unknown schemes: storage is not measured."""

    async def measure(self) -> tuple[int, int] | None:
        """Nothing to measure."""
        return None


@dataclass
class SQLiteFootprint:
    """The database file after a TRUNCATE checkpoint; raw: file + ``-wal`` before it."""

    path: Path

    async def measure(self) -> tuple[int, int]:
        """(checkpointed file size, file + WAL size before the checkpoint)."""
        wal = Path(f"{self.path}-wal")
        raw = sum(p.stat().st_size for p in (self.path, wal) if p.exists())
        db = sqlite3.connect(self.path, timeout=30)
        try:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                log(f"warning: the checkpoint of {self.path} was blocked; sizes include the WAL")
        finally:
            db.close()
        settled = sum(p.stat().st_size for p in (self.path, wal) if p.exists())
        return settled, raw


@dataclass
class FolderFootprint:
    """The folder's allocated size (``du``); raw: the sum of its files' sizes."""

    root: Path

    async def measure(self) -> tuple[int, int]:
        """(allocated bytes, apparent bytes)."""
        apparent, allocated = disk_usage([self.root])
        return allocated, apparent


@dataclass
class RedisFootprint:
    """``MEMORY USAGE key SAMPLES 0`` summed over the prefix's keys."""

    url: str
    prefix: str

    async def measure(self) -> tuple[int, int]:
        """(bytes, the same bytes)."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url)
        total = 0
        try:
            async for key in client.scan_iter(match=f"{self.prefix}*", count=1000):
                if b"floor" in key:
                    continue
                total += int(await client.memory_usage(key, samples=0) or 0)
        finally:
            await client.aclose()
        return total, total


@dataclass
class PostgresFootprint:
    """``pg_total_relation_size`` summed over the schema's tables (not the floor's)."""

    url: str
    schema: str

    async def measure(self) -> tuple[int, int]:
        """(bytes, the same bytes)."""
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            total = await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname <> 'bench_floor'",
                self.schema,
            )
        finally:
            await conn.close()
        return int(total), int(total)


# -- the floor: bare driver round trips ---------------------------------------------


class Floor(Protocol):
    """The least a backend could cost: one bare write of a turn, one bare read."""

    async def setup(self, events: list[NewEvent]) -> None:
        """Store ``events`` as the scratch history."""
        ...

    async def append(self, turn: list[NewEvent]) -> None:
        """Store one turn in one round trip."""
        ...

    async def read(self) -> int:
        """Read the whole scratch history; returns the number of items."""
        ...

    async def close(self) -> None:
        """Remove the scratch data and disconnect."""
        ...


class RedisFloor:
    """``RPUSH`` of a turn's two items; ``LRANGE`` of the history."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(url)
        self.key = f"{prefix}floor"
        self.seq = 0

    async def setup(self, events: list[NewEvent]) -> None:
        """RPUSH the history in slices of 1,000."""
        await self.client.delete(self.key)
        items = [as_json(i + 1, e) for i, e in enumerate(events)]
        for start in range(0, len(items), 1000):
            await self.client.rpush(self.key, *items[start : start + 1000])
        self.seq = len(items)

    async def append(self, turn: list[NewEvent]) -> None:
        """One RPUSH of the two events' JSON."""
        items = [as_json(self.seq + k + 1, e) for k, e in enumerate(turn)]
        self.seq += len(items)
        await self.client.rpush(self.key, *items)

    async def read(self) -> int:
        """One LRANGE of the whole list."""
        return len(await self.client.lrange(self.key, 0, -1))

    async def close(self) -> None:
        """Delete the scratch key."""
        await self.client.delete(self.key)
        await self.client.aclose()


class PostgresFloor:
    """One two-row ``INSERT`` into ``(id, seq, data jsonb)``; one ``SELECT`` of the rows.

    ``data`` is ``jsonb`` like the store's ``events.data``: both pay the
    server's JSON parsing on write and printing on read.
    """

    def __init__(self, url: str, schema: str, synchronous_commit: str | None) -> None:
        self.url = url
        self.table = f'"{schema}".bench_floor'
        self.synchronous_commit = synchronous_commit
        self.conn: Any = None
        self.seq = 0

    async def setup(self, events: list[NewEvent]) -> None:
        """Create the scratch table (``data jsonb``, as the store's) and COPY the history."""
        import asyncpg

        # the same setting as the store's connections: the URL's, else the server's
        settings = (
            {}
            if self.synchronous_commit is None
            else {"synchronous_commit": self.synchronous_commit}
        )
        self.conn = await asyncpg.connect(self.url, server_settings=settings)
        await self.conn.execute(
            f"CREATE TABLE {self.table} (id bigint NOT NULL, seq bigint NOT NULL, "
            "data jsonb NOT NULL, PRIMARY KEY (id, seq))"
        )
        rows = [(1, i + 1, as_json(i + 1, e)) for i, e in enumerate(events)]
        schema, table = self.table.split(".")
        await self.conn.copy_records_to_table(
            table, records=rows, schema_name=schema.strip('"'), columns=["id", "seq", "data"]
        )
        await self.conn.execute(f"ANALYZE {self.table}")
        self.seq = len(rows)

    async def append(self, turn: list[NewEvent]) -> None:
        """One INSERT statement of two rows (its own transaction): one round trip."""
        a, b = self.seq + 1, self.seq + 2
        self.seq += 2
        await self.conn.execute(
            f"INSERT INTO {self.table} (id, seq, data) VALUES (1, $1, $2), (1, $3, $4)",
            a,
            as_json(a, turn[0]),
            b,
            as_json(b, turn[1]),
        )

    async def read(self) -> int:
        """One SELECT of every row of the history, in seq order."""
        rows = await self.conn.fetch(
            f"SELECT seq, data FROM {self.table} WHERE id = 1 ORDER BY seq"
        )
        return len(rows)

    async def close(self) -> None:
        """Drop the scratch table."""
        if self.conn is not None:
            await self.conn.execute(f"DROP TABLE IF EXISTS {self.table}")
            await self.conn.close()


class SQLiteFloor:
    """Bare ``sqlite3`` on the event loop's thread, in a scratch file beside the store's.

    The same tables as the store's (``events`` ``WITHOUT ROWID``, keyed by
    session and seq, with the event id; a ``sessions`` row holding the head),
    WAL and ``synchronous=NORMAL`` like the store's default. An append is what
    the store must do at the least: one ``BEGIN IMMEDIATE`` transaction that
    inserts the turn's two rows and moves the head, committed. A read is one
    ``SELECT`` of the rows (``fetchall``) from a new connection. No worker
    thread, no checks, no row objects: the least any Python code can pay for
    the same rows on this machine.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".floor")
        self.db: sqlite3.Connection | None = None
        self.seq = 0

    def _rows(self, start: int, events: list[NewEvent]) -> list[tuple[Any, ...]]:
        return [
            (1, start + k + 1, e.type, e.ts, e.turn_id, e.schema_version, e.data, e.event_id)
            for k, e in enumerate(events)
        ]

    async def setup(self, events: list[NewEvent]) -> None:
        """Create the scratch file and insert the history."""
        db = self.db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(
            "CREATE TABLE sessions (pk INTEGER PRIMARY KEY, head INTEGER NOT NULL, "
            "updated_at REAL NOT NULL)"
        )
        db.execute(
            "CREATE TABLE events (session_pk INTEGER NOT NULL, seq INTEGER NOT NULL, "
            "type TEXT NOT NULL, ts REAL NOT NULL, turn_id TEXT, v INTEGER NOT NULL, "
            "data TEXT NOT NULL, event_id TEXT, PRIMARY KEY (session_pk, seq)) WITHOUT ROWID"
        )
        db.execute("BEGIN")
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._rows(0, events))
        db.execute("INSERT INTO sessions VALUES (1, ?, ?)", (len(events), time.time()))
        db.execute("COMMIT")
        self.seq = len(events)

    async def append(self, turn: list[NewEvent]) -> None:
        """One transaction inserting the turn's two rows and moving the head."""
        assert self.db is not None
        rows = self._rows(self.seq, turn)
        self.seq += len(rows)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self.db.execute(
            "UPDATE sessions SET head = ?, updated_at = ? WHERE pk = 1", (self.seq, time.time())
        )
        self.db.execute("COMMIT")

    async def read(self) -> int:
        """One SELECT of the history's rows, in seq order, from a new connection."""
        db = sqlite3.connect(self.path)
        try:
            rows = db.execute(
                "SELECT seq, type, ts, turn_id, data, v, event_id FROM events "
                "WHERE session_pk = 1 AND seq > 0 ORDER BY seq"
            ).fetchall()
        finally:
            db.close()
        return len(rows)

    async def close(self) -> None:
        """Remove the scratch file."""
        if self.db is not None:
            self.db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def floor_for(backend: Backend, store: Store) -> Floor | None:
    """The floor for ``backend`` (SQLite, Redis and PostgreSQL)."""
    if backend.kind == "sqlite":
        return SQLiteFloor(Path(store.path))  # type: ignore[attr-defined]
    if backend.kind == "redis":
        return RedisFloor(backend.driver_url(), store.prefix)  # type: ignore[attr-defined]
    if backend.kind == "postgres":
        return PostgresFloor(
            backend.driver_url(),
            store.schema,  # type: ignore[attr-defined]
            store.synchronous_commit,  # type: ignore[attr-defined]
        )
    return None


# -- one size -------------------------------------------------------------------------


@dataclass
class Settings:
    """Command-line settings."""

    sizes: list[int]
    appends: int = 200
    warmup: int = 20
    samples: int = 15
    repeat: int = 1


async def read_all(store: Store, session_id: str) -> int:
    """Read every batch of the session; returns the number of events."""
    count = 0
    async for batch in store.read(session_id):
        count += len(batch)
    return count


async def bench_size(backend: Backend, n: int, settings: Settings, run: int = 0) -> list[Row]:
    """Measure one N: fill, load, fork, append, size (see the module docstring)."""
    rows: list[Row] = []

    def add(metric: str, value: float, unit: str) -> None:
        rows.append(
            {"backend": backend.label, "n": n, "metric": metric, "value": value, "unit": unit}
        )

    tag = f"[{backend.label} n={n}" + (
        f" run {run + 1}/{settings.repeat}]" if settings.repeat > 1 else "]"
    )
    url = backend.url_for(n, run)
    session_id = f"bench-{n}-{uuid.uuid4().hex[:6]}"
    store = open_store(url)
    floor: Floor | None = None
    try:
        log(f"{tag} filling {n} messages")
        await store.create(SessionRecord(id=session_id))
        events = history(n)
        head = 0
        for start in range(0, len(events), 1000):
            head = await store.append(session_id, events[start : start + 1000], head)
        floor = floor_for(backend, store)
        if floor is not None:
            await floor.setup(events)

        # load: new store objects, interleaved with the floor's read
        log(f"{tag} loading {n} messages with a new store object, {settings.samples} times")
        gc.collect()
        opens, loads, warm, closes, colds, floor_loads = [], [], [], [], [], []
        for i in range(settings.samples + 1):
            fresh = store if backend.kind == "memory" else open_store(url)
            start = time.perf_counter_ns()
            await fresh.get(session_id)
            t_open = ms_since(start)
            start = time.perf_counter_ns()
            count = await read_all(fresh, session_id)
            t_load = ms_since(start)
            if count != n:
                raise RuntimeError(f"read {count} events, expected {n}")
            start = time.perf_counter_ns()
            await read_all(fresh, session_id)
            t_warm = ms_since(start)
            t_close = 0.0 if fresh is store else await timed(fresh.aclose)
            t_floor = 0.0
            if floor is not None:
                start = time.perf_counter_ns()
                got = await floor.read()
                t_floor = ms_since(start)
                if got != n:
                    raise RuntimeError(f"the floor read {got} items, expected {n}")
            if i == 0:
                continue  # warm-up round
            opens.append(t_open)
            loads.append(t_load)
            warm.append(t_warm)
            closes.append(t_close)
            colds.append(t_open + t_load + t_close)
            floor_loads.append(t_floor)
        add("open", statistics.median(opens), "ms")
        add("load", statistics.median(loads), "ms")
        add("load_warm", statistics.median(warm), "ms")
        add("close", statistics.median(closes), "ms")
        add("load_cold", statistics.median(colds), "ms")
        if floor is not None:
            add("floor_load", statistics.median(floor_loads), "ms")

        # fork at the head: timed forks first, then as many with the storage
        # measured around each (the measurement would disturb the timing)
        log(f"{tag} {settings.samples} + {settings.samples} forks at the head")
        gc.collect()
        forks = [f"{session_id}-f{i}" for i in range(2 * settings.samples)]
        fork_times: list[float] = []
        for fork_id in forks[: settings.samples]:
            record = SessionRecord(id=fork_id)
            start = time.perf_counter_ns()
            await store.fork(session_id, head, record)
            fork_times.append(ms_since(start))
        add("fork", statistics.median(fork_times), "ms")
        footprint = backend.footprint(store)
        deltas: list[int] = []
        raw_deltas: list[int] = []
        for fork_id in forks[settings.samples :]:
            before = await footprint.measure()
            if before is None:
                forks = forks[: settings.samples]
                break
            await store.fork(session_id, head, SessionRecord(id=fork_id))
            after = await footprint.measure()
            assert after is not None
            deltas.append(after[0] - before[0])
            # SQLite: the raw size (file + WAL) is read before the checkpoint that
            # settles it, so it is compared with the settled size before the fork
            raw_before = before[0] if backend.kind == "sqlite" else before[1]
            raw_deltas.append(after[1] - raw_before)
        if deltas:
            add("fork_bytes", statistics.fmean(deltas), "bytes")
            add("fork_bytes_max", max(deltas), "bytes")
            if backend.kind in ("sqlite", "file"):
                add("fork_bytes_raw", statistics.fmean(raw_deltas), "bytes")

        # appends of one turn, interleaved with the floor's
        log(f"{tag} {settings.warmup} + {settings.appends} appends of one turn")
        turns = [turn_events(i) for i in range(settings.warmup + settings.appends)]
        gc.collect()
        times: list[float] = []
        floor_times: list[float] = []
        for turn in turns:
            start = time.perf_counter_ns()
            head = await store.append(session_id, turn, head)
            t_store = ms_since(start)
            if floor is not None:
                start = time.perf_counter_ns()
                await floor.append(turn)
                floor_times.append(ms_since(start))
            times.append(t_store)
        times = times[settings.warmup :]
        floor_times = floor_times[settings.warmup :]
        add("append_p50", statistics.median(times), "ms")
        add("append_p99", percentile(times, 99), "ms")
        if floor_times:
            add("floor_append_p50", statistics.median(floor_times), "ms")
            add("floor_append_p99", percentile(floor_times, 99), "ms")

        # size
        log(f"{tag} measuring the storage")
        gc.collect()
        measured = await footprint.measure()
        stored = [e async for batch in store.read(session_id) for e in batch]
        json_bytes = sum(len(e.to_json().encode()) for e in stored)
        add("messages", len(stored), "count")
        add("json_bytes", json_bytes, "bytes")
        if measured is not None:
            size, raw = measured
            add("footprint", size, "bytes")
            if backend.kind in ("sqlite", "file"):
                add("footprint_raw", raw, "bytes")
            add("bytes_per_message", size / len(stored), "bytes")
            add("size_ratio", size / json_bytes, "x")

        # every timing against the floor
        by = {r["metric"]: r["value"] for r in rows}
        if floor is not None:
            for metric, base in (
                ("append_p50", "floor_append_p50"),
                ("append_p99", "floor_append_p99"),
                ("fork", "floor_append_p50"),
                ("open", "floor_load"),
                ("load", "floor_load"),
                ("load_warm", "floor_load"),
                ("load_cold", "floor_load"),
            ):
                if by.get(base):
                    add(f"{metric}_vs_floor", by[metric] / by[base], "x")

        for fork_id in forks:
            await store.delete(fork_id)
        await store.delete(session_id)
    finally:
        if floor is not None:
            await floor.close()
        await store.aclose()
    return rows


# -- targets and the report ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target: ``check(rows)`` gives the measured figure, PASS when ``<= limit``."""

    text: str
    limit: float
    check: Callable[[dict[tuple[str, int], float], list[int]], float | None]


def at(metric: str, n: int) -> Callable[[dict[tuple[str, int], float], list[int]], float | None]:
    """The figure ``metric`` at N = ``n`` (None when ``n`` was not measured)."""
    return lambda by, sizes: by.get((metric, n))


def worst(metric: str) -> Callable[[dict[tuple[str, int], float], list[int]], float | None]:
    """The largest ``metric`` over every N."""

    def check(by: dict[tuple[str, int], float], sizes: list[int]) -> float | None:
        values = [by[(metric, n)] for n in sizes if (metric, n) in by]
        return max(values) if values else None

    return check


def growth(
    metric: str, lo: int = 100, hi: int = 10_000
) -> Callable[[dict[tuple[str, int], float], list[int]], float | None]:
    """``metric`` at N = ``hi`` over ``metric`` at N = ``lo``."""

    def check(by: dict[tuple[str, int], float], sizes: list[int]) -> float | None:
        if (metric, lo) in by and (metric, hi) in by and by[(metric, lo)]:
            return by[(metric, hi)] / by[(metric, lo)]
        return None

    return check


TARGETS: dict[str, list[Target]] = {
    "sqlite": [
        Target(
            "append p50 <= 3 x floor (one BEGIN IMMEDIATE insert + head update) at every N",
            3.0,
            worst("append_p50_vs_floor"),
        ),
        Target("append p50 <= 0.3 ms at N=10,000", 0.3, at("append_p50", 10_000)),
        Target("append p50(10,000) <= 1.5 x p50(100)", 1.5, growth("append_p50")),
        Target("load of 10,000 messages <= 20 ms", 20.0, at("load", 10_000)),
        Target("load of 10,000 <= 1.25 x floor read (SELECT)", 1.25, at("load_vs_floor", 10_000)),
        Target("fork <= 1 ms at every N", 1.0, worst("fork")),
        Target(
            "fork <= 4 KB extra on disk at every N (largest single fork)",
            4096,
            worst("fork_bytes_max"),
        ),
        Target("bytes on disk <= 1.5 x the messages' JSON at every N", 1.5, worst("size_ratio")),
    ],
    "redis": [
        Target("append p50 <= 5 x floor (RPUSH) at every N", 5.0, worst("append_p50_vs_floor")),
        Target("append p50 flat: p50(10,000) <= 1.5 x p50(100)", 1.5, growth("append_p50")),
        Target("load of 10,000 <= 2 x floor read (LRANGE)", 2.0, at("load_vs_floor", 10_000)),
        Target("fork <= 2 ms at every N", 2.0, worst("fork")),
        Target("fork constant: fork(10,000) <= 1.5 x fork(100)", 1.5, growth("fork")),
    ],
    "postgres": [
        Target("append p50 <= 1.3 x floor (INSERT) at every N", 1.3, worst("append_p50_vs_floor")),
        Target("append p50 flat: p50(10,000) <= 1.5 x p50(100)", 1.5, growth("append_p50")),
        Target("load of 10,000 <= 2 x floor read (SELECT)", 2.0, at("load_vs_floor", 10_000)),
        Target("fork <= 2 ms at every N", 2.0, worst("fork")),
        Target("fork constant: fork(10,000) <= 1.5 x fork(100)", 1.5, growth("fork")),
    ],
}


def verdicts(kind: str, rows: list[Row]) -> list[tuple[str, str, float | None, float]]:
    """(PASS/FAIL/n/a, target, measured, limit) for each target of ``kind``."""
    by = {(r["metric"], r["n"]): float(r["value"]) for r in rows}
    sizes = sorted({int(r["n"]) for r in rows})
    out = []
    for target in TARGETS.get(kind, []):
        value = target.check(by, sizes)
        verdict = "n/a" if value is None else ("PASS" if value <= target.limit else "FAIL")
        out.append((verdict, target.text, value, target.limit))
    return out


def fmt(value: float, unit: str) -> str:
    """A figure for the table."""
    if unit in ("bytes", "count"):
        return f"{value:,.0f}"
    return f"{value:.3f}"


def report(backend: Backend, rows: list[Row]) -> str:
    """The Markdown table of ``rows`` and the targets' verdicts."""
    sizes = sorted({r["n"] for r in rows})
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    units = {r["metric"]: r["unit"] for r in rows}
    by = {(r["metric"], r["n"]): r["value"] for r in rows}
    lines = [f"backend: {backend.label} ({backend.url})", ""]
    lines.append("| metric | unit | " + " | ".join(f"N={n:,}" for n in sizes) + " |")
    lines.append("| --- | --- | " + " | ".join("---:" for _ in sizes) + " |")
    for metric in metrics:
        unit = units[metric]
        cells = [fmt(by[(metric, n)], unit) if (metric, n) in by else "" for n in sizes]
        lines.append(f"| {metric} | {unit} | " + " | ".join(cells) + " |")
    results = verdicts(backend.kind, rows)
    if results:
        lines.append("")
        for verdict, text, value, limit in results:
            shown = "not measured" if value is None else f"measured {value:.3f}, limit {limit:g}"
            lines.append(f"- {verdict}: {text} ({shown})")
    return "\n".join(lines)


async def run(spec: str, settings: Settings) -> tuple[Backend, list[Row]]:
    """Measure every size on ``spec``; always cleans up."""
    backend = Backend(spec)
    runs: list[Row] = []
    try:
        for run in range(settings.repeat):
            for n in settings.sizes:
                runs.extend(await bench_size(backend, n, settings, run))
                gc.collect()
    finally:
        await backend.cleanup()
    return backend, median_rows(runs)


def median_rows(runs: list[Row]) -> list[Row]:
    """One row per (N, metric): the median of its values over the runs."""
    values: dict[tuple[int, str], list[float]] = {}
    first: dict[tuple[int, str], Row] = {}
    for row in runs:
        key = (row["n"], row["metric"])
        values.setdefault(key, []).append(row["value"])
        first.setdefault(key, row)
    return [
        {**row, "value": statistics.median(values[key])}
        for key, row in sorted(first.items(), key=lambda item: item[0][0])
    ]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the table and write the JSON lines."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend", default="sqlite", help="store URL or memory/sqlite/file/redis/postgres"
    )
    parser.add_argument("--sizes", default="100,1000,10000", help="comma-separated message counts")
    parser.add_argument("--appends", type=int, default=200, help="timed appends per size")
    parser.add_argument("--warmup", type=int, default=20, help="untimed appends first")
    parser.add_argument(
        "--samples", type=int, default=15, help="loads and forks per size and run (medians)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="whole runs over every size (medians of the runs)"
    )
    parser.add_argument("--json", type=Path, help="write JSON lines here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers, got {args.sizes!r}")
    if not sizes or any(n < 2 for n in sizes):
        parser.error("--sizes needs message counts of at least 2")
    if min(args.appends, args.samples, args.repeat) < 1 or args.warmup < 0:
        parser.error("--appends, --samples and --repeat must be positive, --warmup not negative")
    if args.appends < 200:
        log(f"note: {args.appends} appends; the targets assume at least 200")
    settings = Settings(sizes, args.appends, args.warmup, args.samples, args.repeat)
    started = time.perf_counter_ns()
    backend, rows = asyncio.run(run(args.backend, settings))
    print(report(backend, rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"wrote {len(rows)} rows to {args.json}")
    log(f"done in {ms_since(started) / 1000:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
