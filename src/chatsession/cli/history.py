"""What ``/history`` and ``/history all`` print.

``/history`` shows what the model sees now: the context, empty after
``/clear``, the rewound context after ``/rewind``, the summary after a
compaction. ``/history all`` shows the whole record from the session's log,
cleared and rewound turns included, with a mark for every event that
changed the context or ended a turn badly: clears, rewinds, compactions,
checkpoints, turns that ended other than ``completed`` (and one that never
ended), and the point a fork starts from. Messages the model no longer
sees are marked ``(not in context)``.

Every piece of stored text is passed through ``clean`` (by default
:func:`~chatsession.cli.terminal.sanitize`; the REPL also redacts
credentials) and put in a :class:`rich.text.Text`, so neither terminal
control sequences nor Rich markup in it take effect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from rich.text import Text

from chatsession.cli.output import styled
from chatsession.cli.terminal import sanitize
from chatsession.log import (
    CheckpointEntry,
    CompactionEntry,
    LogEvent,
    Message,
    MessageEntry,
    ResetEntry,
    RewindEntry,
    TurnEndEntry,
    TurnStartEntry,
)
from chatsession.store.base import ParentRef

__all__ = ["context_lines", "message_line", "record_lines"]

#: how much of a compaction summary ``/history all`` shows
SUMMARY_PREVIEW = 200


Clean = Callable[[str], str]


def message_line(
    seq: int, message: Message, notes: Iterable[str] = (), clean: Clean = sanitize
) -> Text:
    """One message: ``seq role (notes): text``; ``clean`` makes stored text printable."""
    marks = list(notes)
    if message.partial:
        marks.append("cut short")
    if message.truncated:
        marks.append("stopped at the model's output limit")
    if message.is_error:
        marks.append("the tool failed")
    images = (
        sum(1 for part in message.content if part.type == "image")
        if isinstance(message.content, list)
        else 0
    )
    if images:
        marks.append(f"{images} image" + ("s" if images > 1 else ""))
    role: str = message.role
    if role == "tool" and message.name:
        role = f"tool {clean(message.name)}"
    text = clean(message.text)
    if message.tool_calls:
        calls = ", ".join(
            f"→ {clean(call.name)}({clean(call.arguments)})" for call in message.tool_calls
        )
        text = f"{text} {calls}" if text else calls
    return styled(
        (f"{seq:>4} ", "dim"),
        (role, "bold"),
        (f" ({'; '.join(marks)})" if marks else "", "dim"),
        ": ",
        text,
    )


def _mark(seq: int | None, text: str) -> Text:
    where = f"{seq:>4} " if seq is not None else "     "
    return styled((where, "dim"), (f"── {text} ──", "yellow"))


def context_lines(context: Sequence[tuple[int, Message]], clean: Clean = sanitize) -> list[Text]:
    """``/history``: the messages the model sees now, with their seqs."""
    if not context:
        return [
            styled(
                (
                    "(the model's context is empty; /history all shows the whole record)",
                    "dim",
                )
            )
        ]
    return [message_line(seq, message, clean=clean) for seq, message in context]


def record_lines(
    events: Sequence[LogEvent],
    in_context: set[int],
    fork_point: ParentRef | None = None,
    clean: Clean = sanitize,
) -> list[Text]:
    """``/history all``: every message of the log and a mark for each event that matters.

    Args:
        events: The session's whole log (a fork's inherited events first).
        in_context: The seqs of the messages the model sees now.
        fork_point: The parent and seq this session was forked from, if any.
        clean: Makes a piece of stored text printable.
    """
    lines: list[Text] = []

    def quoted(value: str) -> str:
        return clean(repr(value))

    open_turn: int | None = None
    fork_marked = fork_point is None

    def mark_fork(point: ParentRef) -> None:
        lines.append(
            _mark(
                None,
                f"this session starts here, forked from session "
                f"{quoted(point.session_id)} at seq {point.seq}",
            )
        )

    for event in events:
        seq = event.seq
        if not fork_marked and fork_point is not None and seq > fork_point.seq:
            mark_fork(fork_point)
            fork_marked = True
        if isinstance(event, MessageEntry):
            notes = () if seq in in_context else ("not in context",)
            lines.append(message_line(seq, event.data, notes, clean))
        elif isinstance(event, TurnStartEntry):
            open_turn = seq
        elif isinstance(event, TurnEndEntry):
            open_turn = None
            end = event.data
            if end.status != "completed":
                detail = f": {clean(end.error)}" if end.error else ""
                lines.append(_mark(seq, f"turn ended: {end.status}{detail}"))
        elif isinstance(event, ResetEntry):
            also = " and the agent's state" if event.data.clear_state else ""
            lines.append(_mark(seq, f"history cleared{also}: the model forgot what is above"))
        elif isinstance(event, RewindEntry):
            name = event.data.checkpoint
            which = f" (checkpoint {quoted(name)})" if name else ""
            lines.append(_mark(seq, f"rewound to seq {event.data.to_seq}{which}"))
        elif isinstance(event, CheckpointEntry):
            lines.append(_mark(seq, f"checkpoint {quoted(event.data.name)}"))
        elif isinstance(event, CompactionEntry):
            summary = clean(event.data.summary)
            if len(summary) > SUMMARY_PREVIEW:
                summary = summary[:SUMMARY_PREVIEW] + "…"
            lines.append(
                _mark(
                    seq,
                    f"compacted: the model sees this summary instead of the messages "
                    f"up to seq {event.data.upto_seq}: {summary}",
                )
            )
    if not fork_marked and fork_point is not None:
        mark_fork(fork_point)
    if open_turn is not None:
        lines.append(
            _mark(
                None,
                f"the turn started at seq {open_turn} has not ended "
                "(it reads as interrupted; the next turn records that)",
            )
        )
    if not lines:
        lines.append(styled(("(no messages recorded yet)", "dim")))
    return lines
