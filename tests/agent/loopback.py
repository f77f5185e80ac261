"""Small servers on loopback for conditions llama.cpp's server cannot produce on demand.

Each runs its own event loop in a daemon thread, so it serves whatever loop
(or none) the test uses.

- :class:`ScriptedHTTP`: an HTTP/1.1 server whose answers a test function
  picks per request: a canned answer (``Respond``), a hand-made event stream
  (``Stream``, which may break off), or the request passed to a real server
  (``Forward``, e.g. llama.cpp's).
- :class:`TCPCounter`: a byte-level proxy that counts the TCP connections it
  accepts (connection reuse) and can cut a connection after some bytes of the
  answer (a server dying mid-stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


@dataclass
class Request:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Respond:
    """Answer with ``status`` and a JSON (or text) body; the connection stays open."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stream:
    """Answer 200 with server-sent events; ``cut`` closes the socket mid-body."""

    events: list[bytes]
    cut: bool = False
    delay: float = 0.0


@dataclass
class Forward:
    """Pass the request to the upstream server and its answer back (then close)."""


Action = Respond | Stream | Forward
Handler = Callable[[Request, int], Action]


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` (JSON, or ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


def chunk(
    content: str | None = None, finish: str | None = None, role: str | None = None
) -> dict[str, Any]:
    """A Chat Completions stream chunk."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "loopback",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


class _Threaded:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.connections = 0
        self.open_connections = 0

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def start(self) -> Any:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        for _ in range(3):  # let the transports' close callbacks run
            await asyncio.sleep(0)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        # shutdown cancels this inner task, not the one asyncio's server watches
        task = asyncio.ensure_future(self._handle(reader, writer))
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await task
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self.open_connections -= 1
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _connect(self, target: tuple[str, int]) -> tuple[asyncio.StreamReader, Any]:
        """A connection to ``target`` that shutdown closes too."""
        reader, writer = await asyncio.open_connection(*target)
        self._writers.add(writer)
        return reader, writer

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ScriptedHTTP(_Threaded):
    """An HTTP/1.1 server answering each request as ``handler(request, n)`` says.

    ``n`` counts the requests to the same path, from 1. ``upstream`` is the
    ``(host, port)`` that ``Forward`` sends to.
    """

    def __init__(self, handler: Handler, upstream: tuple[str, int] | None = None) -> None:
        super().__init__()
        self.handler = handler
        self.upstream = upstream
        self.requests: list[Request] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            line, *rest = head.decode("latin-1").split("\r\n")
            method, path, _ = line.split(" ", 2)
            headers = {}
            for item in rest:
                if ":" in item:
                    name, _, value = item.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Request(method, path, headers, body)
            self.requests.append(request)
            n = sum(1 for r in self.requests if r.path == path)
            action = self.handler(request, n)
            if isinstance(action, Respond):
                await self._respond(writer, action)
            elif isinstance(action, Stream):
                if not await self._stream(writer, action):
                    return
            else:
                await self._forward(writer, head, headers, body)
                return

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, action: Respond) -> None:
        if isinstance(action.body, bytes | str):
            payload = action.body.encode() if isinstance(action.body, str) else action.body
        else:
            payload = json.dumps(action.body).encode()
        head = [f"HTTP/1.1 {action.status} {REASONS.get(action.status, 'Status')}"]
        head.append("content-type: application/json")
        head.append(f"content-length: {len(payload)}")
        head.extend(f"{k}: {v}" for k, v in action.headers.items())
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()

    @staticmethod
    async def _stream(writer: asyncio.StreamWriter, action: Stream) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for event in action.events:
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            if action.delay:
                await asyncio.sleep(action.delay)
        if action.cut:
            await writer.drain()
            writer.close()
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _forward(
        self, writer: asyncio.StreamWriter, head: bytes, headers: dict[str, str], body: bytes
    ) -> None:
        if self.upstream is None:
            raise RuntimeError("Forward needs an upstream server")
        up_reader, up_writer = await self._connect(self.upstream)
        lines = head.decode("latin-1").split("\r\n")
        kept = [x for x in lines[1:] if x and not x.lower().startswith(("connection:", "host:"))]
        host = f"host: {self.upstream[0]}:{self.upstream[1]}"
        raw = "\r\n".join([lines[0], host, *kept, "connection: close"]) + "\r\n\r\n"
        up_writer.write(raw.encode("latin-1") + body)
        await up_writer.drain()
        try:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            up_writer.close()
            self._writers.discard(up_writer)


class TCPCounter(_Threaded):
    """Forward 127.0.0.1:<port> to ``target``, counting connections.

    ``cut_after``: close the first connection once that many bytes of the
    answer went through (later connections pass untouched).
    """

    def __init__(self, target: tuple[str, int], cut_after: int | None = None) -> None:
        super().__init__()
        self.target = target
        self.cut_after = cut_after
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._connect(self.target)
        limit = self.cut_after if self.connections == 1 else None

        async def upward() -> None:
            try:
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()
            finally:
                up_writer.close()

        async def downward() -> None:
            sent = 0
            while data := await up_reader.read(65536 if limit is None else 256):
                if limit is not None and sent + len(data) >= limit:
                    writer.write(data[: limit - sent])
                    await writer.drain()
                    self.cuts += 1
                    # a FIN mid-body, not a reset: a reset can make the client's kernel
                    # drop bytes it received but had not read yet (the cut would then
                    # fall before the first token on a quiet machine)
                    writer.close()
                    up_writer.transport.abort()
                    return
                sent += len(data)
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(upward()), asyncio.ensure_future(downward())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.close()
            self._writers.discard(up_writer)
