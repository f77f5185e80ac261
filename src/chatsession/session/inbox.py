"""Incoming messages: ``message_source``, ``send`` and ``close``, for ``events()``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from typing import Any, TypeAlias

from chatsession.log import ImagePart, Message, TextPart

__all__ = ["END", "ChatMessage", "Inbox", "MessageSource"]

ChatMessage: TypeAlias = str | Sequence[TextPart | ImagePart] | Message
"""What a user sends: text, a list of text and image parts, or a ``Message``."""

MessageSource: TypeAlias = (
    Iterable[ChatMessage] | Iterator[ChatMessage] | AsyncIterator[ChatMessage] | asyncio.Queue[Any]
)
"""Where ``events()`` takes messages from: a list, an iterator, an async
iterator or generator, or an ``asyncio.Queue`` (``None`` in the queue ends it)."""

#: Marks the end of the incoming messages.
END = object()


class Inbox:
    """Where a session's :meth:`~chatsession.ChatSession.events` takes its messages from.

    Args:
        source: A ``message_source``; without one, :meth:`send` feeds the inbox.
    """

    def __init__(self, source: MessageSource | None) -> None:
        self.source = source
        self._queue: asyncio.Queue[Any] | None = None
        self._closing: asyncio.Event | None = None
        self.closed = False

    def put(self, message: ChatMessage) -> None:
        """Queue a message (only for inboxes without a source)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        self._queue.put_nowait(message)

    def close(self) -> None:
        """End the iteration, whatever feeds it (a message already taken is still read)."""
        self.closed = True
        if self._closing is not None:
            self._closing.set()

    async def messages(self) -> AsyncGenerator[ChatMessage, None]:
        """The incoming messages, until the source ends or :meth:`close` is called."""
        source: Any = self.source
        if source is None:
            if self._queue is None:
                self._queue = asyncio.Queue()
            source = self._queue
        if isinstance(source, asyncio.Queue):
            while True:
                item = await self._unless_closed(source.get())
                if item is None or item is END:
                    return
                yield item
        elif hasattr(source, "__anext__"):
            while True:
                try:
                    item = await self._unless_closed(anext(source))
                except StopAsyncIteration:
                    return
                if item is END:
                    return
                yield item
        else:
            blocking = iter(source)
            done = object()
            while True:
                # a blocking iterator must not block the event loop
                item = await self._unless_closed(asyncio.to_thread(next, blocking, done))
                if item is done or item is END:
                    return
                yield item

    async def _unless_closed(self, step: Awaitable[Any]) -> Any:
        """Await ``step``, or return :data:`END` as soon as the inbox is closed."""
        if self.closed:
            if asyncio.iscoroutine(step):
                step.close()
            return END
        if self._closing is None:
            self._closing = asyncio.Event()
        task = asyncio.ensure_future(step)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.done() and not task.cancelled():
            return task.result()  # a message that arrived with close() is still read
        return END
