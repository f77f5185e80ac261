"""The ``store`` fixture: every conformance test runs once per backend.

Backends: memory, sqlite, file, redis, postgres. ``CHATSESSION_TEST_BACKENDS``
(a comma list) narrows a local run. Redis and PostgreSQL come from
``CHATSESSION_TEST_REDIS_URL`` / ``CHATSESSION_TEST_POSTGRES_URL`` (loopback
defaults); an unreachable server fails the tests, it never skips them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from chatsession import Store, open_store

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
