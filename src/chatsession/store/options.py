"""Store URL options, read the same strict way by every backend.

A store URL carries options in its query (``sqlite:///a.db?busy_timeout=5000``)
and ``open_store(url, **options)`` may pass them as keywords, which replace
the URL's. Every backend declares its options once, as a mapping of names to
:class:`Option`, and reads them with :func:`parse_options`:

- an unknown option, one given twice in the URL, or a query that is not
  ``name=value`` pairs joined by ``&`` is :class:`~chatsession.errors.InvalidURLError`;
- values are typed and checked against their range (whole numbers, seconds,
  yes/no flags, one of a few words, text matching a pattern);
- a secret option's value (a password) is never shown; messages show the URL
  with its password masked (:func:`~chatsession.store.urls.redact_url`) and
  without its query (a misspelled ``pasword=`` would not be masked), and the
  value of the one option they are about when it is not secret.

Example::

    SPEC = {"busy_timeout": integer(0, 3_600_000, default=30_000)}
    values = parse_options(url, SPEC, overrides, backend="sqlite")
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from chatsession.errors import InvalidURLError
from chatsession.store.urls import redact_url

__all__ = [
    "Option",
    "choice",
    "flag",
    "integer",
    "parse_options",
    "query_options",
    "read_options",
    "seconds",
    "text",
]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_WHOLE_RE = re.compile(r"[+]?[0-9]{1,18}")
_NUMBER_RE = re.compile(r"[+]?(?:[0-9]{1,18}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})")


@dataclass(frozen=True)
class Option:
    """How one URL option is read: its kind, default, range and whether it is secret.

    Build one with :func:`text`, :func:`choice`, :func:`integer`,
    :func:`seconds` or :func:`flag` rather than by hand.

    Attributes:
        kind: ``text``, ``choice``, ``integer``, ``seconds`` or ``flag``.
        default: The value when the option is not given (None: no value).
        choices: The words a ``choice`` accepts (compared without case).
        low: The least value of an ``integer`` or ``seconds``.
        high: The greatest value of an ``integer`` or ``seconds``.
        low_open: Whether ``low`` itself is refused (seconds "above 0").
        pattern: A regular expression a ``text`` value must match whole.
        describe: What a ``text`` value must be, for the message.
        secret: Whether the value is never shown (a password).
    """

    kind: Literal["text", "choice", "integer", "seconds", "flag"]
    default: Any = None
    choices: tuple[str, ...] = ()
    low: float = 0
    high: float = 0
    low_open: bool = False
    pattern: re.Pattern[str] | None = None
    describe: str = ""
    secret: bool = False

    def expected(self) -> str:
        """What a value must be, in words (for messages)."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "flag":
            return "0 or 1 (or true/false, yes/no, on/off)"
        if self.kind == "integer":
            return f"a whole number from {self.low:g} to {self.high:g}"
        if self.kind == "seconds":
            lowest = f"above {self.low:g}" if self.low_open else f"from {self.low:g}"
            return f"a number of seconds {lowest} and at most {self.high:g}"
        return self.describe or "text"

    def read(self, value: object) -> Any:
        """The typed value of ``value`` (URL text, or a keyword's typed value).

        Raises:
            ValueError: ``value`` is not what this option takes.
        """
        if self.kind == "flag":
            if type(value) is bool or (type(value) is int and value in (0, 1)):
                return bool(value)
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
        elif self.kind == "choice":
            if isinstance(value, str) and value.lower() in self.choices:
                return value.lower()
        elif self.kind in ("integer", "seconds"):
            number = self._number(value)
            if number is not None:
                return number
        elif (
            isinstance(value, str)
            and "\x00" not in value
            and (self.pattern is None or self.pattern.fullmatch(value))
        ):
            return value
        raise ValueError(self.expected())

    def _number(self, value: object) -> int | float | None:
        """An ``integer`` or ``seconds`` value in range, or None."""
        if isinstance(value, str):
            pattern = _WHOLE_RE if self.kind == "integer" else _NUMBER_RE
            if not pattern.fullmatch(value):
                return None
            value = int(value) if self.kind == "integer" else float(value)
        if type(value) is int or (self.kind == "seconds" and type(value) is float):
            number: int | float = value
            if not math.isfinite(number) or number > self.high:
                return None
            if number < self.low or (self.low_open and number == self.low):
                return None
            return float(number) if self.kind == "seconds" else number
        return None


def text(
    default: str | None = None,
    *,
    pattern: str | None = None,
    describe: str = "",
    secret: bool = False,
) -> Option:
    """A text option, optionally matching ``pattern`` (described by ``describe``)."""
    compiled = re.compile(pattern) if pattern is not None else None
    return Option("text", default, pattern=compiled, describe=describe, secret=secret)


def choice(*choices: str, default: str | None = None) -> Option:
    """An option that is one of ``choices`` (given in any case, read in lower case)."""
    return Option("choice", default, choices=tuple(c.lower() for c in choices))


def integer(low: int, high: int, *, default: int | None = None) -> Option:
    """A whole-number option from ``low`` to ``high``."""
    return Option("integer", default, low=low, high=high)


def seconds(
    low: float, high: float, *, default: float | None = None, low_open: bool = False
) -> Option:
    """A number of seconds from ``low`` (above it when ``low_open``) to ``high``."""
    return Option("seconds", default, low=low, high=high, low_open=low_open)


def flag(*, default: bool = False) -> Option:
    """A yes/no option: ``0``/``1``, ``true``/``false``, ``yes``/``no``, ``on``/``off``."""
    return Option("flag", default)


def _shown(url: str) -> str:
    """``url`` for a message: its password masked and its query left out (values are shown,
    or not, one by one: a misspelled secret option would not be masked)."""
    masked = redact_url(url)
    return masked.partition("?")[0].partition("#")[0] if isinstance(url, str) else masked


def query_options(url: str, *, backend: str) -> dict[str, str]:
    """The options in ``url``'s query, strictly: ``name=value`` pairs, each name once.

    Raises:
        InvalidURLError: The query is malformed or repeats an option (the URL
            is shown without its password and query).
    """
    shown = _shown(url)
    try:
        query = urlsplit(url).query
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidURLError(
            f"{backend} store URL {shown} has a malformed query; write options as "
            "?name=value&name=value"
        ) from None
    found: dict[str, str] = {}
    for name, value in pairs:
        if name in found:
            raise InvalidURLError(
                f"{backend} store URL {shown} gives the option {name[:40]!r} more than once; "
                "give it once"
            )
        found[name] = value
    return found


def parse_options(
    url: str,
    spec: Mapping[str, Option],
    overrides: Mapping[str, object] | None = None,
    *,
    backend: str,
) -> dict[str, Any]:
    """Read ``url``'s query options and ``overrides`` (keyword options) against ``spec``.

    Args:
        url: The store URL (its query is read; it is shown without password and query).
        spec: The options the backend takes, by name.
        overrides: Keyword options (``open_store(url, **options)``); they
            replace the URL's. A None value counts as not given.
        backend: The backend's name for messages (``sqlite``, ``file``, ...).

    Returns:
        Every option of ``spec`` by name: its typed value, or its default.

    Raises:
        InvalidURLError: An unknown option, one repeated in the URL, a
            malformed query, or a value of the wrong kind or out of range. The
            message names the option and what it takes, never a secret.
    """
    given: dict[str, object] = dict(query_options(url, backend=backend))
    given.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return read_options(spec, given, backend=backend, url=url)


def read_options(
    spec: Mapping[str, Option], given: Mapping[str, object], *, backend: str, url: str
) -> dict[str, Any]:
    """Check options already gathered (``given``, by name) against ``spec``.

    For a store built from its parts rather than a URL; ``url`` is only shown
    (redacted). A None value counts as not given.

    Returns:
        Every option of ``spec`` by name: its typed value, or its default.

    Raises:
        InvalidURLError: As :func:`parse_options`.
    """
    unknown = sorted(name for name, value in given.items() if name not in spec)
    if unknown:
        names = ", ".join(repr(name[:40]) for name in unknown)
        known = ", ".join(spec) if spec else "none"
        raise InvalidURLError(
            f"{backend} store URL {_shown(url)}: unknown option(s) {names}; "
            f"the options it takes: {known}"
        )
    values: dict[str, Any] = {}
    for name, option in spec.items():
        value = given.get(name)
        if value is None:
            values[name] = option.default
            continue
        try:
            values[name] = option.read(value)
        except ValueError:
            shown = "***" if option.secret else repr(value)[:60]
            raise InvalidURLError(
                f"{backend} store URL {_shown(url)}: the option {name} must be "
                f"{option.expected()}, not {shown}"
            ) from None
    return values
