"""The ``store`` fixture: every conformance test runs once per backend.

Backends: memory, sqlite, file, redis, postgres. ``CHATSESSION_TEST_BACKENDS``
(a comma list) narrows a local run. Redis and PostgreSQL come from
``CHATSESSION_TEST_REDIS_URL`` / ``CHATSESSION_TEST_POSTGRES_URL`` (loopback
defaults); an unreachable server fails the tests, it never skips them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from chatsession import Store, open_store
from chatsession.store.base import ParentRef

REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get(
    "CHATSESSION_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
ALL_BACKENDS = ["memory", "sqlite", "file", "redis", "postgres"]
_chosen = os.environ.get("CHATSESSION_TEST_BACKENDS", "")
BACKENDS = [b.strip() for b in _chosen.split(",") if b.strip()] or ALL_BACKENDS
DURABLE = [b for b in BACKENDS if b != "memory"]


def _with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(query=joined))


def make_url(backend: str, tmp_path: Path) -> tuple[str, str]:
    """A fresh, isolated URL for ``backend`` and the namespace to clean up."""
    tag = uuid.uuid4().hex[:12]
    if backend == "memory":
        return "memory://", ""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/store.db", ""
    if backend == "file":
        return f"file://{tmp_path}/sessions", ""
    if backend == "redis":
        prefix = f"cstest-{tag}:"
        return _with_query(REDIS_URL, f"prefix={prefix}"), prefix
    if backend == "postgres":
        schema = f"cstest_{tag}"
        return _with_query(POSTGRES_URL, f"schema={schema}"), schema
    raise ValueError(f"unknown backend {backend!r}")


async def cleanup(backend: str, namespace: str) -> None:
    """Remove what a Redis or PostgreSQL test left behind."""
    if backend == "redis" and namespace:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"*{namespace}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
    elif backend == "postgres" and namespace:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return str(request.param)


@pytest.fixture
async def store_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh URL of the backend under test, cleaned up afterwards."""
    url, namespace = make_url(backend, tmp_path)
    yield url
    await cleanup(backend, namespace)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store of the backend under test."""
    opened = open_store(store_url)
    yield opened
    await opened.aclose()


@pytest.fixture(params=DURABLE)
def durable_backend(request: pytest.FixtureRequest) -> str:
    """A backend whose data outlives the process (everything but memory://)."""
    return str(request.param)


@pytest.fixture
async def durable_url(durable_backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh URL of a durable backend, cleaned up afterwards."""
    url, namespace = make_url(durable_backend, tmp_path)
    yield url
    await cleanup(durable_backend, namespace)


@pytest.fixture
def writer_script() -> Iterator[Path]:
    """The child-process writer used by the concurrency and crash tests."""
    yield Path(__file__).with_name("writer.py")


# --------------------------------------------------------------------------
# damage made by hand, one helper per backend (the owners of redis and
# postgres fill in their branches)


def sqlite_path(url: str) -> Path:
    """The database file a ``sqlite:///`` test URL names."""
    return Path(urlsplit(url).path[1:])


def file_root(url: str) -> Path:
    """The folder a ``file://`` test URL names."""
    return Path(urlsplit(url).path)


async def make_fork_cycle(backend: str, store: Store, url: str, root_id: str, fork_id: str) -> None:
    """Make the fork chain loop: ``root_id`` (a root) gets ``fork_id`` as its parent, at seq 1.

    The test has created ``root_id`` with at least one event and forked
    ``fork_id`` from it at seq 1 or later. Afterwards each of the two is the
    other's ancestor, as a bad hand edit or a bad restore could leave them.
    Edits the backend's storage directly (behind ``store``'s back, as another
    program would); ``store`` is the open store object, for in-process backends.
    """
    if backend == "memory":
        entry = store._entries[root_id]  # type: ignore[attr-defined]
        entry.record = entry.record.model_copy(
            update={"parent": ParentRef(session_id=fork_id, seq=1)}
        )
        return
    if backend == "sqlite":
        db = sqlite3.connect(sqlite_path(url))
        try:
            db.execute(
                "UPDATE sessions SET parent_pk = (SELECT pk FROM sessions WHERE id = ?), "
                "parent_seq = 1 WHERE id = ?",
                (fork_id, root_id),
            )
            db.commit()
        finally:
            db.close()
        return
    if backend == "file":
        header_path = file_root(url) / root_id / "session.json"
        header = json.loads(header_path.read_text())
        header["parent"] = {"session_id": fork_id, "seq": 1}
        header_path.write_text(json.dumps(header))
        return
    if backend == "redis":  # the record hash of the root names the fork as its parent
        from urllib.parse import parse_qsl

        import redis.asyncio as aioredis

        prefix = dict(parse_qsl(urlsplit(url).query))["prefix"]
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await client.hset(
                f"{prefix}{{{root_id}}}:rec", mapping={"parent_id": fork_id, "parent_seq": "1"}
            )
        finally:
            await client.aclose()
        return
    if backend == "postgres":  # the root's row names the fork's row as its parent
        from urllib.parse import parse_qsl

        import asyncpg

        schema = dict(parse_qsl(urlsplit(url).query))["schema"]
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(
                f'UPDATE "{schema}".sessions SET parent_pk = '
                f'(SELECT pk FROM "{schema}".sessions WHERE id = $1), parent_seq = 1 WHERE id = $2',
                fork_id,
                root_id,
            )
        finally:
            await conn.close()
        return
    if backend in ("redis", "postgres"):
        raise NotImplementedError(
            f"make_fork_cycle has no {backend} branch yet: the {backend} store's owner writes "
            f"one here (tests/conformance/conftest.py) that points {root_id!r}'s parent at "
            f"{fork_id!r} (seq 1) in the server, the way the sqlite and file branches do"
        )
    raise AssertionError(f"make_fork_cycle knows no backend {backend!r}: add a branch")


async def damage_record(backend: str, store: Store, url: str, session_id: str) -> None:
    """Damage the stored record of ``session_id`` so that it cannot be read back.

    Afterwards ``store.get(session_id)`` must raise ``CorruptDataError`` and
    ``list_sessions`` must skip the session (logging a warning), while every
    other session stays readable and listed. Only for durable backends: an
    in-process ``memory://`` store keeps objects, not bytes that can rot.
    """
    if backend == "sqlite":
        db = sqlite3.connect(sqlite_path(url))
        try:
            db.execute("UPDATE sessions SET body = '{\"title\": [' WHERE id = ?", (session_id,))
            db.commit()
        finally:
            db.close()
        return
    if backend == "file":
        (file_root(url) / session_id / "session.json").write_text('["a list, not a record"]')
        return
    if backend == "redis":  # the record's JSON body cut short
        from urllib.parse import parse_qsl

        import redis.asyncio as aioredis

        prefix = dict(parse_qsl(urlsplit(url).query))["prefix"]
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await client.hset(f"{prefix}{{{session_id}}}:rec", "body", '{"title": [')
        finally:
            await client.aclose()
        return
    if backend == "postgres":  # the record's body kept as text, cut short
        from urllib.parse import parse_qsl

        import asyncpg

        schema = dict(parse_qsl(urlsplit(url).query))["schema"]
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(
                f'UPDATE "{schema}".sessions SET body = NULL, body_text = \'{{"title": [\' '
                "WHERE id = $1",
                session_id,
            )
        finally:
            await conn.close()
        return
    if backend in ("redis", "postgres"):
        raise NotImplementedError(
            f"damage_record has no {backend} branch yet: the {backend} store's owner writes "
            f"one here (tests/conformance/conftest.py) that leaves {session_id!r}'s record "
            "unreadable in the server (e.g. a field of the wrong type or bad JSON)"
        )
    raise AssertionError(f"damage_record knows no backend {backend!r}: add a branch")
