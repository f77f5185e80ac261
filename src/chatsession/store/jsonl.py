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
"data"}``; ``data`` is the payload exactly as appended. A fork's file holds only
its own events; its ``session.json`` names the parent and the fork point.

Guarantees:

- An append is one ``write()`` of all its lines, under a cross-process lock
  (``filelock``), after checking the head: atomic and conditional like every
  backend. When it returns, the lines are in the operating system, so killing
  the writer loses nothing acknowledged. ``?fsync=1`` also ``fsync``s every
  append and header for power-loss safety.
- A write cut off by a crash leaves a torn last line (or an incomplete last
  append). It is found when the session is next read or written, moved aside
  to ``context.jsonl.corrupt`` (never silently dropped) and reported with a
  :class:`~chatsession.errors.StoreRepairWarning`. Damage anywhere else (a bad
  line in the middle, an unreadable ``session.json``) raises
  :class:`~chatsession.errors.CorruptDataError` naming the file and line.
- ``list_sessions`` and ``purge_expired`` read every session's header: O(number
  of sessions). Appends cost O(1) in history length: each store object keeps
  every session's head and file size, and reads only bytes added since.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from filelock import FileLock, Timeout

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
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
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    StoredEvent,
    check_append,
    check_fork_point,
    check_limit,
    decode_cursor,
    encode_cursor,
    fork_segments,
    initial_record,
    now,
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


def _line(seq: int, event: NewEvent, batch: int) -> str:
    turn = "null" if event.turn_id is None else json.dumps(event.turn_id)
    size = f',"batch":{batch}' if batch > 1 else ""
    return (
        f'{{"seq":{seq},"type":{json.dumps(event.type)},"ts":{event.ts!r},"turn_id":{turn},'
        f'"v":{event.schema_version}{size},"data":{event.data}}}\n'
    )


class _Tail:
    """What a store object knows of a session's log: its size and head."""

    __slots__ = ("head", "size")

    def __init__(self, size: int, head: int) -> None:
        self.size = size
        self.head = head


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
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidURLError(
                f"file URL {url!r} names a host; use file:///absolute/dir or file:relative/dir"
            )
        path = unquote(parts.path)
        if not path:
            raise InvalidURLError(f"file URL {url!r} names no directory; e.g. file:///srv/sessions")
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

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        try:
            return await asyncio.to_thread(fn)
        except Timeout as exc:
            raise StoreUnavailableError(
                f"could not lock {exc.lock_file} within {_LOCK_TIMEOUT:.0f} s: another process "
                "holds it; retry, or remove the lock file if no process uses the store"
            ) from exc
        except PermissionError as exc:
            raise StoreUnavailableError(
                f"permission denied on {exc.filename}: make {self.root} writable"
            ) from exc
        except (NotADirectoryError, FileExistsError) as exc:
            raise StoreUnavailableError(
                f"cannot use {self.root} as a session folder ({exc}); choose another path"
            ) from exc

    def _dir(self, session_id: str) -> Path:
        return self.root / session_id

    @contextlib.contextmanager
    def _root_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".chatsession.lock"), timeout=_LOCK_TIMEOUT):
            yield

    @contextlib.contextmanager
    def _session_lock(self, session_id: str) -> Iterator[None]:
        with FileLock(str(self._dir(session_id) / ".lock"), timeout=_LOCK_TIMEOUT):
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

    # -- headers ---------------------------------------------------------------

    def _read_header(self, session_id: str) -> dict[str, Any] | None:
        path = self._dir(session_id) / HEADER
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        try:
            header = json.loads(raw)
            if not isinstance(header, dict) or header.get("id") != session_id:
                raise ValueError("not this session's header")
            return header
        except ValueError as exc:
            raise CorruptDataError(
                f"{path} is damaged ({exc}); restore it from a backup or rewrite it by hand "
                "(see docs/stores.md for its fields)"
            ) from exc

    def _write_header(self, header: dict[str, Any]) -> None:
        path = self._dir(header["id"]) / HEADER
        self._write_atomic(path, json.dumps(header, indent=1, ensure_ascii=False).encode())

    @staticmethod
    def _header_of(record: SessionRecord) -> dict[str, Any]:
        header = record.model_dump(mode="json", exclude={"head"})
        header["deleted"] = False
        header["children"] = []
        return header

    def _record(self, header: dict[str, Any], head: int) -> SessionRecord:
        fields = {k: v for k, v in header.items() if k not in ("deleted", "children")}
        try:
            record = SessionRecord.model_validate({**fields, "head": head})
        except ValueError as exc:
            raise CorruptDataError(
                f"{self._dir(header.get('id', '?')) / HEADER} has invalid fields ({exc})"
            ) from exc
        return record

    def _visible_header(self, session_id: str) -> dict[str, Any]:
        header = self._read_header(session_id)
        if header is None or header.get("deleted"):
            raise SessionNotFoundError(session_id)
        expires = header.get("expires_at")
        if expires is not None and expires <= now():
            raise SessionNotFoundError(session_id, "expired")
        return header

    @staticmethod
    def _fork_seq(header: dict[str, Any]) -> int:
        parent = header.get("parent")
        return int(parent["seq"]) if parent else 0

    # -- the log ---------------------------------------------------------------

    def _scan(self, session_id: str, header: dict[str, Any]) -> _Tail:
        """Bring our knowledge of the log's end up to date; repair a torn tail.

        Call with the session's lock held.
        """
        path = self._dir(session_id) / LOG
        with self._tails_lock:
            tail = self._tails.get(session_id)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if tail is not None and tail.size == size:
            return tail
        if tail is None or size < tail.size:
            tail = _Tail(0, self._fork_seq(header))
        if size == 0:
            tail = _Tail(0, self._fork_seq(header))
        else:
            with path.open("rb") as f:
                f.seek(tail.size)
                added = f.read()
            tail = self._consume(session_id, path, tail, added)
        with self._tails_lock:
            self._tails[session_id] = tail
        return tail

    def _consume(self, session_id: str, path: Path, tail: _Tail, added: bytes) -> _Tail:
        """Walk whole appends in ``added``; move a torn or incomplete last append aside."""
        offset, head = tail.size, tail.head
        pos = 0
        lines = added.split(b"\n")
        complete, rest = lines[:-1], lines[-1]
        index = 0
        while index < len(complete):
            line = complete[index]
            try:
                obj = json.loads(line)
                batch = int(obj.get("batch", 1))
                seq = int(obj["seq"])
            except (ValueError, KeyError, TypeError) as exc:
                if index == len(complete) - 1 and not rest:
                    break  # a damaged last line: treat like a torn write
                raise self._corrupt_line(path, offset + pos, exc) from exc
            if seq != head + 1:
                raise self._corrupt_line(path, offset + pos, f"seq {seq} after {head}")
            if index + batch > len(complete):
                break  # the last append did not finish
            block = complete[index : index + batch]
            for k, other in enumerate(block[1:], start=1):
                try:
                    other_seq = int(json.loads(other)["seq"])
                except (ValueError, KeyError, TypeError) as exc:
                    if index + k == len(complete) - 1 and not rest:
                        block = []  # only the file's last line can be a torn write
                        break
                    at = offset + pos + sum(len(b) + 1 for b in block[:k])
                    raise self._corrupt_line(path, at, exc) from exc
                if other_seq != seq + k:
                    raise self._corrupt_line(path, offset + pos, f"seq {other_seq} in an append")
            if not block:
                break
            pos += sum(len(b) + 1 for b in block)
            head = seq + batch - 1
            index += batch
        torn = added[pos:]
        if torn:
            self._move_aside(session_id, path, offset + pos, torn)
        return _Tail(offset + pos, head)

    def _corrupt_line(self, path: Path, byte: int, why: object) -> CorruptDataError:
        with path.open("rb") as f:
            line_no = f.read(byte).count(b"\n") + 1
        return CorruptDataError(
            f"{path}, line {line_no}: damaged event ({why}); the lines before it are intact. "
            "Restore the file from a backup, or move the damaged lines to "
            f"{CORRUPT} by hand"
        )

    def _move_aside(self, session_id: str, path: Path, at: int, torn: bytes) -> None:
        corrupt = path.with_name(CORRUPT)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with corrupt.open("ab") as f:
            f.write(f"# {stamp}: {len(torn)} bytes from {LOG} at byte {at}\n".encode())
            f.write(torn if torn.endswith(b"\n") else torn + b"\n")
            f.flush()
            os.fsync(f.fileno())
        with path.open("r+b") as f:
            f.truncate(at)
            f.flush()
            os.fsync(f.fileno())
        message = (
            f"session {session_id!r}: an unfinished write at the end of {path} ({len(torn)} "
            f"bytes, from an append that was never acknowledged) was moved to {corrupt}"
        )
        logger.warning(message)
        warnings.warn(message, StoreRepairWarning, stacklevel=2)

    # -- records ---------------------------------------------------------------

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)

        def work() -> None:
            with self._root_lock():
                folder = self._dir(stored.id)
                if (folder / HEADER).exists():
                    raise SessionExistsError(stored.id)
                (folder / OFFLOAD).mkdir(parents=True, exist_ok=True)
                (folder / LOG).touch()
                self._write_header(self._header_of(stored))

        await self._run(work)
        return stored

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)

        def work() -> SessionRecord:
            header = self._visible_header(session_id)
            with self._session_lock(session_id):
                tail = self._scan(session_id, header)
            return self._with_mtime(self._record(header, tail.head))

        return await self._run(work)

    def _with_mtime(self, record: SessionRecord) -> SessionRecord:
        try:
            mtime = (self._dir(record.id) / LOG).stat().st_mtime
        except FileNotFoundError:
            return record
        if mtime > record.updated_at and record.head > (record.parent.seq if record.parent else 0):
            return record.model_copy(update={"updated_at": mtime})
        return record

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        validate_id(record.id)

        def work() -> SessionRecord:
            with self._root_lock():
                header = self._visible_header(record.id)
                with self._session_lock(record.id):
                    tail = self._scan(record.id, header)
                current = self._record(header, tail.head)
                if current.version != expected_version:
                    raise ConflictError(record.id, expected_version, current.version, "version")
                new = updated_record(current, record)
                self._write_header(
                    {
                        **new.model_dump(mode="json", exclude={"head"}),
                        "deleted": False,
                        "children": header.get("children", []),
                    }
                )
                return new

        return await self._run(work)

    def _remove(self, session_id: str) -> None:
        """Delete (or tombstone, if forks need it) a session; then unneeded ancestors."""
        header = self._read_header(session_id)
        if header is None:
            return
        if header.get("children"):
            header["deleted"] = True
            self._write_header(header)
            return
        shutil.rmtree(self._dir(session_id), ignore_errors=True)
        with self._tails_lock:
            self._tails.pop(session_id, None)
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

        await self._run(work)

    def _headers(self) -> Iterator[dict[str, Any]]:
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if entry.is_dir() and not entry.name.startswith("."):
                header = self._read_header(entry.name)
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
        """See :meth:`Store.list_sessions`."""
        check_limit(limit)
        after = decode_cursor(cursor) if cursor else None

        def work() -> list[SessionRecord]:
            at = now()
            found = []
            for h in self._headers():
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
            page = found[: limit + 1]
            records = []
            for h in page:
                with self._session_lock(h["id"]):
                    tail = self._scan(h["id"], h)
                records.append(self._with_mtime(self._record(h, tail.head)))
            return records

        records = await self._run(work)
        more = len(records) > limit
        records = records[:limit]
        return Page(records, encode_cursor(records[-1]) if more else None)

    # -- events ----------------------------------------------------------------

    async def append(self, session_id: str, events: Sequence[NewEvent], expected_seq: int) -> int:
        """See :meth:`Store.append`."""
        check_append(events, expected_seq)
        validate_id(session_id)

        def work() -> int:
            header = self._visible_header(session_id)
            path = self._dir(session_id) / LOG
            with self._session_lock(session_id):
                tail = self._scan(session_id, header)
                if tail.head != expected_seq:
                    raise ConflictError(session_id, expected_seq, tail.head)
                text = "".join(
                    _line(expected_seq + i, e, len(events) if i == 1 else 1)
                    for i, e in enumerate(events, start=1)
                ).encode()
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    written = os.write(fd, text)
                    if written != len(text):  # the disk is full: undo the partial line
                        os.ftruncate(fd, tail.size)
                        raise StoreUnavailableError(
                            f"short write to {path} ({written} of {len(text)} bytes): is the "
                            "disk full? nothing was appended"
                        )
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                new = _Tail(tail.size + len(text), expected_seq + len(events))
                with self._tails_lock:
                    self._tails[session_id] = new
                return new.head

        return await self._run(work)

    def _parse(self, path: Path, raw: bytes, line_no: int) -> StoredEvent:
        try:
            text = raw.decode()
            obj = json.loads(text)
            cut = text.find(_DATA_KEY)
            if cut >= 0 and text.endswith("}"):
                data = text[cut + len(_DATA_KEY) : -1]
            else:  # edited by hand: keep the meaning, not the bytes
                data = json.dumps(obj["data"], ensure_ascii=False)
            return StoredEvent(
                int(obj["seq"]),
                str(obj["type"]),
                float(obj["ts"]),
                obj.get("turn_id"),
                data,
                int(obj.get("v", 1)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptDataError(
                f"{path}, line {line_no}: damaged event ({exc}); restore the file from a backup"
            ) from exc

    def _read_segment(self, session_id: str, lo: int, hi: int) -> list[StoredEvent]:
        header = self._read_header(session_id)
        if header is None:
            raise CorruptDataError(f"a fork's ancestor {session_id!r} is missing from {self.root}")
        path = self._dir(session_id) / LOG
        with self._session_lock(session_id):
            tail = self._scan(session_id, header)
            with path.open("rb") as f:
                raw = f.read(tail.size)
        start = self._fork_seq(header)
        out = []
        for line_no, line in enumerate(raw.split(b"\n")[:-1], start=1):
            seq = start + line_no
            if seq <= lo:
                continue
            if seq > hi:
                break
            event = self._parse(path, line, line_no)
            if event.seq != seq:
                raise CorruptDataError(f"{path}, line {line_no}: seq {event.seq}, expected {seq}")
            out.append(event)
        if len(out) != hi - lo:
            raise CorruptDataError(
                f"{path}: events {lo + 1}..{hi} expected, {len(out)} found; restore from a backup"
            )
        return out

    def _lineage(self, header: dict[str, Any]) -> list[tuple[str, int]]:
        chain = []
        current: dict[str, Any] | None = header
        while current is not None:
            chain.append((current["id"], self._fork_seq(current)))
            parent = current.get("parent")
            current = self._read_header(parent["session_id"]) if parent else None
            if parent and current is None:
                raise CorruptDataError(f"the parent {parent['session_id']!r} of a fork is missing")
        return chain

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`."""
        validate_id(session_id)

        def plan() -> list[tuple[str, int, int]]:
            header = self._visible_header(session_id)
            with self._session_lock(session_id):
                tail = self._scan(session_id, header)
            return fork_segments(self._lineage(header), tail.head, after_seq, upto_seq)

        for seg_id, lo, hi in await self._run(plan):
            events = await self._run(lambda s=seg_id, a=lo, b=hi: self._read_segment(s, a, b))  # type: ignore[misc]
            for i in range(0, len(events), batch_size):
                yield events[i : i + batch_size]

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        validate_id(new_record.id)

        def work() -> SessionRecord:
            with self._root_lock():
                parent = self._visible_header(session_id)
                with self._session_lock(session_id):
                    head = self._scan(session_id, parent).head
                check_fork_point(session_id, at_seq, head)
                if (self._dir(new_record.id) / HEADER).exists():
                    raise SessionExistsError(new_record.id)
                stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
                folder = self._dir(stored.id)
                (folder / OFFLOAD).mkdir(parents=True, exist_ok=True)
                (folder / LOG).touch()
                self._write_header(self._header_of(stored))
                parent["children"] = [*parent.get("children", []), stored.id]
                self._write_header(parent)
                return stored

        return await self._run(work)

    # -- blobs -----------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        blob_id = hashlib.sha256(data).hexdigest()

        def work() -> None:
            self._visible_header(session_id)
            path = self._dir(session_id) / OFFLOAD / blob_id
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                self._write_atomic(path, bytes(data))

        await self._run(work)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")

        def work() -> bytes:
            header = self._visible_header(session_id)
            for seg_id, _ in self._lineage(header):
                path = self._dir(seg_id) / OFFLOAD / blob_id
                if path.is_file():
                    return path.read_bytes()
            raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")

        return await self._run(work)

    # -- upkeep ----------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`."""
        at = now() if before is None else before

        def work() -> int:
            with self._root_lock():
                expired = [
                    h["id"]
                    for h in self._headers()
                    if not h.get("deleted")
                    and h.get("expires_at") is not None
                    and h["expires_at"] <= at
                ]
                for session_id in expired:
                    self._remove(session_id)
                return len(expired)

        return await self._run(work)

    async def aclose(self) -> None:
        """Forget cached heads; the store cannot be used afterwards. Idempotent."""
        self._closed = True
        self._tails.clear()
