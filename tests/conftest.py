"""Test set-up shared by every test module.

Every test runs with ``CHATSESSION_*`` paths pointed at a temporary directory,
so no test touches a real user's sessions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Services the tests use; .ci/run exports these, and the same defaults apply locally.
REDIS_URL = os.environ.get("CHATSESSION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get(
    "CHATSESSION_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True)
def env_setup(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Point every chatsession path and setting at a fresh temporary directory."""
    home = tmp_path_factory.mktemp("chatsession-home")
    for name in list(os.environ):
        if name.startswith("CHATSESSION_") and not name.startswith("CHATSESSION_TEST_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATSESSION_DATA_DIR", str(home))
    yield home
