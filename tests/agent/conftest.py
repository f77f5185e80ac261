"""Fixtures for the model tests: llama.cpp's OpenAI-compatible server, started once."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from chatsession.agent.llm.local import model_path

#: The context size the test server is started with (``--n_ctx``).
LLAMA_N_CTX = 2048


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server serving SmolLM2 on a free loopback port.

    Yields its base URL (``http://127.0.0.1:PORT/v1``). It answers one
    request at a time; with ``--chat_format chatml-function-calling`` the
    model makes tool calls when ``tool_choice`` names a tool.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model_path()),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                str(LLAMA_N_CTX),
                "--chat_format",
                "chatml-function-calling",
                # one thread: on a small shared machine more threads wait on each other
                "--n_threads",
                "1",
                "--n_threads_batch",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=1) as answer:
                if answer.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=30)
            raise RuntimeError(f"llama.cpp server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def llama_address(llama_server: str) -> tuple[str, int]:
    """``(host, port)`` of :func:`llama_server`, for proxies in front of it."""
    parts = urlsplit(llama_server)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port
