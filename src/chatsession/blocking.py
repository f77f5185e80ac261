"""A blocking facade over :class:`~chatsession.session.ChatSession`, for scripts.

``SyncChatSession`` runs the async session on a private event loop in a
background thread; each method waits for its coroutine, and async iterators
become plain iterators. Names mirror the async class one to one. It refuses
to be used from inside a running event loop (that would block the loop): use
``ChatSession`` there.

Ctrl+C while a turn runs stops the turn, records it as ``interrupted`` with
what was produced so far, and raises ``KeyboardInterrupt`` as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any, Self, TypeVar

from chatsession.agent import Agent
from chatsession.agent.events import AgentEvent
from chatsession.errors import UsageError
from chatsession.log import LogEvent, Message
from chatsession.session import INTERRUPTED, ChatMessage, ChatSession, ContextInfo, UsageSummary
from chatsession.store import Store
from chatsession.transfer import ExportFormat

__all__ = ["SyncChatSession"]

T = TypeVar("T")


def _settle(future: Future[T], task: asyncio.Task[T]) -> None:
    """Hand a finished task's outcome to the blocked caller's future."""
    if task.cancelled():
        future.set_exception(asyncio.CancelledError())
    elif (error := task.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(task.result())


class _Portal:
    """An event loop in a daemon thread that runs coroutines for blocking callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="chatsession-loop", daemon=True
        )
        self._thread.start()
        self.users = 1

    def run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise UsageError(
                "SyncChatSession blocks, so it cannot be used inside a running event loop; "
                "use ChatSession (async) there"
            )
        if not self.loop.is_running():
            raise UsageError("this SyncChatSession is closed")
        # The future exists before anything is scheduled, so Ctrl+C landing at any
        # point here finds it: a call not started yet is cancelled and never
        # starts; a started one is interrupted (recorded) and waited for.
        future: Future[T] = Future()
        tasks: list[asyncio.Task[T]] = []

        def begin() -> None:  # on the loop's thread
            if not future.set_running_or_notify_cancel():
                return  # cancelled before it started
            task = self.loop.create_task(make())
            tasks.append(task)
            task.add_done_callback(functools.partial(_settle, future))

        def interrupt() -> None:  # on the loop's thread, after begin()
            for task in tasks:
                task.cancel(INTERRUPTED)

        try:
            self.loop.call_soon_threadsafe(begin)
            return future.result()
        except KeyboardInterrupt:
            if not future.cancel():
                self.loop.call_soon_threadsafe(interrupt)
                with contextlib.suppress(BaseException):  # the turn is recorded; report Ctrl+C
                    future.result(timeout=30)
            raise

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self.run(agen.__anext__)  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            aclose: Callable[[], Awaitable[None]] | None = getattr(agen, "aclose", None)
            if aclose is not None and self.loop.is_running():
                self.run(aclose)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.loop.is_running():
            # as asyncio.run does: finish async generators (adapters close clients there)
            shutdown = asyncio.run_coroutine_threadsafe(self.loop.shutdown_asyncgens(), self.loop)
            with contextlib.suppress(Exception):
                shutdown.result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


class SyncChatSession:
    """The blocking twin of :class:`~chatsession.session.ChatSession`.

    Takes the same arguments. Use it as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        agent: Agent,
        session_id: str | None = None,
        *,
        store: str | Store | None = None,
        _portal: _Portal | None = None,
        _session: ChatSession | None = None,
        **options: Any,
    ) -> None:
        self._portal = _portal or _Portal()
        self._session = _session or ChatSession(agent, session_id, store=store, **options)

    @classmethod
    def resume(
        cls, agent: Agent, session_id: str, *, store: str | Store | None = None, **options: Any
    ) -> Self:
        """Open an existing session (see :meth:`ChatSession.resume`); loads it now."""
        self = cls(agent, session_id, store=store, must_exist=True, **options)
        self.open()
        return self

    @classmethod
    def import_session(cls, source: str | Path | IO[str], agent: Agent, **options: Any) -> Self:
        """Create a session from an export (see :meth:`ChatSession.import_session`)."""
        portal = _Portal()
        session = portal.run(lambda: ChatSession.import_session(source, agent, **options))
        return cls(agent, _portal=portal, _session=session)

    @property
    def session(self) -> ChatSession:
        """The async session underneath."""
        return self._session

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self._session.session_id

    @property
    def state(self) -> dict[str, Any]:
        """The agent's persisted key-values (saved with the next turn)."""
        return self._session.state

    @property
    def messages(self) -> list[Message]:
        """The messages the model sees now."""
        return self._session.messages

    @property
    def message_count(self) -> int:
        """How many messages were ever recorded. See :attr:`ChatSession.message_count`."""
        return self._session.message_count

    def read_history(self) -> list[Message]:
        """Every message ever recorded (reads the log). See :meth:`ChatSession.read_history`."""
        return self._portal.run(self._session.read_history)

    def open(self) -> Self:
        """Load or create the session now. See :meth:`ChatSession.open`."""
        self._portal.run(self._session.open)
        return self

    def query(self, message: ChatMessage, *, timeout: float | None = None) -> str:
        """Run one turn; return the final text. See :meth:`ChatSession.query`."""
        return self._portal.run(lambda: self._session.query(message, timeout=timeout))

    def query_stream(
        self, message: ChatMessage, *, timeout: float | None = None
    ) -> Iterator[AgentEvent]:
        """Run one turn, yielding its events. See :meth:`ChatSession.query_stream`."""
        return self._portal.iterate(self._session.query_stream(message, timeout=timeout))

    def events(self) -> Iterator[AgentEvent]:
        """One turn per incoming message. See :meth:`ChatSession.events`."""
        return self._portal.iterate(self._session.events())

    def send(self, message: ChatMessage) -> None:
        """Queue a message for :meth:`events`. See :meth:`ChatSession.send`."""
        self._portal.run(lambda: self._session.send(message))

    def fork_session(
        self, at: int | str | None = None, *, session_id: str | None = None
    ) -> SyncChatSession:
        """Fork (O(1)). See :meth:`ChatSession.fork_session`."""
        fork = self._portal.run(lambda: self._session.fork_session(at, session_id=session_id))
        self._portal.users += 1
        return SyncChatSession(self._session.agent, _portal=self._portal, _session=fork)

    def checkpoint(self, name: str, data: Any = None) -> int:
        """Name the current point. See :meth:`ChatSession.checkpoint`."""
        return self._portal.run(lambda: self._session.checkpoint(name, data))

    def rewind(self, to: int | str) -> int:
        """Return the context to an earlier point. See :meth:`ChatSession.rewind`."""
        return self._portal.run(lambda: self._session.rewind(to))

    def clear_history(self, *, clear_state: bool = False) -> None:
        """Empty the context; keep the record. See :meth:`ChatSession.clear_history`."""
        self._portal.run(lambda: self._session.clear_history(clear_state=clear_state))

    def save_state(self) -> None:
        """Persist :attr:`state` now. See :meth:`ChatSession.save_state`."""
        self._portal.run(self._session.save_state)

    def get_usage(self) -> UsageSummary:
        """Token usage and cost. See :meth:`ChatSession.get_usage`."""
        return self._portal.run(self._session.get_usage)

    def get_context_info(self) -> ContextInfo:
        """Context tokens against the budget. See :meth:`ChatSession.get_context_info`."""
        return self._portal.run(self._session.get_context_info)

    def read_events(self) -> list[LogEvent]:
        """The whole log. See :meth:`ChatSession.read_events`."""
        return self._portal.run(self._session.read_events)

    def export(self, dest: str | Path | IO[str], format: ExportFormat = "json") -> None:
        """Write the session to a file. See :meth:`ChatSession.export`."""
        self._portal.run(lambda: self._session.export(dest, format))

    def close(self) -> None:
        """Close the session and stop the background loop when no fork uses it.

        Unlike the other methods, this one may be called inside a running loop.
        """
        if self._portal.loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._session.close(), self._portal.loop)
            done.result(timeout=30)
        self._portal.stop()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
