"""``file:///dir``: one folder per session, readable with ``cat`` and ``jq``.

URL forms: ``file:///absolute/dir`` and ``file:relative/dir``. Layout::

    dir/
      .chatsession.lock          serialises creating, forking and deleting sessions
      SESSION_ID/
        session.json             the record (replaced atomically on change)
        context.jsonl            the session's own events, one JSON object a line
        context.jsonl.corrupt    torn writes moved aside, if there ever were any
        offload/BLOB_ID          blobs (large tool outputs), named by their sha256
        .lock                    serialises appends to this session

Each line of ``context.jsonl`` is ``{"seq", "type", "ts", "turn_id", "v",
"data"}``; ``data`` is the payload exactly as appended. The first line of an
append of several events also carries ``"batch": N``. A fork's file holds only
its own events; its ``session.json`` names the parent and the fork point.
Besides the record's fields, ``session.json`` keeps ``deleted`` (a deleted
session kept for its forks), ``children`` (its forks) and ``create_id`` (a
random id given by ``create``/``fork``, so a deleted and re-created session is
never mistaken for the old one).

Guarantees:

- An append is one ``write()`` of all its lines, under a cross-process lock
  (``filelock``), after checking the head: atomic and conditional like every
  backend. When it returns, the lines are in the operating system, so killing
  the writer loses nothing acknowledged. ``?fsync=1`` also ``fsync``s every
  append and header for power-loss safety. An append that fails (a full or
  read-only disk, an I/O error) is cut back off the file and raises
  :class:`~chatsession.errors.StoreUnavailableError`: nothing half-written
  stays behind.
- ``get``, ``append``, ``update``, ``fork``, ``list_sessions`` and the start
  of ``read`` walk, under the session's lock, whatever its log gained since
  this store object last looked (the whole file the first time). Only a write
  cut off by a crash is repaired: a last line without its newline, or an
  append of ``N`` events whose last lines never arrived. It is moved aside to
  ``context.jsonl.corrupt`` (never silently dropped) and reported with a
  :class:`~chatsession.errors.StoreRepairWarning`. A complete line that does
  not parse or breaks the seq order, anywhere in the file including the last
  line, is damage, not a crash: it raises
  :class:`~chatsession.errors.CorruptDataError` naming the session, the file
  and the line, and nothing is moved. So does an unreadable or ill-typed
  ``session.json``, a missing ``context.jsonl``, a damaged line met by
  ``read`` (bad JSON, a field missing or of the wrong type, a seq that
  jumps) and a fork chain whose parents are missing or loop.
- Lines are split on ``\n`` only: text holding U+2028, U+2029, NEL or other
  separators is one line, as JSON allows.
- ``list_sessions`` and ``purge_expired`` skip a session whose files are
  damaged and log a warning (logger ``chatsession.store.jsonl``) naming it,
  so one damaged session does not hide or keep the others.
- Every other operating-system failure (permissions, a full or read-only
  disk, an I/O error, a store folder that is a file) raises
  :class:`~chatsession.errors.StoreUnavailableError`, never
  :class:`~chatsession.errors.SessionNotFoundError`.
- What the store creates is its owner's only: folders ``0700``, files
  ``0600`` (an existing folder keeps its mode).
- ``read`` streams: memory is bounded by ``batch_size``, not by the history. A
  session deleted (or deleted and re-created) while it is being read raises
  ``SessionNotFoundError`` at the next batch.
- ``list_sessions`` and ``purge_expired`` read every session's header: O(number
  of sessions). Appends cost O(1) in history length: each store object keeps
  every session's head and file size, and reads only bytes added since. That
  knowledge is reused only while the file is the same one (device, inode and
  ``create_id``); otherwise the file is walked again from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from filelock import FileLock, Timeout

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ChatSessionError,
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    SessionExistsError,
    SessionNotFoundError,
    StoreRepairWarning,
    StoreUnavailableError,
)
from chatsession.store.base import (
    DEFAULT_READ_BATCH,
    STRICT_JSON,
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    StoredEvent,
    check_append,
    check_before,
    check_blob,
    check_filters,
    check_fork_at,
    check_fork_point,
    check_limit,
    check_read,
    check_record,
    check_version,
    decode_cursor,
    describe_failure,
    encode_cursor,
    fork_loop,
    fork_segments,
    initial_record,
    now,
    redact_url,
    updated_record,
    validate_id,
)

__all__ = ["JSONLStore"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

HEADER = "session.json"
LOG = "context.jsonl"
CORRUPT = "context.jsonl.corrupt"
OFFLOAD = "offload"
_LOCK_TIMEOUT = 60.0
_DATA_KEY = ',"data":'
_CHUNK = 1 << 16  # bytes read at a time when walking a log
_RELOCKS = 10  # attempts when a session is re-created while we wait for its lock
_TRASH = ".deleted-"  # a deleted session's folder is renamed to this prefix, then removed
_BOOKKEEPING = ("deleted", "children", "create_id")  # header keys that are not record fields

#: What to tell the user for an operating-system error, by errno.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, then retry",
    errno.EDQUOT: "the disk quota is used up: free some space or raise the quota, then retry",
    errno.EROFS: "the file system is read-only: remount it read-write, or open the store on "
    "a writable folder",
    errno.EACCES: "permission denied: make the store folder readable and writable by this user",
    errno.EPERM: "permission denied: make the store folder readable and writable by this user",
    errno.EIO: "the disk or network file system reported an I/O error: check it (dmesg, fsck), "
    "then retry",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or close other stores",
    errno.ENFILE: "too many open files on this machine: close some, then retry",
    errno.ENAMETOOLONG: "the path is too long: open the store on a shorter path",
}


def _line(seq: int, event: NewEvent, batch: int) -> str:
    turn = "null" if event.turn_id is None else json.dumps(event.turn_id)
    size = f',"batch":{batch}' if batch > 1 else ""
    return (
        f'{{"seq":{seq},"type":{json.dumps(event.type)},"ts":{event.ts!r},"turn_id":{turn},'
        f'"v":{event.schema_version}{size},"data":{event.data}}}\n'
    )


def _errno(exc: OSError) -> int | None:
    """The errno of ``exc``, also for ``OSError(errno.X)`` built with one argument."""
    if exc.errno is not None:
        return exc.errno
    if len(exc.args) == 1 and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _loads(raw: bytes | str) -> Any:
    """Strict JSON in strict UTF-8: NaN and Infinity refused (``ValueError``), deep nesting a
    ``RecursionError``."""
    return STRICT_JSON.decode(raw.decode() if isinstance(raw, bytes) else raw)


def _event_fields(obj: Any) -> tuple[int, str, float, str | None, int]:
    """``seq, type, ts, turn_id, v`` of a parsed log line, checked type for type."""
    if type(obj) is not dict:
        raise TypeError(f"a JSON {type(obj).__name__}, not an object")
    seq, kind, ts, turn_id = obj["seq"], obj["type"], obj["ts"], obj.get("turn_id")
    version = obj.get("v", 1)
    if type(seq) is not int or seq < 1:
        raise TypeError(f"seq {seq!r} is not an int >= 1")
    if type(kind) is not str:
        raise TypeError(f"type {kind!r} is not a string")
    if type(ts) not in (float, int):
        raise TypeError(f"ts {ts!r} is not a number")
    if turn_id is not None and type(turn_id) is not str:
        raise TypeError(f"turn_id {turn_id!r} is not a string or null")
    if type(version) is not int:
        raise TypeError(f"v {version!r} is not an int")
    batch = obj.get("batch", 1)
    if type(batch) is not int or batch < 1:
        raise TypeError(f"batch {batch!r} is not an int >= 1")
    if "data" not in obj:
        raise KeyError("data")
    return seq, kind, float(ts), turn_id, version


def _parse_event(path: Path, raw: bytes, line_no: int) -> StoredEvent:
    """One line of a log (without its newline) as an event."""
    try:
        text = raw.decode()
        obj = _loads(text)
        seq, kind, ts, turn_id, version = _event_fields(obj)
        keys = list(obj)
        cut = text.find(_DATA_KEY)
        if (
            cut >= 0
            and text.endswith("}")
            and keys[-1] == "data"
            and not any(type(obj[k]) in (dict, list) for k in keys[:-1])
        ):  # as written: "data" last, after scalars only, so the first ',"data":' is its key
            data = text[cut + len(_DATA_KEY) : -1]
        else:  # edited by hand: keep the meaning, not the bytes
            data = json.dumps(obj["data"], ensure_ascii=False, separators=(",", ":"))
        return StoredEvent(seq, kind, ts, turn_id, data, version)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptDataError(
            f"session {path.parent.name!r}: {path}, line {line_no}: damaged event ({describe_failure(exc)}); "
            "restore the file from a backup"
        ) from exc


def _reader(source: int | Path) -> io.BufferedReader:
    """A buffered binary reader of a file descriptor (which it then owns) or a path."""
    return io.BufferedReader(io.FileIO(source, "r"), buffer_size=_CHUNK)


def _skip_lines(file: io.BufferedReader, count: int) -> int:
    """Move ``file`` past ``count`` lines; return how many it had (fewer at its end)."""
    skipped = 0
    while skipped < count:
        chunk = file.read1(_CHUNK)
        if not chunk:
            break
        found = chunk.count(b"\n")
        if skipped + found < count:
            skipped += found
            continue
        cut = -1
        for _ in range(count - skipped):
            cut = chunk.index(b"\n", cut + 1)
        file.seek(cut + 1 - len(chunk), os.SEEK_CUR)
        return count
    return skipped


def _check_header(header: Any, session_id: str) -> None:
    """Check the header fields the store itself relies on (the record's are checked on use)."""
    if type(header) is not dict:
        raise TypeError(f"a JSON {type(header).__name__}, not an object")
    if header.get("id") != session_id:
        raise ValueError(f"its id is {header.get('id')!r}, not {session_id!r}")
    if type(header.get("deleted", False)) is not bool:
        raise TypeError(f"deleted {header['deleted']!r} is not true or false")
    children = header.get("children", [])
    if type(children) is not list or any(type(c) is not str for c in children):
        raise TypeError(f"children {str(children)[:80]} is not a list of session ids")
    if type(header.get("create_id")) not in (str, type(None)):
        raise TypeError(f"create_id {header['create_id']!r} is not a string")
    for name in ("created_at", "expires_at"):
        value = header.get(name)
        if type(value) not in (float, int) and not (value is None and name == "expires_at"):
            raise TypeError(f"{name} {value!r} is not a number")
    parent = header.get("parent")
    if parent is not None and (
        type(parent) is not dict
        or type(parent.get("session_id")) is not str
        or type(parent.get("seq")) is not int
        or parent["seq"] < 0
    ):
        raise TypeError(f"parent {str(parent)[:80]} is not {{session_id, seq}}")


class _Tail:
    """What a store object knows of a session's log.

    ``identity`` is the file's device and inode and the header's ``create_id``;
    ``size`` is where the last complete append ends; ``head`` its last seq.
    """

    __slots__ = ("head", "identity", "size")

    def __init__(self, identity: tuple[int, int, str | None], size: int, head: int) -> None:
        self.identity = identity
        self.size = size
        self.head = head


class _Segment:
    """Streams one session's own events ``lo < seq <= hi`` from its log."""

    def __init__(self, path: Path, file: io.BufferedReader, start: int, lo: int, hi: int) -> None:
        self.path = path
        self.file = file
        self.start = start  # the fork point: line n holds seq start + n
        self.next_seq = lo + 1
        self.hi = hi
        self.skipped = False

    @property
    def done(self) -> bool:
        return self.next_seq > self.hi

    def _missing(self, line_no: int, why: str) -> CorruptDataError:
        return CorruptDataError(
            f"session {self.path.parent.name!r}: {self.path}: events {self.next_seq}..{self.hi} "
            f"expected, but {why} at line {line_no}; restore the file from a backup"
        )

    def take(self, count: int) -> list[StoredEvent]:
        if not self.skipped:
            wanted = self.next_seq - 1 - self.start
            if _skip_lines(self.file, wanted) != wanted:
                raise self._missing(wanted, "the file ends")
            self.skipped = True
        out: list[StoredEvent] = []
        while len(out) < count and not self.done:
            line_no = self.next_seq - self.start
            raw = self.file.readline()
            if not raw.endswith(b"\n"):
                raise self._missing(line_no, "the file ends mid-line" if raw else "the file ends")
            event = _parse_event(self.path, raw[:-1], line_no)
            if event.seq != self.next_seq:
                raise CorruptDataError(
                    f"session {self.path.parent.name!r}: {self.path}, line {line_no}: seq "
                    f"{event.seq}, expected {self.next_seq}; restore the file from a backup"
                )
            out.append(event)
            self.next_seq += 1
        return out

    def close(self) -> None:
        self.file.close()


class JSONLStore:
    """The JSONL folder store (``file://``). See the module docstring."""

    def __init__(self, root: str, *, fsync: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        self.fsync = fsync
        self.url = "file://" + str(self.root)
        self._tails: dict[str, _Tail] = {}
        self._tails_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``file:///dir`` (option ``fsync=0|1``).

        Raises:
            InvalidURLError: A malformed URL or an unknown option.
        """
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise InvalidURLError(f"cannot parse the file URL {shown}: {exc}") from None
        if parts.netloc not in ("", "localhost"):
            raise InvalidURLError(
                f"file URL {shown} names a host; use file:///absolute/dir or file:relative/dir"
            )
        path = unquote(parts.path)
        if not path:
            raise InvalidURLError(f"file URL {shown} names no directory; e.g. file:///srv/sessions")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        query.update({k: str(v) for k, v in options.items()})
        unknown = set(query) - {"fsync"}
        if unknown:
            raise InvalidURLError(f"unknown file:// option(s) {sorted(unknown)}; known: ['fsync']")
        fsync = query.get("fsync", "0").lower()
        if fsync not in ("0", "1", "true", "false", "yes", "no"):
            raise InvalidURLError(f"fsync must be 0 or 1, not {fsync!r}")
        return cls(path, fsync=fsync in ("1", "true", "yes"))

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
                f"could not lock {exc.lock_file} within {_LOCK_TIMEOUT:.0f} s: another process "
                "holds it; retry, or remove the lock file if no process uses the store"
            ) from exc
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and session_id is not None:
                try:
                    gone = not self._is_visible(self._read_header(session_id))
                except (OSError, ChatSessionError):
                    gone = False
                if gone:
                    raise SessionNotFoundError(session_id, "it was deleted meanwhile") from None
            raise self._unavailable(exc, doing) from exc

    def _unavailable(self, exc: OSError, doing: str, outcome: str = "") -> StoreUnavailableError:
        """A ``StoreUnavailableError`` that says what failed, where, and what to do."""
        code = _errno(exc)
        reason = exc.strerror or (os.strerror(code) if code is not None else str(exc))
        where = f": {exc.filename}" if exc.filename else ""
        if isinstance(exc, NotADirectoryError | FileExistsError) or code in (
            errno.ENOTDIR,
            errno.EEXIST,
        ):
            if self.root.exists() and not self.root.is_dir():
                advice = f"{self.root} is a file, not a folder: open the store on a folder"
            else:
                advice = (
                    f"a file stands where the store expects a folder under {self.root}: "
                    "move it away, or open the store on another folder"
                )
        elif isinstance(exc, FileNotFoundError):
            advice = f"a file under {self.root} vanished while in use: check what else removes files there, then retry"
        else:
            advice = _ADVICE.get(code or 0, f"check the disk holding {self.root}, then retry")
        return StoreUnavailableError(
            f"file store {self.root}: could not {doing} ({reason}{where}); {advice}{outcome}"
        )

    def _dir(self, session_id: str) -> Path:
        return self.root / session_id

    @contextlib.contextmanager
    def _root_lock(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with FileLock(str(self.root / ".chatsession.lock"), timeout=_LOCK_TIMEOUT, mode=0o600):
            yield

    @contextlib.contextmanager
    def _session_lock(self, session_id: str) -> Iterator[None]:
        with FileLock(str(self._dir(session_id) / ".lock"), timeout=_LOCK_TIMEOUT, mode=0o600):
            yield

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _forget(self, session_id: str) -> None:
        with self._tails_lock:
            self._tails.pop(session_id, None)

    # -- headers ---------------------------------------------------------------

    def _read_header(self, session_id: str) -> dict[str, Any] | None:
        """The session's header, or None if there is no such session.

        Only a missing ``session.json`` means "no such session"; any other
        failure to read it raises (``OSError`` becomes ``StoreUnavailableError``).
        """
        path = self._dir(session_id) / HEADER
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            header = _loads(raw)
            _check_header(header, session_id)
            fields = {k: v for k, v in header.items() if k not in _BOOKKEEPING}
            SessionRecord.model_validate(fields, strict=True)  # every field, for every caller
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise CorruptDataError(
                f"session {session_id!r}: {path} is damaged ({describe_failure(exc)}); restore it from a "
                "backup or rewrite it by hand (see docs/stores.md for its fields)"
            ) from exc
        return header  # type: ignore[no-any-return]

    def _write_header(self, header: dict[str, Any]) -> None:
        path = self._dir(header["id"]) / HEADER
        self._write_atomic(path, json.dumps(header, indent=1, ensure_ascii=False).encode())

    @staticmethod
    def _header_of(record: SessionRecord, kept: dict[str, Any] | None = None) -> dict[str, Any]:
        """The header for ``record``, keeping the bookkeeping of ``kept`` (or starting it)."""
        header = record.model_dump(mode="json", exclude={"head"})
        if kept is None:
            header.update(deleted=False, children=[], create_id=uuid.uuid4().hex)
        else:
            header.update(
                deleted=bool(kept.get("deleted")),
                children=list(kept.get("children", [])),
                create_id=kept.get("create_id"),
            )
        return header

    def _record(self, header: dict[str, Any], head: int) -> SessionRecord:
        fields = {k: v for k, v in header.items() if k not in _BOOKKEEPING}
        try:
            record = SessionRecord.model_validate({**fields, "head": head}, strict=True)
        except ValueError as exc:
            raise CorruptDataError(
                f"session {header['id']!r}: {self._dir(header['id']) / HEADER} has an invalid "
                f"field ({describe_failure(exc)}); restore it from a backup or rewrite it by hand (see "
                "docs/stores.md for its fields)"
            ) from exc
        return record

    @staticmethod
    def _is_visible(header: dict[str, Any] | None) -> bool:
        if header is None or header.get("deleted"):
            return False
        expires = header.get("expires_at")
        return expires is None or expires > now()

    def _visible_header(self, session_id: str) -> dict[str, Any]:
        return self._check_visible(session_id, self._read_header(session_id))

    @staticmethod
    def _check_visible(session_id: str, header: dict[str, Any] | None) -> dict[str, Any]:
        if header is None or header.get("deleted"):
            raise SessionNotFoundError(session_id)
        expires = header.get("expires_at")
        if expires is not None and expires <= now():
            raise SessionNotFoundError(session_id, "expired")
        return header

    def _check_still_there(self, session_id: str, create_id: str | None) -> None:
        """Raise ``SessionNotFoundError`` if the session was deleted (or re-created)."""
        header = self._read_header(session_id)
        if header is None or not self._is_visible(header) or header.get("create_id") != create_id:
            raise SessionNotFoundError(session_id, "it was deleted or expired while being read")

    @staticmethod
    def _fork_seq(header: dict[str, Any]) -> int:
        parent = header.get("parent")
        return int(parent["seq"]) if parent else 0

    # -- the log ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(
        self, session_id: str, *, write: bool = False
    ) -> Iterator[tuple[dict[str, Any], int, _Tail]]:
        """Lock a visible session, open its log and bring its tail up to date.

        Yields the header read under the lock, the log's file descriptor
        (opened for appending if ``write``) and the tail. A torn end is moved
        aside first.

        Raises:
            SessionNotFoundError: The session is not visible.
        """
        for _ in range(_RELOCKS):
            before = self._visible_header(session_id)
            lock = FileLock(str(self._dir(session_id) / ".lock"), timeout=_LOCK_TIMEOUT, mode=0o600)
            try:
                lock.acquire()
            except FileNotFoundError:  # the folder went away while we came to lock it
                self._check_visible(session_id, self._read_header(session_id))
                continue  # and came back: re-created meanwhile
            try:
                found = self._read_header(session_id)
                if found is None:  # deleted while we came to lock it
                    self._drop_lock_folder(session_id)
                header = self._check_visible(session_id, found)
                if header.get("create_id") != before.get("create_id"):
                    continue  # deleted and re-created meanwhile: we hold the old folder's lock
                path = self._dir(session_id) / LOG
                try:
                    fd = os.open(path, os.O_RDWR | os.O_APPEND if write else os.O_RDONLY)
                except FileNotFoundError:
                    raise CorruptDataError(
                        f"{path} is missing, though {HEADER} is there: restore it from a "
                        "backup (an empty file if the session had no events of its own)"
                    ) from None
                try:
                    yield header, fd, self._scan(session_id, header, fd)
                    return
                finally:
                    os.close(fd)
            finally:
                lock.release()
        raise StoreUnavailableError(
            f"session {session_id!r} in {self.root} was deleted and re-created {_RELOCKS} times "
            "while this store waited for its lock; retry"
        )

    def _drop_lock_folder(self, session_id: str) -> None:
        """Remove the folder that locking a just-deleted session made again (lock held)."""
        folder = self._dir(session_id)
        with contextlib.suppress(OSError):
            os.unlink(folder / ".lock")
            os.rmdir(folder)  # only if empty: a create under way keeps it

    def _scan(self, session_id: str, header: dict[str, Any], fd: int) -> _Tail:
        """Bring our knowledge of the log's end up to date; repair a torn tail.

        Call with the session's lock held; ``fd`` is its log, ``header`` was read
        under the lock. The cached tail is reused only for the same file.
        """
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino, header.get("create_id"))
        with self._tails_lock:
            tail = self._tails.get(session_id)
        if tail is None or tail.identity != identity or st.st_size < tail.size:
            tail = _Tail(identity, 0, self._fork_seq(header))
        if st.st_size != tail.size:
            tail = self._walk(session_id, header, fd, tail)
        with self._tails_lock:
            self._tails[session_id] = tail
        return tail

    def _walk(self, session_id: str, header: dict[str, Any], fd: int, tail: _Tail) -> _Tail:
        """Walk the whole appends after ``tail``; move a torn or unfinished last append aside.

        Only what a crash during one ``write()`` can leave is torn: a last line
        without its newline, or the first lines of an append of ``batch`` events.
        Any complete line that does not parse or breaks the seq order raises
        ``CorruptDataError``.
        """
        path = self._dir(session_id) / LOG
        fork_seq = self._fork_seq(header)
        pos, head, pending = tail.size, tail.head, 0
        good_size, good_head = pos, head  # where the last complete append ends
        end = pos
        with _reader(os.dup(fd)) as f:
            f.seek(pos)
            while True:
                line = f.readline()
                end = pos + len(line)
                if not line.endswith(b"\n"):
                    break  # the end of the file, maybe a line cut off by a crash
                line_no = head - fork_seq + 1
                try:
                    obj = _loads(line)
                    seq = _event_fields(obj)[0]
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
        return _Tail(tail.identity, good_size, good_head)

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
                for start in range(at, end, _CHUNK):
                    chunk = os.pread(fd, min(_CHUNK, end - start), start)
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

    def _write_events(self, path: Path, fd: int, size: int, text: bytes) -> None:
        """Append ``text`` in one ``write()``; on any failure cut the file back to ``size``."""
        try:
            written = os.write(fd, text)
            if written != len(text):
                raise OSError(
                    errno.ENOSPC, f"short write, {written} of {len(text)} bytes", str(path)
                )
            if self.fsync:
                os.fsync(fd)
        except BaseException as exc:
            try:
                os.ftruncate(fd, size)
            except OSError as undo:
                raise StoreUnavailableError(
                    f"file store {self.root}: appending to {path} failed ({exc}) and could not be "
                    f"undone ({undo}): the append may be partly stored. Fix the disk, then re-read "
                    "the session: an unfinished append is moved aside when it is next read"
                ) from exc
            if isinstance(exc, OSError):
                raise self._unavailable(exc, f"append to {path}", ". Nothing was appended") from exc
            raise

    # -- records ---------------------------------------------------------------

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)

        def work() -> None:
            with self._root_lock():
                self._make_folder(stored.id)
                self._write_header(self._header_of(stored))

        await self._run(work, f"create session {stored.id!r}")
        return stored

    def _make_folder(self, session_id: str) -> None:
        """Make a new session's folder and empty log (root lock held); write the header after."""
        folder = self._dir(session_id)
        if self._read_header(session_id) is not None:
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
        self._forget(session_id)

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)

        def work() -> SessionRecord:
            with self._locked(session_id) as (header, fd, tail):
                mtime = os.fstat(fd).st_mtime
            return self._with_mtime(self._record(header, tail.head), mtime)

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
            with self._root_lock(), self._locked(record.id) as (header, _, tail):
                current = self._record(header, tail.head)
                if current.version != expected_version:
                    raise ConflictError(record.id, expected_version, current.version, "version")
                new = updated_record(current, record)
                self._write_header(self._header_of(new, header))
                return new

        return await self._run(work, f"update session {record.id!r}", record.id)

    def _remove(self, session_id: str) -> None:
        """Delete (or tombstone, if forks need it) a session; then unneeded ancestors.

        Call with the root lock held. The folder is renamed away under the
        session's lock (one atomic step), then removed.
        """
        header = self._read_header(session_id)
        if header is None:
            return
        folder = self._dir(session_id)
        if header.get("children"):
            header["deleted"] = True
            self._write_header(header)
            return
        trash = self.root / f"{_TRASH}{session_id}-{uuid.uuid4().hex}"
        with self._session_lock(session_id):
            os.rename(folder, trash)
        self._forget(session_id)
        shutil.rmtree(trash, ignore_errors=True)
        parent = header.get("parent")
        if parent:
            parent_header = self._read_header(parent["session_id"])
            if parent_header is not None:
                parent_header["children"] = [
                    c for c in parent_header.get("children", []) if c != session_id
                ]
                self._write_header(parent_header)
                if parent_header.get("deleted") and not parent_header["children"]:
                    self._remove(parent["session_id"])

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        validate_id(session_id)

        def work() -> None:
            with self._root_lock():
                self._visible_header(session_id)
                self._remove(session_id)

        await self._run(work, f"delete session {session_id!r}", session_id)

    def _headers(self, doing: str) -> Iterator[dict[str, Any]]:
        """Every session's header; a damaged one is skipped with a warning naming it."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return  # nothing was ever created here
        for entry in entries:
            if entry.is_dir() and not entry.name.startswith("."):
                try:
                    header = self._read_header(entry.name)
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

        def work() -> list[SessionRecord]:
            at = now()
            found = []
            for h in self._headers("list_sessions"):
                if h.get("deleted") or (h.get("expires_at") is not None and h["expires_at"] <= at):
                    continue
                if any(
                    want is not None and h.get(key) != want
                    for key, want in (
                        ("user_id", user_id),
                        ("agent_id", agent_id),
                        ("window_id", window_id),
                        ("state", state),
                    )
                ):
                    continue
                if after is not None and (h["created_at"], h["id"]) >= after:
                    continue
                found.append(h)
            found.sort(key=lambda h: (h["created_at"], h["id"]), reverse=True)
            records: list[SessionRecord] = []
            for h in found:
                if len(records) > limit:
                    break
                try:
                    with self._locked(h["id"]) as (header, fd, tail):
                        mtime = os.fstat(fd).st_mtime
                    record = self._record(header, tail.head)
                except SessionNotFoundError:
                    continue  # deleted since it was listed
                except CorruptDataError as exc:
                    logger.warning("list_sessions skips session %r: %s", h["id"], exc)
                    continue
                records.append(self._with_mtime(record, mtime))
            return records

        records = await self._run(work, "list sessions")
        more = len(records) > limit
        records = records[:limit]
        return Page(records, encode_cursor(records[-1]) if more else None)

    # -- events ----------------------------------------------------------------

    async def append(self, session_id: str, events: Sequence[NewEvent], expected_seq: int) -> int:
        """See :meth:`Store.append`."""
        check_append(events, expected_seq)
        validate_id(session_id)

        def work() -> int:
            with self._locked(session_id, write=True) as (_, fd, tail):
                if tail.head != expected_seq:
                    raise ConflictError(session_id, expected_seq, tail.head)
                text = "".join(
                    _line(expected_seq + i, e, len(events) if i == 1 else 1)
                    for i, e in enumerate(events, start=1)
                ).encode()
                try:
                    self._write_events(self._dir(session_id) / LOG, fd, tail.size, text)
                except BaseException:
                    self._forget(session_id)
                    raise
                new = _Tail(tail.identity, tail.size + len(text), expected_seq + len(events))
                with self._tails_lock:
                    self._tails[session_id] = new
                return new.head

        return await self._run(work, f"append to session {session_id!r}", session_id)

    def _lineage(self, header: dict[str, Any]) -> list[tuple[str, int]]:
        chain: list[tuple[str, int]] = []
        current: dict[str, Any] | None = header
        while current is not None:
            chain.append((current["id"], self._fork_seq(current)))
            parent = current.get("parent")
            if not parent:
                break
            parent_id = parent["session_id"]
            if any(node == parent_id for node, _ in chain):
                raise fork_loop(header["id"], [node for node, _ in chain] + [parent_id])
            current = self._read_header(parent_id)
            if current is None:
                raise CorruptDataError(
                    f"session {header['id']!r}: its fork ancestor {parent_id!r} is missing "
                    f"from {self.root}; restore that folder from a backup"
                )
        return chain

    def _open_segment(
        self, session_id: str, create_id: str | None, seg_id: str, start: int, lo: int, hi: int
    ) -> _Segment:
        path = self._dir(seg_id) / LOG
        try:
            file = _reader(path)
        except FileNotFoundError:
            self._check_still_there(session_id, create_id)
            raise CorruptDataError(
                f"{path} is missing, though session {session_id!r} reads its events "
                f"{lo + 1}..{hi} from it; restore it from a backup"
            ) from None
        return _Segment(path, file, start, lo, hi)

    def _next_batch(
        self, session_id: str, create_id: str | None, segment: _Segment, batch_size: int
    ) -> list[StoredEvent]:
        try:
            events = segment.take(batch_size)
        except (CorruptDataError, OSError):
            self._check_still_there(session_id, create_id)  # a deletion is not damage
            raise
        self._check_still_there(session_id, create_id)
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
            with self._locked(session_id) as (header, _, tail):
                lineage = self._lineage(header)
            segments = fork_segments(lineage, tail.head, after_seq, upto_seq)
            return header.get("create_id"), dict(lineage), segments

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
            with self._root_lock():
                with self._locked(session_id) as (parent, _, tail):
                    check_fork_point(session_id, at_seq, tail.head)
                stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
                self._make_folder(stored.id)
                self._write_header(self._header_of(stored))
                parent["children"] = [*parent.get("children", []), stored.id]
                self._write_header(parent)
                return stored

        return await self._run(work, f"fork session {session_id!r}", session_id)

    # -- blobs -----------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        check_blob(data, media_type)
        blob_id = hashlib.sha256(data).hexdigest()

        def work() -> None:
            self._visible_header(session_id)
            path = self._dir(session_id) / OFFLOAD / blob_id
            if not path.exists():
                path.parent.mkdir(mode=0o700, exist_ok=True)
                self._write_atomic(path, bytes(data))

        await self._run(work, f"store a blob for session {session_id!r}", session_id)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")

        def work() -> bytes:
            header = self._visible_header(session_id)
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

        A session whose header is damaged is skipped, with a warning logged.
        """
        check_before(before)
        at = now() if before is None else before

        def work() -> int:
            with self._root_lock():
                expired = [
                    h["id"]
                    for h in self._headers("purge_expired")
                    if not h.get("deleted")
                    and h.get("expires_at") is not None
                    and h["expires_at"] <= at
                ]
                for session_id in expired:
                    self._remove(session_id)
                for entry in os.scandir(self.root):  # what an interrupted delete left behind
                    if entry.name.startswith(_TRASH) and entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                return len(expired)

        return await self._run(work, "purge expired sessions")

    async def aclose(self) -> None:
        """Forget cached heads; the store cannot be used afterwards. Idempotent."""
        self._closed = True
        self._tails.clear()
