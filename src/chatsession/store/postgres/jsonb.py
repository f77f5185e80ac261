"""Whether ``jsonb`` gives a JSON text back as the same values and types, decided by the client.

A payload (or a record's body) that ``jsonb`` would change or cannot hold is
kept as text instead (see the package docstring): a ``\\u0000`` escape, an
unpaired surrogate escape, a number written with an exponent that would come
back as an integer, ``-0``, or a number beyond ``numeric``.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal

from chatsession.store.checks import STRICT_JSON

#: Every backslash escape of a JSON text, in order; group 1 is the hex of a
#: ``\\u0000`` or surrogate escape (``\\\\`` is one escape, so ``\\\\u0000`` is none).
_ESCAPE_RE = re.compile(r"\\(?:u(0000|[dD][89a-fA-F][0-9a-fA-F]{2})|.)", re.DOTALL)
_FIRST_RE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_NUMERIC_INT_DIGITS = 131072  # PostgreSQL numeric (so jsonb): digits before the point
_NUMERIC_SCALE = 16383  # and after it


def needs_text(data: str) -> bool:
    """Whether JSON text ``data`` has a string jsonb cannot hold.

    That is a ``\\u0000`` escape or an unpaired surrogate escape (a high one
    not followed by a low one, or a low one alone); an escaped backslash
    before ``u`` is not an escape.
    """
    if _FIRST_RE.search(data) is None:
        return False
    high_end = -1  # where the last high surrogate escape ended, if one waits for its pair
    for match in _ESCAPE_RE.finditer(data):
        code = match.group(1)
        if high_end >= 0:
            if match.start() != high_end or code is None or code[1] not in "cdefCDEF":
                return True
            high_end = -1
        elif code is not None:
            if code == "0000" or code[1] not in "89abAB":
                return True
            high_end = match.end()
    return high_end >= 0


def _beyond_numeric(value: Decimal) -> bool:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):  # NaN or infinity: not JSON
        return True
    return bool(value and value.adjusted() >= _NUMERIC_INT_DIGITS) or -exponent > _NUMERIC_SCALE


def fits_numeric(data: str) -> bool:
    """Whether every number in JSON text ``data`` fits PostgreSQL's ``numeric``.

    jsonb keeps numbers as ``numeric``: at most 131072 digits before the
    point and 16383 after (``1e131072`` and ``1e-16384`` do not fit). Text
    that is not JSON counts as fitting (the server judges it).
    """
    fits = True

    def number(text: str) -> None:
        nonlocal fits
        if _beyond_numeric(Decimal(text)):
            fits = False

    try:
        json.loads(data, parse_int=number, parse_float=number)
    except (ValueError, RecursionError):
        return True
    return fits


class _Altered(Exception):
    """Raised from inside ``json.loads`` at the first number jsonb would change."""


def _number_form(token: str) -> float:
    """``parse_float`` for :func:`_jsonb_alters_numbers`: C-speed for plain floats."""
    if "e" in token or "E" in token or token.startswith("-0"):
        value = Decimal(token)
        exponent = value.as_tuple().exponent
        if (
            not isinstance(exponent, int)
            or exponent >= 0
            or (value.is_zero() and value.is_signed())
            or _beyond_numeric(value)
        ):
            raise _Altered
    return 0.0


_NUMBER_FORMS = json.JSONDecoder(parse_float=_number_form)


def _jsonb_alters_numbers(data: str) -> bool:
    """Whether jsonb would give back a number of JSON text ``data`` as another type or sign.

    jsonb writes ``numeric`` in plain decimal with the input's digits after
    the point: a number written with an exponent and no digits left after
    the point (``1e16``, ``1.5e1``, ``-0e3``) would come back as an integer,
    and a negative zero (``-0.0``) as ``0.0``. Numbers beyond ``numeric``
    count too. Integers (no point, no exponent) always come back as written.
    One parse by the C scanner; only floats with an exponent or a ``-0`` are
    looked at closely.
    """
    try:
        _NUMBER_FORMS.decode(data)
    except _Altered:
        return True
    except (ValueError, RecursionError):
        return False  # not JSON: the checks refuse it before this is asked
    return False


def jsonb_changes(data: str) -> bool:
    """Whether jsonb would not give JSON text ``data`` back as the same values and types.

    A ``\\u`` substring test (a scan of the escapes if there is one) and a parse
    (about 2 us a kilobyte).
    """
    if "\\u" in data and needs_text(data):
        return True
    return _jsonb_alters_numbers(data)


def is_strict_json(text: str) -> bool:
    """Whether ``text`` is JSON PostgreSQL's ``json`` type would accept (no NaN)."""
    try:
        STRICT_JSON.decode(text)
    except (ValueError, RecursionError, TypeError):
        return False
    return True
