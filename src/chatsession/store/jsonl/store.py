"""``JSONLStore``: the ``file://`` store's operations over its folder (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import unquote, urlsplit

from filelock import Timeout

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ChatSessionError,
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    SessionArchivedError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    StoreUnavailableError,
)
from chatsession.store.base import (
    DEFAULT_READ_BATCH,
    EventCounts,
    Lease,
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    StatsTally,
    StoredEvent,
    StoreStats,
    check_append,
    check_before,
    check_blob,
    check_create,
    check_filters,
    check_fork_at,
    check_fork_point,
    check_lease,
    check_lease_request,
    check_limit,
    check_read,
    check_record,
    check_snapshot,
    check_stats,
    check_version,
    count_events,
    decode_cursor,
    fork_loop,
    fork_segments,
    initial_record,
    now,
    redact_url,
    updated_record,
    validate_id,
)
from chatsession.store.jsonl import leases
from chatsession.store.jsonl.files import (
    HEADER,
    LEASE,
    LOCK_TIMEOUT,
    LOG,
    OFFLOAD,
    SNAPSHOT,
    TRASH,
    Folder,
)
from chatsession.store.jsonl.headers import (
    Header,
    counts_field,
    counts_of,
    fork_seq,
    header_of,
    read_header,
    record_of,
    shown,
    visible_header,
    write_header,
)
from chatsession.store.jsonl.lines import Segment, line, reader
from chatsession.store.jsonl.log import Log, Tail
from chatsession.store.leases import check_lease_for, check_writer, granted, renewed
from chatsession.store.options import flag, parse_options
from chatsession.store.records import page_of

__all__ = ["JSONLStore"]

T = TypeVar("T")
logger = logging.getLogger("chatsession.store.jsonl")

#: The options of a ``file://`` URL (see the package docstring).
OPTIONS = {"fsync": flag(default=False)}
#: Expired sessions a purge deletes per hold of the store's lock (creates get it in between).
_PURGE_BATCH = 100


class JSONLStore:
    """The JSONL folder store (``file://``). See :mod:`chatsession.store.jsonl`.

    Args:
        root: The store's folder (made on first write).
        fsync: ``fsync`` every append, header, lease and snapshot.
    """

    def __init__(self, root: str, *, fsync: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        self.fsync = fsync
        self.url = "file://" + str(self.root)
        self._folder = Folder(self.root, fsync)
        self._log = Log(self._folder)
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``file:///dir`` (option ``fsync=0|1``).

        Raises:
            InvalidURLError: A malformed URL, an unknown or repeated option, or a bad value.
        """
        shown_url = redact_url(url)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise InvalidURLError(f"cannot parse the file URL {shown_url}: {exc}") from None
        if parts.netloc not in ("", "localhost"):
            raise InvalidURLError(
                f"file URL {shown_url} names a host; use file:///absolute/dir or file:relative/dir"
            )
        path = unquote(parts.path)
        if not path:
            raise InvalidURLError(
                f"file URL {shown_url} names no directory; e.g. file:///srv/sessions"
            )
        values = parse_options(url, OPTIONS, options, backend="file")
        return cls(path, fsync=values["fsync"])

    def __repr__(self) -> str:
        return f"JSONLStore({self.url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing --------------------------------------------------------------

    async def _run(self, fn: Callable[[], T], doing: str, session_id: str | None = None) -> T:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        return await asyncio.to_thread(self._guarded, fn, doing, session_id)

    def _guarded(self, fn: Callable[[], T], doing: str, session_id: str | None) -> T:
        """Run ``fn``; turn operating-system errors into ``StoreUnavailableError``.

        A file that vanished because ``session_id`` was deleted meanwhile is
        ``SessionNotFoundError``; nothing else is.
        """
        try:
            return fn()
        except ChatSessionError:
            raise
        except Timeout as exc:
            raise StoreUnavailableError(
                f"could not lock {exc.lock_file} within {LOCK_TIMEOUT:.0f} s: another process "
                "holds it; retry, or remove the lock file if no process uses the store"
            ) from exc
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and session_id is not None:
                try:
                    gone = not shown(read_header(self._folder, session_id))
                except (OSError, ChatSessionError):
                    gone = False
                if gone:
                    raise SessionNotFoundError(session_id, "it was deleted meanwhile") from None
            raise self._folder.unavailable(exc, doing) from exc

    def _dir(self, session_id: str) -> Path:
        return self._folder.dir(session_id)

    # -- records ---------------------------------------------------------------

    async def create(
        self, record: SessionRecord, *, max_per_user: int | None = None
    ) -> SessionRecord:
        """See :meth:`Store.create`.

        With ``max_per_user``, the user's sessions are counted and the new one
        made under the store's lock (``.chatsession.lock``), which every
        create, fork, update and delete of any process holds: the count
        cannot change in between. Counting reads every session's header.
        """
        check_create(record, max_per_user)
        stored = initial_record(record)

        def work() -> None:
            with self._folder.root_lock():
                if max_per_user is not None and stored.user_id is not None:
                    if read_header(self._folder, stored.id) is not None:
                        raise SessionExistsError(stored.id)
                    count = self._count_user(stored.user_id)
                    if count >= max_per_user:
                        raise SessionLimitError(stored.user_id, max_per_user, count)
                self._make_folder(stored.id)
                write_header(self._folder, header_of(stored))

        await self._run(work, f"create session {stored.id!r}")
        return stored

    def _count_user(self, user_id: str) -> int:
        """The user's visible sessions that are not archived (hold the store's lock)."""
        at = now()
        return sum(
            1
            for h in self._headers("create")
            if h.get("user_id") == user_id
            and h.get("state") != SessionState.ARCHIVED
            and not h.get("deleted")
            and (h.get("expires_at") is None or h["expires_at"] > at)
        )

    def _make_folder(self, session_id: str) -> None:
        """Make a new session's folder and empty log (root lock held); write the header after."""
        folder = self._dir(session_id)
        if read_header(self._folder, session_id) is not None:
            raise SessionExistsError(session_id)
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / OFFLOAD).mkdir(mode=0o700, exist_ok=True)
        fd = os.open(folder / LOG, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size:
                raise CorruptDataError(
                    f"{folder} holds events but no {HEADER}: restore its {HEADER} from a backup, "
                    "or move the folder away to reuse the id"
                )
        finally:
            os.close(fd)
        self._drop_derived(session_id)  # of a session that once had this folder
        self._log.forget(session_id)

    def _drop_derived(self, session_id: str) -> None:
        """Remove the session's lease and snapshot files (gone with the session)."""
        for name in (LEASE, SNAPSHOT):
            (self._dir(session_id) / name).unlink(missing_ok=True)

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)

        def work() -> SessionRecord:
            with self._log.locked(session_id) as session:
                mtime = os.fstat(session.fd).st_mtime
            return self._with_mtime(
                record_of(self._folder, session.header, session.tail.head), mtime
            )

        return await self._run(work, f"read session {session_id!r}", session_id)

    @staticmethod
    def _with_mtime(record: SessionRecord, mtime: float) -> SessionRecord:
        if mtime > record.updated_at and record.head > (record.parent.seq if record.parent else 0):
            return record.model_copy(update={"updated_at": mtime})
        return record

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        check_record(record)
        check_version(expected_version)

        def work() -> SessionRecord:
            with self._folder.root_lock(), self._log.locked(record.id) as session:
                current = record_of(self._folder, session.header, session.tail.head)
                if current.version != expected_version:
                    raise ConflictError(record.id, expected_version, current.version, "version")
                new = updated_record(current, record)
                write_header(self._folder, header_of(new, session.header))
                return new

        return await self._run(work, f"update session {record.id!r}", record.id)

    def _remove(self, session_id: str) -> None:
        """Delete (or tombstone, if forks need it) a session; then unneeded ancestors.

        Call with the root lock held. The folder is renamed away under the
        session's lock (one atomic step), then removed. A tombstone keeps its
        log (its forks read it) and loses its lease and snapshot.
        """
        header = read_header(self._folder, session_id)
        if header is None:
            return
        folder = self._dir(session_id)
        if header.get("children"):  # they change under the store's lock only: ours
            with self._folder.session_lock(session_id):
                kept = read_header(self._folder, session_id)  # as the last append left it
                if kept is None:
                    return
                kept["deleted"] = True
                write_header(self._folder, kept)
                self._drop_derived(session_id)
            return
        trash = self.root / f"{TRASH}{session_id}-{uuid.uuid4().hex}"
        with self._folder.session_lock(session_id):
            os.rename(folder, trash)
        self._log.forget(session_id)
        shutil.rmtree(trash, ignore_errors=True)
        parent = header.get("parent")
        if parent and read_header(self._folder, parent["session_id"]) is not None:
            with self._folder.session_lock(parent["session_id"]):  # appends rewrite its header
                parent_header = read_header(self._folder, parent["session_id"])
                if parent_header is not None:
                    parent_header["children"] = [
                        c for c in parent_header.get("children", []) if c != session_id
                    ]
                    write_header(self._folder, parent_header)
            if (
                parent_header is not None
                and parent_header.get("deleted")
                and not parent_header["children"]
            ):
                self._remove(parent["session_id"])

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        validate_id(session_id)

        def work() -> None:
            with self._folder.root_lock():
                visible_header(self._folder, session_id)
                self._remove(session_id)

        await self._run(work, f"delete session {session_id!r}", session_id)

    def _headers(self, doing: str) -> Iterator[Header]:
        """Every session's header; a damaged one is skipped with a warning naming it."""
        try:
            entries = os.scandir(self.root)
        except FileNotFoundError:
            return  # nothing was ever created here
        with entries:
            for entry in entries:
                if entry.is_dir() and not entry.name.startswith("."):
                    try:
                        header = read_header(self._folder, entry.name)
                    except CorruptDataError as exc:
                        logger.warning("%s skips session %r: %s", doing, entry.name, exc)
                        continue
                    if header is not None:
                        yield header

    async def list_sessions(
        self,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        window_id: str | None = None,
        state: SessionState | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """See :meth:`Store.list_sessions`.

        A session whose files are damaged is skipped, with a warning logged.
        """
        check_limit(limit)
        check_filters(user_id=user_id, agent_id=agent_id, window_id=window_id, state=state)
        after = decode_cursor(cursor) if cursor is not None else None
        wanted = {"user_id": user_id, "agent_id": agent_id, "window_id": window_id, "state": state}

        def work() -> list[SessionRecord]:
            found = [
                h
                for h in self._headers("list_sessions")
                if shown(h)
                and all(want is None or h.get(key) == want for key, want in wanted.items())
                and (after is None or (h["created_at"], h["id"]) < after)
            ]
            found.sort(key=lambda h: (h["created_at"], h["id"]), reverse=True)
            records: list[SessionRecord] = []
            for h in found:
                if len(records) > limit:
                    break
                try:
                    with self._log.locked(h["id"]) as session:
                        mtime = os.fstat(session.fd).st_mtime
                    record = record_of(self._folder, session.header, session.tail.head)
                except SessionNotFoundError:
                    continue  # deleted since it was listed
                except CorruptDataError as exc:
                    logger.warning("list_sessions skips session %r: %s", h["id"], exc)
                    continue
                records.append(self._with_mtime(record, mtime))
            return records

        records = await self._run(work, "list sessions")
        return page_of(records, limit)

    # -- events ----------------------------------------------------------------

    async def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_seq: int,
        *,
        lease: Lease | None = None,
    ) -> int:
        """See :meth:`Store.append`.

        Under the session's lock: the head, the state (archived refuses) and
        the lease are checked, the lines written, then ``session.json`` gets
        the session's figures for ``stats()`` and ``updated_at``. If that last
        write fails, or the process dies before it, the append still stands:
        the figures lag, and the session's next append counts what they miss
        from the log (as it does once for a header written before the store
        kept figures).
        """
        check_append(events, expected_seq)
        validate_id(session_id)
        if lease is not None:
            check_lease_for(lease, session_id)
        added = count_events(events)

        def work() -> int:
            with self._log.locked(session_id, write=True) as session:
                tail = session.tail
                if tail.head != expected_seq:
                    first_id = events[0].event_id
                    if (
                        first_id is not None
                        and expected_seq < tail.head
                        and self._log.event_id_at(session_id, session.header, expected_seq + 1)
                        == first_id
                    ):
                        return expected_seq + len(events)  # applied already: its reply was lost
                    raise ConflictError(session_id, expected_seq, tail.head)
                if session.header.get("state") == SessionState.ARCHIVED:
                    raise SessionArchivedError(session_id)
                held, _ = leases.held_lease(self._folder, session_id)
                check_writer(session_id, held, lease, now())
                before = self._counted(session_id, session.header, tail.head)
                text = "".join(
                    line(expected_seq + i, e, len(events) if i == 1 else 1)
                    for i, e in enumerate(events, start=1)
                ).encode()
                try:
                    self._log.write_events(session_id, session.fd, tail.size, text)
                except BaseException:
                    self._log.forget(session_id)
                    raise
                new = Tail(tail.identity, tail.size + len(text), expected_seq + len(events))
                self._log.remember(session_id, new)
                total = EventCounts(*(a + b for a, b in zip(before, added, strict=True)))
                self._keep_counts(session.header, total, new.head)
                return new.head

        return await self._run(work, f"append to session {session_id!r}", session_id)

    def _counted(self, session_id: str, header: Header, head: int) -> EventCounts:
        """The figures of the session's own events up to ``head`` (its lock held).

        What the header keeps, plus what it misses counted from the log: all
        of it for a header without figures, the last append's after a crash
        between the log's write and the header's.
        """
        kept = counts_of(header)
        if kept is not None and fork_seq(header) <= kept[1] <= head:
            counts, upto = kept
        else:
            counts, upto = EventCounts(0, 0, 0), fork_seq(header)
        if upto == head:
            return counts
        missed = self._log.count_own(session_id, header, upto, head)
        return EventCounts(*(a + b for a, b in zip(counts, missed, strict=True)))

    def _keep_counts(self, header: Header, counts: EventCounts, head: int) -> None:
        """Write the session's figures and ``updated_at`` into its header (its lock held).

        The events are already stored: a failure here is logged, not raised
        (the next append counts what the header misses).
        """
        kept = {**header, "counts": counts_field(counts, head), "updated_at": now()}
        try:
            write_header(self._folder, kept)
        except OSError as exc:
            logger.warning(
                "session %r: the append is stored, but its figures could not be written to %s "
                "(%s); the next append counts them",
                header["id"],
                self._dir(header["id"]) / HEADER,
                exc,
            )

    def _lineage(self, header: Header) -> list[tuple[str, int]]:
        chain: list[tuple[str, int]] = []
        current: Header | None = header
        while current is not None:
            chain.append((current["id"], fork_seq(current)))
            parent = current.get("parent")
            if not parent:
                break
            parent_id = parent["session_id"]
            if any(node == parent_id for node, _ in chain):
                raise fork_loop(header["id"], [node for node, _ in chain] + [parent_id])
            current = read_header(self._folder, parent_id)
            if current is None:
                raise CorruptDataError(
                    f"session {header['id']!r}: its fork ancestor {parent_id!r} is missing "
                    f"from {self.root}; restore that folder from a backup"
                )
        return chain

    def _open_segment(
        self, session_id: str, create_id: str | None, seg_id: str, start: int, lo: int, hi: int
    ) -> Segment:
        path = self._dir(seg_id) / LOG
        try:
            file = reader(path)
        except FileNotFoundError:
            self._log.check_still_there(session_id, create_id)
            raise CorruptDataError(
                f"{path} is missing, though session {session_id!r} reads its events "
                f"{lo + 1}..{hi} from it; restore it from a backup"
            ) from None
        return Segment(path, file, start, lo, hi)

    def _next_batch(
        self, session_id: str, create_id: str | None, segment: Segment, batch_size: int
    ) -> list[StoredEvent]:
        try:
            events = segment.take(batch_size)
        except (CorruptDataError, OSError):
            self._log.check_still_there(session_id, create_id)  # a deletion is not damage
            raise
        self._log.check_still_there(session_id, create_id)
        return events

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`.

        Streams: each batch is read from disk when it is asked for.
        """
        check_read(after_seq, upto_seq, batch_size)
        validate_id(session_id)
        doing = f"read session {session_id!r}"

        def plan() -> tuple[str | None, dict[str, int], list[tuple[str, int, int]]]:
            with self._log.locked(session_id) as session:
                lineage = self._lineage(session.header)
            segments = fork_segments(lineage, session.tail.head, after_seq, upto_seq)
            return session.header.get("create_id"), dict(lineage), segments

        create_id, starts, segments = await self._run(plan, doing, session_id)
        for seg_id, lo, hi in segments:
            segment = await self._run(
                partial(self._open_segment, session_id, create_id, seg_id, starts[seg_id], lo, hi),
                doing,
                session_id,
            )
            try:
                while not segment.done:
                    yield await self._run(
                        partial(self._next_batch, session_id, create_id, segment, batch_size),
                        doing,
                        session_id,
                    )
            finally:
                segment.close()

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        check_fork_at(at_seq)
        check_record(new_record)

        def work() -> SessionRecord:
            with self._folder.root_lock(), self._log.locked(session_id) as session:
                check_fork_point(session_id, at_seq, session.tail.head)
                stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
                self._make_folder(stored.id)
                write_header(self._folder, header_of(stored))
                parent = session.header  # read under its lock, which appends hold to rewrite it
                parent["children"] = [*parent.get("children", []), stored.id]
                write_header(self._folder, parent)
                return stored

        return await self._run(work, f"fork session {session_id!r}", session_id)

    # -- leases and snapshots ----------------------------------------------------

    async def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Lease:
        """See :meth:`Store.acquire_lease`."""
        check_lease_request(session_id, owner, ttl)

        def work() -> Lease:
            with self._log.locked(session_id):
                held, last = leases.held_lease(self._folder, session_id)
                lease = granted(session_id, held, last, owner, ttl, now())
                leases.write_lease(self._folder, lease, session_id, lease.token)
                return lease

        return await self._run(work, f"take the lease of session {session_id!r}", session_id)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """See :meth:`Store.renew_lease`."""
        check_lease(lease)
        check_lease_request(lease.session_id, lease.owner, ttl)

        def work() -> Lease:
            with self._log.locked(lease.session_id):
                held, _ = leases.held_lease(self._folder, lease.session_id)
                new = renewed(lease, held, ttl, now())
                leases.write_lease(self._folder, new, lease.session_id, new.token)
                return new

        doing = f"renew the lease of session {lease.session_id!r}"
        return await self._run(work, doing, lease.session_id)

    async def release_lease(self, lease: Lease) -> None:
        """See :meth:`Store.release_lease`."""
        check_lease(lease)

        def work() -> None:
            try:
                with self._log.locked(lease.session_id):
                    held, last = leases.held_lease(self._folder, lease.session_id)
                    if held is not None and held.token == lease.token:
                        leases.write_lease(self._folder, None, lease.session_id, last)
            except SessionNotFoundError:
                pass  # gone with its session

        await self._run(work, f"release the lease of session {lease.session_id!r}")

    async def put_snapshot(self, session_id: str, seq: int, data: bytes) -> None:
        """See :meth:`Store.put_snapshot`."""
        validate_id(session_id)
        check_snapshot(seq, data)

        def work() -> None:
            with self._log.locked(session_id) as session:
                leases.put_snapshot(self._folder, session, session_id, seq, data)

        await self._run(work, f"store a snapshot of session {session_id!r}", session_id)

    async def get_snapshot(self, session_id: str) -> tuple[int, bytes] | None:
        """See :meth:`Store.get_snapshot`. A damaged snapshot file counts as none (logged)."""
        validate_id(session_id)

        def work() -> tuple[int, bytes] | None:
            with self._log.locked(session_id) as session:
                return leases.get_snapshot(self._folder, session, session_id)

        return await self._run(work, f"read the snapshot of session {session_id!r}", session_id)

    # -- blobs -----------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        check_blob(data, media_type)
        blob_id = hashlib.sha256(data).hexdigest()

        def work() -> None:
            visible_header(self._folder, session_id)
            path = self._dir(session_id) / OFFLOAD / blob_id
            if not path.exists():
                path.parent.mkdir(mode=0o700, exist_ok=True)
                self._folder.write_atomic(path, bytes(data))

        await self._run(work, f"store a blob for session {session_id!r}", session_id)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")

        def work() -> bytes:
            header = visible_header(self._folder, session_id)
            for seg_id, _ in self._lineage(header):
                try:
                    return (self._dir(seg_id) / OFFLOAD / blob_id).read_bytes()
                except FileNotFoundError:
                    continue
            raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")

        return await self._run(work, f"read a blob of session {session_id!r}", session_id)

    # -- upkeep ----------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`.

        Finds the expired sessions by their headers, then deletes them in
        batches of 100 under the store's lock, each one checked again under
        it: a purge running in another process at once finds it gone, so each
        session is deleted, and counted, once. A session whose header is
        damaged is skipped, with a warning logged.
        """
        check_before(before)
        at = now() if before is None else before

        def expired(header: Header | None) -> bool:
            return (
                header is not None
                and not header.get("deleted")
                and header.get("expires_at") is not None
                and header["expires_at"] <= at
            )

        def purge(batch: list[str]) -> int:
            done = 0
            with self._folder.root_lock():
                for session_id in batch:
                    try:
                        header = read_header(self._folder, session_id)
                    except CorruptDataError as exc:
                        logger.warning("purge_expired skips session %r: %s", session_id, exc)
                        continue
                    if expired(header):  # not purged by another process meanwhile
                        self._remove(session_id)
                        done += 1
            return done

        def work() -> int:
            found = [h["id"] for h in self._headers("purge_expired") if expired(h)]
            purged = 0
            for start in range(0, len(found), _PURGE_BATCH):
                purged += purge(found[start : start + _PURGE_BATCH])
            if not self.root.is_dir():
                return purged
            with self._folder.root_lock():
                for entry in os.scandir(self.root):  # what an interrupted delete left behind
                    if entry.name.startswith(TRASH) and entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
            return purged

        return await self._run(work, "purge expired sessions")

    async def stats(self, *, idle_before: float | None = None, top: int = 100) -> StoreStats:
        """See :meth:`Store.stats`.

        Reads every session's header (``session.json``, where appends keep the
        figures), never a log line: O(sessions) time, memory in the number of
        users and agents. A header without figures (written before the store
        kept them) counts 0 until its session's next append; a damaged one is
        skipped, with a warning logged.
        """
        check_stats(idle_before, top)

        def work() -> StoreStats:
            at = now()
            tally = StatsTally(idle_before)
            for header in self._headers("stats"):
                if header.get("deleted"):
                    continue
                if header.get("expires_at") is not None and header["expires_at"] <= at:
                    tally.expired()
                    continue
                kept = counts_of(header)
                counts = kept[0] if kept is not None else EventCounts(0, 0, 0)
                updated_at = header["updated_at"]
                if kept is None:  # an older header: its log's time says when it was appended to
                    with contextlib.suppress(OSError):
                        updated_at = max(
                            updated_at, os.stat(self._dir(header["id"]) / LOG).st_mtime
                        )
                tally.add(
                    str(header["state"]),
                    updated_at,
                    header.get("user_id"),
                    header.get("agent_id"),
                    counts,
                )
            return tally.result(top)

        return await self._run(work, "compute the store's stats")

    async def aclose(self) -> None:
        """Forget cached heads; the store cannot be used afterwards. Idempotent."""
        self._closed = True
        self._log.forget()
