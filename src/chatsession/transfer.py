"""Moving sessions in and out: JSON snapshots, JSONL logs and Markdown transcripts.

A JSON snapshot holds everything needed to recreate a session elsewhere (any
store): the record, the agent's fingerprint (model, system prompt hash, tool
schema hash), the state, summary metadata (tokens, steps, duration, created,
updated) and every event. JSONL holds one header line, then one event per
line. Markdown is for people, and cannot be imported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import TypeAdapter

from chatsession.errors import CorruptDataError, UsageError
from chatsession.log import (
    LogEvent,
    MessageEntry,
    TurnEndEntry,
    fold,
)
from chatsession.store.base import SessionRecord, now

__all__ = ["FORMAT", "ExportFormat", "Snapshot", "read_snapshot", "write_export"]

#: The format tag written in every export.
FORMAT = "chatsession/1"

ExportFormat = Literal["json", "jsonl", "markdown"]

_EVENTS: TypeAdapter[list[LogEvent]] = TypeAdapter(list[LogEvent])


class Snapshot:
    """A session read back from an export: its record and events."""

    def __init__(self, record: SessionRecord, events: list[LogEvent], header: dict[str, Any]):
        self.record = record
        self.events = events
        self.header = header


def _summary(record: SessionRecord, events: Sequence[LogEvent]) -> dict[str, Any]:
    state = fold(events)
    steps = sum(e.data.steps or 0 for e in events if isinstance(e, TurnEndEntry))
    duration = sum(e.data.duration or 0.0 for e in events if isinstance(e, TurnEndEntry))
    return {
        "tokens": {
            "prompt": state.usage.prompt_tokens,
            "completion": state.usage.completion_tokens,
            "total": state.usage.total_tokens,
            "cost": state.usage.cost,
        },
        "turns": state.turns,
        "steps": steps,
        "duration": duration,
        "messages": len(state.history),
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "exported_at": now(),
    }


def write_export(
    dest: str | Path | IO[str],
    record: SessionRecord,
    events: Sequence[LogEvent],
    *,
    format: ExportFormat = "json",
    agent: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Write a session to a path or an open text file.

    Args:
        dest: A path or a writable text file.
        record: The session's record.
        events: Its whole log.
        format: ``json`` (a snapshot), ``jsonl`` (header + one event a line)
            or ``markdown`` (a transcript).
        agent: The agent's fingerprint and configuration, for the snapshot.
        state: The agent's state key-values.

    Raises:
        UsageError: An unknown format.
    """
    if format not in ("json", "jsonl", "markdown"):
        raise UsageError(f"unknown export format {format!r}: use 'json', 'jsonl' or 'markdown'")
    header = {
        "format": FORMAT,
        "session": record.model_dump(mode="json"),
        "agent": agent or {},
        "tool_schema_hash": (agent or {}).get("tool_schema_sha256"),
        "state": state if state is not None else fold(events).state,
        "metadata": _summary(record, events),
    }
    if format == "json":
        doc = {**header, "events": [e.model_dump(mode="json") for e in events]}
        text = json.dumps(doc, ensure_ascii=False, indent=1)
    elif format == "jsonl":
        lines = [json.dumps(header, ensure_ascii=False)]
        lines.extend(e.model_dump_json() for e in events)
        text = "\n".join(lines) + "\n"
    else:
        text = _markdown(record, events)
    if isinstance(dest, str | Path):
        Path(dest).write_text(text, encoding="utf-8")
    else:
        dest.write(text)


def _markdown(record: SessionRecord, events: Sequence[LogEvent]) -> str:
    out = [f"# {record.title or 'Session ' + record.id}", ""]
    out.append(f"- session: `{record.id}`")
    if record.user_id:
        out.append(f"- user: `{record.user_id}`")
    out.append("")
    for event in events:
        if isinstance(event, MessageEntry):
            m = event.data
            who = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}
            out.append(f"**{who[m.role]}**{' (partial)' if m.partial else ''}: {m.text}")
            for call in m.tool_calls:
                out.append(f"  - calls `{call.name}({call.arguments})`")
            out.append("")
        elif event.type in ("reset", "rewind", "checkpoint", "compaction"):
            out.append(f"*— {event.type} (seq {event.seq}) —*")
            out.append("")
    return "\n".join(out)


def read_snapshot(source: str | Path | IO[str]) -> Snapshot:
    """Read a JSON or JSONL export made by :func:`write_export`.

    Raises:
        CorruptDataError: Not a chatsession export, or damaged.
    """
    if isinstance(source, str | Path):
        name = str(source)
        text = Path(source).read_text(encoding="utf-8")
    else:
        name = getattr(source, "name", "<file>")
        text = source.read()
    try:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "events" in doc:
            header, raw_events = doc, doc["events"]
        else:
            lines = [line for line in text.splitlines() if line.strip()]
            header = json.loads(lines[0])
            raw_events = [json.loads(line) for line in lines[1:]]
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise CorruptDataError(
                f"{name} is not a chatsession export (format {found!r}, expected {FORMAT!r})"
            )
        record = SessionRecord.model_validate(header["session"])
        events = _EVENTS.validate_python(raw_events)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CorruptDataError(f"{name} is not a readable chatsession export: {exc}") from exc
    for expected, event in enumerate(events, start=1):
        if event.seq != expected:
            raise CorruptDataError(
                f"{name}: events are not numbered 1..n (seq {event.seq} at {expected})"
            )
    return Snapshot(record, events, header)
