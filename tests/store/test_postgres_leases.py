# ruff: noqa: F811 (the schema fixture, imported from test_postgres, is every test's argument)
"""PostgreSQL only: leases on the server's clock, fenced one-statement appends, an append
whose reply was lost sent again and applied once, snapshots, and migration 005."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from chatsession import (
    Lease,
    LeaseLostError,
    NewEvent,
    SessionBusyError,
    SessionRecord,
    Store,
    StoreUnavailableError,
    open_store,
)
from chatsession.store.base import new_event_id
from chatsession.store.postgres import MIGRATIONS, PostgresStore
from tests.store.tcp_proxy import TCPProxy
from tests.store.test_postgres import make_database_at, pg, schema  # noqa: F401

POSTGRES_URL = os.environ.get(
    "CHATSESSION_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def ev(n: int, event_id: str | None = None) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0, event_id=event_id)


async def numbers(store: Store, session_id: str) -> list[int]:
    return [json.loads(r.data)["n"] async for b in store.read(session_id) for r in b]


# -- a reply lost on the way back ------------------------------------------------------


class ReplyDropper(TCPProxy):
    """A proxy that, once armed, swallows the first reply holding ``marker`` and cuts
    that client's connection: the server did the work, the client never hears of it.

    Only the client's side is cut (a reset); the server's side is closed after the
    server has answered, so the server finishes what it received.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.marker: bytes | None = None
        self.dropped = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await super()._pipe(_Watched(reader, writer, self), writer)  # type: ignore[arg-type]


class _Watched:
    """A stream reader that ends, and resets the other end, at the proxy's marker."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: ReplyDropper
    ) -> None:
        self.reader, self.writer, self.proxy = reader, writer, proxy

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        if self.proxy.marker is not None and self.proxy.marker in data:
            self.proxy.marker = None
            self.proxy.dropped += 1
            self.writer.transport.abort()
            return b""
        return data


@pytest.fixture
async def dropper() -> AsyncIterator[ReplyDropper]:
    target = urlsplit(POSTGRES_URL)
    proxy = ReplyDropper(target.hostname or "127.0.0.1", target.port or 5432).start()
    try:
        yield proxy
    finally:
        proxy.close()


def through(proxy: TCPProxy, schema: str) -> str:
    target = urlsplit(POSTGRES_URL)
    user = f"{target.username}@" if target.username else ""
    return f"postgresql://{user}127.0.0.1:{proxy.port}{target.path}?schema={schema}"


@pytest.mark.parametrize("leased", [False, True])
async def test_an_append_whose_reply_was_lost_is_sent_again_and_applied_once(
    schema: str, dropper: ReplyDropper, leased: bool
) -> None:
    async with open_store(through(dropper, schema)) as store:
        assert isinstance(store, PostgresStore)
        await store.create(SessionRecord(id="s"))
        lease = await store.acquire_lease("s", "me", 30) if leased else None
        assert await store.append("s", [ev(1, new_event_id())], 0, lease=lease) == 1
        seen: list[bool] = []  # what each refused statement was found to be
        why_refused = store._why_refused

        async def spy(*args: Any) -> bool:
            applied = await why_refused(*args)
            seen.append(applied)
            return applied

        store._why_refused = spy  # type: ignore[method-assign]
        dropper.marker = b"INSERT 0 2\x00"  # the reply to this append, once the server did it
        batch = [ev(2, new_event_id()), ev(3, new_event_id())]
        assert await store.append("s", batch, 1, lease=lease) == 3  # success, not an error
        assert dropper.dropped == 1  # the server did the first try: its reply was swallowed
        assert seen == [True]  # the second try found it done and wrote nothing
        assert await numbers(store, "s") == [1, 2, 3]  # stored once
        assert (await store.get("s")).head == 3
        ids = [r.event_id async for b in store.read("s") for r in b]
        assert ids[1:] == [e.event_id for e in batch]
        assert await store.append("s", [ev(4, new_event_id())], 3, lease=lease) == 4  # goes on


async def test_an_append_without_event_ids_is_not_sent_again_after_a_lost_reply(
    schema: str, dropper: ReplyDropper
) -> None:
    async with open_store(through(dropper, schema)) as store:
        await store.create(SessionRecord(id="s"))
        assert await store.append("s", [ev(1)], 0) == 1
        dropper.marker = b"INSERT 0 2\x00"
        with pytest.raises(StoreUnavailableError):  # done or not: the store cannot tell
            await store.append("s", [ev(2), ev(3)], 1)
        assert dropper.dropped == 1
        assert await numbers(store, "s") == [1, 2, 3]  # it was done, once


# -- one statement per append -------------------------------------------------------


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of every statement the store sends (through asyncpg's connection)."""
    sent: list[str] = []
    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        real = getattr(asyncpg.Connection, name)

        def spy(self: Any, query: str, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            sent.append(query)
            return _real(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, name, spy)
    return sent


@pytest.mark.parametrize("size", [2, 40])
async def test_a_fenced_append_is_one_statement(
    schema: str, statements: list[str], size: int
) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))

        async def sent(lease: Lease | None, head: int) -> tuple[int, int]:
            statements.clear()
            batch = [ev(n, new_event_id()) for n in range(size)]
            return await store.append("s", batch, head, lease=lease), len(statements)

        lease = await store.acquire_lease("s", "me", 30)
        assert await sent(lease, 0) == (size, 1)  # under a lease
        await store.release_lease(lease)
        assert await sent(None, size) == (2 * size, 1)  # without one
        lease = await store.acquire_lease("s", "me", 30)
        batch = [ev(n, new_event_id()) for n in range(size)]
        assert await store.append("s", batch, 2 * size, lease=lease) == 3 * size
        statements.clear()
        assert await store.append("s", batch, 2 * size, lease=lease) == 3 * size  # sent again
        assert len(statements) == 2, statements  # refused, then found done: nothing written
        assert (await store.get("s")).head == 3 * size


# -- the server's clock ---------------------------------------------------------------


async def test_leases_are_judged_by_the_servers_clock_not_the_clients(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        await store.create(SessionRecord(id="s"))
        server_now = (await pg("SELECT date_part('epoch', clock_timestamp())"))[0][0]
        lease = await store.acquire_lease("s", "a", 30)
        assert abs(lease.expires_at - (server_now + 30)) < 5
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this client's clock is off
        with pytest.raises(SessionBusyError) as busy:  # an hour on, by our clock: still held
            await store.acquire_lease("s", "b", 30)
        assert busy.value.holder == "a" and busy.value.retry_after is not None
        assert 0 < busy.value.retry_after <= 30
        with pytest.raises(SessionBusyError):
            await store.append("s", [ev(1)], 0)
        assert await store.append("s", [ev(1)], 0, lease=lease) == 1  # not expired
        monkeypatch.setattr(time, "time", lambda: real() - 3600)  # and the other way
        short = await store.acquire_lease("s", "a", 0.3)  # a renewal by its holder
        await asyncio.sleep(0.45)
        with pytest.raises(LeaseLostError, match="expired"):
            await store.append("s", [ev(2)], 1, lease=short)
        taken = await store.acquire_lease("s", "b", 30)
        assert taken.token > short.token
        assert await numbers(store, "s") == [1]


# -- snapshots and leases go with the session -------------------------------------------


async def test_snapshot_rows_are_deleted_with_the_session_and_by_purge(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}") as store:
        for session_id in ("parent", "alone", "expiring"):
            await store.create(SessionRecord(id=session_id))
            await store.append(session_id, [ev(1)], 0)
            await store.put_snapshot(session_id, 1, session_id.encode())
        await store.fork("parent", 1, SessionRecord(id="fork"))
        await store.put_snapshot("fork", 1, b"fork")
        rows = f'SELECT count(*) FROM "{schema}".snapshots'
        assert (await pg(rows))[0][0] == 4
        await store.delete("parent")  # kept for its fork: its snapshot goes at once
        await store.delete("alone")
        record = await store.get("expiring")
        await store.update(record.model_copy(update={"expires_at": time.time() - 1}), 1)
        assert await store.purge_expired() == 1
        assert (await pg(rows))[0][0] == 1
        assert await store.get_snapshot("fork") == (1, b"fork")
        await store.delete("fork")
        assert (await pg(rows))[0][0] == 0
        assert await pg(f'SELECT id FROM "{schema}".sessions') == []


async def test_a_snapshot_and_a_delete_at_once_leave_no_snapshot_behind(schema: str) -> None:
    async with open_store(f"{POSTGRES_URL}?schema={schema}&max_size=20") as store:
        for n in range(20):
            await store.create(SessionRecord(id=f"s{n}"))
            await store.append(f"s{n}", [ev(1)], 0)

        async def snapshot(n: int) -> None:
            with contextlib.suppress(Exception):  # not found, once the delete went first
                await store.put_snapshot(f"s{n}", 1, b"x" * 100_000)

        await asyncio.gather(
            *(snapshot(n) for n in range(20)), *(store.delete(f"s{n}") for n in range(20))
        )
        assert (await pg(f'SELECT count(*) FROM "{schema}".snapshots'))[0][0] == 0


# -- migration 005 ----------------------------------------------------------------------


async def test_a_database_made_by_the_previous_version_gets_leases_ids_and_snapshots(
    schema: str,
) -> None:
    # the tables as migration 004 left them, with a session and its events
    await make_database_at(schema, 4, [json.dumps({"n": n}) for n in (1, 2)])
    url = f"{POSTGRES_URL}?schema={schema}"
    stores = [open_store(url) for _ in range(4)]  # opened at once: 005 runs once
    try:
        heads = await asyncio.gather(*(store.get("old") for store in stores))
        assert {r.head for r in heads} == {2}
        store = stores[0]
        old = [r async for b in store.read("old") for r in b]
        assert [(r.seq, r.event_id) for r in old] == [(1, None), (2, None)]
        lease = await store.acquire_lease("old", "me", 30)
        assert lease.token == 1
        with pytest.raises(SessionBusyError):
            await stores[1].append("old", [ev(3)], 2)
        batch = [ev(3, new_event_id())]
        assert await stores[1].append("old", batch, 2, lease=lease) == 3
        assert await store.append("old", batch, 2, lease=lease) == 3  # sent again: once
        await store.put_snapshot("old", 3, b"state")
        assert await stores[2].get_snapshot("old") == (3, b"state")
        assert await numbers(store, "old") == [1, 2, 3]
    finally:
        for store in stores:
            await store.aclose()
    names = [
        r[0] for r in await pg(f'SELECT name FROM "{schema}".chatsession_migrations ORDER BY 1')
    ]
    assert names == [name for name, _ in MIGRATIONS]
    assert names[4] == "005_leases_event_ids_snapshots"
