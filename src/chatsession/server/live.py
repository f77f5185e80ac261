"""Live streams any window can join: ``GET /v1/sessions/{id}/events``.

A :class:`LiveHub` per app (per worker process) carries what turns produce
to every window watching the session:

- The worker running a turn publishes two kinds of items: each text delta
  (``Delta``: the seq of the last stored event, its number since, its text)
  and, whenever the turn stored something, the new head of the log
  (``Stored``: a pointer, never the events themselves). Publishing never
  waits: items go to each local watcher's bounded queue and to the broker's
  outbox, and the turn goes on. The outbox is sent every ``LINGER`` (20 ms):
  each session's items of that time as one message, in order.
- A watcher sends stored events from the log (read after its cursor
  whenever a ``Stored`` pointer says there is more) and text deltas of the
  model call in progress. Every event id means "the log up to this seq":
  a stored event's id is its own seq; a delta's is ``<seq>-<n>``.
- Across workers, the broker depends on the store: Redis pub/sub (a channel
  per session under the store's key prefix), PostgreSQL LISTEN/NOTIFY (one
  channel per schema), and for ``sqlite://`` and ``file://`` a tail of the log
  (the head polled every ``poll_interval`` seconds while someone watches):
  stored events only, deltas stay within their worker. ``memory://`` is one
  process. On Redis and PostgreSQL the head is also polled every 2 s, so a
  lost notification delays events, never loses them.

A watcher that sees a gap in a model call's deltas (it joined another
worker's turn mid-answer, a delta was too large for a NOTIFY) stops sending
that call's deltas; when the call's message is stored it sends the text the
client lacks, so the concatenated ``text`` events always equal the stored
answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from chatsession.errors import ChatSessionError, SessionNotFoundError, UsageError
from chatsession.log import decode, to_builtins
from chatsession.store import Store

__all__ = [
    "Delta",
    "LiveEvent",
    "LiveHub",
    "Stored",
    "Subscription",
    "TurnFeed",
    "parse_event_id",
    "watch",
]

_logger = logging.getLogger("chatsession.server.live")

#: The largest NOTIFY payload PostgreSQL accepts is 8000 bytes; a delta above this is
#: sent as a gap (its text comes with the stored message).
PG_PAYLOAD_LIMIT = 7900
#: Seconds between safety polls of the head on Redis and PostgreSQL.
SAFETY_POLL = 2.0


@dataclass(frozen=True, slots=True)
class Delta:
    """A text delta: ``head`` the seq of the last stored event, ``n`` its number since.

    ``text`` is None when it could not be carried (too large for the broker).
    """

    head: int
    n: int
    text: str | None


@dataclass(frozen=True, slots=True)
class Stored:
    """The log now holds events up to ``seq`` (read them from the store)."""

    seq: int


class _Signal:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


OVERFLOW = _Signal("OVERFLOW")
CLOSED = _Signal("CLOSED")
GONE = _Signal("GONE")

Item = Delta | Stored | _Signal


def parse_event_id(value: str | None) -> tuple[int, int | None]:
    """Read a ``Last-Event-ID``: ``"12"`` or ``"12-3"`` (a delta).

    Returns:
        ``(seq, n)``: the log seen up to ``seq``, and ``n`` deltas after it (None: none).

    Raises:
        UsageError: Not an event id of this server.
    """
    if value is None or not value.strip():
        return 0, None
    text = value.strip()
    seq_text, dash, n_text = text.partition("-")
    if not seq_text.isdigit() or (dash and not n_text.isdigit()) or len(text) > 40:
        raise UsageError(f"not an event id: {text[:60]!r} (use '<seq>' or '<seq>-<n>')")
    return int(seq_text), (int(n_text) if dash else None)


class Subscription:
    """One watcher's bounded queue of items.

    When it holds ``size`` items and another comes, it overflows: the
    watcher is told to reconnect with its last event id (nothing is lost:
    the store and the worker's buffer replay it).
    """

    def __init__(self, session_id: str, size: int) -> None:
        self.session_id = session_id
        self.size = size
        self.overflowed = False
        self.closed = False
        self.buffer: dict[int, list[str]] = {}
        self._items: deque[Item] = deque()
        self._wakeup = asyncio.Event()

    def push(self, item: Item) -> None:
        """Queue ``item`` (never waits)."""
        if self.closed or self.overflowed:
            return
        items = self._items
        if isinstance(item, Stored) and items and isinstance(items[-1], Stored):
            if item.seq > items[-1].seq:
                items[-1] = item  # pointers coalesce
        elif isinstance(item, _Signal):
            items.append(item)
        elif len(items) >= self.size:
            self.overflowed = True
            items.clear()
        else:
            items.append(item)
        self._wakeup.set()

    def close(self) -> None:
        """End the watch (server shutdown)."""
        self.closed = True
        self._wakeup.set()

    async def next(self) -> Item:
        """The next item, or ``OVERFLOW`` / ``CLOSED`` / ``GONE``."""
        while True:
            if self.overflowed:
                return OVERFLOW
            if self._items:
                return self._items.popleft()
            if self.closed:
                return CLOSED
            self._wakeup.clear()
            await self._wakeup.wait()


@dataclass
class _Buffer:
    deltas: dict[int, list[str]] = field(default_factory=dict)
    ended: bool = False


class TurnFeed:
    """What one running turn publishes (see :meth:`LiveHub.feed`)."""

    def __init__(self, hub: LiveHub, session_id: str) -> None:
        self._hub = hub
        self.session_id = session_id
        self._buffer = _Buffer()
        self._stored = -1
        hub._buffers[session_id] = self._buffer

    def delta(self, head: int, n: int, text: str) -> None:
        """Publish the ``n``-th text delta since the stored seq ``head``."""
        self.stored(head)
        texts = self._buffer.deltas.setdefault(head, [])
        if len(texts) == n - 1:
            texts.append(text)
        self._hub._publish(self.session_id, Delta(head, n, text))

    def stored(self, head: int) -> None:
        """Publish that the log holds events up to ``head`` (once per new head)."""
        if head > self._stored:
            self._stored = head
            self._hub._publish(self.session_id, Stored(head))

    def end(self, head: int | None) -> None:
        """The turn ended; its deltas stay buffered for ``keep_seconds``."""
        if head is not None:
            self.stored(head)
        self._buffer.ended = True
        hub, buffer, sid = self._hub, self._buffer, self.session_id

        def drop() -> None:
            if hub._buffers.get(sid) is buffer:
                del hub._buffers[sid]

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_later(hub.keep_seconds, drop)


class _Broker:
    """Carries items between workers (the base class: one process)."""

    #: Seconds between polls of a watched session's head (None: no polling).
    poll_interval: float | None = None

    async def start(self, deliver: Callable[[str, Item], None]) -> None:
        """Begin delivering other workers' items to ``deliver``."""

    def send(self, session_id: str, item: Item) -> None:
        """Send ``item`` to the other workers (never waits)."""

    async def watch(self, session_id: str) -> None:
        """Receive the other workers' items of ``session_id`` (returns once listening)."""

    async def unwatch(self, session_id: str) -> None:
        """Stop receiving them."""

    async def aclose(self) -> None:
        """Release connections."""


class _Tail(_Broker):
    """SQLite and files: the head polled while someone watches; no deltas across workers."""

    def __init__(self, interval: float) -> None:
        self.poll_interval = interval


def _entry(item: Item) -> list[Any]:
    """One item of a batch payload: ``[seq]`` (a pointer) or ``[head, n, text]`` (a delta)."""
    if isinstance(item, Delta):
        return [item.head, item.n, item.text]
    assert isinstance(item, Stored)
    return [item.seq]


def _encode_batch(
    worker: str, session_id: str, items: list[Item], limit: int | None = None
) -> list[str]:
    """Encode one session's items, in order, as few payloads as fit in ``limit`` bytes.

    A payload is ``{"w": worker, "s": session id, "i": [entry, ...]}``. A delta
    too large for ``limit`` on its own crosses as a gap (text None).
    """
    head = json.dumps({"w": worker, "s": session_id, "i": []}, ensure_ascii=False)
    base = len(head.encode())
    payloads: list[str] = []
    chunk: list[str] = []
    size = base
    for item in items:
        entry = json.dumps(_entry(item), ensure_ascii=False, separators=(",", ":"))
        grow = len(entry.encode()) + (1 if chunk else 0)
        if limit is not None and base + grow > limit and isinstance(item, Delta):
            entry = json.dumps([item.head, item.n, None])
            grow = len(entry) + (1 if chunk else 0)
        if limit is not None and chunk and size + grow > limit:
            payloads.append(head[:-2] + ",".join(chunk) + "]}")
            chunk, size = [], base
            grow = len(entry.encode())
        chunk.append(entry)
        size += grow
    if chunk:
        payloads.append(head[:-2] + ",".join(chunk) + "]}")
    return payloads


def _decode_entry(entry: Any) -> Item:
    if len(entry) == 1:
        return Stored(int(entry[0]))
    text = entry[2]
    return Delta(int(entry[0]), int(entry[1]), text if isinstance(text, str) else None)


def _decode(payload: str | bytes) -> tuple[str, str, list[Item]] | None:
    try:
        value = json.loads(payload)
        worker, session_id = value["w"], value["s"]
        if "i" in value:
            return worker, session_id, [_decode_entry(e) for e in value["i"]]
        if "q" in value:
            return worker, session_id, [Stored(int(value["q"]))]
        text = value.get("t")
        return worker, session_id, [Delta(int(value["h"]), int(value["n"]), text)]
    except (ValueError, KeyError, TypeError, IndexError):
        return None


#: Seconds a worker gathers items before publishing them: each session's items of
#: that time cross as one message (a turn's ~35 deltas as one or two PUBLISHes).
LINGER = 0.02
#: The most items waiting to be published (then new ones are dropped: watchers on
#: other workers catch up from the safety poll of the head).
OUTBOX_LIMIT = 100_000


class _Remote(_Broker):
    """The shared parts of Redis and PostgreSQL: an outbox drained by one task.

    Items are gathered per session for :data:`LINGER` seconds and sent as one
    payload per session (in order; PostgreSQL splits what exceeds its limit).
    """

    poll_interval = SAFETY_POLL
    #: The largest payload the broker carries (None: no limit).
    payload_limit: int | None = None

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._pending: dict[str, list[Item]] = {}
        self._count = 0
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._deliver: Callable[[str, Item], None] | None = None
        self._sender: asyncio.Task[None] | None = None

    async def start(self, deliver: Callable[[str, Item], None]) -> None:
        self._deliver = deliver
        self._sender = asyncio.get_running_loop().create_task(
            self._send_loop(), name="chatsession-live-sender"
        )

    def send(self, session_id: str, item: Item) -> None:
        # when the broker is gone and the outbox full, watchers fall back to the safety poll
        if self._count >= OUTBOX_LIMIT:
            return
        items = self._pending.get(session_id)
        if items is None:
            self._pending[session_id] = [item]
        elif isinstance(item, Stored) and isinstance(items[-1], Stored):
            if item.seq > items[-1].seq:
                items[-1] = item  # pointers coalesce
            return
        else:
            items.append(item)
        self._count += 1
        if not self._ready.is_set():
            self._ready.set()
            self._idle.clear()

    def _payloads(self, session_id: str, items: list[Item]) -> list[str]:
        return _encode_batch(self.worker, session_id, items, self.payload_limit)

    def received(self, payload: str | bytes) -> None:
        """Hand another worker's items to the hub."""
        decoded = _decode(payload)
        if decoded is None or self._deliver is None:
            return
        worker, session_id, items = decoded
        if worker != self.worker:
            for item in items:
                self._deliver(session_id, item)

    async def _send_loop(self) -> None:
        while True:
            await self._ready.wait()
            await asyncio.sleep(LINGER)
            pending, self._pending, self._count = self._pending, {}, 0
            self._ready.clear()
            batch = [
                (session_id, payload)
                for session_id, items in pending.items()
                for payload in self._payloads(session_id, items)
            ]
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _logger.warning("live events: the broker refused %d item(s): %r", len(batch), exc)
                await asyncio.sleep(0.5)
            finally:
                if not self._ready.is_set():
                    self._idle.set()

    async def _send(self, batch: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        if self._sender is not None:
            # what is queued is sent first (briefly): the turns' last pointers matter
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)
            self._sender.cancel()
            with contextlib.suppress(BaseException):
                await self._sender


class _Redis(_Remote):
    """Redis pub/sub: one channel per session, ``<prefix>{<session id>}:live``."""

    def __init__(self, url: str, worker: str) -> None:
        super().__init__(worker)
        from chatsession.store.redis.connection import RedisConnection

        self._conn = RedisConnection(url, {})
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._confirmed: dict[str, asyncio.Event] = {}

    def channel(self, session_id: str) -> str:
        """The session's channel."""
        return f"{self._conn.prefix}{{{session_id}}}:live"

    async def _send(self, batch: list[tuple[str, str]]) -> None:
        pipe = self._conn.client().pipeline(transaction=False)
        for session_id, payload in batch:
            pipe.publish(self.channel(session_id), payload)
        await pipe.execute()

    async def watch(self, session_id: str) -> None:
        if self._pubsub is None:
            self._pubsub = self._conn.client().pubsub()
        channel = self.channel(session_id)
        event = self._confirmed.setdefault(channel, asyncio.Event())
        try:
            await self._pubsub.subscribe(channel)
        except Exception as exc:
            _logger.warning("live events: cannot subscribe on Redis: %r", exc)
            return
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(
                self._read_loop(), name="chatsession-live-redis"
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await event.wait()

    async def unwatch(self, session_id: str) -> None:
        channel = self.channel(session_id)
        self._confirmed.pop(channel, None)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def _read_loop(self) -> None:
        pubsub = self._pubsub
        while True:
            try:
                message = await pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _logger.warning("live events: Redis pub/sub failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                if not pubsub.subscribed:
                    await asyncio.sleep(0.05)
                continue
            kind = message.get("type")
            channel = message.get("channel")
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind == "subscribe":
                event = self._confirmed.get(channel)
                if event is not None:
                    event.set()
            elif kind == "message":
                self.received(message["data"])

    async def aclose(self) -> None:
        await super().aclose()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        await self._conn.aclose()


class _Postgres(_Remote):
    """PostgreSQL LISTEN/NOTIFY: one channel per schema, the session id in the payload."""

    payload_limit = PG_PAYLOAD_LIMIT

    def __init__(self, url: str, worker: str) -> None:
        super().__init__(worker)
        from chatsession.store.postgres.settings import parse_url

        self._settings = parse_url(url, {})
        digest = hashlib.sha256(self._settings.schema.encode()).hexdigest()[:16]
        self.channel = f"chatsession_live_{digest}"
        self._send_conn: Any = None
        self._listen_conn: Any = None
        self._watched: set[str] = set()

    async def _connect(self) -> Any:
        import asyncpg

        return await asyncpg.connect(
            **self._settings.connect_kwargs(), timeout=self._settings.connect_timeout
        )

    async def _send(self, batch: list[tuple[str, str]]) -> None:
        if self._send_conn is None or self._send_conn.is_closed():
            self._send_conn = await self._connect()
        try:
            await self._send_conn.executemany(
                "SELECT pg_notify($1, $2)", [(self.channel, p) for _, p in batch]
            )
        except Exception:
            with contextlib.suppress(Exception):
                await self._send_conn.close()
            self._send_conn = None
            raise

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        decoded = _decode(payload)
        if decoded is not None and decoded[1] in self._watched:
            self.received(payload)

    async def watch(self, session_id: str) -> None:
        self._watched.add(session_id)
        if self._listen_conn is None or self._listen_conn.is_closed():
            try:
                conn = await self._connect()
                await conn.add_listener(self.channel, self._on_notify)
            except Exception as exc:
                _logger.warning("live events: cannot LISTEN on PostgreSQL: %r", exc)
                return
            self._listen_conn = conn

    async def unwatch(self, session_id: str) -> None:
        self._watched.discard(session_id)

    async def aclose(self) -> None:
        await super().aclose()
        for conn in (self._send_conn, self._listen_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()


def _broker_for(url: str, worker: str, poll_interval: float) -> _Broker:
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss"):
        return _Redis(url, worker)
    if scheme in ("postgresql", "postgres"):
        return _Postgres(url, worker)
    if scheme in ("sqlite", "file"):
        return _Tail(poll_interval)
    return _Broker()


class LiveHub:
    """One worker's live events: what its turns publish, what its watchers receive.

    Args:
        store: The store (watchers read the log from it).
        url: The store's URL, unmasked (the broker connects with it).
        queue_size: The most items a watcher's queue holds (then it overflows).
        poll_interval: Seconds between polls of the head (``sqlite://`` and ``file://``).
        keep_seconds: How long a finished turn's deltas stay buffered.
    """

    def __init__(
        self,
        store: Store,
        url: str,
        *,
        queue_size: int = 1000,
        poll_interval: float = 0.1,
        keep_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.worker = uuid.uuid4().hex
        self.queue_size = queue_size
        self.keep_seconds = keep_seconds
        self._broker = _broker_for(url, self.worker, poll_interval)
        self._subs: dict[str, set[Subscription]] = {}
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._buffers: dict[str, _Buffer] = {}
        self._closed = False

    async def start(self) -> None:
        """Connect the broker (lazily: nothing is opened before it is needed)."""
        await self._broker.start(self._deliver)

    def feed(self, session_id: str) -> TurnFeed:
        """A feed for a turn of ``session_id`` starting now (its delta buffer is new)."""
        return TurnFeed(self, session_id)

    def watchers(self, session_id: str | None = None) -> int:
        """How many watchers this worker has (of one session, or all)."""
        if session_id is not None:
            return len(self._subs.get(session_id, ()))
        return sum(len(s) for s in self._subs.values())

    def _publish(self, session_id: str, item: Item) -> None:
        self._deliver(session_id, item)
        if not self._closed:
            self._broker.send(session_id, item)

    def _deliver(self, session_id: str, item: Item) -> None:
        for sub in tuple(self._subs.get(session_id, ())):
            sub.push(item)

    async def subscribe(self, session_id: str) -> Subscription:
        """Watch ``session_id``: items from now on, and a copy of the buffered deltas.

        Returns once the broker listens, so nothing published after the
        return is missed.
        """
        sub = Subscription(session_id, self.queue_size)
        buffer = self._buffers.get(session_id)
        if buffer is not None:
            sub.buffer = {h: list(texts) for h, texts in buffer.deltas.items()}
        if self._closed:
            sub.close()
            return sub
        subs = self._subs.setdefault(session_id, set())
        subs.add(sub)
        if len(subs) == 1:
            interval = self._broker.poll_interval
            if interval is not None:
                self._pollers[session_id] = asyncio.get_running_loop().create_task(
                    self._poll(session_id, interval), name=f"chatsession-live-poll-{session_id}"
                )
            await self._broker.watch(session_id)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        """Stop watching."""
        session_id = sub.session_id
        subs = self._subs.get(session_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[session_id]
            poller = self._pollers.pop(session_id, None)
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(BaseException):
                    await poller
            with contextlib.suppress(Exception):
                await self._broker.unwatch(session_id)

    async def _poll(self, session_id: str, interval: float) -> None:
        last = -1
        while True:
            await asyncio.sleep(interval)
            try:
                head = (await self.store.get(session_id)).head
            except SessionNotFoundError:
                self._deliver(session_id, GONE)
                return
            except ChatSessionError as exc:
                _logger.debug("live events: polling %r failed: %r", session_id, exc)
                continue
            if head != last:
                last = head
                self._deliver(session_id, Stored(head))

    async def aclose(self) -> None:
        """End every watch and close the broker."""
        self._closed = True
        for subs in self._subs.values():
            for sub in subs:
                sub.close()
        for poller in self._pollers.values():
            poller.cancel()
        for poller in list(self._pollers.values()):
            with contextlib.suppress(BaseException):
                await poller
        self._pollers.clear()
        await self._broker.aclose()


@dataclass(frozen=True)
class LiveEvent:
    """One event of a watch: ``event``, its JSON ``data``, its ``id``."""

    event: str
    data: dict[str, Any]
    id: str


@dataclass
class _Partial:
    """The text the client has of the model call after stored seq ``head``."""

    head: int
    text: str | None  # None: unknown (it resumed from a delta this worker never buffered)
    expected: int = 1
    broken: bool = False
    sent: str = ""  # sent by this watch


class _Watch:
    def __init__(self, store: Store, session_id: str, after: int, n: int | None) -> None:
        self.store = store
        self.session_id = session_id
        self.cursor = after
        self.last_id = str(after) if n is None else f"{after}-{n}"
        self.partial: _Partial | None = None
        self.turn_text: dict[str | None, str] = {}
        if n is not None:
            self.partial = _Partial(head=after, text=None, expected=n + 1)

    def resume_from_buffer(self, buffer: dict[int, list[str]]) -> None:
        partial = self.partial
        if partial is None:
            return
        texts = buffer.get(partial.head)
        if texts is not None and len(texts) >= partial.expected - 1:
            partial.text = "".join(texts[: partial.expected - 1])

    async def read_stored(self, upto: int | None = None) -> list[LiveEvent]:
        out: list[LiveEvent] = []
        async for batch in self.store.read(self.session_id, after_seq=self.cursor, upto_seq=upto):
            for event in decode(batch, self.session_id):
                out.extend(self._convert(event))
                self.cursor = event.seq
        return out

    def _convert(self, event: Any) -> list[LiveEvent]:
        seq = event.seq
        ident = str(seq)
        kind = event.type
        data = event.data
        if kind == "message":
            if data.role == "user":
                return [
                    LiveEvent(
                        "message",
                        {"role": "user", "content": data.text, "turn_id": event.turn_id},
                        ident,
                    )
                ]
            if data.role == "tool":
                return [
                    LiveEvent(
                        "tool_result",
                        {
                            "call_id": data.tool_call_id,
                            "name": data.name,
                            "content": data.text,
                            "is_error": data.is_error,
                        },
                        ident,
                    )
                ]
            if data.role != "assistant":
                return []
            out: list[LiveEvent] = []
            text = data.text
            self.turn_text[event.turn_id] = text
            partial, self.partial = self.partial, None
            if partial is not None and partial.head < seq:
                if partial.text is not None:
                    have = partial.text + partial.sent
                    if text.startswith(have):
                        if text[len(have) :]:
                            out.append(LiveEvent("text", {"text": text[len(have) :]}, ident))
                    else:
                        out.append(LiveEvent("text", {"text": text, "replace": True}, ident))
                elif not partial.broken and text.endswith(partial.sent):
                    pass  # the client has it all (what it had, then what this watch sent)
                else:
                    out.append(LiveEvent("text", {"text": text, "replace": True}, ident))
            elif text:
                out.append(LiveEvent("text", {"text": text}, ident))
            out.extend(
                LiveEvent(
                    "tool_call", {"id": c.id, "name": c.name, "arguments": c.arguments}, ident
                )
                for c in data.tool_calls
            )
            return out
        if kind == "usage":
            return [LiveEvent("usage", to_builtins(data), ident)]
        if kind == "turn_end":
            out = []
            status = data.status
            if status in ("error", "timeout"):
                kind_name = "turn_timeout" if status == "timeout" else "model_error"
                out.append(LiveEvent("error", {"type": kind_name, "message": data.error}, ident))
            reason = {"completed": "end_turn"}.get(status, status)
            out.append(
                LiveEvent(
                    "stop",
                    {
                        "reason": reason,
                        "text": self.turn_text.pop(event.turn_id, ""),
                        "session_id": self.session_id,
                        "seq": seq,
                        "status": status,
                    },
                    ident,
                )
            )
            return out
        return []

    def delta(self, item: Delta, buffer: dict[int, list[str]] | None = None) -> LiveEvent | None:
        if item.head != self.cursor:
            return None  # stored already (older), or its pointer is not read yet
        partial = self.partial
        if partial is None or partial.head != item.head:
            partial = self.partial = _Partial(head=item.head, text="")
        if partial.broken or item.n < partial.expected:
            return None
        if item.n > partial.expected or item.text is None:
            partial.broken = True
            return None
        partial.expected += 1
        partial.sent += item.text
        return LiveEvent("text", {"text": item.text}, f"{item.head}-{item.n}")


async def watch(
    hub: LiveHub, session_id: str, after: int = 0, n: int | None = None
) -> AsyncIterator[LiveEvent]:
    """The session's events after ``after`` (and delta ``n`` of it), then live, until closed.

    Subscribes first, then replays the log, then sends the live items the
    replay did not cover (by seq), so nothing is lost or sent twice at the seam.
    Ends with a ``reconnect`` event when the watcher's queue overflowed,
    and quietly at shutdown or when the session is deleted.
    """
    sub = await hub.subscribe(session_id)
    state = _Watch(hub.store, session_id, after, n)
    try:
        state.resume_from_buffer(sub.buffer)
        for event in await state.read_stored():
            state.last_id = event.id
            yield event
        for head, texts in sorted(sub.buffer.items()):
            for i, text in enumerate(texts, start=1):
                out = state.delta(Delta(head, i, text))
                if out is not None:
                    state.last_id = out.id
                    yield out
        while True:
            item = await sub.next()
            if item is OVERFLOW:
                yield LiveEvent(
                    "reconnect",
                    {"last_event_id": state.last_id, "reason": "the watcher fell behind"},
                    state.last_id,
                )
                return
            if item is CLOSED or item is GONE:
                return
            if isinstance(item, Stored):
                if item.seq > state.cursor:
                    for event in await state.read_stored():
                        state.last_id = event.id
                        yield event
            elif isinstance(item, Delta):
                out = state.delta(item)
                if out is not None:
                    state.last_id = out.id
                    yield out
    finally:
        await hub.unsubscribe(sub)
