"""Hypothesis strategies shared by the store, session and export tests.

The storable side (:func:`json_values`, :func:`records`, :func:`new_events`)
draws what the store contract promises to give back exactly: any unicode
without lone surrogates (controls, NUL, U+2028/U+2029/NEL and the other
separators included), empty strings, big integers, finite floats including
``-0.0``, subnormals and values near the float limits, and nesting up to a
chosen depth. The refusing side (:func:`unstorable_values`,
:func:`unstorable_payloads`) draws what every store must refuse with
:class:`~chatsession.errors.UnsupportedValueError` before writing anything.

:func:`same` is the type-strict equality the round-trip tests compare with:
``1 == 1.0 == True`` and ``0.0 == -0.0`` in Python, but not in a store that
keeps what it acknowledged.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from chatsession.store.base import MAX_JSON_DEPTH, NewEvent, SessionRecord

__all__ = [
    "ID_ALPHABET",
    "SEPARATORS",
    "compact_json",
    "event_types",
    "json_texts",
    "json_values",
    "nested",
    "new_events",
    "records",
    "same",
    "session_ids",
    "storable_floats",
    "texts",
    "times",
    "titles",
    "turn_ids",
    "unstorable_payloads",
    "unstorable_values",
]

#: Characters that break naive line splitting or key joining somewhere:
#: controls, NUL, the unicode line and paragraph separators, NEL, the
#: information separators (Redis joins fields with ``\x1f``), BOM, DEL, C1.
SEPARATORS = (
    "\x00",
    "\n",
    "\r",
    "\r\n",
    "\t",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x1f",
    "\x7f",
    "\x85",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\\",
    '"',
    "\\u0000",
)

#: The characters a session id may hold (see ``validate_id``).
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-."

_ANY_CHAR = st.characters(blacklist_categories=("Cs",))  # every code point but surrogates


def texts(*, max_size: int = 24, controls: bool = True, nul: bool = True) -> st.SearchStrategy[str]:
    """Any unicode text without lone surrogates, often holding :data:`SEPARATORS`.

    Args:
        max_size: The longest text drawn (in pieces of text, roughly characters).
        controls: Whether ASCII control characters (below U+0020, and DEL) may appear.
        nul: Whether NUL may appear (only matters when ``controls`` is true).
    """

    def allowed(c: str) -> bool:
        if not controls and (ord(c) < 32 or c == "\x7f"):
            return False
        return nul or c != "\x00"

    chars = _ANY_CHAR.filter(allowed)
    specials = [s for s in SEPARATORS if all(allowed(c) for c in s)]
    piece = st.one_of(chars, st.sampled_from(specials)) if specials else chars
    return st.lists(piece, max_size=max_size).map("".join)


def storable_floats() -> st.SearchStrategy[float]:
    """Finite floats: ``-0.0``, subnormals, the float limits and everything between."""
    return st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(
            [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1.5e300]
        ),
        st.sampled_from([1.0, 1e16, 1e22, 0.1, 1.5, 123456789.125, 1e-7]),
    )


def _big_ints() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(),
        st.integers(min_value=-(10**300), max_value=10**300),
        st.sampled_from([2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**400]),
    )


def _scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), _big_ints(), storable_floats(), texts(), st.just(""))


def json_values(max_depth: int = 4, *, max_size: int = 4) -> st.SearchStrategy[Any]:
    """Any value JSON carries exactly, nested at most ``max_depth`` levels of containers.

    ``max_depth=0`` draws scalars only; a list or object counts one level, so
    a value drawn with ``max_depth=MAX_JSON_DEPTH`` is within every limit.

    Args:
        max_depth: The deepest nesting of lists and dicts drawn.
        max_size: The most items in one list or dict.
    """
    strategy: st.SearchStrategy[Any] = _scalars()
    for _ in range(max_depth):
        inner = strategy
        strategy = st.one_of(
            _scalars(),
            st.lists(inner, max_size=max_size),
            st.dictionaries(texts(max_size=8), inner, max_size=max_size),
        )
    return strategy


def nested(depth: int, leaf: Any = 1, *, key: str = "k") -> Any:
    """A value nested exactly ``depth`` levels of containers deep (lists and dicts by turns)."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {key: value}
    return value


def compact_json(value: Any, *, ensure_ascii: bool = False) -> str:
    """``value`` as the compact one-line JSON text a store accepts as a payload."""
    return json.dumps(value, ensure_ascii=ensure_ascii, separators=(",", ":"))


def json_texts(max_depth: int = 4) -> st.SearchStrategy[str]:
    """Payload text: compact JSON of :func:`json_values`, ASCII-escaped or not."""
    return st.builds(
        lambda value, ascii_only: compact_json(value, ensure_ascii=ascii_only),
        json_values(max_depth),
        st.booleans(),
    )


def session_ids() -> st.SearchStrategy[str]:
    """Valid session ids (``validate_id``): 1-128 characters, no leading dot."""
    head = st.sampled_from(ID_ALPHABET.replace(".", ""))
    tail = st.text(alphabet=ID_ALPHABET, max_size=127)
    return st.builds(lambda a, b: a + b, head, tail)


def event_types() -> st.SearchStrategy[str]:
    """Valid event type names: a letter, then up to 63 of ``a-z 0-9 _``."""
    return st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z")


def turn_ids() -> st.SearchStrategy[str | None]:
    """None or a free-text turn id: any unicode without control characters, ``""`` included."""
    return st.one_of(st.none(), st.just(""), texts(controls=False))


def titles() -> st.SearchStrategy[str | None]:
    """None or a title: any unicode but NUL (controls and separators included)."""
    return st.one_of(st.none(), st.just(""), texts(nul=False))


def times() -> st.SearchStrategy[float]:
    """Finite timestamps (``ts``, ``created_at``...): any finite float but ``-0.0``.

    ``-0.0`` times are refused (``check_event``/``check_record``: SQLite's REAL
    columns would give them back as ``0.0``), so these draw every other finite
    float; payload values keep ``-0.0``.
    """
    return st.one_of(
        st.floats(min_value=1.0, max_value=4e9),
        st.floats(allow_nan=False, allow_infinity=False).filter(
            lambda t: t != 0.0 or math.copysign(1.0, t) > 0
        ),
    )


def _future() -> st.SearchStrategy[float | None]:
    # far enough ahead that the session stays visible for the whole test
    return st.one_of(st.none(), st.floats(min_value=4e9, max_value=1.7e308))


def records(max_depth: int = 4) -> st.SearchStrategy[SessionRecord]:
    """Session records a store must keep exactly.

    Ids come from the allowed alphabet (tests usually replace them with a
    fresh id per example); ``user_id``/``agent_id``/``window_id`` are free text
    without control characters (``""`` included); titles any unicode but
    NUL; times finite (``expires_at`` None or far ahead, so the session stays
    visible); metadata and fingerprint from :func:`json_values`.
    """
    free = st.one_of(st.none(), st.just(""), texts(controls=False))
    return st.builds(
        SessionRecord,
        id=session_ids(),
        user_id=free,
        agent_id=free,
        window_id=free,
        title=titles(),
        state=st.sampled_from(["active", "idle", "archived", "expired"]),
        created_at=times(),
        updated_at=times(),
        expires_at=_future(),
        metadata=st.dictionaries(texts(max_size=8), json_values(max_depth - 1), max_size=4),
        fingerprint=st.one_of(
            st.none(),
            st.dictionaries(texts(max_size=8), json_values(max_depth - 1), max_size=3),
        ),
    )


def new_events(max_depth: int = 4) -> st.SearchStrategy[NewEvent]:
    """Events a store must keep exactly: valid type, compact JSON payload, finite ts."""
    return st.builds(
        NewEvent,
        type=event_types(),
        data=json_texts(max_depth),
        ts=times(),
        turn_id=turn_ids(),
        schema_version=st.one_of(st.just(1), st.integers(min_value=0, max_value=32767)),
        event_id=st.one_of(st.none(), st.from_regex(r"\A[A-Za-z0-9_\-]{1,64}\Z")),
    )


class _Opaque:
    def __repr__(self) -> str:
        return "<an object>"


def unstorable_values() -> st.SearchStrategy[Any]:
    """Values no store can give back exactly, alone or inside a JSON value.

    NaN and infinities, tuples, sets, frozensets, dicts with keys that are
    not strings, lone surrogates (in values and in keys), nesting one level
    past :data:`~chatsession.store.base.MAX_JSON_DEPTH`, bytes, Decimals and
    plain objects.
    """
    bad_leaf = st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.tuples(st.integers()),
        st.sets(st.integers(), min_size=1, max_size=2),
        st.frozensets(st.integers(), max_size=2),
        st.dictionaries(
            st.one_of(st.integers(), st.none(), st.booleans()),
            st.integers(),
            min_size=1,
            max_size=2,
        ),
        st.sampled_from(["\ud800", "a\udfffb", "\udc00x"]),
        st.sampled_from([{"\ud83d": 1}]),
        st.binary(max_size=4),
        st.just(Decimal("1.5")),
        st.builds(_Opaque),
    )
    too_deep = st.just(nested(MAX_JSON_DEPTH + 1))
    hidden = st.builds(
        lambda leaf, key, wrap: {key: [leaf]} if wrap else {key: leaf},
        bad_leaf,
        texts(max_size=4),
        st.booleans(),
    )
    return st.one_of(bad_leaf, too_deep, hidden)


def unstorable_payloads() -> st.SearchStrategy[Any]:
    """Payloads (``NewEvent.data``) every store must refuse.

    Not JSON, pretty printed (line breaks), NaN/Infinity, a lone surrogate
    (raw or escaped), nesting past the limit, trailing garbage, empty text,
    and values that are not ``str`` at all.
    """
    deep = MAX_JSON_DEPTH + 1
    return st.sampled_from(
        [
            "",
            "not json",
            "{",
            '{"a":1} trailing',
            '{"a":1}{"b":2}',
            json.dumps({"a": [1, 2]}, indent=2),
            '{"a":1}\n',
            '{\r"a":1}',
            '{"ts":NaN}',
            '{"ts":Infinity}',
            "-Infinity",
            '{"n":1e999}',
            '{"s":"\ud800"}',
            '{"s":"\\ud800"}',
            '{"\\udc00":1}',
            "[" * deep + "]" * deep,
            compact_json(nested(deep)),
            b'{"a":1}',
            {"a": 1},
            None,
            42,
        ]
    )


def same(a: Any, b: Any) -> bool:
    """Type-strict equality: ``True`` only if ``a`` and ``b`` have equal values of equal types.

    Unlike ``==``: ``1`` is not ``1.0`` or ``True``, ``-0.0`` is not ``0.0``,
    and NaN equals NaN. Dicts compare key by key, lists item by item. Pydantic
    models compare field by field.
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "model_dump") and hasattr(type(a), "model_fields"):
        return all(same(getattr(a, name), getattr(b, name)) for name in type(a).model_fields)
    if hasattr(type(a), "__struct_fields__"):  # msgspec structs (log events and payloads)
        return all(same(getattr(a, name), getattr(b, name)) for name in type(a).__struct_fields__)
    return bool(a == b)
