"""The lines of ``context.jsonl``: writing one, parsing one, and streaming a range of them.

A line is ``{"seq", "type", "ts", "turn_id", "v"[, "batch"][, "id"], "data"}``
and its newline. ``data`` comes last and is written exactly as appended, so
it is read back byte for byte; ``batch`` (on the first line of an append of
several events) says how many lines the append wrote; ``id`` is the event id,
when the writer gave one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from chatsession.errors import CorruptDataError
from chatsession.store.base import STRICT_JSON, NewEvent, StoredEvent, describe_failure

__all__ = ["CHUNK", "Segment", "event_fields", "line", "loads", "parse_event", "reader"]

CHUNK = 1 << 16  # bytes read at a time when walking a log
_DATA_KEY = ',"data":'


def line(seq: int, event: NewEvent, batch: int) -> str:
    """The line (with its newline) that stores ``event`` at ``seq``; ``batch`` on a first line."""
    turn = "null" if event.turn_id is None else json.dumps(event.turn_id)
    size = f',"batch":{batch}' if batch > 1 else ""
    event_id = "" if event.event_id is None else f',"id":"{event.event_id}"'
    return (
        f'{{"seq":{seq},"type":{json.dumps(event.type)},"ts":{event.ts!r},"turn_id":{turn},'
        f'"v":{event.schema_version}{size}{event_id},"data":{event.data}}}\n'
    )


def loads(raw: bytes | str) -> Any:
    """Strict JSON in strict UTF-8: NaN and Infinity refused (``ValueError``), deep nesting a
    ``RecursionError``."""
    return STRICT_JSON.decode(raw.decode() if isinstance(raw, bytes) else raw)


def event_fields(obj: Any) -> tuple[int, str, float, str | None, int, str | None]:
    """``seq, type, ts, turn_id, v, id`` of a parsed log line, checked type for type."""
    if type(obj) is not dict:
        raise TypeError(f"a JSON {type(obj).__name__}, not an object")
    seq, kind, ts, turn_id = obj["seq"], obj["type"], obj["ts"], obj.get("turn_id")
    version = obj.get("v", 1)
    event_id = obj.get("id")
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
    if event_id is not None and type(event_id) is not str:
        raise TypeError(f"id {event_id!r} is not a string")
    batch = obj.get("batch", 1)
    if type(batch) is not int or batch < 1:
        raise TypeError(f"batch {batch!r} is not an int >= 1")
    if "data" not in obj:
        raise KeyError("data")
    return seq, kind, float(ts), turn_id, version, event_id


def parse_event(path: Path, raw: bytes, line_no: int) -> StoredEvent:
    """One line of a log (without its newline) as an event.

    Raises:
        CorruptDataError: The line is damaged (names the session, file and line).
    """
    try:
        text = raw.decode()
        obj = loads(text)
        seq, kind, ts, turn_id, version, event_id = event_fields(obj)
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
        return StoredEvent(seq, kind, ts, turn_id, data, version, event_id)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptDataError(
            f"session {path.parent.name!r}: {path}, line {line_no}: damaged event "
            f"({describe_failure(exc)}); restore the file from a backup"
        ) from exc


def reader(source: int | Path) -> io.BufferedReader:
    """A buffered binary reader of a file descriptor (which it then owns) or a path."""
    return io.BufferedReader(io.FileIO(source, "r"), buffer_size=CHUNK)


def _skip_lines(file: io.BufferedReader, count: int) -> int:
    """Move ``file`` past ``count`` lines; return how many it had (fewer at its end)."""
    skipped = 0
    while skipped < count:
        chunk = file.read1(CHUNK)
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


class Segment:
    """Streams one session's own events ``lo < seq <= hi`` from its log.

    Args:
        path: The log (for messages).
        file: The log, open for reading at its start; the segment closes it.
        start: The session's fork point: line ``n`` holds seq ``start + n``.
        lo: Stream events after this seq.
        hi: Up to and including this seq.
    """

    def __init__(self, path: Path, file: io.BufferedReader, start: int, lo: int, hi: int) -> None:
        self.path = path
        self.file = file
        self.start = start
        self.next_seq = lo + 1
        self.hi = hi
        self.skipped = False

    @property
    def done(self) -> bool:
        """Whether every event of the range was taken."""
        return self.next_seq > self.hi

    def _missing(self, line_no: int, why: str) -> CorruptDataError:
        return CorruptDataError(
            f"session {self.path.parent.name!r}: {self.path}: events {self.next_seq}..{self.hi} "
            f"expected, but {why} at line {line_no}; restore the file from a backup"
        )

    def take(self, count: int) -> list[StoredEvent]:
        """The next ``count`` events of the range (fewer at its end).

        Raises:
            CorruptDataError: A line is damaged, missing or out of order.
        """
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
            event = parse_event(self.path, raw[:-1], line_no)
            if event.seq != self.next_seq:
                raise CorruptDataError(
                    f"session {self.path.parent.name!r}: {self.path}, line {line_no}: seq "
                    f"{event.seq}, expected {self.next_seq}; restore the file from a backup"
                )
            out.append(event)
            self.next_seq += 1
        return out

    def close(self) -> None:
        """Close the log."""
        self.file.close()
