"""A blocking facade over :class:`~chatsession.session.ChatSession`, for scripts.

``SyncChatSession`` runs the async session on a private event loop in a
background thread; each method waits for its coroutine, and async iterators
become plain iterators. It has every public method and property of
``ChatSession``, with the same names and options (a test compares the two);
the streaming primitive is a plain context manager::

    with SyncChatSession(agent, "chat-42", store=url) as session:
        with session.stream("hello") as events:
            for event in events:
                ...

It refuses to be used from inside a running event loop (that would block
the loop): use ``ChatSession`` there. Only :meth:`SyncChatSession.close`
may be called there.

Ctrl+C while a turn runs stops the turn, records it as ``interrupted`` with
what was produced so far, and raises ``KeyboardInterrupt`` as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypedDict, TypeVar, Unpack

from chatsession.agent import Agent
from chatsession.agent.events import AgentEvent
from chatsession.errors import UsageError
from chatsession.log import ConversationState, LogEvent, Message
from chatsession.session import (
    INTERRUPTED,
    ChatMessage,
    ChatSession,
    Consistency,
    ContextInfo,
    MessageSource,
    TurnStream,
    UsageSummary,
)
from chatsession.session.keeper import EventRedactor
from chatsession.store import SessionRecord, Store
from chatsession.transfer import ExportFormat
from chatsession.values import AgentState

__all__ = ["SessionOptions", "SyncChatSession", "SyncTurnStream"]

T = TypeVar("T")

#: Seconds ``close()`` waits for the session to close (and a Ctrl+C'd call to record itself).
_CLOSE_WAIT = 30.0


class SessionOptions(TypedDict, total=False):
    """The options of :class:`ChatSession` that :meth:`SyncChatSession.resume` and
    :meth:`SyncChatSession.import_session` pass on (see :class:`ChatSession` for each)."""

    message_source: MessageSource | None
    timeout: float | None
    consistency: Consistency
    offload_threshold: int
    compaction_threshold: float | None
    budget_tokens: int | None
    busy_timeout: float | None
    lease_ttl: float | None
    lease_linger: float | None
    snapshot_every: int | None
    redact: EventRedactor | None
    on_turn: Callable[[ChatSession], Awaitable[None]] | None


def _settle(future: Future[T], task: asyncio.Task[T]) -> None:
    """Hand a finished task's outcome to the blocked caller's future."""
    if task.cancelled():
        future.set_exception(asyncio.CancelledError())
    elif (error := task.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(task.result())


class _Portal:
    """An event loop in a daemon thread that runs coroutines for blocking callers.

    Shared by a session and its forks; the last of them to close stops it.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="chatsession-loop", daemon=True)
        self._thread.start()
        self.users = 1

    def _serve(self) -> None:
        # Ctrl+C must reach the main thread: a SIGINT the kernel hands to this thread
        # (or to the worker threads it starts, which inherit its mask) would leave
        # the main thread blocked in input() with the KeyboardInterrupt pending
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        self.loop.run_forever()

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
            raise UsageError("this SyncChatSession is closed; open a new one to continue")
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
                    future.result(timeout=_CLOSE_WAIT)
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


class SyncTurnStream:
    """One turn, blocking: ``with session.stream(message) as events: for event in events:``.

    Made by :meth:`SyncChatSession.stream`; the blocking twin of
    :class:`~chatsession.session.TurnStream` (see :meth:`ChatSession.stream`).
    Entering takes the session and stores the user's message; iterating
    yields the turn's events, each step stored first; leaving ends the turn,
    recorded as ``interrupted`` when the events were not read to the end (or
    Ctrl+C stopped it).
    """

    def __init__(self, portal: _Portal, turn: TurnStream) -> None:
        self._portal = portal
        self._turn = turn
        self._entered = False

    def __enter__(self) -> Self:
        self._portal.run(self._turn.__aenter__)
        self._entered = True
        return self

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> AgentEvent:
        if not self._entered:
            raise UsageError("iterate the turn inside `with session.stream(message) as events:`")
        try:
            return self._portal.run(self._turn.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._portal.run(lambda: self._turn.__aexit__(exc_type, exc, tb))


class SyncChatSession:
    """The blocking twin of :class:`~chatsession.session.ChatSession`.

    Takes the same arguments and has the same methods and properties, each
    blocking until done; async iterators are plain iterators and
    :meth:`stream` is a plain context manager. Use it as a context manager
    or call :meth:`close`.

    Args:
        agent: The agent that answers.
        session_id: Open this session (created if it does not exist); None
            for a new session with a fresh id.
        store: A store URL or object; None for the default store.
        user_id: The owner recorded on a new session.
        agent_id: The agent id recorded on a new session.
        window_id: The client window recorded on a new session.
        title: A title for a new session.
        message_source: Where :meth:`events` takes messages from.
        timeout: Seconds a turn may take.
        consistency: ``warn``, ``strict`` or ``ignore`` (see :class:`ChatSession`).
        offload_threshold: Tool outputs longer than this are kept as blobs.
        compaction_threshold: The context's share of the budget that triggers compaction.
        budget_tokens: The context budget; default: the model's window.
        busy_timeout: Seconds to wait while another writer holds the session.
        lease_ttl: Seconds the session's lease lasts unrenewed.
        lease_linger: Seconds the lease is kept after a write.
        snapshot_every: Events between snapshots of the folded state.
        must_exist: Raise :class:`SessionNotFoundError` instead of creating it.
        redact: Rewrites every event before it is stored (see :class:`ChatSession`).
        on_turn: A coroutine function awaited (on the twin's event loop) once
            each turn has started, with the async session.

    Raises:
        UsageError: A bad option (see :class:`ChatSession`).
    """

    def __init__(
        self,
        agent: Agent,
        session_id: str | None = None,
        *,
        store: str | Store | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        window_id: str | None = None,
        title: str | None = None,
        message_source: MessageSource | None = None,
        timeout: float | None = None,
        consistency: Consistency = "warn",
        offload_threshold: int = 8000,
        compaction_threshold: float | None = 0.8,
        budget_tokens: int | None = None,
        busy_timeout: float | None = None,
        lease_ttl: float | None = None,
        lease_linger: float | None = None,
        snapshot_every: int | None = None,
        must_exist: bool = False,
        redact: EventRedactor | None = None,
        on_turn: Callable[[ChatSession], Awaitable[None]] | None = None,
    ) -> None:
        # the session first: a bad option starts no thread
        self._session = ChatSession(
            agent,
            session_id,
            store=store,
            user_id=user_id,
            agent_id=agent_id,
            window_id=window_id,
            title=title,
            message_source=message_source,
            timeout=timeout,
            consistency=consistency,
            offload_threshold=offload_threshold,
            compaction_threshold=compaction_threshold,
            budget_tokens=budget_tokens,
            busy_timeout=busy_timeout,
            lease_ttl=lease_ttl,
            lease_linger=lease_linger,
            snapshot_every=snapshot_every,
            must_exist=must_exist,
            redact=redact,
            on_turn=on_turn,
        )
        self._portal = _Portal()
        self._closed = False

    @classmethod
    def _around(cls, session: ChatSession, portal: _Portal) -> Self:
        """A twin for an async session already made on ``portal``'s loop (forks, imports)."""
        self = cls.__new__(cls)
        self._session = session
        self._portal = portal
        self._closed = False
        return self

    # ------------------------------------------------------------------
    # opening

    @classmethod
    def resume(
        cls,
        agent: Agent,
        session_id: str,
        *,
        store: str | Store | None = None,
        **options: Unpack[SessionOptions],
    ) -> Self:
        """Open an existing session and load it now (see :meth:`ChatSession.resume`).

        Raises:
            SessionNotFoundError: There is no such visible session.
        """
        self = cls(agent, session_id, store=store, must_exist=True, **options)
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    @classmethod
    def import_session(
        cls,
        source: str | Path | IO[str],
        agent: Agent,
        *,
        store: str | Store | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        **options: Unpack[SessionOptions],
    ) -> Self:
        """Create a session from an export (see :meth:`ChatSession.import_session`)."""
        portal = _Portal()
        try:
            session = portal.run(
                lambda: ChatSession.import_session(
                    source, agent, store=store, session_id=session_id, user_id=user_id, **options
                )
            )
        except BaseException:
            portal.stop()
            raise
        return cls._around(session, portal)

    def open(self) -> Self:
        """Load or create the session now. See :meth:`ChatSession.open`."""
        self._portal.run(self._session.open)
        return self

    def open_for_reading(self) -> None:
        """Open the session unless it is open. See :meth:`ChatSession.open_for_reading`."""
        self._portal.run(self._session.open_for_reading)

    # ------------------------------------------------------------------
    # what the session is

    @property
    def session(self) -> ChatSession:
        """The async session underneath (it runs on this object's own event loop thread)."""
        return self._session

    @property
    def agent(self) -> Agent:
        """The agent that answers."""
        return self._session.agent

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self._session.session_id

    @property
    def store(self) -> Store:
        """The store the session is kept in (an async object, used on this session's loop)."""
        return self._session.store

    @property
    def record(self) -> SessionRecord | None:
        """The session's record as last read or written (None before it is opened)."""
        return self._session.record

    @property
    def consistency_warnings(self) -> list[str]:
        """How the agent differs from the one that wrote the session (on resume)."""
        return self._session.consistency_warnings

    @property
    def timeout(self) -> float | None:
        """Seconds a turn may take (None: no limit)."""
        return self._session.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._session.timeout = value

    @property
    def consistency(self) -> Consistency:
        """How a changed agent is treated on resume (``warn``, ``strict``, ``ignore``)."""
        return self._session.consistency

    @consistency.setter
    def consistency(self, value: Consistency) -> None:
        self._session.consistency = value

    @property
    def busy_timeout(self) -> float:
        """Seconds to wait while another writer holds the session."""
        return self._session.busy_timeout

    @busy_timeout.setter
    def busy_timeout(self, value: float) -> None:
        self._session.busy_timeout = value

    @property
    def offload_threshold(self) -> int:
        """Tool outputs longer than this many characters are kept as blobs."""
        return self._session.offload_threshold

    @offload_threshold.setter
    def offload_threshold(self, value: int) -> None:
        self._session.offload_threshold = value

    @property
    def compaction_threshold(self) -> float | None:
        """The context's share of the budget past which older turns are summarised."""
        return self._session.compaction_threshold

    @compaction_threshold.setter
    def compaction_threshold(self, value: float | None) -> None:
        self._session.compaction_threshold = value

    @property
    def conversation(self) -> ConversationState:
        """The folded state of the log. See :attr:`ChatSession.conversation`."""
        return self._session.conversation

    @property
    def state(self) -> AgentState:
        """The agent's own key-values, saved with each turn. See :attr:`ChatSession.state`."""
        return self._session.state

    @state.setter
    def state(self, values: Mapping[str, Any]) -> None:
        self._session.state = values

    @property
    def messages(self) -> list[Message]:
        """The messages the model sees now (a copy)."""
        return self._session.messages

    @property
    def message_count(self) -> int:
        """How many messages were ever recorded. See :attr:`ChatSession.message_count`."""
        return self._session.message_count

    # ------------------------------------------------------------------
    # turns

    def stream(self, message: ChatMessage, *, timeout: float | None = None) -> SyncTurnStream:
        """One turn, streamed: ``with session.stream(message) as events:``.

        See :meth:`ChatSession.stream` for what is stored when, and the errors.
        """

        async def make() -> TurnStream:
            return self._session.stream(message, timeout=timeout)

        return SyncTurnStream(self._portal, self._portal.run(make))

    def query_stream(
        self, message: ChatMessage, *, timeout: float | None = None
    ) -> Iterator[AgentEvent]:
        """Run one turn, yielding its events. See :meth:`ChatSession.query_stream`."""
        with self.stream(message, timeout=timeout) as events:
            yield from events

    def query(self, message: ChatMessage, *, timeout: float | None = None) -> str:
        """Run one turn; return the final text. See :meth:`ChatSession.query`."""
        return self._portal.run(lambda: self._session.query(message, timeout=timeout))

    def compact(self, *, keep_messages: int = 4) -> bool:
        """Summarise older messages in the context. See :meth:`ChatSession.compact`."""
        return self._portal.run(lambda: self._session.compact(keep_messages=keep_messages))

    def events(self) -> Iterator[AgentEvent]:
        """One turn per incoming message. See :meth:`ChatSession.events`."""
        return self._portal.iterate(self._session.events())

    def send(self, message: ChatMessage) -> None:
        """Queue a message for :meth:`events`. See :meth:`ChatSession.send`."""
        self._portal.run(lambda: self._session.send(message))

    # ------------------------------------------------------------------
    # fork, checkpoints, rewind, clear, state

    def fork_session(
        self, at: int | str | None = None, *, session_id: str | None = None
    ) -> SyncChatSession:
        """Fork (O(1) at the head). See :meth:`ChatSession.fork_session`.

        The fork shares this session's event loop thread; it stops when the
        last of them is closed.
        """
        fork = self._portal.run(lambda: self._session.fork_session(at, session_id=session_id))
        self._portal.users += 1
        return self._around(fork, self._portal)

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

    def set_metadata(self, **values: Any) -> None:
        """Record session key-values. See :meth:`ChatSession.set_metadata`."""
        self._portal.run(lambda: self._session.set_metadata(**values))

    # ------------------------------------------------------------------
    # reading

    def read_history(self) -> list[Message]:
        """Every message ever recorded (reads the log). See :meth:`ChatSession.read_history`."""
        return self._portal.run(self._session.read_history)

    def read_events(self) -> list[LogEvent]:
        """The whole log. See :meth:`ChatSession.read_events`."""
        return self._portal.run(self._session.read_events)

    def read_blob(self, blob_id: str) -> bytes:
        """An offloaded tool output's bytes. See :meth:`ChatSession.read_blob`."""
        return self._portal.run(lambda: self._session.read_blob(blob_id))

    def get_usage(self) -> UsageSummary:
        """Token usage and cost. See :meth:`ChatSession.get_usage`."""
        return self._portal.run(self._session.get_usage)

    def get_context_info(self) -> ContextInfo:
        """Context tokens against the budget. See :meth:`ChatSession.get_context_info`."""
        return self._portal.run(self._session.get_context_info)

    def export(self, dest: str | Path | IO[str], format: ExportFormat = "json") -> None:
        """Write the session to a file. See :meth:`ChatSession.export`."""
        self._portal.run(lambda: self._session.export(dest, format))

    # ------------------------------------------------------------------
    # closing

    def close(self) -> None:
        """Close the session (see :meth:`ChatSession.close`) and stop the background
        loop when no fork uses it. Idempotent.

        Unlike the other methods, this one may be called inside a running loop.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._portal.loop.is_running():
                done = asyncio.run_coroutine_threadsafe(self._session.close(), self._portal.loop)
                done.result(timeout=_CLOSE_WAIT)
        finally:
            self._portal.stop()

    def __enter__(self) -> Self:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
