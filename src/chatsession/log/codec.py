"""The stored form of events: encoding, decoding, and upgrades of older versions.

Stored events carry a ``schema_version``; :func:`upgrade_payload` is the only
place that knows older stored formats, and :func:`decode_payloads` sends only
the rows an upgrade changes through it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from chatsession.errors import CorruptDataError, UnsupportedValueError
from chatsession.log.events import (
    EVENT_TYPES,
    Checkpoint,
    LogEvent,
    Metadata,
    Reset,
    StateChange,
    TurnEnd,
    TurnStart,
    Usage,
)
from chatsession.store.base import (
    EVENT_SCHEMA_VERSION,
    MAX_JSON_DEPTH,
    NewEvent,
    StoredEvent,
    check_json_value,
    new_event_id,
    now,
)

__all__ = ["decode", "decode_payloads", "encode", "upgrade_payload"]

_ENCODER = msgspec.json.Encoder()
_CHECKERS: dict[str, msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(payload) for kind, (_, payload) in EVENT_TYPES.items()
}
_LISTS: dict[str, msgspec.json.Decoder[Any]] = {
    kind: msgspec.json.Decoder(list[payload])  # type: ignore[valid-type]
    for kind, (_, payload) in EVENT_TYPES.items()
}
_ENTRIES: dict[str, Any] = {kind: entry for kind, (entry, _) in EVENT_TYPES.items()}
# payloads that are often all defaults ("{}"): one shared frozen instance each
_EMPTY: dict[str, Any] = {"turn_start": TurnStart(), "turn_end": TurnEnd(), "reset": Reset()}
_WHERE = re.compile(r"\$\[(\d+)\]")


def _check_values(event_type: str, data: Any) -> None:
    """Refuse what JSON would change silently (NaN becomes null, tuples become lists)."""
    if isinstance(data, Checkpoint):
        check_json_value(data.data, "checkpoint data", max_depth=MAX_JSON_DEPTH - 1)
    elif isinstance(data, Metadata | StateChange):
        check_json_value(data.values, f"{event_type} values", max_depth=MAX_JSON_DEPTH - 1)
    elif isinstance(data, Usage):
        if data.cost is not None and not math.isfinite(data.cost):
            raise UnsupportedValueError(f"usage cost {data.cost!r} is not a finite number")
    elif (
        isinstance(data, TurnEnd) and data.duration is not None and not math.isfinite(data.duration)
    ):
        raise UnsupportedValueError(f"turn duration {data.duration!r} is not a finite number")


def encode(event: LogEvent, *, event_id: str | None = None) -> NewEvent:
    """The stored form of an event (its seq is given by the store on append).

    Default-valued fields are left out of the JSON to keep the log small. The
    payload is checked against its type as it is encoded, so what is stored
    always decodes again.

    Args:
        event: The event.
        event_id: The id to append it with (default: a fresh one, so a re-sent
            append is recognised by the store).

    Raises:
        UnsupportedValueError: The payload is not a valid value of its type,
            or holds a value JSON cannot carry back (NaN, infinity, a tuple).
    """
    kind = event.type
    data = event.data
    try:
        _check_values(kind, data)
        text = _ENCODER.encode(data)
        _CHECKERS[kind].decode(text)
    except (msgspec.ValidationError, msgspec.EncodeError, TypeError, ValueError) as exc:
        if isinstance(exc, UnsupportedValueError):
            raise
        raise UnsupportedValueError(
            f"a {kind} event cannot be stored: its data is not valid ({exc})"
        ) from None
    return NewEvent(
        type=kind,
        data=text.decode(),
        ts=event.ts or now(),
        turn_id=event.turn_id,
        schema_version=EVENT_SCHEMA_VERSION,
        event_id=event_id or new_event_id(),
    )


# --------------------------------------------------------------------------
# upgrades


def _upgrade_v0(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    # 0.0 pre-releases wrote message text as "text" (not "content"), usage as
    # input/output tokens, and turn ends as {"ok": bool}.
    data = dict(data)
    if event_type == "message" and "text" in data and "content" not in data:
        data["content"] = data.pop("text")
    elif event_type == "usage":
        if "input_tokens" in data:
            data["prompt_tokens"] = data.pop("input_tokens")
        if "output_tokens" in data:
            data["completion_tokens"] = data.pop("output_tokens")
        data.setdefault(
            "total_tokens", data.get("prompt_tokens", 0) + data.get("completion_tokens", 0)
        )
    elif event_type == "turn_end" and "ok" in data:
        data["status"] = "completed" if data.pop("ok") else "error"
    return data


def _upgrade_v1(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    # version 1 wrote a removed state key as a None value, so a key set to None
    # could not be kept; version 2 lists removed keys in "removed"
    if event_type != "state":
        return data
    values = data.get("values", {})
    if not isinstance(values, dict):
        return data  # invalid either way: validation reports it
    return {
        **data,
        "values": {k: v for k, v in values.items() if v is not None},
        "removed": [k for k, v in values.items() if v is None],
    }


def tag_content_parts(data: dict[str, Any]) -> dict[str, Any]:
    """A message payload whose content parts all carry their ``type``.

    Versions up to 2 left the ``type`` of text and image parts out of the
    stored JSON (it was a default); a part with ``text`` is a text part, any
    other an image.
    """
    content = data.get("content")
    if not isinstance(content, list):
        return data
    parts = [
        part
        if not isinstance(part, dict) or "type" in part
        else {"type": "text" if "text" in part else "image", **part}
        for part in content
    ]
    return {**data, "content": parts}


def _upgrade_v2(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    return tag_content_parts(data) if event_type == "message" else data


#: ``version -> function(type, data) -> data`` upgrading that version to the next.
_UPGRADES: dict[int, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    0: _upgrade_v0,
    1: _upgrade_v1,
    2: _upgrade_v2,
}
_LIST_CONTENT = re.compile(r'"content"\s*:\s*\[')


def _changed_by_upgrade(event_type: str, version: int, data: str) -> bool:
    """Whether a stored payload differs from the current format (and must be upgraded)."""
    if version == EVENT_SCHEMA_VERSION:
        return False
    if not 0 <= version < EVENT_SCHEMA_VERSION:
        return True  # upgrade_payload reports it
    if version == 0:
        return True
    if event_type == "state" and version == 1:
        return True
    # versions 1 and 2 differ from 3 only in messages whose content is a list of parts
    return event_type == "message" and _LIST_CONTENT.search(data) is not None


def upgrade_payload(event_type: str, data: dict[str, Any], version: int) -> dict[str, Any]:
    """Upgrade an event payload written with ``version`` to the current version.

    This is the only place that knows older stored formats.

    Raises:
        CorruptDataError: The version is newer than this code, or unknown.
    """
    if version > EVENT_SCHEMA_VERSION:
        raise CorruptDataError(
            f"event payload has schema version {version}, newer than this chatsession "
            f"understands ({EVENT_SCHEMA_VERSION}); upgrade chatsession to read it"
        )
    while version < EVENT_SCHEMA_VERSION:
        step = _UPGRADES.get(version)
        if step is None:
            raise CorruptDataError(f"no upgrade known from event schema version {version}")
        data = step(event_type, data)
        version += 1
    return data


def _upgraded_text(row: StoredEvent, session_id: str) -> str:
    """The payload text of an older row, upgraded to the current format."""
    where = f"session {session_id!r}, seq {row[0]}"
    try:
        raw = json.loads(row[4])
    except (ValueError, RecursionError) as exc:
        raise CorruptDataError(f"{where}: payload is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CorruptDataError(f"{where}: payload is a {type(raw).__name__}, not an object")
    try:
        upgraded = upgrade_payload(row[1], raw, row[5])
    except CorruptDataError as exc:
        raise CorruptDataError(f"{where}: {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CorruptDataError(f"{where}: cannot upgrade the payload ({exc})") from None
    return json.dumps(upgraded)


# --------------------------------------------------------------------------
# decoding


def decode_payloads(rows: Sequence[StoredEvent], session_id: str = "?") -> list[Any]:
    """The typed payloads of stored rows, in order, without building event envelopes.

    Payloads of each type are decoded in one call. Older schema versions are
    upgraded.

    Raises:
        CorruptDataError: A row's type is unknown or its payload is invalid.
    """
    out: list[Any] = [None] * len(rows)
    groups: dict[str, tuple[list[int], list[str]]] = {}
    current = EVENT_SCHEMA_VERSION
    for i, row in enumerate(rows):
        kind, data = row[1], row[4]
        group = groups.get(kind)
        if group is None:
            if kind not in _LISTS:
                raise CorruptDataError(
                    f"session {session_id!r}, seq {row[0]}: unknown event type {kind!r}"
                )
            group = groups[kind] = ([], [])
        if row[5] != current and _changed_by_upgrade(kind, row[5], data):
            data = _upgraded_text(row, session_id)
        elif data == "{}" and kind in _EMPTY:
            out[i] = _EMPTY[kind]
            continue
        group[0].append(i)
        group[1].append(data)
    for kind, (indexes, texts) in groups.items():
        if not indexes:
            continue
        try:
            values = _LISTS[kind].decode("[" + ",".join(texts) + "]")
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            found = _WHERE.search(str(exc))
            where = int(found.group(1)) if found else None
            seq = rows[indexes[where]].seq if where is not None and where < len(indexes) else "?"
            raise CorruptDataError(
                f"session {session_id!r}, seq {seq}: stored event is invalid: {exc}"
            ) from None
        except RecursionError:
            raise CorruptDataError(
                f"session {session_id!r}: a stored {kind} event is nested too deeply to read"
            ) from None
        for i, value in zip(indexes, values, strict=True):
            out[i] = value
    return out


def decode(rows: Sequence[StoredEvent], session_id: str = "?") -> list[LogEvent]:
    """Turn stored rows into events, upgrading old schema versions.

    Args:
        rows: Rows as a store's ``read`` yields them.
        session_id: For error messages.

    Raises:
        CorruptDataError: A row's type is unknown or its payload is invalid.
    """
    payloads = decode_payloads(rows, session_id)
    entries = _ENTRIES
    return [
        entries[row[1]](seq=row[0], ts=row[2], turn_id=row[3], data=payload)
        for row, payload in zip(rows, payloads, strict=True)
    ]
