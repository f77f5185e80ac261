"""A real uvicorn on a free loopback port, in a thread (or a subprocess for the CLI).

``LiveServer`` runs an app made by ``create_app`` with a test agent: a
scripted model whose rules call tools (``add`` answers at once, ``wait``
sleeps, so a turn can be kept running for the busy and disconnect tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import uvicorn

from chatsession import Agent, Reply, ScriptedLLM, tool
from chatsession.log import Message
from chatsession.server import ServerSettings, create_app

ADMIN_KEY = "test-admin-key-0123456789abcdef"


@tool
def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


@tool
async def wait(seconds: float) -> str:
    """Wait a while.

    Args:
        seconds: How long.
    """
    await asyncio.sleep(seconds)
    return f"waited {seconds}"


def _once(call: Reply) -> Any:
    """The tool call, then (after its result) an answer that quotes the result."""

    def reply(messages: Sequence[Message]) -> str | Reply:
        if messages and messages[-1].role == "tool":
            return f"The tool said {messages[-1].text}"
        return call

    return reply


def test_agent() -> Agent:
    """The agent of the test servers."""
    llm = ScriptedLLM(
        rules=[
            (r"please add", _once(Reply.call("add", a=2, b=3))),
            (r"please wait", _once(Reply.call("wait", "waiting", seconds=30))),
        ]
    )
    return Agent(llm, [add, wait])


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LiveServer:
    """A server running in a thread; ``url`` is its base URL."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    keys: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        """The auth header of ``who`` (``admin`` or a user made by :meth:`user`)."""
        key = ADMIN_KEY if who == "admin" else self.keys[who]
        return {"Authorization": f"Bearer {key}"}

    def client(self) -> httpx.Client:
        """A client on the server (close it)."""
        return httpx.Client(base_url=self.url, timeout=30)

    def user(self, name: str) -> str:
        """Make a key for user ``name`` (through the admin API) and keep it."""
        with self.client() as client:
            reply = client.post(
                "/v1/admin/keys", json={"user_id": name}, headers=self.headers("admin")
            )
            assert reply.status_code == 201, reply.text
            self.keys[name] = reply.json()["key"]
        return self.keys[name]


@contextlib.contextmanager
def live_server(
    store_url: str = "memory://", agent: Agent | None = None, **settings: Any
) -> Iterator[LiveServer]:
    """Run ``create_app`` on uvicorn in a thread on a free loopback port."""
    options: dict[str, Any] = {
        "store_url": store_url,
        "model": "scripted",
        "admin_key": ADMIN_KEY,
        "busy_timeout": 0.2,
        "key_cache_seconds": 0.5,
        "shutdown_grace": 2.0,
    }
    options.update(settings)
    app = create_app(ServerSettings(**options), agent=agent or test_agent())
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    """A server on a memory store with users alice and bob."""
    with live_server() as running:
        running.user("alice")
        running.user("bob")
        yield running


def sse_events(text: str) -> list[dict[str, Any]]:
    """Parse a text/event-stream body into ``{event, id, data}`` dicts (comments skipped)."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    data: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            if data or current:
                current["data"] = json.loads("\n".join(data)) if data else None
                events.append(current)
            current, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name in ("event", "id"):
            current[name] = value
    return events


@dataclass
class ServeProcess:
    """``chatsession serve`` in a subprocess."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop it; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@contextlib.contextmanager
def serve_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[ServeProcess]:
    """Run ``chatsession serve ARGS --port P`` and wait until ``/healthz`` answers."""
    port = port or free_port()
    log = tmp_path / f"serve-{port}.log"
    full_env = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatsession", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    running = ServeProcess(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited: {log.read_text()}")
            try:
                if httpx.get(running.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start: {log.read_text()}")
            time.sleep(0.1)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
