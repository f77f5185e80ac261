"""ASGI middleware: the request size limit (413) and request counting."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatsession.server.errors import error_body

__all__ = ["BodyLimit", "CountRequests"]

_WITH_BODY = {"POST", "PUT", "PATCH", "DELETE"}


#: Methods counted by name in the request metric; any other is counted as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413.

    A ``Content-Length`` over the limit is refused before reading; a body
    without one (chunked) is read up to the limit, then refused. Bodies
    within the limit are handed on as they came.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            error_body(
                "request_too_large",
                f"the request body is larger than {self.max_bytes} bytes "
                "(CHATSESSION_MAX_REQUEST_BYTES)",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class CountRequests:
    """Count every answered request by method and status (``record(method, status)``)."""

    def __init__(self, app: ASGIApp, record: Callable[[str, int], None]) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        if method not in _METHODS:
            method = "other"  # a client must not make label values up

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.record(method, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting)


class HeadAsGet:
    """Answer ``HEAD`` wherever ``GET`` is answered (RFC 9110): the GET's status and
    headers, without its body. Health probes and caches send ``HEAD``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the rest of the body is dropped too
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
