"""Keeping ``context.jsonl``: the session lock, what a store object knows of each log's end,
torn-tail repair, appending, and finding one event again.

Every store object keeps, per session, the head and the size of the log as
it last saw them (a :class:`Tail`); under the session's lock it reads only
the bytes added since. That knowledge is reused only while the file is the
same one (device, inode and the header's ``create_id``); otherwise the log is
walked again from its start. Only what a crash during one ``write()`` can
leave is repaired: a last line without its newline, or the first lines of an
append of ``batch`` events; it is moved aside to ``context.jsonl.corrupt``
and reported. A complete line that does not parse is damage.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from chatsession.errors import (
    CorruptDataError,
    SessionNotFoundError,
    StoreRepairWarning,
    StoreUnavailableError,
)
from chatsession.store.base import EventCounts, NewEvent, count_events, describe_failure
from chatsession.store.jsonl.files import CORRUPT, HEADER, LOG, Folder
from chatsession.store.jsonl.headers import (
    Header,
    fork_seq,
    read_header,
    shown,
    visible,
    visible_header,
)
from chatsession.store.jsonl.lines import CHUNK, Segment, event_fields, loads, reader

__all__ = ["Locked", "Log", "Tail"]

logger = logging.getLogger("chatsession.store.jsonl")

_RELOCKS = 10  # attempts when a session is re-created while we wait for its lock


class Tail:
    """What a store object knows of a session's log.

    ``identity`` is the file's device and inode and the header's ``create_id``;
    ``size`` is where the last complete append ends; ``head`` its last seq.
    """

    __slots__ = ("head", "identity", "size")

    def __init__(self, identity: tuple[int, int, str | None], size: int, head: int) -> None:
        self.identity = identity
        self.size = size
        self.head = head


class Locked:
    """A session under its lock: its header read under the lock, its log's file descriptor
    and its tail."""

    __slots__ = ("fd", "header", "tail")

    def __init__(self, header: Header, fd: int, tail: Tail) -> None:
        self.header = header
        self.fd = fd
        self.tail = tail


class Log:
    """The logs of one store object's sessions, and what it knows of their ends."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder
        self._tails: dict[str, Tail] = {}
        self._tails_lock = threading.Lock()

    def forget(self, session_id: str = "") -> None:
        """Forget what is known of a session's log (of every log when no id is given)."""
        with self._tails_lock:
            if session_id:
                self._tails.pop(session_id, None)
            else:
                self._tails.clear()

    def remember(self, session_id: str, tail: Tail) -> None:
        """Keep ``tail`` as what is known of the session's log."""
        with self._tails_lock:
            self._tails[session_id] = tail

    @contextlib.contextmanager
    def locked(self, session_id: str, *, write: bool = False) -> Iterator[Locked]:
        """Lock a visible session, open its log and bring its tail up to date.

        Yields the session under its lock; its log is opened for appending if
        ``write``. A torn end is moved aside first.

        Raises:
            SessionNotFoundError: The session is not visible.
            CorruptDataError: Its header or log is damaged.
        """
        for _ in range(_RELOCKS):
            before = visible_header(self.folder, session_id)
            lock = self.folder.session_lock(session_id)
            try:
                lock.acquire()
            except FileNotFoundError:  # the folder went away while we came to lock it
                visible(session_id, read_header(self.folder, session_id))
                continue  # and came back: re-created meanwhile
            try:
                found = read_header(self.folder, session_id)
                if found is None:  # deleted while we came to lock it
                    self._drop_lock_folder(session_id)
                header = visible(session_id, found)
                if header.get("create_id") != before.get("create_id"):
                    continue  # deleted and re-created meanwhile: we hold the old folder's lock
                path = self.folder.dir(session_id) / LOG
                try:
                    fd = os.open(path, os.O_RDWR | os.O_APPEND if write else os.O_RDONLY)
                except FileNotFoundError:
                    raise CorruptDataError(
                        f"{path} is missing, though {HEADER} is there: restore it from a "
                        "backup (an empty file if the session had no events of its own)"
                    ) from None
                try:
                    yield Locked(header, fd, self._scan(session_id, header, fd))
                    return
                finally:
                    os.close(fd)
            finally:
                lock.release()
        raise StoreUnavailableError(
            f"session {session_id!r} in {self.folder.root} was deleted and re-created "
            f"{_RELOCKS} times while this store waited for its lock; retry"
        )

    def check_still_there(self, session_id: str, create_id: str | None) -> None:
        """Raise ``SessionNotFoundError`` if the session was deleted (or re-created)."""
        header = read_header(self.folder, session_id)
        if not shown(header) or header is None or header.get("create_id") != create_id:
            raise SessionNotFoundError(session_id, "it was deleted or expired while being read")

    def _drop_lock_folder(self, session_id: str) -> None:
        """Remove the folder that locking a just-deleted session made again (lock held)."""
        folder = self.folder.dir(session_id)
        with contextlib.suppress(OSError):
            os.unlink(folder / ".lock")
            os.rmdir(folder)  # only if empty: a create under way keeps it

    def _scan(self, session_id: str, header: Header, fd: int) -> Tail:
        """Bring our knowledge of the log's end up to date; repair a torn tail.

        Call with the session's lock held; ``fd`` is its log, ``header`` was read
        under the lock. The cached tail is reused only for the same file.
        """
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino, header.get("create_id"))
        with self._tails_lock:
            tail = self._tails.get(session_id)
        if tail is None or tail.identity != identity or st.st_size < tail.size:
            tail = Tail(identity, 0, fork_seq(header))
        if st.st_size != tail.size:
            tail = self._walk(session_id, header, fd, tail)
        self.remember(session_id, tail)
        return tail

    def _walk(self, session_id: str, header: Header, fd: int, tail: Tail) -> Tail:
        """Walk the whole appends after ``tail``; move a torn or unfinished last append aside.

        Only what a crash during one ``write()`` can leave is torn: a last line
        without its newline, or the first lines of an append of ``batch`` events.
        Any complete line that does not parse or breaks the seq order raises
        ``CorruptDataError``.
        """
        path = self.folder.dir(session_id) / LOG
        start = fork_seq(header)
        pos, head, pending = tail.size, tail.head, 0
        good_size, good_head = pos, head  # where the last complete append ends
        end = pos
        with reader(os.dup(fd)) as f:
            f.seek(pos)
            while True:
                line = f.readline()
                end = pos + len(line)
                if not line.endswith(b"\n"):
                    break  # the end of the file, maybe a line cut off by a crash
                line_no = head - start + 1
                try:
                    obj = loads(line)
                    seq = event_fields(obj)[0]
                    batch = obj.get("batch", 1) if pending == 0 else 1
                except (ValueError, KeyError, TypeError, RecursionError) as exc:
                    why = describe_failure(exc)
                    raise self._damaged(path, line_no, why, last=not f.peek(1)) from exc
                if seq != head + 1:
                    why = f"seq {seq} where {head + 1} was expected"
                    raise self._damaged(path, line_no, why, last=not f.peek(1))
                pending = pending or batch
                pending -= 1
                pos, head = end, seq
                if pending == 0:
                    good_size, good_head = pos, head
        if end > good_size:
            self._move_aside(session_id, path, fd, good_size, end)
        return Tail(tail.identity, good_size, good_head)

    @staticmethod
    def _damaged(path: Path, line_no: int, why: object, *, last: bool) -> CorruptDataError:
        fix = (
            f"if that event is not needed, move the line to {CORRUPT} by hand"
            if last
            else "or repair that line by hand (one JSON event a line, seqs without gaps)"
        )
        return CorruptDataError(
            f"session {path.parent.name!r}: {path}, line {line_no}: damaged event ({why}). The "
            "line is complete, so it is not "
            "a write cut off by a crash: the file was damaged or edited. The lines before it "
            f"are intact; restore the file from a backup, {fix}"
        )

    def _move_aside(self, session_id: str, path: Path, fd: int, at: int, end: int) -> None:
        """Copy bytes ``at..end`` of the log to ``context.jsonl.corrupt``, then cut them off.

        Call with the session's lock held; ``fd`` is the log as checked under it.
        """
        corrupt = path.with_name(CORRUPT)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(path, "r+b") as log:
            if not os.path.samestat(os.fstat(log.fileno()), os.fstat(fd)):
                raise StoreUnavailableError(
                    f"{path} was replaced while locked: another program edits it; retry"
                )
            with corrupt.open("ab") as f:
                f.write(f"# {stamp}: {end - at} bytes from {LOG} at byte {at}\n".encode())
                last = b"\n"
                for start in range(at, end, CHUNK):
                    chunk = os.pread(fd, min(CHUNK, end - start), start)
                    f.write(chunk)
                    last = chunk[-1:] or last
                if last != b"\n":
                    f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            log.truncate(at)
            log.flush()
            os.fsync(log.fileno())
        message = (
            f"session {session_id!r}: an unfinished write at the end of {path} ({end - at} "
            f"bytes, from an append that was never acknowledged) was moved to {corrupt}"
        )
        logger.warning(message)
        warnings.warn(message, StoreRepairWarning, stacklevel=2)

    def write_events(self, session_id: str, fd: int, size: int, text: bytes) -> None:
        """Append ``text`` to the log in one ``write()``; on any failure cut it back to ``size``."""
        path = self.folder.dir(session_id) / LOG
        try:
            written = os.write(fd, text)
            if written != len(text):
                raise OSError(
                    errno.ENOSPC, f"short write, {written} of {len(text)} bytes", str(path)
                )
            if self.folder.fsync:
                os.fsync(fd)
        except BaseException as exc:
            try:
                os.ftruncate(fd, size)
            except OSError as undo:
                raise StoreUnavailableError(
                    f"file store {self.folder.root}: appending to {path} failed ({exc}) and could "
                    f"not be undone ({undo}): the append may be partly stored. Fix the disk, then "
                    "re-read the session: an unfinished append is moved aside when it is next read"
                ) from exc
            if isinstance(exc, OSError):
                raise self.folder.unavailable(
                    exc, f"append to {path}", ". Nothing was appended"
                ) from exc
            raise

    def event_id_at(self, session_id: str, header: Header, seq: int) -> str | None:
        """The id of the session's own event at ``seq`` (None: no id, or not its own).

        Reads the log from its start (a retried append is rare); call under the lock.
        """
        start = fork_seq(header)
        if seq <= start:
            return None  # inherited from the parent: not an append to this session
        path = self.folder.dir(session_id) / LOG
        segment = Segment(path, reader(path), start, seq - 1, seq)
        try:
            found = segment.take(1)
        finally:
            segment.close()
        return found[0].event_id if found else None

    def count_own(self, session_id: str, header: Header, after: int, upto: int) -> EventCounts:
        """:func:`count_events` of the session's own events ``after < seq <= upto``.

        Reads those lines of the log (once per session at most, to back-fill
        figures an older header lacks or a crash left behind); call under the lock.
        """
        start = fork_seq(header)
        after = max(after, start)
        if upto <= after:
            return EventCounts(0, 0, 0)
        path = self.folder.dir(session_id) / LOG
        segment = Segment(path, reader(path), start, after, upto)
        messages = tokens = size = 0
        try:
            while not segment.done:
                batch = segment.take(CHUNK // 64)
                if not batch:
                    break
                counts = count_events([NewEvent(e.type, e.data, e.ts) for e in batch])
                messages += counts.messages
                tokens += counts.tokens
                size += counts.bytes
        finally:
            segment.close()
        return EventCounts(messages, tokens, size)
