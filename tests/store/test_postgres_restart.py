"""A PostgreSQL server that goes away and comes back: the same store object goes on.

These tests start a throwaway PostgreSQL server of their own (``initdb`` in a
temporary folder, a free loopback port), so that they can stop, crash and
restart it and change its settings without touching the shared test server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chatsession import (
    NewEvent,
    SessionNotFoundError,
    SessionRecord,
    Store,
    StoredEvent,
    StoreUnavailableError,
    open_store,
)

pytestmark = pytest.mark.slow


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail("initdb not found: install the PostgreSQL server (these tests start one)")
    return Path(initdb).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayServer:
    """A PostgreSQL cluster in a temporary folder, on a free loopback port."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="chatsession-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0  # initdb and postgres refuse to run as root
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}{tail}")

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c fsync=off -c full_page_writes=off"
        )
        log = str(self.root / "log")
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[ThrowawayServer]:
    """A server of the module's own, started once (initdb takes a few seconds)."""
    made = ThrowawayServer()
    try:
        made.init()
        made.start()
        yield made
    finally:
        made.close()


async def started(server: ThrowawayServer) -> None:
    """Start the server and wait until it takes connections."""
    await asyncio.to_thread(server.start)
    for _ in range(300):
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await asyncpg.connect(server.url, timeout=2)
            await conn.close()
            return
        await asyncio.sleep(0.05)
    pytest.fail("the throwaway server did not come back")


@pytest.fixture
async def store_url(server: ThrowawayServer) -> AsyncIterator[str]:
    """A fresh schema on the throwaway server; the server is running at the end."""
    await started_if_down(server)
    schema = f"cs_{os.urandom(5).hex()}"
    yield f"{server.url}?schema={schema}&min_size=3&connect_timeout=2&command_timeout=5"
    await started_if_down(server)
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def started_if_down(server: ThrowawayServer) -> None:
    try:
        conn = await asyncpg.connect(server.url, timeout=2)
    except (OSError, asyncpg.PostgresError):
        await started(server)
    else:
        await conn.close()


def ev(n: int) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0)


async def read_all(store: Store, session_id: str) -> list[StoredEvent]:
    return [r async for b in store.read(session_id) for r in b]


def every_call(head: int) -> list[Callable[[Store], Awaitable[object]]]:
    """One call of each kind, for a session ``s`` at ``head``."""
    return [
        lambda s: s.get("s"),
        lambda s: s.append("s", [ev(head + 1)], head),
        lambda s: read_all(s, "s"),
        lambda s: s.list_sessions(),
        lambda s: s.put_blob("s", b"blob"),
        lambda s: s.get_blob("s", "0" * 64),
        lambda s: s.fork("s", 1, SessionRecord(id=f"f{head}")),
        lambda s: s.update(SessionRecord(id="s"), 1),
        lambda s: s.purge_expired(),
    ]


async def all_unavailable(store: Store, head: int) -> None:
    """Every kind of call raises StoreUnavailableError, one after another (the fast
    lane) and all at once (the pool)."""
    for call in every_call(head):
        with pytest.raises(StoreUnavailableError, match="unavailable"):
            await asyncio.wait_for(call(store), 20)
    results = await asyncio.gather(
        *(asyncio.wait_for(call(store), 20) for call in every_call(head)),
        return_exceptions=True,
    )
    for result in results:
        assert isinstance(result, StoreUnavailableError), repr(result)


async def all_work(store: Store, head: int) -> int:
    """Every kind of call works again, one after another (the fast lane), and the
    reads all at once (the pool); returns the new head."""
    assert (await store.get("s")).head == head
    head = await store.append("s", [ev(head + 1)], head)
    assert [json.loads(r.data)["n"] for r in await read_all(store, "s")] == list(range(1, head + 1))
    blob_id = await store.put_blob("s", b"blob")
    assert await store.get_blob("s", blob_id) == b"blob"
    record = await store.update(await store.get("s"), (await store.get("s")).version)
    assert (await store.fork("s", 1, SessionRecord(id=f"f{head}-{record.version}"))).head == 1
    assert await store.purge_expired() == 0
    results: list[Any] = await asyncio.gather(
        *(store.get("s") for _ in range(3)),
        *(read_all(store, "s") for _ in range(3)),
        store.list_sessions(),
        store.get_blob("s", blob_id),
        store.put_blob("s", b"blob"),
    )
    assert {r.head for r in results[:3]} == {head}
    assert all(len(rows) == head for rows in results[3:6])
    return head


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_the_same_store_works_again_after_the_server_restarts(
    server: ThrowawayServer, store_url: str, mode: str
) -> None:
    """``fast``: a clean shutdown (connections told to go); ``immediate``: a crash."""
    async with open_store(store_url) as store:
        await store.create(SessionRecord(id="s"))
        head = await all_work(store, 0)
        for _ in range(2):
            await asyncio.to_thread(server.stop, mode)
            await all_unavailable(store, head)
            await started(server)
            head = await all_work(store, head)  # the same object, at once
        assert [json.loads(r.data)["n"] for r in await read_all(store, "s")] == list(
            range(1, head + 1)
        )


async def test_a_store_first_used_while_the_server_is_down_works_once_it_is_up(
    server: ThrowawayServer, store_url: str
) -> None:
    await asyncio.to_thread(server.stop, "fast")
    async with open_store(store_url) as store:
        for _ in range(2):
            with pytest.raises(StoreUnavailableError):
                await store.get("s")
        await started(server)
        with pytest.raises(SessionNotFoundError):
            await store.get("s")
        await store.create(SessionRecord(id="s"))
        assert await all_work(store, 0) == 1


async def test_connections_closed_by_idle_session_timeout_are_replaced(
    server: ThrowawayServer, store_url: str
) -> None:
    admin = await asyncpg.connect(server.url)
    try:
        await admin.execute("ALTER SYSTEM SET idle_session_timeout = '150ms'")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()
    try:
        async with open_store(store_url) as store:
            await store.create(SessionRecord(id="s"))
            head = 0
            for _ in range(4):  # the server closes every connection idle for 150 ms
                await asyncio.sleep(0.5)
                head = await all_work(store, head)
    finally:
        admin = await asyncpg.connect(server.url)
        try:
            await admin.execute("ALTER SYSTEM RESET idle_session_timeout")
            await admin.execute("SELECT pg_reload_conf()")
        finally:
            await admin.close()
