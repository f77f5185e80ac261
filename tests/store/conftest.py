"""Fixtures of the Redis store tests (``test_redis.py``, ``test_redis_integrity.py``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A unique key prefix, every key under it deleted afterwards."""
    value = f"cstest-{uuid.uuid4().hex[:10]}:"  # no glob characters: safe in MATCH
    yield value
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{value}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    """A plain client on the shared test server, for looking under the store."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()
