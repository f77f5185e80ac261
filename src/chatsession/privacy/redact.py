"""Redaction: secrets rewritten before anything is stored.

A :class:`Redactor` holds named regular expressions (:data:`DEFAULT_PATTERNS`:
API keys, tokens, passwords, private keys, card numbers) and rewrites what
they match to a marker that names the pattern (``[REDACTED:openai_api_key]``).
``ChatSession(redact=...)`` (and ``SessionManager(redact=...)``) runs
:meth:`Redactor.redact_event` on every event before it is encoded and
stored; what the session keeps in memory is the redacted event, so memory
and store agree. The manager also runs :meth:`Redactor.redact_value` on
metadata values and titles.

Rules of a pattern:

- The whole match is replaced, unless the pattern has named groups whose
  names start with ``secret`` (``(?P<secret>...)``, ``(?P<secret_quoted>...)``):
  then only the groups that took part in the match are replaced, so
  ``password=hunter2`` becomes ``password=[REDACTED:password]``.
- A :class:`RedactionPattern` may carry a ``validate`` function that sees the
  matched text and says whether it really is a secret (card numbers use the
  Luhn checksum, so ordinary long numbers survive).
- Patterns run in the mapping's order, each over the output of the one before;
  text that is already a marker is left as it is, so redacting twice changes
  nothing more than redacting once.

Values (metadata, agent state, checkpoint data, tool-call arguments that are
JSON) are walked: every string is redacted as text; **keys are kept** (they
are the names programs look values up by; redacting them would break lookups
and could merge two keys into one), and every string or number under a key
that names a secret (``password``, ``api_key``, ``token``, ``Authorization``,
``credentials``...: ``sensitive_keys``) is replaced whole, however deep below
that key it sits. The walk uses no recursion: any nesting is safe.

The default patterns are written so that redaction is linear in the length
of the text (possessive quantifiers, anchors that start a match only at the
beginning of a token), and each carries ``hints`` (strings every match
contains) so that it is skipped on text without them: a megabyte of prose,
or of adversarial text, takes tens of milliseconds. Patterns you add are
your own: avoid nested quantifiers such as ``(a+)+``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from chatsession.errors import InvalidArgumentError
from chatsession.log.events import ImagePart, LogEvent, Message, TextPart, ToolCall
from chatsession.log.events import replace as replace_fields
from chatsession.store.base import STRICT_JSON

__all__ = [
    "DEFAULT_PATTERNS",
    "DEFAULT_REPLACEMENT",
    "DEFAULT_SENSITIVE_KEYS",
    "RedactionPattern",
    "Redactor",
    "is_card_number",
    "luhn_valid",
]


@dataclass(frozen=True)
class RedactionPattern:
    """A regular expression with an optional check of what it matched.

    Attributes:
        regex: The expression (text, compiled with no flags: use inline flags
            such as ``(?i)``; or an already compiled ``re.Pattern[str]``).
        validate: Called with the whole matched text; the match is redacted
            only when it returns True.
        hints: Strings one of which every match contains (compared ignoring
            case): the pattern is not run on text that has none of them.
            Optional; it makes redaction of long text several times faster.
    """

    regex: str | re.Pattern[str]
    validate: Callable[[str], bool] | None = None
    hints: tuple[str, ...] = ()


def luhn_valid(digits: str) -> bool:
    """Whether a string of ASCII digits passes the Luhn checksum (card numbers do).

    Args:
        digits: Only the characters ``0``-``9``.

    Returns:
        True when the checksum holds (an empty string does not).
    """
    if not digits or not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def is_card_number(text: str) -> bool:
    """Whether ``text`` (digits, maybe grouped by spaces or dashes) is a plausible card number.

    13 to 19 digits, the first 2 to 6 (the industries that issue payment
    cards: Mastercard 2 and 5, Amex, Diners and JCB 3, Visa 4, Discover and
    UnionPay 6), and a valid Luhn checksum. So timestamps in milliseconds
    (which start with 1), phone numbers and most ids are left alone.

    Args:
        text: The candidate.

    Returns:
        True for a plausible card number.
    """
    digits = text.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


# quoted or bare value after "name=" / "name:" (JSON, shell, config files, query strings)
_VALUE = (
    r"""["']?[ \t]*+[:=][ \t]*+"""
    r"""(?:"(?P<secret_dq>(?:[^"\\\n]|\\.)*+)"|'(?P<secret_sq>[^'\n]*+)'|(?P<secret>[^\s"'&;,]++))"""
)

#: The patterns a :class:`Redactor` uses unless told otherwise, applied in this order.
#: Each name is what its matches become (``[REDACTED:name]``). Extend them
#: with ``Redactor({**DEFAULT_PATTERNS, "name": r"..."})``.
DEFAULT_PATTERNS: Mapping[str, RedactionPattern] = MappingProxyType(
    {
        # a PEM private key block (also cut short, as in a truncated tool output)
        "private_key": RedactionPattern(
            r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----[^-]*+"
            r"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?",
            hints=("private key-----",),
        ),
        # scheme://user:PASSWORD@host
        "url_password": RedactionPattern(
            r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*+://[^\s/@:\"'\\]*+:"
            r"(?P<secret>[^\s@/\"'\\]++)@",
            hints=("://",),
        ),
        # Authorization: Bearer TOKEN / Basic CREDENTIALS / TOKEN
        "authorization": RedactionPattern(
            r"(?i)(?<![A-Za-z0-9_\-])(?:proxy-)?authorization[\"']?[ \t]*+[:=][ \t]*+[\"']?"
            r"(?:(?:bearer|basic|token|digest|negotiate)[ \t]++)?+"
            r"(?P<secret>[A-Za-z0-9._~+/\-]++=*+)",
            hints=("authorization",),
        ),
        # Bearer TOKEN outside a header (at least 16 characters, so prose survives)
        "bearer_token": RedactionPattern(
            r"(?i)(?<![A-Za-z0-9_\-])bearer[ \t]++(?P<secret>[A-Za-z0-9._~+/\-]{16,}+=*+)",
            hints=("bearer",),
        ),
        # JSON web tokens
        "jwt": RedactionPattern(
            r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{8,}+\.eyJ[A-Za-z0-9_\-]{8,}+\.[A-Za-z0-9_\-]*+",
            hints=("eyj",),
        ),
        # Anthropic keys: sk-ant-api03-..., sk-ant-admin01-...
        "anthropic_api_key": RedactionPattern(
            r"(?<![A-Za-z0-9_\-])sk-ant-[A-Za-z0-9_\-]{20,}+", hints=("sk-ant-",)
        ),
        # OpenAI keys: sk-..., sk-proj-..., sk-svcacct-...
        "openai_api_key": RedactionPattern(
            r"(?<![A-Za-z0-9_\-])sk-[A-Za-z0-9_\-]{20,}+", hints=("sk-",)
        ),
        # Stripe secret and restricted keys
        "stripe_key": RedactionPattern(
            r"(?<![A-Za-z0-9_])(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}+",
            hints=("_live_", "_test_"),
        ),
        # Google API keys
        "google_api_key": RedactionPattern(
            r"(?<![A-Za-z0-9_\-])AIza[A-Za-z0-9_\-]{35}", hints=("aiza",)
        ),
        # AWS access key ids
        "aws_access_key_id": RedactionPattern(
            r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])",
            hints=("akia", "asia", "abia", "acca"),
        ),
        # GitHub tokens: ghp_ (classic), gho_, ghu_, ghs_, ghr_, github_pat_ (fine-grained)
        "github_token": RedactionPattern(
            r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{20,}+|github_pat_[A-Za-z0-9_]{20,}+)",
            hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        ),
        # Slack tokens: xoxb-, xoxp-, xoxa-, xoxr-, xoxs-, xoxe- ...
        "slack_token": RedactionPattern(
            r"(?<![A-Za-z0-9])xox[a-z]-[A-Za-z0-9\-]{10,}+", hints=("xox",)
        ),
        # password=VALUE, passwd: VALUE, "pwd": "VALUE" (the value only)
        "password": RedactionPattern(
            r"(?i)(?:password|passwd|passphrase|pwd)" + _VALUE, hints=("pass", "pwd")
        ),
        # api_key=VALUE, client_secret: VALUE, aws_secret_access_key = VALUE ...
        "secret": RedactionPattern(
            r"(?i)(?<![A-Za-z0-9])(?:[A-Za-z0-9]++[_\-])?"
            r"(?:api[_\-]?key|secret[_\-]?key|secret[_\-]?access[_\-]?key|client[_\-]?secret"
            r"|access[_\-]?token|auth[_\-]?token|refresh[_\-]?token|private[_\-]?key)" + _VALUE,
            hints=("key", "secret", "token"),
        ),
        # payment card numbers: 13-19 digits, or groups of 4 (4-6-5 and 4-6-4 too) with
        # spaces or dashes between, Luhn-checked (the pattern starts with a digit and looks
        # behind it, so the search skips fast to digits)
        "card_number": RedactionPattern(
            r"\d(?<![0-9A-Za-z]\d)"
            r"(?:\d{12,18}|\d{3}[ \-]\d{4}[ \-]\d{4}[ \-]\d{1,7}|\d{3}[ \-]\d{6}[ \-]\d{4,5})"
            r"(?![0-9A-Za-z])",
            validate=is_card_number,
        ),
    }
)

#: Keys whose values are replaced whole in JSON values (metadata, state,
#: checkpoint data, JSON tool arguments); searched at the end of the key,
#: ignoring case: ``db_password``, ``X-Api-Key`` and ``sessionToken`` match,
#: ``total_tokens`` and ``max_tokens`` do not. The matched part names the
#: marker: ``{"db_password": "x"}`` becomes ``{"db_password": "[REDACTED:password]"}``.
DEFAULT_SENSITIVE_KEYS = (
    r"(?i)(?:password|passwd|passphrase|pwd|secrets?|(?:api|access|secret|private|signing)"
    r"[_\-]?keys?|apikey|token|authorization|cookie|credentials?)\Z"
)

#: The default replacement: ``{name}`` becomes the pattern's name (or the
#: sensitive part of a key).
DEFAULT_REPLACEMENT = "[REDACTED:{name}]"

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_NOT_JSON = object()
_REPLACEMENT_REFUSED = re.compile(r'["\\\x00-\x1f\x7f]')
_LABEL_JUNK = re.compile(r"[^a-z0-9]+")


class _Rule:
    """One compiled pattern: how to replace what it matches."""

    __slots__ = ("callback", "hints", "name", "regex", "secrets", "validate")

    def __init__(
        self,
        name: str,
        regex: re.Pattern[str],
        validate: Callable[[str], bool] | None,
        hints: tuple[str, ...] = (),
    ):
        self.name = name
        self.regex = regex
        self.validate = validate
        self.hints = hints
        self.secrets = tuple(g for g in regex.groupindex if g.startswith("secret"))
        self.callback: Callable[[re.Match[str]], str] = str  # set by the Redactor


def _compile(name: object, spec: object) -> _Rule:
    if type(name) is not str or _NAME_RE.fullmatch(name) is None:
        raise InvalidArgumentError(
            "a redaction pattern's name is 1-64 characters of A-Z a-z 0-9 _ . - (it is "
            f"written into the replacement), got {name!r}"[:200]
        )
    validate: Callable[[str], bool] | None = None
    hints: tuple[str, ...] = ()
    if isinstance(spec, RedactionPattern):
        validate = spec.validate
        if validate is not None and not callable(validate):
            raise InvalidArgumentError(
                f"redaction pattern {name!r}: validate must be a function of the matched "
                f"text, got {type(validate).__name__}"
            )
        if not isinstance(spec.hints, tuple | list) or not all(
            type(hint) is str and hint for hint in spec.hints
        ):
            raise InvalidArgumentError(
                f"redaction pattern {name!r}: hints must be a tuple of non-empty strings, "
                f"got {spec.hints!r}"[:200]
            )
        hints = tuple(hint.lower() for hint in spec.hints)
        spec = spec.regex
    if isinstance(spec, re.Pattern):
        if not isinstance(spec.pattern, str):
            raise InvalidArgumentError(
                f"redaction pattern {name!r} is a bytes pattern; redaction works on text: "
                "compile it from a str"
            )
        regex: re.Pattern[str] = spec
    elif isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except (re.error, OverflowError, RecursionError) as exc:
            raise InvalidArgumentError(
                f"redaction pattern {name!r} is not a valid regular expression ({exc}); "
                "fix it (Python's re syntax)"
            ) from None
    else:
        raise InvalidArgumentError(
            f"redaction pattern {name!r} must be a str, a compiled re.Pattern or a "
            f"RedactionPattern, not {type(spec).__name__}"
        )
    if regex.fullmatch("") is not None:
        raise InvalidArgumentError(
            f"redaction pattern {name!r} ({regex.pattern[:60]!r}) matches the empty string, "
            "so it would insert the replacement everywhere; make it require at least one character"
        )
    return _Rule(name, regex, validate, hints)


class _Frame:
    """A dict or list being walked by :meth:`Redactor.redact_value`."""

    __slots__ = ("container", "copy", "items", "key", "label")

    def __init__(self, container: Any, key: Any, label: str | None) -> None:
        self.container = container
        self.key = key  # where it sits in the frame below
        self.label = label  # the sensitive key above it, if any
        self.copy: Any = None
        self.items: Iterator[tuple[Any, Any]] = (
            iter(container.items()) if type(container) is dict else enumerate(container)
        )

    def set(self, key: Any, value: Any) -> None:
        if self.copy is None:
            self.copy = (
                dict(self.container) if type(self.container) is dict else list(self.container)
            )
        self.copy[key] = value

    def result(self) -> Any:
        return self.container if self.copy is None else self.copy


class Redactor:
    """Rewrites secrets in text, JSON values and log events before they are stored.

    Args:
        patterns: Named patterns, applied in order: a ``str`` regular
            expression, a compiled ``re.Pattern[str]`` or a
            :class:`RedactionPattern`. Default: :data:`DEFAULT_PATTERNS`.
            Add your own with ``{**DEFAULT_PATTERNS, "ticket": r"TCK-\\d{6}"}``,
            or replace them with a mapping of your own. Names are 1-64
            characters of ``A-Z a-z 0-9 _ . -``.
        replacement: What a secret becomes; ``{name}`` in it is replaced by
            the pattern's name (default :data:`DEFAULT_REPLACEMENT`,
            ``[REDACTED:{name}]``). It may not contain quotes, backslashes or
            control characters (it is written into text that may be JSON,
            such as tool-call arguments, which must stay valid).
        sensitive_keys: A regular expression searched in the keys of JSON
            objects: every string or number under a matching key is replaced
            whole. Default :data:`DEFAULT_SENSITIVE_KEYS`; None turns it off.

    Raises:
        InvalidArgumentError: A pattern that is not a valid regular
            expression (or not text, or matches the empty string), a bad
            name, replacement or ``sensitive_keys``.

    Example::

        redactor = Redactor({**DEFAULT_PATTERNS, "employee": r"EMP-\\d{6}"})
        redactor.redact_text("key sk-abcdefghijklmnopqrstuvwx")
        # 'key [REDACTED:openai_api_key]'
    """

    def __init__(
        self,
        patterns: Mapping[str, str | re.Pattern[str] | RedactionPattern] = DEFAULT_PATTERNS,
        *,
        replacement: str = DEFAULT_REPLACEMENT,
        sensitive_keys: str | re.Pattern[str] | None = DEFAULT_SENSITIVE_KEYS,
    ) -> None:
        if not isinstance(patterns, Mapping):
            raise InvalidArgumentError(
                "patterns must be a mapping of names to regular expressions, e.g. "
                f'{{**DEFAULT_PATTERNS, "ticket": r"TCK-\\d+"}}, not {type(patterns).__name__}'
            )
        self._rules = tuple(_compile(name, spec) for name, spec in patterns.items())
        for rule in self._rules:
            rule.callback = functools.partial(self._replace, rule)
        if (
            type(replacement) is not str
            or not replacement
            or _REPLACEMENT_REFUSED.search(replacement)
        ):
            raise InvalidArgumentError(
                "replacement must be a non-empty str without quotes, backslashes or control "
                f"characters, got {replacement!r}"[:200]
            )
        try:
            replacement.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgumentError("replacement holds a lone UTF-16 surrogate") from None
        self.replacement = replacement
        # a marker this redactor wrote: left alone when met again
        self._marker = re.compile(
            re.escape(replacement).replace(re.escape("{name}"), r"[A-Za-z0-9_.\-]{1,64}")
        )
        self._sensitive: re.Pattern[str] | None = None
        if sensitive_keys is not None:
            self._sensitive = _compile("sensitive_keys", sensitive_keys).regex

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the patterns, in the order they are applied."""
        return tuple(rule.name for rule in self._rules)

    def __repr__(self) -> str:
        return f"Redactor(patterns={list(self.names)!r}, replacement={self.replacement!r})"

    def marker(self, name: str) -> str:
        """What a secret found by the pattern (or sensitive key) ``name`` becomes.

        Args:
            name: A pattern name such as ``openai_api_key``.

        Returns:
            The replacement with ``{name}`` filled in (``[REDACTED:openai_api_key]``).
        """
        return self.replacement.replace("{name}", name)

    def is_marker(self, text: str) -> bool:
        """Whether ``text`` is exactly a replacement this redactor writes."""
        return self._marker.fullmatch(text) is not None

    # -- text ------------------------------------------------------------

    def redact_text(self, text: str) -> str:
        """``text`` with every match of every pattern replaced.

        Args:
            text: Any text.

        Returns:
            The redacted text; the same ``str`` object when nothing matched.
        """
        original = text
        lowered: str | None = None
        for rule in self._rules:
            if rule.hints:
                if lowered is None:
                    lowered = text.lower()
                if not any(hint in lowered for hint in rule.hints):
                    continue
            new = rule.regex.sub(rule.callback, text)
            if new is not text:
                text, lowered = new, None  # the text changed: lower it again when needed
        if text is not original and text == original:
            return original  # matches that were not secrets (a number failing Luhn)
        return text

    def _replace(self, rule: _Rule, match: re.Match[str]) -> str:
        whole = match.group()
        if not whole or (rule.validate is not None and not rule.validate(whole)):
            return whole
        if not rule.secrets:
            return self.marker(rule.name)
        spans = sorted(
            match.span(name)
            for name in rule.secrets
            if match.start(name) < match.end(name) and not self.is_marker(match.group(name) or "")
        )
        if not spans:
            return whole
        pieces: list[str] = []
        at = match.start()
        for lo, hi in spans:
            pieces.append(match.string[at:lo])
            pieces.append(self.marker(rule.name))
            at = hi
        pieces.append(match.string[at : match.end()])
        return "".join(pieces)

    # -- values ----------------------------------------------------------

    def redact_value(self, value: Any) -> Any:
        """A JSON value (dicts, lists, str, numbers, bool, None) with its secrets redacted.

        Every string is redacted as text; keys are kept as they are; every
        string or number under a sensitive key (see ``sensitive_keys``), at
        any depth below it, is replaced whole. Containers are copied only
        along the way to what changed; nesting depth is not limited (no
        recursion). Other objects are returned as they are.

        Args:
            value: The value (a metadata dict, a title, agent state...).

        Returns:
            The redacted value; the same object when nothing changed.
        """
        kind = type(value)
        if kind is str:
            return self.redact_text(value)
        if kind is not dict and kind is not list:
            return value
        stack = [_Frame(value, None, None)]
        active = {id(value)}  # containers being walked: a cycle is left alone
        while True:
            frame = stack[-1]
            step = next(frame.items, None)
            if step is None:
                stack.pop()
                active.discard(id(frame.container))
                done = frame.result()
                if not stack:
                    return done
                if done is not frame.container:
                    stack[-1].set(frame.key, done)
                continue
            key, item = step
            label = frame.label
            if label is None and type(key) is str and self._sensitive is not None:
                found = self._sensitive.search(key)
                if found is not None:
                    label = _LABEL_JUNK.sub("_", found.group().lower()).strip("_") or "secret"
            kind = type(item)
            if kind is dict or kind is list:
                if id(item) not in active:
                    active.add(id(item))
                    stack.append(_Frame(item, key, label))
                continue
            new = self._scalar(item, label)
            if new is not item:
                frame.set(key, new)

    def _scalar(self, item: Any, label: str | None) -> Any:
        kind = type(item)
        if label is not None:
            if kind is str:
                return item if item == "" or self.is_marker(item) else self.marker(label)
            if kind is int or kind is float:
                return self.marker(label)
            return item
        if kind is str:
            new = self.redact_text(item)
            return item if new == item else new
        return item

    def _arguments(self, text: str) -> str:
        """Tool-call arguments: as a JSON value when they are JSON (so they stay valid), else as text."""
        head = text.lstrip()[:1]
        if head in ("{", "["):
            try:
                value = STRICT_JSON.decode(text)
            except (ValueError, RecursionError):
                value = _NOT_JSON
            if value is not _NOT_JSON:
                new = self.redact_value(value)
                if new is value:
                    return text
                try:
                    return json.dumps(new, ensure_ascii=False, allow_nan=False)
                except (ValueError, RecursionError):
                    pass
        return self.redact_text(text)

    # -- events ----------------------------------------------------------

    def redact_event(self, event: LogEvent) -> LogEvent:
        """The event with its secrets redacted (what ``ChatSession(redact=...)`` calls).

        Redacted: message text and text parts, image URLs (not ``data:``
        URLs), tool-call arguments (as JSON when they are JSON), tool results
        (tool messages), checkpoint data, metadata and agent-state values,
        compaction summaries, offload previews, the error of a turn's end,
        the reason of a reset or a lifecycle change. Untouched: ids, types,
        roles, names, seqs, times, turn ids, token counts, models, and every
        key.

        Args:
            event: A log event.

        Returns:
            The redacted event; the same object when nothing changed.
        """
        kind = event.type
        data: Any = event.data
        new: Any = data
        if kind == "message":
            new = self._message(data)
        elif kind in _VALUE_FIELDS:
            field = _VALUE_FIELDS[kind]
            value = getattr(data, field)
            redacted = self.redact_value(value)
            if redacted is not value:
                new = replace_fields(data, **{field: redacted})
        elif kind in _TEXT_FIELDS:
            changes: dict[str, str] = {}
            for field in _TEXT_FIELDS[kind]:
                text = getattr(data, field, None)
                if type(text) is str:
                    redacted = self.redact_text(text)
                    if redacted != text:
                        changes[field] = redacted
            if changes:
                new = replace_fields(data, **changes)
        if new is data:
            return event
        return replace_fields(event, data=new)

    def _message(self, message: Message) -> Message:
        content = message.content
        new_content: str | list[TextPart | ImagePart] = content
        if isinstance(content, str):
            new_content = self.redact_text(content)
        else:
            parts: list[TextPart | ImagePart] | None = None
            for index, part in enumerate(content):
                new_part = self._part(part)
                if new_part is not part:
                    if parts is None:
                        parts = list(content)
                    parts[index] = new_part
            if parts is not None:
                new_content = parts
        calls: list[ToolCall] | None = None
        for index, call in enumerate(message.tool_calls):
            arguments = self._arguments(call.arguments)
            if arguments != call.arguments:
                if calls is None:
                    calls = list(message.tool_calls)
                calls[index] = replace_fields(call, arguments=arguments)
        changes: dict[str, Any] = {}
        if new_content is not content and new_content != content:
            changes["content"] = new_content
        if calls is not None:
            changes["tool_calls"] = tuple(calls)
        return replace_fields(message, **changes) if changes else message

    def _part(self, part: TextPart | ImagePart) -> TextPart | ImagePart:
        if isinstance(part, TextPart):
            text = self.redact_text(part.text)
            return part if text == part.text else replace_fields(part, text=text)
        url = part.url
        if url is None or url[:5].lower() == "data:":
            return part
        redacted = self.redact_text(url)
        return part if redacted == url else replace_fields(part, url=redacted)


#: event type -> the payload field holding a JSON value to redact
_VALUE_FIELDS: dict[str, str] = {"checkpoint": "data", "metadata": "values", "state": "values"}
#: event type -> the payload fields holding free text to redact
_TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "turn_end": ("error",),
    "reset": ("reason",),
    "offload": ("preview",),
    "compaction": ("summary",),
    "lifecycle": ("reason",),
}
#: every event type :meth:`Redactor.redact_event` knows (the others carry no free text:
#: ``usage`` holds counts and a model name, ``turn_start`` its source, ``rewind`` a seq)
HANDLED_EVENT_TYPES = frozenset(
    {"message", "usage", "turn_start", "rewind", *_VALUE_FIELDS, *_TEXT_FIELDS}
)
