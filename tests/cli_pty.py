"""Running ``chatsession chat`` in a pseudo-terminal, for the CLI tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect


def spawn(home: Path, *args: str, timeout: float = 60) -> pexpect.spawn:
    """``chatsession chat ARGS`` with its data in ``home``, a 200-column dumb terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSION_")}
    env.update(CHATSESSION_DATA_DIR=str(home), TERM="dumb", COLUMNS="200")
    return pexpect.spawn(
        sys.executable,
        ["-m", "chatsession", "chat", *args],
        env=env,
        encoding="utf-8",
        dimensions=(24, 200),
        timeout=timeout,
    )
