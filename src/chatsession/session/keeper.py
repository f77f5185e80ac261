"""The log keeper: a session's folded state, kept in step with its store.

It loads the state (the latest snapshot plus the events after it, or the
whole log when there is no usable snapshot), appends events (shielded from
cancellation, under the session's lease, catching up when another writer got
there first), writes snapshots now and then, and reads the log for what the
bounded state does not keep (an earlier point for a rewind, the whole history).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, TypeVar

from chatsession.errors import ConflictError, CorruptDataError, DecryptionError, SessionBusyError
from chatsession.log import (
    ConversationState,
    LogEvent,
    Message,
    Snapshot,
    UsageTotals,
    decode,
    decode_payloads,
    encode,
)
from chatsession.log.state import group_snapshot, read_snapshot, summary_message
from chatsession.store import Lease, SessionRecord, Store, StoredEvent

__all__ = ["EventRedactor", "LogKeeper", "bounded"]

_logger = logging.getLogger("chatsession.session")
T = TypeVar("T")

#: Events per read while loading.
_LOAD_BATCH = 5000


async def _read_ahead(batches: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yield batches while the next one is already being read (decoding overlaps I/O)."""
    iterator = aiter(batches)
    pending: asyncio.Future[T] | None = asyncio.ensure_future(anext(iterator))
    try:
        while pending is not None:
            try:
                batch = await pending
            except StopAsyncIteration:
                # drop the finished task: its exception's traceback holds this frame
                # (a reference cycle keeping the last batch alive until a gc run)
                pending = None
                return
            pending = asyncio.ensure_future(anext(iterator))
            yield batch
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


class EventRedactor(Protocol):
    """What rewrites events before they are stored (:class:`chatsession.privacy.Redactor`)."""

    def redact_event(self, event: LogEvent) -> LogEvent:
        """The event with secrets rewritten (the same object when nothing changed)."""
        ...

    def redact_text(self, text: str) -> str:
        """The text with secrets rewritten (a large tool output kept as a blob)."""
        ...


class LogKeeper:
    """A session's bounded conversation state, in step with its store.

    Args:
        store: The store.
        session_id: The session.
        snapshot_every: Write a snapshot once this many events were appended
            since the last one (0: never, but on :meth:`flush_snapshot`).
        redact: Rewrites every event before it is stored (and folded: the
            state holds what the store holds).
    """

    def __init__(
        self,
        store: Store,
        session_id: str,
        *,
        snapshot_every: int = 1000,
        redact: EventRedactor | None = None,
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.snapshot_every = snapshot_every
        self.redact = redact
        self.state = ConversationState.bounded()
        #: a fork's usage at its fork point, per (model, level)
        self.inherited: dict[tuple[str, str], UsageTotals] = {}
        self.snapshot_seq = 0
        self._inflight: asyncio.Future[None] | None = None

    # -- loading ------------------------------------------------------------------

    async def load(self, record: SessionRecord) -> None:
        """Fold the session's log into :attr:`state` (from its snapshot when it has one)."""
        if record.head and await self._load_snapshot(record):
            return
        fork_seq = record.parent.seq if record.parent else 0
        full = ConversationState()  # keeps the history for rewinds; dropped after
        async for batch in _read_ahead(self.store.read(self.session_id, batch_size=_LOAD_BATCH)):
            payloads = decode_payloads(batch, self.session_id)
            if fork_seq and batch[0].seq <= fork_seq <= batch[-1].seq:
                cut = fork_seq - batch[0].seq + 1
                full.apply_stored(batch[:cut], payloads[:cut])
                self.inherited = {k: v.copy() for k, v in full.usage_groups.items()}
                full.apply_stored(batch[cut:], payloads[cut:])
            else:
                full.apply_stored(batch, payloads)
        self.state = bounded(full)
        if record.head > 1 and self.snapshot_every:
            await self.write_snapshot()

    async def _load_snapshot(self, record: SessionRecord) -> bool:
        """Restore from the stored snapshot; False when there is none or it is unusable."""
        try:
            stored = await self.store.get_snapshot(self.session_id)
        except DecryptionError:
            raise  # the log is written with the same keys: rebuilding would not help
        except CorruptDataError as exc:
            _logger.warning(
                "session %r: its snapshot cannot be read (%s); reading the whole log instead",
                self.session_id,
                exc,
            )
            return False
        if stored is None:
            return False
        seq, data = stored
        snap = read_snapshot(data)
        if snap is None or snap.head != seq or seq > record.head:
            _logger.warning(
                "session %r: its snapshot at seq %s is damaged or of another version; "
                "reading the whole log instead",
                self.session_id,
                seq,
            )
            return False
        try:
            context = await self._read_context(snap)
            state = snap.restore(context)
        except CorruptDataError as exc:
            _logger.warning(
                "session %r: its snapshot at seq %s does not match the log (%s); reading "
                "the whole log instead",
                self.session_id,
                seq,
                exc,
            )
            return False
        inherited = snap.inherited_usage()
        if inherited is not None:
            self.inherited = inherited
        self.snapshot_seq = seq
        self.state = state
        async for batch in self.store.read(self.session_id, after_seq=seq, batch_size=_LOAD_BATCH):
            await self.fold_in(batch, decode_payloads(batch, self.session_id))
        return True

    async def _read_context(self, snap: Snapshot) -> list[tuple[int, Message]]:
        """The context's messages, read from where the snapshot says they are."""
        context: list[tuple[int, Message]] = []
        if snap.summary_seq is not None:
            rows = await self._rows(snap.summary_seq - 1, snap.summary_seq)
            if len(rows) != 1 or rows[0].type != "compaction":
                raise CorruptDataError(f"seq {snap.summary_seq} is not a compaction")
            (payload,) = decode_payloads(rows, self.session_id)
            context.append((rows[0].seq, summary_message(payload.summary)))
        for lo, hi in snap.segments:
            async for batch in _read_ahead(
                self.store.read(
                    self.session_id, after_seq=lo - 1, upto_seq=hi, batch_size=_LOAD_BATCH
                )
            ):
                rows = [row for row in batch if row[1] == "message"]
                context.extend(
                    zip([r[0] for r in rows], decode_payloads(rows, self.session_id), strict=True)
                )
        return context

    async def _rows(self, after_seq: int, upto_seq: int) -> list[StoredEvent]:
        return [
            row
            async for batch in self.store.read(
                self.session_id, after_seq=after_seq, upto_seq=upto_seq, batch_size=_LOAD_BATCH
            )
            for row in batch
        ]

    def adopt(
        self, state: ConversationState, inherited: dict[tuple[str, str], UsageTotals]
    ) -> None:
        """Take a state folded elsewhere (a fork's, from its parent) instead of loading."""
        self.state = state
        self.inherited = inherited
        self.snapshot_seq = state.head

    # -- the past -----------------------------------------------------------------

    async def state_at(self, seq: int) -> ConversationState:
        """The full state right after ``seq``, read from the log (for a rewind or a fork)."""
        full = ConversationState()
        if seq:
            async for batch in self.store.read(
                self.session_id, upto_seq=seq, batch_size=_LOAD_BATCH
            ):
                full.apply_stored(batch, decode_payloads(batch, self.session_id))
        return full

    async def fold_in(self, rows: Sequence[StoredEvent], payloads: Sequence[Any]) -> None:
        """Fold stored rows into :attr:`state`, reading the earlier point of any rewind."""
        pasts: dict[int, ConversationState] = {}
        for row, payload in zip(rows, payloads, strict=True):
            if row.type == "rewind":
                upto = min(payload.to_seq, row.seq - 1)
                pasts[upto] = await self.state_at(upto)
        self.state.apply_stored(rows, payloads, pasts.__getitem__ if pasts else None)

    # -- appending ----------------------------------------------------------------

    async def append(
        self,
        events: Sequence[LogEvent],
        lease: Lease | None,
        *,
        past: ConversationState | None = None,
        catch_up: bool = True,
    ) -> None:
        """Append events at our head and fold them in, shielded from cancellation.

        A cancelled caller stops waiting, but the write itself completes and is
        folded in, so the state never lags behind the store.

        Args:
            events: The events.
            lease: The session's lease (appends are fenced by it).
            past: For a ``rewind`` among ``events``: the state it returns to.
            catch_up: When another writer got there first, fold in what it
                wrote and append after it; False raises the ``ConflictError``
                instead (for events computed from the state, which must be
                computed again).
        """
        await self.settle()
        if self.redact is not None:
            events = [self.redact.redact_event(e) for e in events]
        task = asyncio.ensure_future(self._append_now(events, lease, past, catch_up))
        self._inflight = task
        await asyncio.shield(task)
        if self.snapshot_every and self.state.head - self.snapshot_seq >= self.snapshot_every:
            await self.write_snapshot()

    async def settle(self) -> None:
        """Wait for a write that a cancelled caller left running."""
        task = self._inflight
        if task is not None and not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)

    async def _append_now(
        self,
        events: Sequence[LogEvent],
        lease: Lease | None,
        past: ConversationState | None,
        catch_up: bool,
    ) -> None:
        rows = [encode(e) for e in events]
        for _ in range(20):
            head = self.state.head
            try:
                new_head = await self.store.append(self.session_id, rows, head, lease=lease)
            except ConflictError as exc:
                if isinstance(exc, SessionBusyError) or type(exc) is not ConflictError:
                    raise  # busy or lease lost: not a race to catch up with
                await self.catch_up()
                if not catch_up:
                    raise
                continue
            if new_head != head + len(rows):
                raise CorruptDataError(
                    f"session {self.session_id!r}: the store acknowledged {len(rows)} events "
                    f"after seq {head} but reports head {new_head}"
                )
            resolver = (lambda _upto: past) if past is not None else None
            items = [
                (seq, e.type, e.turn_id, e.data) for seq, e in enumerate(events, start=head + 1)
            ]
            self.state._fold_items(items, resolver)
            return
        raise SessionBusyError(self.session_id, "other writers (20 conflicts in a row)")

    async def catch_up(self) -> None:
        """Fold in what other writers appended since our head."""
        async for batch in self.store.read(self.session_id, after_seq=self.state.head):
            await self.fold_in(batch, decode_payloads(batch, self.session_id))

    async def write_snapshot(self) -> None:
        """Store a snapshot of the state at its head (best effort: it is a cache)."""
        state = self.state
        if state.head <= self.snapshot_seq and self.snapshot_seq:
            return
        data = state.snapshot(inherited=group_snapshot(self.inherited) if self.inherited else None)
        try:
            await self.store.put_snapshot(self.session_id, state.head, data)
        except Exception as exc:  # a cache: the log stays the truth
            _logger.warning("session %r: could not store a snapshot (%s)", self.session_id, exc)
            return
        self.snapshot_seq = state.head

    # -- reading the log ----------------------------------------------------------

    async def read_events(self) -> list[LogEvent]:
        """The whole log (inherited events first, for a fork)."""
        out: list[LogEvent] = []
        async for batch in self.store.read(self.session_id):
            out.extend(decode(batch, self.session_id))
        return out

    async def read_history(self) -> list[Message]:
        """Every message ever recorded, cleared and rewound ones included."""
        out: list[Message] = []
        async for batch in self.store.read(self.session_id, batch_size=_LOAD_BATCH):
            rows = [row for row in batch if row.type == "message"]
            out.extend(decode_payloads(rows, self.session_id))
        return out

    async def turn_seq(self, turn_id: str) -> int | None:
        """The seq of a turn's ``turn_end`` (or, for a turn still open, its last event)."""
        last = None
        ended = None
        async for batch in self.store.read(self.session_id, batch_size=_LOAD_BATCH):
            for row in batch:
                if row.turn_id == turn_id:
                    last = row.seq
                    if row.type == "turn_end":
                        ended = row.seq
        return ended if ended is not None else last


def bounded(full: ConversationState) -> ConversationState:
    """``full`` made bounded, in place: the same meaning without history or timeline."""
    full.history = None
    full._timeline = []
    full.offloads = {}
    full._messages = None
    return full
