"""chatsession.privacy: redaction of secrets, and encryption at rest over every backend.

Encryption tests write secrets through an ``EncryptingStore`` and then read the
raw bytes each backend keeps (the SQLite files, the JSONL folder, every Redis
key of the test's prefix, every PostgreSQL row of the test's schema) to check
that no secret is there, in plain, hex or base64 form; a value written in plain
through the same store is found by the same scan, so the scan is known to look
in the right places. The conformance suite also runs on an ``EncryptingStore``
over ``memory://`` (see the end of this file).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import re
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from chatsession import Agent, ChatSession, ScriptedLLM, SessionManager, open_store
from chatsession.errors import (
    ConflictError,
    CorruptDataError,
    DecryptionError,
    InvalidArgumentError,
    MissingDependencyError,
    SessionNotFoundError,
    UnsupportedValueError,
)
from chatsession.log import (
    Checkpoint,
    CheckpointEntry,
    Compaction,
    CompactionEntry,
    ImagePart,
    Lifecycle,
    LifecycleEntry,
    Message,
    MessageEntry,
    Metadata,
    MetadataEntry,
    Offload,
    OffloadEntry,
    Reset,
    ResetEntry,
    Rewind,
    RewindEntry,
    StateChange,
    StateEntry,
    TextPart,
    ToolCall,
    TurnEnd,
    TurnEndEntry,
    TurnStart,
    TurnStartEntry,
    Usage,
    UsageEntry,
    decode,
    encode,
)
from chatsession.log.events import EVENT_TYPES, LogEvent
from chatsession.privacy import (
    DEFAULT_PATTERNS,
    KEY_BYTES,
    EncryptingStore,
    RedactionPattern,
    Redactor,
    generate_key,
    is_card_number,
    key_id,
    luhn_valid,
)
from chatsession.privacy.redact import HANDLED_EVENT_TYPES
from chatsession.store.base import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    NewEvent,
    SessionRecord,
    SessionState,
    Store,
    StoredEvent,
)
from tests.conformance.conftest import (
    BACKENDS,
    DURABLE,
    POSTGRES_URL,
    REDIS_URL,
    cleanup,
    make_url,
)

# ==========================================================================
# redaction
# ==========================================================================

OPENAI = "sk-proj-Abc123def456GHI789jkl012MNO345"
ANTHROPIC = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz012345"
AWS = "AKIAIOSFODNN7EXAMPLE"
GITHUB = "ghp_1234567890abcdefghijABCDEFGHIJ123456"
GITHUB_PAT = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
SLACK = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
STRIPE = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
GOOGLE = "AIzaSyA-1234567890abcdefghijklmnopqrstu"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
VISA = "4111 1111 1111 1111"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"

PATTERN_CASES: list[tuple[str, str, str, str]] = [
    # (case, text, the secret, the marker expected)
    ("openai", f"my key is {OPENAI}.", OPENAI, "openai_api_key"),
    ("openai-legacy", "sk-abcdefghijklmnopqrstuvwxyz0123", "sk-abcdefghijklmnop", "openai_api_key"),
    ("anthropic", f"ANTHROPIC_API_KEY {ANTHROPIC}", ANTHROPIC, "anthropic_api_key"),
    ("aws", f"aws id {AWS} in use", AWS, "aws_access_key_id"),
    ("github", f"token {GITHUB}", GITHUB, "github_token"),
    ("github-pat", f"{GITHUB_PAT} done", GITHUB_PAT, "github_token"),
    ("slack", f"slack: {SLACK}", SLACK, "slack_token"),
    ("stripe", f"use {STRIPE}", STRIPE, "stripe_key"),
    ("google", f"key={GOOGLE}", GOOGLE, "google_api_key"),
    ("jwt", f"cookie {JWT} end", JWT, "jwt"),
    (
        "bearer",
        "send Bearer abcdefghijklmnop0123456789 now",
        "abcdefghijklmnop0123456789",
        "bearer_token",
    ),
    ("header", "Authorization: Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy", "authorization"),
    ("header-json", '{"Authorization": "Bearer t0k3n-value"}', "t0k3n-value", "authorization"),
    ("url", "DATABASE_URL=postgresql://bob:hunter2x@db:5432/app", "hunter2x", "url_password"),
    ("url-redis", "redis://:s3cr3tpw@cache:6379/0", "s3cr3tpw", "url_password"),
    ("password=", "login with password=hunter2x please", "hunter2x", "password"),
    ("password:", "passwd: 'correct horse'", "correct horse", "password"),
    ("password-json", '{"user": "bob", "password": "p@ss w0rd!"}', "p@ss w0rd!", "password"),
    ("DB_PASSWORD", "export DB_PASSWORD=Zx9!vQ", "Zx9!vQ", "password"),
    ("api_key=", "api_key=abc123def456 rest", "abc123def456", "secret"),
    ("client_secret", 'client_secret: "cs-998877"', "cs-998877", "secret"),
    ("aws-secret", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI", "secret"),
    ("visa", f"card {VISA} exp 12/30", VISA, "card_number"),
    ("visa-dashes", "4111-1111-1111-1111", "4111-1111-1111-1111", "card_number"),
    ("amex", "amex 378282246310005", "378282246310005", "card_number"),
    ("mastercard", "5555555555554444", "5555555555554444", "card_number"),
    ("pem", f"key:\n{PEM}\n", "MIIEpAIBAAKCAQEA7", "private_key"),
]


@pytest.mark.parametrize(
    ("text", "secret", "name"), [c[1:] for c in PATTERN_CASES], ids=[c[0] for c in PATTERN_CASES]
)
def test_each_default_pattern_redacts_its_secret(text: str, secret: str, name: str) -> None:
    redactor = Redactor()
    out = redactor.redact_text(text)
    assert secret not in out
    assert f"[REDACTED:{name}]" in out
    assert redactor.redact_text(out) == out  # redacting twice changes nothing more


def test_only_the_secret_part_is_replaced() -> None:
    redactor = Redactor()
    assert redactor.redact_text("password=hunter2x; next") == "password=[REDACTED:password]; next"
    assert (
        redactor.redact_text("postgresql://bob:pw1@db/x")
        == "postgresql://bob:[REDACTED:url_password]@db/x"
    )
    assert redactor.redact_text(f"a {OPENAI} b") == "a [REDACTED:openai_api_key] b"


ORDINARY_TEXT = [
    "The password policy says: use a long passphrase.",
    "We used 1,234 total_tokens and max_tokens=4096 today.",
    "order 1234567890123456 shipped",  # 16 digits, fails Luhn
    "timestamp 1700000000000 ms",  # 13 digits starting with 1
    "phone +1 415 555 0100",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "see https://example.com/path?q=1 and ftp://host/file",
    "task-123 sk-short ghp_short xoxb-1",
    "Bearer of bad news",
    "isbn 978-3-16-148410-0 and 4111 1111 1111 1112",  # the card fails Luhn
    "",
]


@pytest.mark.parametrize("text", ORDINARY_TEXT)
def test_ordinary_text_is_left_alone_and_the_same_object(text: str) -> None:
    assert Redactor().redact_text(text) is text


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("378282246310005", True),
        ("79927398713", True),
        ("0", True),
        ("", False),
        ("12a4", False),
        ("١٢٣", False),  # non-ASCII digits
    ],
)
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


def test_card_numbers_need_an_issuer_digit_a_length_and_luhn() -> None:
    assert is_card_number("4111 1111 1111 1111")
    assert is_card_number("6011-1111-1111-1117")
    assert not is_card_number("1111111111111117")  # passes Luhn, but no card starts with 1
    assert not is_card_number("411111111111")  # 12 digits
    assert not is_card_number("41111111111111111111")  # 20 digits
    redactor = Redactor()
    for number in ["1111111111111117", "9999999999999995", "4111111111111112", "12345678901234"]:
        assert redactor.redact_text(f"n={number}") == f"n={number}"


def test_card_numbers_next_to_other_numbers_are_still_found() -> None:
    redactor = Redactor()
    assert redactor.redact_text("qty 1 4111 1111 1111 1111 total 2") == (
        "qty 1 [REDACTED:card_number] total 2"
    )
    assert redactor.redact_text("4111-1111-1111-1111 2") == "[REDACTED:card_number] 2"
    assert redactor.redact_text("amex 3782 822463 10005.") == "amex [REDACTED:card_number]."
    # a longer run of digits is not a card, nor a card glued to letters
    assert redactor.redact_text("41111111111111111111") == "41111111111111111111"
    assert redactor.redact_text("id4111111111111111") == "id4111111111111111"


def test_hints_skip_a_pattern_on_text_without_them() -> None:
    redactor = Redactor({"code": RedactionPattern(r"\bX\d+", hints=("x",))})
    assert redactor.redact_text("X12 and x7") == "[REDACTED:code] and x7"
    skipped = Redactor({"code": RedactionPattern(r"\d+", hints=("never",))})
    assert skipped.redact_text("1234") == "1234"  # hints are a promise the pattern keeps
    for bad in (("",), "x", (1,)):
        with pytest.raises(InvalidArgumentError, match="hints"):
            Redactor({"code": RedactionPattern("x", hints=bad)})  # type: ignore[arg-type]
    for name, pattern in DEFAULT_PATTERNS.items():
        assert pattern.hints or name == "card_number", name


def test_values_are_walked_keys_kept_and_sensitive_keys_replaced() -> None:
    redactor = Redactor()
    value = {
        "password": "x",
        "db_password": 5,
        "X-Api-Key": "abc",
        "sessionToken": "t",
        "total_tokens": 10,
        "max_tokens": 4096,
        "credentials": {"user": "bob", "ids": [1, "two", None, True]},
        "note": f"use {OPENAI}",
        "nested": [{"deeper": {"cookie": "c=1"}}, "plain"],
        "empty_secret": {"token": ""},
        f"key {OPENAI}": "keys are kept",
    }
    before = json.dumps(value)
    out = redactor.redact_value(value)
    assert json.dumps(value) == before  # the input is not changed
    assert out == {
        "password": "[REDACTED:password]",
        "db_password": "[REDACTED:password]",
        "X-Api-Key": "[REDACTED:api_key]",
        "sessionToken": "[REDACTED:token]",
        "total_tokens": 10,
        "max_tokens": 4096,
        "credentials": {
            "user": "[REDACTED:credentials]",
            "ids": ["[REDACTED:credentials]", "[REDACTED:credentials]", None, True],
        },
        "note": "use [REDACTED:openai_api_key]",
        "nested": [{"deeper": {"cookie": "[REDACTED:cookie]"}}, "plain"],
        "empty_secret": {"token": ""},
        f"key {OPENAI}": "keys are kept",
    }
    assert out["nested"][1] is value["nested"][1]
    unchanged = {"a": [1, 2, {"b": "c"}], "total_tokens": 3}
    assert redactor.redact_value(unchanged) is unchanged
    assert redactor.redact_value(None) is None and redactor.redact_value(3.5) == 3.5
    assert redactor.redact_value(f"t {OPENAI}") == "t [REDACTED:openai_api_key]"
    assert Redactor(sensitive_keys=None).redact_value({"password": "x"}) == {"password": "x"}


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 100_000])
def test_deep_values_are_redacted_without_recursion(depth: int) -> None:
    value: Any = {"api_key": "k", "text": OPENAI}
    for level in range(depth):
        value = [value] if level % 2 else {"x": value}
    out = Redactor().redact_value(value)
    while not (isinstance(out, dict) and "api_key" in out):
        out = out[0] if isinstance(out, list) else out["x"]
    assert out == {"api_key": "[REDACTED:api_key]", "text": "[REDACTED:openai_api_key]"}


def test_a_value_that_contains_itself_does_not_loop() -> None:
    loop: list[Any] = [OPENAI]
    loop.append(loop)
    out = Redactor().redact_value(loop)
    assert out[0] == "[REDACTED:openai_api_key]"


def test_custom_patterns_validators_secret_groups_and_replacement() -> None:
    redactor = Redactor(
        {
            **DEFAULT_PATTERNS,
            "employee": r"EMP-\d{6}",
            "ticket": re.compile(r"(?i)ticket #(?P<secret>\d+)"),
            "even": RedactionPattern(r"\bN\d+\b", validate=lambda text: int(text[1:]) % 2 == 0),
        }
    )
    assert redactor.names[-3:] == ("employee", "ticket", "even")
    assert redactor.redact_text("EMP-123456 and Ticket #42") == (
        "[REDACTED:employee] and Ticket #[REDACTED:ticket]"
    )
    assert redactor.redact_text("N2 N3") == "[REDACTED:even] N3"
    only = Redactor({"word": "secret"}, replacement="***")
    assert only.redact_text("a secret, sk-abcdefghijklmnopqrstuvwxyz") == (
        "a ***, sk-abcdefghijklmnopqrstuvwxyz"
    )
    assert only.redact_value({"password": "x"}) == {"password": "***"}
    angle = Redactor(replacement="<{name}>")
    assert angle.redact_text(f"k {OPENAI}") == "k <openai_api_key>"
    assert angle.redact_text("k <openai_api_key>") == "k <openai_api_key>"
    assert "employee" in repr(redactor)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"patterns": {"bad": "("}}, "not a valid regular expression"),
        ({"patterns": {"bad": "a{2,1}"}}, "not a valid regular expression"),
        ({"patterns": {"empty": ""}}, "matches the empty string"),
        ({"patterns": {"star": "a*"}}, "matches the empty string"),
        ({"patterns": {"bytes": re.compile(b"x")}}, "bytes pattern"),
        ({"patterns": {"num": 5}}, "must be a str"),
        ({"patterns": {"bad name": "x"}}, "name"),
        ({"patterns": {"": "x"}}, "name"),
        ({"patterns": {3: "x"}}, "name"),
        ({"patterns": ["x"]}, "mapping"),
        ({"patterns": {"v": RedactionPattern("x", validate=5)}}, "validate"),  # type: ignore[arg-type]
        ({"replacement": 'say "x"'}, "replacement"),
        ({"replacement": "a\\b"}, "replacement"),
        ({"replacement": "line\n"}, "replacement"),
        ({"replacement": ""}, "replacement"),
        ({"replacement": 5}, "replacement"),
        ({"sensitive_keys": "("}, "not a valid regular expression"),
    ],
)
def test_bad_patterns_and_options_are_refused(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(fragment)):
        Redactor(**kwargs)


def test_adversarial_text_is_redacted_in_linear_time() -> None:
    # catastrophic backtracking would hang here (pytest-timeout stops it); nothing is timed
    redactor = Redactor()
    size = 200_000
    for text in [
        "a" * size,
        "1" * size,
        "1 " * (size // 2),
        "password=" * (size // 9),
        "-----BEGIN PRIVATE KEY-----" + "A" * size,
        "x://" * (size // 4),
        "http://u:" + "p" * size,
        "eyJ" + "a" * size + ".eyJ",
        "Bearer " * (size // 7),
        "sk-" * (size // 3),
    ]:
        assert isinstance(redactor.redact_text(text), str)


def test_every_event_type_is_handled() -> None:
    assert frozenset(EVENT_TYPES) == HANDLED_EVENT_TYPES


def _events_with_secrets() -> list[LogEvent]:
    s = OPENAI
    return [
        MessageEntry(data=Message(role="user", content=f"my key {s}")),
        MessageEntry(
            data=Message(
                role="user",
                content=[
                    TextPart(text=f"see {s}"),
                    ImagePart(url=f"https://u:{'pw9secret'}@img.example/x.png"),
                    ImagePart(
                        url="data:image/png;base64,c2stcHJvai1BYmMxMjNkZWY0NTZHSEk3ODlqa2wwMTJNTk8zNDU="
                    ),
                ],
            )
        ),
        MessageEntry(
            data=Message(
                role="assistant",
                content="",
                tool_calls=(
                    ToolCall(
                        id="c1",
                        name="login",
                        arguments=json.dumps({"password": "pw9secret", "user": "bob"}),
                    ),
                    ToolCall(id="c2", name="raw", arguments=f"not json {s}"),
                    ToolCall(id="c3", name="arr", arguments=json.dumps([s])),
                ),
            )
        ),
        MessageEntry(
            data=Message(role="tool", content=f"result {s}", tool_call_id="c1", name="login")
        ),
        UsageEntry(data=Usage(model="m", total_tokens=3)),
        TurnStartEntry(data=TurnStart(source="api")),
        TurnEndEntry(data=TurnEnd(status="error", error=f"401 for {s}")),
        ResetEntry(data=Reset(reason=f"leaked {s}")),
        RewindEntry(data=Rewind(to_seq=1)),
        CheckpointEntry(data=Checkpoint(name="cp", data={"token": "pw9secret", "n": s})),
        MetadataEntry(data=Metadata(values={"api_key": "pw9secret", "x": None})),
        StateEntry(data=StateChange(values={"github": s}, removed=("old",))),
        OffloadEntry(data=Offload(blob_id="b", size=10, preview=f"head {s}")),
        CompactionEntry(data=Compaction(summary=f"they shared {s}", upto_seq=3)),
        LifecycleEntry(data=Lifecycle(state="archived", reason=f"by {s}")),
    ]


def test_redact_event_rewrites_every_free_text_field_of_every_type() -> None:
    redactor = Redactor()
    events = _events_with_secrets()
    assert {e.type for e in events} == set(EVENT_TYPES)
    for event in events:
        redacted = redactor.redact_event(event)
        stored = encode(redacted)
        assert OPENAI not in stored.data and "pw9secret" not in stored.data, event.type
        assert redacted.type == event.type and redacted.turn_id == event.turn_id
        assert redactor.redact_event(redacted) is redacted  # idempotent, same object
    message = redactor.redact_event(events[2]).data
    assert isinstance(message, Message)
    arguments = [
        call.parsed_arguments() if call.arguments.startswith("{") else call.arguments
        for call in message.tool_calls
    ]
    assert arguments[0] == {"password": "[REDACTED:password]", "user": "bob"}
    assert arguments[1] == "not json [REDACTED:openai_api_key]"
    assert json.loads(message.tool_calls[2].arguments) == ["[REDACTED:openai_api_key]"]
    parts = redactor.redact_event(events[1]).data
    assert isinstance(parts, Message) and isinstance(parts.content, list)
    assert parts.content[2] is events[1].data.content[2]  # type: ignore[union-attr]  # data: URL kept


def test_deeply_nested_tool_arguments_fall_back_to_text() -> None:
    arguments = "[" * 5000 + json.dumps({"password": "hunter2x"}) + "]" * 5000
    event = MessageEntry(
        data=Message(
            role="assistant", tool_calls=(ToolCall(id="c", name="f", arguments=arguments),)
        )
    )
    redacted = Redactor().redact_event(event).data
    assert isinstance(redacted, Message)
    assert "hunter2x" not in redacted.tool_calls[0].arguments


def test_an_event_without_secrets_is_returned_as_is() -> None:
    redactor = Redactor()
    event = MessageEntry(data=Message(role="user", content="hello there"))
    assert redactor.redact_event(event) is event
    usage = UsageEntry(data=Usage(model="sk-not-a-key", total_tokens=5))
    assert redactor.redact_event(usage) is usage


async def test_a_chat_session_stores_and_holds_redacted_events() -> None:
    store = open_store("memory://")
    reply = f"Stored your key {OPENAI} and password=hunter2x."
    agent = Agent(ScriptedLLM([reply]))
    async with ChatSession(agent, "s1", store=store, redact=Redactor()) as chat:
        answer = await chat.query(f"my key is {ANTHROPIC}, card {VISA}")
        held = [m.text for m in chat.messages]
    raw = [e async for batch in store.read("s1") for e in batch]
    text = "\n".join(e.data for e in raw)
    for secret in (OPENAI, ANTHROPIC, VISA, "hunter2x"):
        assert secret not in text
        assert all(secret not in m for m in held)
    assert "[REDACTED:anthropic_api_key]" in text and "[REDACTED:openai_api_key]" in text
    assert answer  # the turn completed
    await store.aclose()


async def test_the_manager_redacts_metadata_titles_and_events() -> None:
    manager = SessionManager("memory://", redact=True)
    try:
        made = await manager.create_session(
            "ann",
            "helper",
            title=f"about {OPENAI}",
            metadata={"api_key": "k1", "note": f"k {GITHUB}"},
        )
        assert made.title == "about [REDACTED:openai_api_key]"
        assert made.metadata == {
            "api_key": "[REDACTED:api_key]",
            "note": "k [REDACTED:github_token]",
        }
        updated = await manager.update_session_metadata(made.session_id, "ann", {"password": "x"})
        assert updated.metadata["password"] == "[REDACTED:password]"
        stored = await manager.store.get(made.session_id)
        assert OPENAI not in stored.model_dump_json() and GITHUB not in stored.model_dump_json()
    finally:
        await manager.aclose()


# ==========================================================================
# encryption: keys
# ==========================================================================

RAW_KEY = bytes(range(32))


@pytest.mark.parametrize(
    "form",
    [
        RAW_KEY,
        bytearray(RAW_KEY),
        base64.b64encode(RAW_KEY).decode(),
        base64.urlsafe_b64encode(RAW_KEY).decode().rstrip("="),
        RAW_KEY.hex(),
        RAW_KEY.hex().upper(),
        f"  {RAW_KEY.hex()}\n",
    ],
    ids=["bytes", "bytearray", "base64", "urlsafe-unpadded", "hex", "HEX", "spaces"],
)
def test_key_forms_name_the_same_key(form: Any) -> None:
    import hashlib

    assert key_id(form) == hashlib.sha256(RAW_KEY).hexdigest()[:8]


def test_generated_keys_are_random_32_byte_base64() -> None:
    first, second = generate_key(), generate_key()
    assert first != second and len(base64.urlsafe_b64decode(first)) == KEY_BYTES
    assert re.fullmatch(r"[0-9a-f]{8}", key_id(first))


@pytest.mark.parametrize(
    "bad",
    [
        b"short",
        b"x" * 33,
        "",
        "not base64 at all!",
        "AAAA",
        "ab" * 31,
        "zz" * 32,
        12345,
        None,
        ["k"],
    ],
)
def test_bad_keys_are_refused_without_showing_them(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        key_id(bad)
    if isinstance(bad, str) and len(bad) > 5:
        assert bad not in str(caught.value)
    with pytest.raises(InvalidArgumentError):
        EncryptingStore(open_store("memory://"), [generate_key(), bad])


def test_store_arguments_are_checked() -> None:
    key = generate_key()
    with pytest.raises(InvalidArgumentError, match="empty"):
        EncryptingStore(open_store("memory://"), [])
    with pytest.raises(InvalidArgumentError, match="list of keys"):
        EncryptingStore(open_store("memory://"), key)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="twice"):
        EncryptingStore(open_store("memory://"), [key, RAW_KEY, key])
    with pytest.raises(InvalidArgumentError, match="must be a store"):
        EncryptingStore("memory://", [key])  # type: ignore[arg-type]
    store = EncryptingStore(open_store("memory://"), [key, RAW_KEY])
    assert store.key_ids == (key_id(key), key_id(RAW_KEY))
    assert key not in repr(store) and key_id(key) in repr(store)
    assert isinstance(store, Store) and store.url == "memory://"


def test_a_missing_cryptography_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(MissingDependencyError, match=r"chatsession\[encryption\]"):
        EncryptingStore(open_store("memory://"), [generate_key()])
    with pytest.raises(ImportError):  # it is also an ImportError
        SessionManager("memory://", encryption_keys=[generate_key()])


# ==========================================================================
# encryption: helpers
# ==========================================================================

SECRET = "TOPSECRET-7f3a9c-PLAINTEXT"
CONTROL = "VISIBLECONTROL-51e2b8"


def _needles(text: str) -> list[bytes]:
    """``text`` as a backend might keep it: raw, hex, or base64 at any alignment."""
    raw = text.encode()
    found = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for pad in range(3):
        encoded = base64.b64encode(b"\x00" * pad + raw)
        # drop the characters that depend on the bytes around it
        found.append(encoded[(pad * 4 + 2) // 3 + 1 : -4])
    return found


def _contains(dump: bytes, text: str) -> bool:
    return any(needle in dump for needle in _needles(text))


async def raw_dump(backend: str, url: str, root: Path) -> bytes:
    """Every byte the backend keeps for the test (files, Redis keys, PostgreSQL rows)."""
    if backend in ("sqlite", "file"):
        return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())
    query = dict(parse_qsl(urlsplit(url).query))
    chunks: list[bytes] = []
    if backend == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            async for key in client.scan_iter(match=f"{query['prefix']}*", count=1000):
                kind = (await client.type(key)).decode()
                chunks.append(key)
                if kind == "string":
                    chunks.append(await client.get(key) or b"")
                elif kind == "hash":
                    for field, value in (await client.hgetall(key)).items():
                        chunks += [field, value]
                elif kind == "list":
                    chunks += await client.lrange(key, 0, -1)
                elif kind == "set":
                    chunks += list(await client.smembers(key))
                elif kind == "zset":
                    chunks += [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
                elif kind == "stream":
                    for _, fields in await client.xrange(key):
                        for field, value in fields.items():
                            chunks += [field, value]
                else:
                    raise AssertionError(f"redis key {key!r} of type {kind}: dump it too")
        finally:
            await client.aclose()
        return b"\n".join(chunks)
    if backend == "postgres":
        import asyncpg

        schema = query["schema"]
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
            for row in tables:
                rows = await conn.fetch(f'SELECT t::text AS x FROM "{schema}"."{row[0]}" t')
                chunks += [r["x"].encode() for r in rows]
        finally:
            await conn.close()
        return b"\n".join(chunks)
    raise AssertionError(f"no raw dump for {backend}")


def _event(kind: str, data: dict[str, Any], turn_id: str | None = None) -> NewEvent:
    return NewEvent(kind, json.dumps(data, separators=(",", ":")), time.time(), turn_id)


async def _all(store: Store, session_id: str, **kwargs: Any) -> list[StoredEvent]:
    return [e async for batch in store.read(session_id, **kwargs) for e in batch]


async def _write_secrets(store: Store, session_id: str, text: str) -> str:
    """A session with ``text`` in every place that can hold content; returns a blob id."""
    await store.create(
        SessionRecord(
            id=session_id,
            user_id="ann",
            agent_id="helper",
            title=f"title {text}",
            metadata={f"key-{text}": f"value {text}", "nested": [{"deep": text}]},
            fingerprint={"system_prompt": text, "model": "m"},
        )
    )
    head = await store.append(
        session_id,
        [
            _event("message", {"role": "user", "content": f"hello {text}"}, "t1"),
            _event(
                "message",
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"id": "c", "name": "f", "arguments": json.dumps({"q": text})}],
                },
                "t1",
            ),
            _event("usage", {"model": "m", "total_tokens": 42}, "t1"),
            _event("checkpoint", {"name": "cp", "data": {"note": text}}),
        ],
        0,
    )
    await store.put_snapshot(session_id, head, f"snapshot {text}".encode())
    return await store.put_blob(session_id, f"blob {text}".encode() * 10, "text/plain")


# ==========================================================================
# encryption: on every backend
# ==========================================================================


@pytest.fixture(params=BACKENDS)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh URL of each backend under test, cleaned up afterwards."""
    url, namespace = make_url(str(request.param), tmp_path)
    yield url
    await cleanup(str(request.param), namespace)


@pytest.fixture(params=DURABLE)
async def durable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """``(backend, url)``: a fresh URL of each durable backend under test (the data is in
    ``tmp_path`` for sqlite and file), cleaned up afterwards."""
    url, namespace = make_url(str(request.param), tmp_path)
    yield str(request.param), url
    await cleanup(str(request.param), namespace)


async def test_no_secret_reaches_the_backend_in_any_form(
    durable: tuple[str, str], tmp_path: Path
) -> None:
    durable_backend, durable_url = durable
    base = open_store(durable_url)
    store = EncryptingStore(base, [generate_key()])
    try:
        blob_id = await _write_secrets(store, "secret-session", SECRET)
        await store.fork("secret-session", 2, SessionRecord(id="secret-fork", title=SECRET))
        await store.update(
            (await store.get("secret-session")).model_copy(update={"title": f"new {SECRET}"}),
            1,
        )
        # the scan finds the same things written in plain, in every place
        await _write_secrets(base, "control-session", CONTROL)
        assert await store.get_blob("secret-session", blob_id) == f"blob {SECRET}".encode() * 10
    finally:
        await base.aclose()
    dump = await raw_dump(durable_backend, durable_url, tmp_path)
    assert _contains(dump, "title " + CONTROL) and _contains(dump, "snapshot " + CONTROL)
    assert _contains(dump, "blob " + CONTROL) and _contains(dump, "hello " + CONTROL)
    assert _contains(dump, "key-" + CONTROL)
    assert not _contains(dump, SECRET), f"{SECRET} is stored in plain on {durable_backend}"
    assert b"secret-session" in dump  # ids stay plain: the store finds sessions by them


async def test_everything_round_trips_exactly(store_url: str) -> None:
    base = open_store(store_url)
    store = EncryptingStore(base, [generate_key()])
    try:
        text = 'héllo ✓ \u2028 "quoted" \\ back'
        record = await store.create(
            SessionRecord(
                id="rt",
                user_id="ann",
                agent_id="helper",
                window_id="w",
                title=text,
                metadata={"a": [1, 2.5, None, True, {"b": text}], "big": 10**30, "": "empty key"},
                fingerprint={"model": "m", "settings": {"temperature": 0.25}},
            )
        )
        assert record.title == text and record.metadata["big"] == 10**30
        events = [encode(e) for e in _events_with_secrets()]
        head = await store.append("rt", events, 0)
        back = await _all(store, "rt")
        assert [(e.type, e.turn_id, e.event_id) for e in back] == [
            (e.type, e.turn_id, e.event_id) for e in events
        ]
        assert [json.loads(e.data) for e in back] == [json.loads(e.data) for e in events]
        assert [e.data for e in back] == [e.data for e in events]  # byte for byte, even on jsonb
        assert [type(e) for e in decode(back)] == [type(e) for e in _events_with_secrets()]
        assert [e.seq for e in await _all(store, "rt", after_seq=3, upto_seq=5, batch_size=1)] == [
            4,
            5,
        ]
        assert await store.get("rt") == record.model_copy(
            update={"head": head, "updated_at": (await store.get("rt")).updated_at}
        )
        page = await store.list_sessions(user_id="ann")
        assert [r.title for r in page.records] == [text]
        # blobs (the same bytes, the same id) and snapshots
        blob = bytes(range(256)) * 100
        blob_id = await store.put_blob("rt", blob, "application/octet-stream")
        assert await store.put_blob("rt", blob) == blob_id
        assert await store.get_blob("rt", blob_id) == blob
        assert await store.get_snapshot("rt") is None
        await store.put_snapshot("rt", 3, b"\x00snap\xff")
        assert await store.get_snapshot("rt") == (3, b"\x00snap\xff")
        # stats still count messages and tokens (bytes are what the store keeps)
        stats = await store.stats()
        assert (stats.sessions, stats.messages, stats.tokens) == (1, 4, 3)
        # update keeps everything readable, with a new version
        changed = await store.update(
            record.model_copy(update={"metadata": {"k": "v"}, "state": SessionState.ARCHIVED}),
            record.version,
        )
        assert (
            changed.metadata == {"k": "v"} and changed.title == text and changed.state == "archived"
        )
        with pytest.raises(ConflictError):
            await store.update(changed, record.version)
    finally:
        await base.aclose()


async def test_forks_read_their_inherited_events_and_blobs_after_ancestors_go(
    store_url: str,
) -> None:
    key = generate_key()
    base = open_store(store_url)
    store = EncryptingStore(base, [key])
    try:
        await store.create(SessionRecord(id="root"))
        await store.append(
            "root", [_event("message", {"role": "user", "content": f"r{i}"}) for i in range(4)], 0
        )
        root_blob = await store.put_blob("root", b"from the root")
        await store.fork("root", 3, SessionRecord(id="mid", title="middle"))
        await store.append("mid", [_event("message", {"role": "user", "content": "m4"})], 3)
        await store.fork("mid", 4, SessionRecord(id="leaf"))
        await store.fork("mid", 2, SessionRecord(id="early"))  # inherits only from root
        await store.append("leaf", [_event("message", {"role": "user", "content": "l5"})], 4)
        await store.delete("root")
        await store.delete("mid")
        contents = [json.loads(e.data)["content"] for e in await _all(store, "leaf")]
        assert contents == ["r0", "r1", "r2", "m4", "l5"]
        assert [json.loads(e.data)["content"] for e in await _all(store, "leaf", after_seq=3)] == [
            "m4",
            "l5",
        ]
        assert [json.loads(e.data)["content"] for e in await _all(store, "early")] == ["r0", "r1"]
        assert await store.get_blob("leaf", root_blob) == b"from the root"
        assert (await store.get("leaf")).parent is not None
        # a fork updated after its parents went (by a store object that never saw them)
        fresh = EncryptingStore(base, [key])
        leaf = await fresh.get("leaf")
        await fresh.update(leaf.model_copy(update={"title": "renamed"}), leaf.version)
        assert len(await _all(fresh, "leaf")) == 5
    finally:
        await base.aclose()


async def test_keys_rotate_old_keys_read_and_a_missing_key_is_a_decryption_error(
    durable: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    durable_url = durable[1]
    old, new = generate_key(), generate_key()
    async with EncryptingStore(open_store(durable_url), [old]) as first:
        await _write_secrets(first, "s", SECRET)
        await first.create(SessionRecord(id="untouched", title="old title"))
    async with EncryptingStore(open_store(durable_url), [new, old]) as rotated:
        first_event = (await _all(rotated, "s"))[0]
        assert json.loads(first_event.data)["content"] == f"hello {SECRET}"
        record = await rotated.get("s")
        await rotated.update(record.model_copy(update={"title": "rotated"}), record.version)
        head = await rotated.append("s", [_event("message", {"role": "user", "content": "new"})], 4)
        await rotated.put_snapshot("s", head, b"new snapshot")
        raw = await _all(rotated.base, "s")
        assert key_id(new) in raw[-1].data and key_id(old) in raw[0].data
    async with EncryptingStore(open_store(durable_url), [new]) as without_old:
        assert (await without_old.get("s")).title == "rotated"  # re-sealed by the update
        assert await without_old.get_snapshot("s") == (5, b"new snapshot")
        with pytest.raises(DecryptionError) as caught:
            await _all(without_old, "s")
        assert caught.value.session_id == "s" and key_id(old) in str(caught.value)
        assert isinstance(caught.value, CorruptDataError)
        with pytest.raises(DecryptionError):
            await without_old.get("untouched")
        with caplog.at_level(logging.WARNING, logger="chatsession.privacy.crypto"):
            page = await without_old.list_sessions()
        assert [r.id for r in page.records] == ["s"] and "untouched" in caplog.text
    async with EncryptingStore(open_store(durable_url), [generate_key()]) as stranger:
        with pytest.raises(DecryptionError):
            await stranger.get("s")
        with caplog.at_level(logging.WARNING, logger="chatsession.privacy.crypto"):
            assert await stranger.get_snapshot("s") is None  # a cache: rebuilt from the log


async def test_changed_or_moved_ciphertexts_are_decryption_errors(store_url: str) -> None:
    base = open_store(store_url)
    store = EncryptingStore(base, [generate_key()])
    try:
        blob_a = await _write_secrets(store, "a", "alpha")
        await _write_secrets(store, "b", "beta")
        raw_a = await _all(base, "a")
        raw_b = await _all(base, "b")

        # an event of a copied into b, at the same seq it had in a
        await store.create(SessionRecord(id="c"))
        await base.append("c", [NewEvent(e.type, e.data, e.ts, e.turn_id) for e in raw_a], 0)
        with pytest.raises(DecryptionError, match="moved from another session"):
            await _all(store, "c")
        # an event moved to another seq of its own session
        await base.append(
            "b", [NewEvent(raw_b[0].type, raw_b[0].data, raw_b[0].ts, raw_b[0].turn_id)], 4
        )
        assert len(await _all(store, "b", upto_seq=4)) == 4
        with pytest.raises(DecryptionError, match="event 5"):
            await _all(store, "b")
        # one character of a ciphertext changed
        token = json.loads(raw_a[0].data)["enc"]
        flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
        await store.create(SessionRecord(id="d"))
        await base.append(
            "d",
            [NewEvent(raw_a[0].type, json.dumps({"enc": flipped}), raw_a[0].ts, raw_a[0].turn_id)],
            0,
        )
        with pytest.raises(DecryptionError):
            await _all(store, "d")
        # the type, time or turn of an event changed around its ciphertext
        for change in ({"type": "reset"}, {"ts": raw_a[0].ts + 1}, {"turn_id": "other"}):
            sid = f"changed-{next(iter(change))}"
            await store.create(SessionRecord(id=sid))
            moved = NewEvent(raw_a[0].type, raw_a[0].data, raw_a[0].ts, raw_a[0].turn_id)._replace(
                **change
            )
            await base.append(sid, [moved], 0)
            with pytest.raises(DecryptionError):
                await _all(store, sid)
        # a record sealed for another session
        stored_a = await base.get("a")
        stored_b = await base.get("b")
        await base.update(
            stored_b.model_copy(update={"metadata": stored_a.metadata}), stored_b.version
        )
        with pytest.raises(DecryptionError, match="record"):
            await store.get("b")
        # a blob of another session, and a changed blob
        sealed = await base.get_blob("a", blob_a)
        foreign = await base.put_blob("c", sealed)
        with pytest.raises(DecryptionError, match="does not descend"):
            await store.get_blob("c", foreign)
        changed = await base.put_blob("a", sealed[:-1] + bytes([sealed[-1] ^ 1]))
        with pytest.raises(DecryptionError, match=r"blob"):
            await store.get_blob("a", changed)
        # a snapshot moved to another seq reads as missing
        got = await base.get_snapshot("a")
        assert got is not None
        await base.append("a", [_event("message", {"role": "user", "content": "x"})], 4)
        await base.put_snapshot("a", 5, got[1])
        assert await store.get_snapshot("a") is None
    finally:
        await base.aclose()


async def test_bits_flipped_in_the_sqlite_file_are_detected(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    key = generate_key()
    async with EncryptingStore(open_store(url), [key]) as store:
        await _write_secrets(store, "s", SECRET)
    db = sqlite3.connect(tmp_path / "s.db")
    data = db.execute("SELECT data FROM events WHERE seq = 1").fetchone()[0]
    token = json.loads(data)["enc"]
    middle = len(token) // 2
    bad = token[:middle] + ("x" if token[middle] != "x" else "y") + token[middle + 1 :]
    db.execute("UPDATE events SET data = ? WHERE seq = 1", (json.dumps({"enc": bad}),))
    db.execute(
        "UPDATE events SET data = (SELECT data FROM events WHERE seq = 4) WHERE seq = 2"
    )  # swapped within the session
    db.commit()
    db.close()
    async with EncryptingStore(open_store(url), [key]) as store:
        with pytest.raises(DecryptionError, match="event 1"):
            await _all(store, "s")
        with pytest.raises(DecryptionError, match="event 2"):
            await _all(store, "s", after_seq=1)
        assert len(await _all(store, "s", after_seq=2)) == 2


async def test_data_written_in_plain_is_refused_unless_allowed(store_url: str) -> None:
    base = open_store(store_url)
    try:
        await base.create(SessionRecord(id="old", title="plain title", metadata={"a": 1}))
        await base.append("old", [_event("message", {"role": "user", "content": "plain"})], 0)
        blob = await base.put_blob("old", b"plain blob")
        await base.put_snapshot("old", 1, b"plain snapshot")
        strict = EncryptingStore(base, [generate_key()])
        with pytest.raises(DecryptionError, match="not encrypted"):
            await strict.get("old")
        with pytest.raises(DecryptionError, match="not encrypted"):
            await _all(strict, "old")
        with pytest.raises(DecryptionError, match="not encrypted"):
            await strict.get_blob("old", blob)
        assert await strict.get_snapshot("old") is None
        lenient = EncryptingStore(base, [generate_key()], allow_plaintext=True)
        assert (await lenient.get("old")).title == "plain title"
        assert json.loads((await _all(lenient, "old"))[0].data)["content"] == "plain"
        assert await lenient.get_blob("old", blob) == b"plain blob"
        assert await lenient.get_snapshot("old") == (1, b"plain snapshot")
        # new data is encrypted, even in an old session; a fork of it reads both
        await lenient.append("old", [_event("message", {"role": "user", "content": "sealed"})], 1)
        assert "sealed" not in (await _all(base, "old"))[-1].data
        old = await lenient.get("old")
        await lenient.update(old.model_copy(update={"title": "now sealed"}), old.version)
        assert (await base.get("old")).title is None
        await lenient.fork("old", 2, SessionRecord(id="young"))
        await lenient.append("young", [_event("message", {"role": "user", "content": "own"})], 2)
        contents = [json.loads(e.data)["content"] for e in await _all(lenient, "young")]
        assert contents == ["plain", "sealed", "own"]
    finally:
        await base.aclose()


async def test_a_payload_too_large_once_encrypted_is_refused_before_writing() -> None:
    store = EncryptingStore(open_store("memory://"), [generate_key()])
    await store.create(SessionRecord(id="big"))
    text = "x" * (MAX_PAYLOAD_BYTES - 100)
    with pytest.raises(UnsupportedValueError, match="encrypted it is"):
        await store.append("big", [_event("message", {"role": "user", "content": text})], 0)
    assert (await store.get("big")).head == 0
    # the usual refusals come first, naming the caller's own data
    with pytest.raises(UnsupportedValueError, match="line break"):
        await store.append("big", [NewEvent("message", '{"a":\n1}', time.time())], 0)
    with pytest.raises(SessionNotFoundError):
        await store.append("missing", [_event("message", {"role": "user"})], 0)


async def test_the_manager_encrypts_a_whole_conversation(
    durable: tuple[str, str], tmp_path: Path
) -> None:
    durable_backend, durable_url = durable
    key = generate_key()
    manager = SessionManager(durable_url, encryption_keys=[key], redact=True)
    try:
        made = await manager.create_session(
            "ann", "helper", title=f"plan {SECRET}", metadata={"topic": SECRET}
        )
        chat = await manager.chat(made.session_id, "ann", Agent(ScriptedLLM([f"noted: {SECRET}"])))
        async with chat:
            answer = await chat.query(f"remember {SECRET} and {OPENAI}")
        assert SECRET in answer
        async with await manager.chat(made.session_id, "ann", Agent(ScriptedLLM())) as again:
            history = [m.text for m in await again.read_history()]
        assert any(SECRET in text for text in history)
        assert not any(OPENAI in text for text in history)  # redacted before it was encrypted
        assert (await manager.get_session(made.session_id, "ann")).metadata["topic"] == SECRET
    finally:
        await manager.aclose()
    dump = await raw_dump(durable_backend, durable_url, tmp_path)
    assert not _contains(dump, SECRET)
    reopened = SessionManager(durable_url, encryption_keys=[key])
    try:
        assert (await reopened.get_session(made.session_id, "ann")).title == f"plan {SECRET}"
    finally:
        await reopened.aclose()


async def test_a_damaged_snapshot_is_rebuilt_from_the_log(caplog: pytest.LogCaptureFixture) -> None:
    base = open_store("memory://")
    store = EncryptingStore(base, [generate_key()])
    async with ChatSession(
        Agent(ScriptedLLM(["one", "two"])), "snap", store=store, snapshot_every=1
    ) as chat:
        await chat.query("first")
        await chat.query("second")
    got = await base.get_snapshot("snap")
    assert got is not None
    seq, sealed = got
    await base.put_snapshot("snap", seq, sealed[:-1] + bytes([sealed[-1] ^ 1]))
    with caplog.at_level(logging.WARNING):
        async with ChatSession(Agent(ScriptedLLM()), "snap", store=store) as again:
            assert [m.text for m in again.messages][-1] == "two"
    assert "cannot be decrypted" in caplog.text


async def test_large_blobs_are_encrypted_off_the_event_loop() -> None:
    store = EncryptingStore(open_store("memory://"), [generate_key()])
    await store.create(SessionRecord(id="big"))
    data = bytes(3 << 20)
    blob_id = await store.put_blob("big", data)
    assert await store.get_blob("big", blob_id) == data
    await store.put_snapshot("big", 0, data)
    assert await store.get_snapshot("big") == (0, data)


# ==========================================================================
# the conformance suite on an EncryptingStore over memory://
# ==========================================================================

from tests.conformance import (  # noqa: E402
    test_arguments,
    test_contract,
    test_leases,
    test_multi_user,
    test_refusals,
    test_roundtrip,
)

#: contract tests an EncryptingStore is known to differ on, and why
_DIFFERS = {
    "test_blobs": "blob ids hash the encrypted bytes, not the plain ones (docs/privacy.md)",
    "test_blobs_round_trip": "blob ids hash the encrypted bytes, not the plain ones",
    "test_forks_of_forks_and_deleting_ancestors": "it looks a blob up by the sha256 of its plain bytes",
    "test_stats_are_computed_by_the_store": "stats().bytes counts the encrypted payloads",
}


def _contract_tests() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for module in (
        test_arguments,
        test_contract,
        test_leases,
        test_multi_user,
        test_refusals,
        test_roundtrip,
    ):
        short = module.__name__.rsplit(".", 1)[1].removeprefix("test_")
        for name, test in vars(module).items():
            if not name.startswith("test_") or not (
                inspect.iscoroutinefunction(test) or hasattr(test, "hypothesis")
            ):
                continue
            marks = getattr(test, "pytestmark", [])
            given = {
                arg.strip()
                for mark in marks
                if mark.name == "parametrize"
                for arg in (
                    mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0]
                )
            }
            if set(inspect.signature(test).parameters) - given - {"store", "backend"}:
                continue  # it opens stores by URL itself
            if any(mark.name == "slow" for mark in marks):
                continue
            if name in _DIFFERS:
                test = pytest.mark.xfail(reason=_DIFFERS[name], strict=True)(test)
            found[f"test_encrypted_{short}__{name.removeprefix('test_')}"] = test
    return found


globals().update(_contract_tests())


@pytest.fixture
def backend() -> str:
    """The backend under the EncryptingStore of the conformance tests above."""
    return "memory"


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    """An EncryptingStore over a fresh memory:// store (for the conformance tests above)."""
    opened = EncryptingStore(open_store("memory://"), [generate_key(), generate_key()])
    yield opened
    await opened.aclose()


def test_the_conformance_suite_is_wrapped() -> None:
    names = [name for name in globals() if name.startswith("test_encrypted_")]
    assert "test_encrypted_contract__is_a_store" in names
    assert len(names) > 40


async def test_concurrent_appends_through_two_wrappers_never_interleave() -> None:
    base = open_store("memory://")
    key = generate_key()
    one, two = EncryptingStore(base, [key]), EncryptingStore(base, [key])
    await one.create(SessionRecord(id="race"))

    async def writer(store: EncryptingStore, tag: str) -> None:
        for i in range(20):
            while True:
                head = (await store.get("race")).head
                try:
                    await store.append(
                        "race", [_event("message", {"role": "user", "content": f"{tag}{i}"})], head
                    )
                    break
                except ConflictError:
                    await asyncio.sleep(0)

    await asyncio.gather(writer(one, "a"), writer(two, "b"))
    assert len(await _all(one, "race")) == 40


async def test_the_manager_redacts_before_anything_reaches_the_backend(
    durable: tuple[str, str], tmp_path: Path
) -> None:
    durable_backend, durable_url = durable
    manager = SessionManager(durable_url, redact=True)
    try:
        made = await manager.create_session(
            "ann", "helper", title=f"keys {GITHUB}", metadata={"note": f"card {VISA}"}
        )
        llm = ScriptedLLM([f"I will not repeat {AWS}"])
        async with await manager.chat(made.session_id, "ann", Agent(llm)) as chat:
            await chat.query(f"my key is {OPENAI}, card {VISA}, password=hunter2hunter2")
        await manager.save_checkpoint(
            made.session_id, "ann", {"token": STRIPE, "text": f"Bearer {OPENAI}"}
        )
        await manager.update_session_metadata(made.session_id, "ann", {"slack": SLACK})
    finally:
        await manager.aclose()
    dump = await raw_dump(durable_backend, durable_url, tmp_path)
    for secret in (
        GITHUB,
        VISA,
        VISA.replace(" ", ""),
        AWS,
        OPENAI,
        STRIPE,
        SLACK,
        "hunter2hunter2",
    ):
        assert not _contains(dump, secret), f"{secret!r} is stored on {durable_backend}"
    assert _contains(dump, "[REDACTED:openai_api_key]") or b"REDACTED" in dump
    assert made.session_id.encode() in dump  # the scan reads where the session is
