"""Moving sessions in and out: JSON snapshots, JSONL logs and Markdown transcripts.

A JSON snapshot holds everything needed to recreate a session elsewhere (any
store): the record, the agent's fingerprint (model, system prompt hash, tool
schema hash), the state, summary metadata (tokens, steps, duration, created,
updated) and every event. JSONL holds one header line, then one event per
line. Markdown is for people, and cannot be imported.

Both directions stream: an export writes events batch by batch as the store
yields them, and an import reads one event at a time, so memory does not
grow with the session. The JSON snapshot is written one event per line inside
its ``events`` array, which lets the reader stream it too; any other JSON
layout of the same document is read whole.

Lines are split on ``\\n`` only: JSON text may hold U+2028, U+2029 and NEL
raw, and they are part of the text, not line breaks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import msgspec
from pydantic import ValidationError

from chatsession.errors import (
    ChatSessionError,
    CorruptDataError,
    SessionExistsError,
    UsageError,
)
from chatsession.log import ConversationState, LogEvent, MessageEntry, encode, fold, to_builtins
from chatsession.log.codec import tag_content_parts
from chatsession.store.base import (
    STRICT_JSON,
    NewEvent,
    SessionRecord,
    Store,
    check_event,
    check_record,
    now,
    validate_id,
)

__all__ = [
    "FORMAT",
    "IMPORTING",
    "ExportFormat",
    "ExportReader",
    "ExportWriter",
    "export_header",
    "import_into_store",
    "opened_for_writing",
    "read_snapshot",
    "write_export",
]

#: The format tag written in every export.
FORMAT = "chatsession/1"

ExportFormat = Literal["json", "jsonl", "markdown"]

#: Metadata key marking a session whose import has not finished (its value: the
#: digest of the file's events). Such a session cannot be opened; importing
#: the file again under the same id replaces it.
IMPORTING = "chatsession.importing"

#: Events per append while importing.
IMPORT_BATCH = 1000

_EVENTS_OPEN = '"events":['
_JSON_END = "]}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def export_header(
    record: SessionRecord,
    state: ConversationState,
    *,
    agent: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The header of an export: format, record, agent, state and a summary.

    Args:
        record: The session's record.
        state: The fold of the session's whole log (its summary and state
            go into the header).
        agent: The agent's fingerprint and configuration.
    """
    usage = state.usage
    return {
        "format": FORMAT,
        "session": record.model_dump(mode="json"),
        "agent": agent or {},
        "tool_schema_hash": (agent or {}).get("tool_schema_sha256"),
        "state": state.state,
        "metadata": {
            "tokens": {
                "prompt": usage.prompt_tokens,
                "completion": usage.completion_tokens,
                "total": usage.total_tokens,
                "cost": usage.cost,
            },
            "turns": state.turns,
            "steps": state.steps,
            "duration": state.turn_seconds,
            "messages": state.message_count,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
            "exported_at": now(),
        },
    }


class ExportWriter:
    """Writes an export event by event: :meth:`begin`, :meth:`write` (repeatedly), :meth:`end`.

    Args:
        out: A writable text file.
        format: ``json``, ``jsonl`` or ``markdown``.

    Raises:
        UsageError: An unknown format.
    """

    def __init__(self, out: IO[str], format: ExportFormat = "json") -> None:
        if format not in ("json", "jsonl", "markdown"):
            raise UsageError(f"unknown export format {format!r}: use 'json', 'jsonl' or 'markdown'")
        self.out = out
        self.format = format
        self._first = True

    def begin(self, header: dict[str, Any]) -> None:
        """Write the header."""
        if self.format == "json":
            # the header's keys, then the events one per line inside "events"
            self.out.write(_dumps(header)[:-1] + "," + _EVENTS_OPEN + "\n")
        elif self.format == "jsonl":
            self.out.write(_dumps(header) + "\n")
        else:
            session = header["session"]
            lines = [f"# {session.get('title') or 'Session ' + session['id']}", ""]
            lines.append(f"- session: `{session['id']}`")
            if session.get("user_id"):
                lines.append(f"- user: `{session['user_id']}`")
            self.out.write("\n".join(lines) + "\n\n")

    def write(self, events: Sequence[LogEvent]) -> None:
        """Write a batch of events, in log order."""
        if self.format == "markdown":
            self.out.write(_markdown(events))
            return
        lines = [_dumps(to_builtins(event)) for event in events]
        if not lines:
            return
        if self.format == "json":
            separator = ",\n"
            text = separator.join(lines)
            self.out.write(text if self._first else separator + text)
        else:
            self.out.write("\n".join(lines) + "\n")
        self._first = False

    def end(self) -> None:
        """Finish the document."""
        if self.format == "json":
            self.out.write("\n" + _JSON_END + "\n")


def _markdown(events: Sequence[LogEvent]) -> str:
    who = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}
    out: list[str] = []
    for event in events:
        if isinstance(event, MessageEntry):
            m = event.data
            out.append(f"**{who[m.role]}**{' (partial)' if m.partial else ''}: {m.text}")
            for call in m.tool_calls:
                out.append(f"  - calls `{call.name}({call.arguments})`")
            out.append("")
        elif event.type in ("reset", "rewind", "checkpoint", "compaction", "lifecycle"):
            out.append(f"*— {event.type} (seq {event.seq}) —*")
            out.append("")
    return "\n".join(out) + "\n" if out else ""


def write_export(
    dest: str | Path | IO[str],
    record: SessionRecord,
    events: Sequence[LogEvent],
    *,
    format: ExportFormat = "json",
    agent: dict[str, Any] | None = None,
) -> None:
    """Write a session held in memory to a path or an open text file.

    ``ChatSession.export`` streams from the store instead; this is for logs
    already in memory.

    Raises:
        UsageError: An unknown format.
    """
    header = export_header(record, fold(events), agent=agent)
    with opened_for_writing(dest) as out:
        writer = ExportWriter(out, format)
        writer.begin(header)
        writer.write(events)
        writer.end()


class opened_for_writing:
    """``with opened_for_writing(dest) as out``: a path opened for writing (closed
    after), or a writable text file used as it is (left open)."""

    def __init__(self, dest: str | Path | IO[str]) -> None:
        self._dest = dest
        self._owned: IO[str] | None = None

    def __enter__(self) -> IO[str]:
        if isinstance(self._dest, str | Path):
            self._owned = Path(self._dest).open("w", encoding="utf-8", newline="\n")
            return self._owned
        return self._dest

    def __exit__(self, *exc: object) -> None:
        if self._owned is not None:
            self._owned.close()


def _loads(text: str) -> Any:
    return STRICT_JSON.decode(text)


class ExportReader:
    """Reads a JSON or JSONL export event by event, checking everything it reads.

    Open it with a path or a readable text file; it can be read more than
    once (:meth:`events` starts over each time: a path is reopened, a
    seekable file rewound, anything else is first copied to a temporary file).
    Use it as a context manager, or call :meth:`close`.

    Raises:
        CorruptDataError: On opening or reading: not a chatsession export, or
            damaged. The message names the file and the line.
    """

    def __init__(self, source: str | Path | IO[str]) -> None:
        self._spool: IO[str] | None = None
        self._path: Path | None = None
        self._file: IO[str] | None = None
        self._start = 0
        if isinstance(source, str | Path):
            self.name = str(source)
            self._path = Path(source)
        else:
            self.name = getattr(source, "name", "<file>")
            if source.seekable():
                self._file = source
                self._start = source.tell()
            else:
                spool = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n")  # noqa: SIM115
                for chunk in iter(lambda: source.read(1 << 20), ""):
                    spool.write(chunk)
                self._spool = self._file = spool
        self.header = self._read_header()
        self.record = self._header_record()
        self.digest = ""
        self.count = 0

    # -- reading -----------------------------------------------------------------

    def _lines(self) -> Iterator[tuple[int, str]]:
        """``(line number, line)`` from the start, split on ``\\n`` only."""
        if self._path is not None:
            try:
                handle = self._path.open("r", encoding="utf-8", newline="\n")
            except OSError as exc:
                raise CorruptDataError(f"cannot read {self.name}: {exc}") from None
            with handle:
                yield from self._numbered(handle)
            return
        if self._file is None:
            raise UsageError("the export reader is closed")
        self._file.seek(self._start)
        yield from self._numbered(self._file)

    def _numbered(self, handle: IO[str]) -> Iterator[tuple[int, str]]:
        number = 0
        try:
            # files this reader opens end lines at "\n" only (newline="\n")
            for number, line in enumerate(handle, start=1):
                yield number, line.removesuffix("\n").removesuffix("\r")
        except (UnicodeDecodeError, OSError) as exc:
            raise CorruptDataError(f"{self.name}: cannot read line {number + 1}: {exc}") from None

    def _read_header(self) -> dict[str, Any]:
        first = next((line for _, line in self._lines() if line.strip()), None)
        if first is None:
            raise CorruptDataError(f"{self.name} is empty: not a chatsession export")
        self.layout: Literal["stream", "jsonl", "whole"]
        stripped = first.rstrip()
        if stripped.startswith("{") and stripped.endswith(_EVENTS_OPEN):
            self.layout = "stream"
            text = stripped[: -len(_EVENTS_OPEN)].rstrip().removesuffix(",") + "}"
        else:
            text = stripped
            self.layout = "jsonl"
        header: dict[str, Any] | None
        try:
            parsed = _loads(text)
        except (ValueError, RecursionError):
            parsed = None
        header = parsed if isinstance(parsed, dict) else None
        if header is None or (self.layout == "jsonl" and "events" in header):
            # another layout of a JSON snapshot (e.g. pretty-printed): read it whole
            self.layout = "whole"
            header = self._whole()
        found = header.get("format")
        if found != FORMAT:
            raise CorruptDataError(
                f"{self.name} is not a chatsession export (format {found!r}, expected {FORMAT!r})"
            )
        return header

    def _whole(self) -> dict[str, Any]:
        text = "\n".join(line for _, line in self._lines())
        try:
            doc = _loads(text)
        except (ValueError, RecursionError) as exc:
            raise CorruptDataError(
                f"{self.name} is not a chatsession export: not JSON ({str(exc)[:200]})"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            raise CorruptDataError(
                f"{self.name} is not a chatsession export: no 'events' list at the top"
            )
        return doc

    def _header_record(self) -> SessionRecord:
        try:
            record = SessionRecord.model_validate(self.header.get("session"))
            check_record(record)
        except (ValidationError, ChatSessionError, ValueError) as exc:
            raise CorruptDataError(
                f"{self.name}: the session record in the header is not valid: {exc}"
            ) from None
        return record

    def _raw_events(self) -> Iterator[tuple[str, Any]]:
        """``(where, raw event)`` in file order."""
        if self.layout == "whole":
            for index, raw in enumerate(self._whole()["events"]):
                yield f"{self.name}: events[{index}]", raw
            return
        lines = self._lines()
        header_seen = False
        ended = False
        for number, line in lines:
            if not line.strip():
                continue
            where = f"{self.name}, line {number}"
            if not header_seen:
                header_seen = True
                continue
            if ended:
                raise CorruptDataError(f"{where}: text after the end of the export")
            if self.layout == "stream":
                if line.strip() == _JSON_END:
                    ended = True
                    continue
                line = line.rstrip().removesuffix(",")
            try:
                yield where, _loads(line)
            except (ValueError, RecursionError) as exc:
                raise CorruptDataError(f"{where}: not a JSON event ({str(exc)[:200]})") from None
        if self.layout == "stream" and not ended:
            raise CorruptDataError(f"{self.name}: the export is cut off (no closing ']}}')")

    def events(self) -> Iterator[LogEvent]:
        """The events, in order, each validated and checked as storable.

        Also computes :attr:`count` and :attr:`digest` (sha256 of the events)
        once the iteration ends.

        Raises:
            CorruptDataError: An event is invalid, not numbered 1..n, or holds a
                value no store could keep (for example ``ts: Infinity``).
        """
        digest = hashlib.sha256()
        expected = 0
        for where, raw in self._raw_events():
            expected += 1
            try:
                if (
                    isinstance(raw, dict)
                    and raw.get("type") == "message"
                    and isinstance(raw.get("data"), dict)
                ):  # exports up to schema 2 left the type of content parts out
                    raw = {**raw, "data": tag_content_parts(raw["data"])}
                event = msgspec.convert(raw, LogEvent)
                stored = encode(event)
                check_event(stored)
            except msgspec.ValidationError as exc:
                raise CorruptDataError(f"{where}: not a valid event: {exc}") from None
            except ChatSessionError as exc:
                raise CorruptDataError(f"{where}: the event cannot be imported: {exc}") from None
            if event.seq != expected:
                raise CorruptDataError(
                    f"{where}: events are not numbered 1..n (seq {event.seq} where {expected} "
                    "belongs)"
                )
            digest.update(stored.data.encode())
            yield event
        self.count = expected
        self.digest = digest.hexdigest()

    def close(self) -> None:
        """Release the temporary copy, if one was made."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._file = None

    def __enter__(self) -> ExportReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def import_into_store(
    source: str | Path | IO[str],
    store: Store,
    *,
    session_id: str,
    user_id: str | None = None,
) -> SessionRecord:
    """Create a session in ``store`` from a JSON or JSONL export, all or nothing.

    The whole file is read and checked before anything is written, so a
    damaged or crafted file (a bad event, ``ts: Infinity``, a value no store
    keeps, events not numbered 1..n) writes nothing. The events are then
    appended in batches while the session is marked as an unfinished import
    (metadata key :data:`IMPORTING`); the mark is removed at the end. A
    failure on the way removes the partial session; if the store is down and
    that fails too, the mark keeps it from being opened, and importing again
    under the same id replaces it. Events are streamed both times: memory
    does not grow with the file.

    Args:
        source: A path or a readable text file made by ``ChatSession.export``.
        store: Where to create the session.
        session_id: The new session's id.
        user_id: Its owner (default: the exported owner).

    Returns:
        The new session's record.

    Raises:
        CorruptDataError: The file is not a chatsession export or is damaged
            (the message names the file and the line).
        SessionExistsError: ``session_id`` is taken by a finished session.
    """
    validate_id(session_id)
    with ExportReader(source) as reader:
        for _ in reader.events():  # check everything before writing anything
            pass
        exported = reader.record
        record = exported.model_copy(
            update={
                "id": session_id,
                "parent": None,
                "user_id": user_id if user_id is not None else exported.user_id,
                "created_at": 0.0,
                "updated_at": 0.0,
                "metadata": {
                    **exported.metadata,
                    "imported_from": exported.id,
                    IMPORTING: reader.digest,
                },
            }
        )
        try:
            await store.create(record)
        except SessionExistsError:
            existing = await store.get(session_id)
            if IMPORTING not in existing.metadata:
                raise
            await store.delete(session_id)  # an unfinished import: start over
            await store.create(record)
        try:
            head = 0
            batch: list[NewEvent] = []
            for event in reader.events():
                batch.append(encode(event))
                if len(batch) == IMPORT_BATCH:
                    head = await store.append(session_id, batch, head)
                    batch = []
            if batch:
                head = await store.append(session_id, batch, head)
            current = await store.get(session_id)
            done = {k: v for k, v in current.metadata.items() if k != IMPORTING}
            return await store.update(
                current.model_copy(update={"metadata": done}), current.version
            )
        except BaseException:
            # all or nothing: remove the partial session (if the store is down this
            # fails too, and the mark left on it keeps it from being opened)
            with contextlib.suppress(Exception):
                await store.delete(session_id)
            raise


class Snapshot:
    """A session read back from an export: its record, events and header."""

    def __init__(self, record: SessionRecord, events: list[LogEvent], header: dict[str, Any]):
        self.record = record
        self.events = events
        self.header = header


def read_snapshot(source: str | Path | IO[str]) -> Snapshot:
    """Read a whole JSON or JSONL export into memory (see :class:`ExportReader` to stream).

    Raises:
        CorruptDataError: Not a chatsession export, or damaged.
    """
    with ExportReader(source) as reader:
        return Snapshot(reader.record, list(reader.events()), reader.header)
