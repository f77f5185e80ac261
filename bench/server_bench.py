"""HTTP server benchmark: ``chatsession serve`` with the ``scripted`` model under load.

Usage::

    python bench/server_bench.py --backend sqlite|redis|postgres|URL [--workers 1,2] \\
        [--clients 100] [--duration 20] [--warmup 3] [--stream-every 4] [--json OUT]

For each worker count: a fresh store (a temporary SQLite file, its own Redis
key prefix or PostgreSQL schema, removed at the end), ``chatsession serve
--model scripted --workers W`` on a free loopback port (no chunk delay), a
key for one user, and one session per client (so no turn ever waits for
another: no 409). ``--clients`` clients then send turns back to back on
keep-alive connections for ``--warmup`` seconds (not counted) and
``--duration`` seconds (counted); every ``--stream-every``-th turn of a client
is ``stream: true``. Figures (requests that ended inside the counted window):

- ``turns_per_s``: turns answered 200 per second (JSON and streamed);
- ``turn_p50``, ``turn_p99``: a non-streamed turn, request sent to the
  whole JSON reply read (ms);
- ``first_byte_p50``, ``first_byte_p99``: a streamed turn, request sent to
  the first byte of the first event (the body, not the headers) (ms);
  ``headers_p50``: to the response headers;
- ``lost_turns``: acknowledged turns (200 and the whole reply) whose user
  message is missing from the session's history afterwards, read over
  HTTP (must be 0); ``duplicate_turns``: messages stored twice; ``errors``:
  answers other than 200;
- ``floor_rps``: the floor, measured right after on the same machine with the
  same clients and uvicorn settings (``uvicorn.run``, workers, log level; the
  default event loop and HTTP parser): a bare FastAPI app whose one endpoint
  ``POST /floor/{client}`` takes a small JSON body and does one
  ``store.append`` of one small ``message`` event to that client's own
  session on a store of the same backend; ``vs_floor`` =
  ``turns_per_s / floor_rps``;
- ``server_cpu_s``, ``client_cpu_s``: CPU seconds the server processes and
  this client used in the counted window (both share the machine's cores).

The load generator is a minimal HTTP/1.1 client on asyncio streams (one
connection per client), so the client costs the shared CPUs as little as
possible; it is the same for the floor.

Targets (issue 12): >= 500 turns/s with 2 workers on Redis, turn p99 <= 100
ms, first byte p50 <= 10 ms, turns/s >= 0.5 x the floor's requests/s, no
lost turns.

Output: a Markdown table with PASS/FAIL on stdout, progress on stderr, JSON
lines ``{"backend", "workers", "metric", "value", "unit"}`` in ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from pydantic import BaseModel
from store_bench import Backend, percentile

ADMIN_KEY = "bench-admin-key-0123456789abcdef"
FLOOR_STORE_VARIABLE = "CHATSESSION_BENCH_FLOOR_STORE"
HOST = "127.0.0.1"
MESSAGE = "hello there, how are you today? " * 2  # ~64 characters
Row = dict[str, Any]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- floor app


class FloorBody(BaseModel):
    """The floor's request body (parsed and validated like the server's)."""

    message: str


def floor_factory() -> Any:
    """The floor: a bare FastAPI app with one endpoint doing one store append.

    The store URL comes from ``CHATSESSION_BENCH_FLOOR_STORE`` (so uvicorn's
    worker processes build the same app).
    """
    from fastapi import FastAPI

    from chatsession.errors import ConflictError, SessionExistsError
    from chatsession.log import Message, MessageEntry, encode
    from chatsession.store import SessionRecord, open_store

    url = os.environ[FLOOR_STORE_VARIABLE]
    heads: dict[str, int] = {}
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["store"] = open_store(url)
        try:
            yield
        finally:
            await state["store"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/floor/{client}")
    async def append(client: str, body: FloorBody) -> dict[str, Any]:
        store = state["store"]
        sid = f"floor-{client}"
        if sid not in heads:
            with contextlib.suppress(SessionExistsError):
                await store.create(SessionRecord(id=sid, user_id="bench"))
            heads[sid] = (await store.get(sid)).head
        event = encode(MessageEntry(data=Message(role="user", content=body.message)))
        while True:
            try:
                heads[sid] = await store.append(sid, [event], heads[sid])
                return {"seq": heads[sid]}
            except ConflictError:  # another worker appended (a reconnected client)
                heads[sid] = (await store.get(sid)).head

    return app


def serve_floor(url: str, port: int, workers: int) -> None:
    """Run the floor on uvicorn exactly as ``chatsession serve`` runs the server."""
    import uvicorn

    os.environ[FLOOR_STORE_VARIABLE] = url
    if workers > 1:
        uvicorn.run(
            "server_bench:floor_factory",
            factory=True,
            app_dir=str(Path(__file__).parent),
            host=HOST,
            port=port,
            workers=workers,
            log_level="warning",
            timeout_graceful_shutdown=15,
        )
    else:
        uvicorn.run(
            floor_factory(),
            host=HOST,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=15,
        )


# --------------------------------------------------------------------------- HTTP client


class HTTPError(Exception):
    """A malformed or closed response."""


@dataclass
class Reply:
    """One response: status, headers, body, and when its parts came."""

    status: int
    headers: dict[str, str]
    body: bytes
    headers_at: float
    first_byte_at: float | None


class Connection:
    """One keep-alive HTTP/1.1 connection (reopened when the server closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        """Close the socket."""
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """Send one request and read the whole response."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None and self.writer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        try:
            reply = await self._read()
        except (OSError, asyncio.IncompleteReadError, HTTPError):
            await self.close()
            raise
        if reply.headers.get("connection", "").lower() == "close":
            await self.close()
        return reply

    async def _read(self) -> Reply:
        reader = self.reader
        assert reader is not None
        head = await reader.readuntil(b"\r\n\r\n")
        headers_at = time.perf_counter()
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise HTTPError(f"bad status line {status_line!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        first_byte_at: float | None = None
        if "content-length" in headers:
            size = int(headers["content-length"])
            body = await reader.readexactly(size) if size else b""
            first_byte_at = headers_at if size else None
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers
                    break
                chunk = await reader.readexactly(size)
                if first_byte_at is None:
                    first_byte_at = time.perf_counter()
                chunks.append(chunk)
                await reader.readexactly(2)
            body = b"".join(chunks)
        else:
            raise HTTPError("a response without a length")
        return Reply(int(parts[1]), headers, body, headers_at, first_byte_at)


def sse_stop(body: bytes) -> dict[str, Any] | None:
    """The ``stop`` event's data of a text/event-stream body (None if missing)."""
    event, data = "", ""
    for line in body.decode().replace("\r\n", "\n").split("\n"):
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif not line and event == "stop" and data:
            found: dict[str, Any] = json.loads(data)
            return found
    return None


# --------------------------------------------------------------------------- load


@dataclass
class Sample:
    """One request of the load."""

    started: float
    ended: float
    stream: bool
    ok: bool
    first_byte: float | None = None
    headers: float | None = None


@dataclass
class Load:
    """What the clients did."""

    samples: list[Sample] = field(default_factory=list)
    acked: dict[str, list[str]] = field(default_factory=dict)  # session -> acked messages
    errors: dict[str, int] = field(default_factory=dict)


async def drive(
    port: int,
    clients: int,
    warmup: float,
    duration: float,
    request: Any,
) -> tuple[Load, float, float]:
    """Run ``clients`` loops of ``request(i, n, connection, load)`` until the end time.

    Returns:
        The load, and the counted window's start and end (perf_counter).
    """
    load = Load()
    start = time.perf_counter() + warmup
    end = start + duration

    async def client(i: int) -> None:
        connection = Connection(port)
        n = 0
        try:
            while time.perf_counter() < end:
                try:
                    await request(i, n, connection, load)
                except (OSError, asyncio.IncompleteReadError, HTTPError) as exc:
                    kind = type(exc).__name__
                    load.errors[kind] = load.errors.get(kind, 0) + 1
                    await asyncio.sleep(0.01)
                n += 1
        finally:
            await connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return load, start, end


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its children, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        this, parent = int(entry.name), int(fields[1])
        if this == pid or parent == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], port: int, workers: int) -> Any:
    """Start a server process; wait until its port accepts connections, then for its workers."""
    with tempfile.TemporaryFile() as output:  # its log (a pipe could fill and block it)
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    raise RuntimeError(f"the server exited: {output.read().decode()[-2000:]}")
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((HOST, port), timeout=1),
                ):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.05)
            time.sleep(1.0 + 0.5 * workers)  # every worker up (each builds its app)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)


def summarise(
    load: Load, start: float, end: float, cpu: tuple[float, float]
) -> tuple[dict[str, float], list[Sample]]:
    counted = [s for s in load.samples if start <= s.ended <= end]
    seconds = end - start
    turns = [s.ended - s.started for s in counted if s.ok and not s.stream]
    firsts = [s.first_byte - s.started for s in counted if s.ok and s.stream and s.first_byte]
    heads = [s.headers - s.started for s in counted if s.ok and s.stream and s.headers]
    out = {
        "rps": sum(s.ok for s in counted) / seconds,
        "server_cpu_s": cpu[0],
        "client_cpu_s": cpu[1],
    }
    if turns:
        out |= {
            "p50": percentile(turns, 50) * 1000,
            "p99": percentile(turns, 99) * 1000,
            "mean": statistics.fmean(turns) * 1000,
        }
    if firsts:
        out |= {
            "first_p50": percentile(firsts, 50) * 1000,
            "first_p99": percentile(firsts, 99) * 1000,
            "headers_p50": percentile(heads, 50) * 1000,
        }
    return out, counted


async def measure_server(url: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    """The chatsession server's figures for one worker count."""
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="chatsession-bench-server-")
    env = {
        **os.environ,
        "CHATSESSION_ADMIN_KEY": ADMIN_KEY,
        "CHATSESSION_DATA_DIR": data_dir,
        "CHATSESSION_SHUTDOWN_GRACE": "5",
    }
    command = [sys.executable, "-m", "chatsession", "serve", "--store", url, "--model"]
    command += ["scripted", "--workers", str(workers), "--port", str(port)]
    command += ["--log-level", "warning"]
    try:
        with running(command, env, port, workers) as process:
            setup = Connection(port)
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            made = await setup.request("POST", "/v1/admin/keys", {"user_id": "bench"}, admin)
            assert made.status == 201, made.body
            auth = {"Authorization": f"Bearer {json.loads(made.body)['key']}"}
            sessions = []
            for _ in range(args.clients):
                created = await setup.request("POST", "/v1/sessions", {}, auth)
                assert created.status == 201, created.body
                sessions.append(json.loads(created.body)["session_id"])

            async def turn(i: int, n: int, connection: Connection, load: Load) -> None:
                stream = args.stream_every > 0 and n % args.stream_every == args.stream_every - 1
                message = f"c{i} n{n} {MESSAGE}"
                sid = sessions[i]
                began = time.perf_counter()
                reply = await connection.request(
                    "POST",
                    f"/v1/sessions/{sid}/messages",
                    {"message": message, "stream": stream},
                    auth,
                )
                ended = time.perf_counter()
                ok = reply.status == 200
                if ok and stream:
                    stop = sse_stop(reply.body)
                    ok = stop is not None and stop["reason"] == "end_turn"
                elif ok:
                    ok = json.loads(reply.body)["stop_reason"] == "end_turn"
                if ok:
                    load.acked.setdefault(sid, []).append(message)
                else:
                    key = f"http_{reply.status}"
                    load.errors[key] = load.errors.get(key, 0) + 1
                load.samples.append(
                    Sample(began, ended, stream, ok, reply.first_byte_at, reply.headers_at)
                )

            cpu_task = asyncio.create_task(cpu_window(process.pid, args))
            load, start, end = await drive(port, args.clients, args.warmup, args.duration, turn)
            cpu = await cpu_task
            figures, _ = summarise(load, start, end, cpu)
            figures["errors"] = float(sum(load.errors.values()))
            if load.errors:
                log(f"  errors: {load.errors}")
            await setup.close()  # idle past uvicorn's keep-alive timeout by now
            reader = Connection(port)
            lost, duplicates, acked = await check_histories(reader, sessions, load, auth)
            await reader.close()
            figures |= {"lost": lost, "duplicates": duplicates, "acked": acked}
            return figures
    finally:
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)


async def cpu_window(pid: int, args: argparse.Namespace) -> tuple[float, float]:
    """(server CPU s, client CPU s) used during the counted window."""
    await asyncio.sleep(args.warmup)
    server0, client0 = server_cpu(pid), sum(os.times()[:2])
    await asyncio.sleep(args.duration)
    return server_cpu(pid) - server0, sum(os.times()[:2]) - client0


async def check_histories(
    connection: Connection, sessions: list[str], load: Load, auth: dict[str, str]
) -> tuple[float, float, float]:
    """(lost, duplicated, acknowledged) turns: acked messages against the stored histories."""
    lost = duplicates = acked = 0
    for sid in sessions:
        stored: list[str] = []
        after = 0
        while True:
            reply = await connection.request(
                "GET", f"/v1/sessions/{sid}/history?after_seq={after}&limit=1000", None, auth
            )
            assert reply.status == 200, reply.body
            page = json.loads(reply.body)
            stored += [
                e["data"]["content"]
                for e in page["events"]
                if e["type"] == "message" and e["data"]["role"] == "user"
            ]
            if page["next_after_seq"] is None:
                break
            after = page["next_after_seq"]
        mine = load.acked.get(sid, [])
        acked += len(mine)
        kept = set(stored)
        lost += sum(message not in kept for message in mine)
        duplicates += len(stored) - len(kept)
    return float(lost), float(duplicates), float(acked)


async def measure_floor(url: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    """The floor's figures for one worker count (same clients, same uvicorn settings)."""
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-floor", url]
    command += ["--port", str(port), "--workers", str(workers)]
    with running(command, dict(os.environ), port, workers) as process:
        body = {"message": MESSAGE}

        async def append(i: int, n: int, connection: Connection, load: Load) -> None:
            began = time.perf_counter()
            reply = await connection.request("POST", f"/floor/{i}", body)
            ok = reply.status == 200
            if not ok:
                key = f"http_{reply.status}"
                load.errors[key] = load.errors.get(key, 0) + 1
            load.samples.append(Sample(began, time.perf_counter(), False, ok))

        cpu_task = asyncio.create_task(cpu_window(process.pid, args))
        load, start, end = await drive(port, args.clients, args.warmup, args.duration, append)
        cpu = await cpu_task
        figures, _ = summarise(load, start, end, cpu)
        if load.errors:
            log(f"  floor errors: {load.errors}")
        return figures


# --------------------------------------------------------------------------- report


UNITS = {
    "turns_per_s": "1/s",
    "turn_p50": "ms",
    "turn_p99": "ms",
    "turn_mean": "ms",
    "first_byte_p50": "ms",
    "first_byte_p99": "ms",
    "headers_p50": "ms",
    "acked_turns": "count",
    "lost_turns": "count",
    "duplicate_turns": "count",
    "errors": "count",
    "server_cpu_s": "s",
    "client_cpu_s": "s",
    "floor_rps": "1/s",
    "floor_p50": "ms",
    "floor_p99": "ms",
    "floor_server_cpu_s": "s",
    "floor_client_cpu_s": "s",
    "vs_floor": "x",
}


def rows_for(
    label: str, workers: int, server: dict[str, float], floor: dict[str, float]
) -> list[Row]:
    values = {
        "turns_per_s": server["rps"],
        "turn_p50": server.get("p50"),
        "turn_p99": server.get("p99"),
        "turn_mean": server.get("mean"),
        "first_byte_p50": server.get("first_p50"),
        "first_byte_p99": server.get("first_p99"),
        "headers_p50": server.get("headers_p50"),
        "acked_turns": server["acked"],
        "lost_turns": server["lost"],
        "duplicate_turns": server["duplicates"],
        "errors": server["errors"],
        "server_cpu_s": server["server_cpu_s"],
        "client_cpu_s": server["client_cpu_s"],
        "floor_rps": floor["rps"],
        "floor_p50": floor.get("p50"),
        "floor_p99": floor.get("p99"),
        "floor_server_cpu_s": floor["server_cpu_s"],
        "floor_client_cpu_s": floor["client_cpu_s"],
        "vs_floor": server["rps"] / floor["rps"] if floor["rps"] else None,
    }
    return [
        {
            "backend": label,
            "workers": workers,
            "metric": metric,
            "value": round(value, 3),
            "unit": UNITS[metric],
        }
        for metric, value in values.items()
        if value is not None
    ]


def report(rows: list[Row], label: str, workers: list[int], duration: float) -> None:
    by = {(r["metric"], r["workers"]): r["value"] for r in rows}
    print(f"\n### {label}: {duration:g} s counted per run\n")
    print("| metric | unit | " + " | ".join(f"{w} worker{'s' * (w > 1)}" for w in workers) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in workers) + " |")
    for metric, unit in UNITS.items():
        cells = [by.get((metric, w)) for w in workers]
        if all(c is None for c in cells):
            continue
        text = [
            "" if c is None else f"{c:,.3f}" if unit in ("ms", "x", "s") else f"{c:,.1f}"
            for c in cells
        ]
        print(f"| {metric} | {unit} | " + " | ".join(text) + " |")
    print()

    def check(name: str, value: float | None, limit: float, at_most: bool) -> None:
        if value is None:
            print(f"- n/a: {name}")
            return
        ok = value <= limit if at_most else value >= limit
        print(f"- {'PASS' if ok else 'FAIL'}: {name} (measured {value:,.3f}, limit {limit:g})")

    if label == "redis" and 2 in workers:
        check(">= 500 turns/s with 2 workers on Redis", by.get(("turns_per_s", 2)), 500, False)
    else:
        print("- n/a: >= 500 turns/s with 2 workers on Redis (not this run)")
    for w in workers:
        tag = f"{w} worker{'s' * (w > 1)}"
        check(f"turn p99 <= 100 ms ({tag})", by.get(("turn_p99", w)), 100, True)
        check(f"first byte p50 <= 10 ms ({tag})", by.get(("first_byte_p50", w)), 10, True)
        check(f"turns/s >= 0.5 x the floor ({tag})", by.get(("vs_floor", w)), 0.5, False)
        check(f"no lost turns ({tag})", by.get(("lost_turns", w)), 0, True)


async def main(args: argparse.Namespace) -> None:
    backend = Backend(args.backend)
    workers = [int(w) for w in args.workers.split(",")]
    rows: list[Row] = []
    try:
        for w in workers:
            url = backend.url_for(w, 0)
            log(f"[{backend.label} workers={w}] server: {args.clients} clients, {args.duration} s")
            server = await measure_server(url, w, args)
            log(f"  {server['rps']:.1f} turns/s, lost {server['lost']:.0f}")
            floor_url = backend.url_for(w, 1)
            log(f"[{backend.label} workers={w}] floor")
            floor = await measure_floor(floor_url, w, args)
            log(f"  {floor['rps']:.1f} requests/s")
            rows += rows_for(backend.label, w, server, floor)
    finally:
        await backend.cleanup()
    if args.json:
        with open(args.json, "w") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
    report(rows, backend.label, workers, args.duration)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="sqlite", help="sqlite, redis, postgres or a URL")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=20.0, help="counted seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="uncounted seconds first")
    parser.add_argument(
        "--stream-every",
        type=int,
        default=4,
        help="every Nth turn of a client is streamed (0: none)",
    )
    parser.add_argument("--json", help="write JSON lines here")
    parser.add_argument("--serve-floor", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve_floor:
        serve_floor(arguments.serve_floor, arguments.port, int(arguments.workers))
    else:
        asyncio.run(main(arguments))
