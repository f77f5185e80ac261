"""Manager tests run on every backend through the conformance suite's fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatsession import SessionManager
from tests.conformance.conftest import (  # noqa: F401  (fixtures)
    backend,
    durable_backend,
    durable_url,
    store_url,
)


class FakeClock:
    """A clock the test moves by hand; it starts at the real time."""

    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fresh fake clock."""
    return FakeClock()


@pytest.fixture
async def manager(
    store_url: str,  # noqa: F811  (the imported fixture)
    clock: FakeClock,
) -> AsyncIterator[SessionManager]:
    """A manager on a fresh store of the backend under test, with a fake clock."""
    made = SessionManager(store_url, ttl=3600, idle_after=600, clock=clock)
    yield made
    await made.aclose()
