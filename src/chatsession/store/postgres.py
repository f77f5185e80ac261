"""``postgresql://user@host/db``: sessions in PostgreSQL (asyncpg, the ``postgres`` extra).

URL: ``postgresql://[user[:password]@][host][:port][,host2[:port2]...][/database][?options]``
(``postgres://`` works too). The user, password and database are
percent-decoded (write ``%40`` for ``@``, ``%2F`` for ``/``, ``%23`` for
``#``); a port is a number from 1 to 65535; several hosts are tried in turn.
What the URL leaves out comes from libpq's environment variables
(``PGHOST``, ``PGUSER``, ``PGPASSWORD``, ...) as in ``psql``. Options, each
given at most once (``open_store`` keyword options override the URL's):

``schema`` (default ``public``)
    The schema holding chatsession's tables (created if missing).
``synchronous_commit`` (``on``, ``off``, ``local``, ``remote_write``, ``remote_apply``)
    Not set by default: the database's and the role's setting applies
    (``ALTER DATABASE``/``ALTER ROLE ... SET synchronous_commit``; PostgreSQL's
    own default is ``on``, which loses nothing acknowledged). With ``off``,
    commits return before the server flushes its WAL: appends cost a network
    round trip instead of a disk flush. What it risks: if the *server*
    crashes (not a client), the last few hundred milliseconds of
    acknowledged appends can be lost; the database is never corrupted and
    seqs stay contiguous.
``min_size``, ``max_size`` (default 1 and 10)
    The connection pool's size.
``command_timeout``, ``connect_timeout`` (seconds, default 30 and 10)
    How long a call or a connection attempt waits before the store reports
    itself unavailable.
``sslmode`` (``disable``, ``allow``, ``prefer``, ``require``, ``verify-ca``, ``verify-full``)
    As in libpq; by default ``PGSSLMODE``, else ``prefer``.
``application_name`` (printable ASCII, at most 63 characters)
    Shown by the server in ``pg_stat_activity``.
``password``
    The password, when it is not in the URL's user part (not both).

Options are handed to the driver as the parsed values, never pasted into a
connection string: a ``%26`` (``&``) or ``%3D`` (``=``) in a value stays
part of that value and cannot add or change a connection parameter. An
unknown or repeated option, a bad value or a bad port raises
:class:`~chatsession.errors.InvalidURLError`. The password never appears in
``store.url``, ``repr(store)`` or any message (it is shown as ``***``).

Tables ``sessions`` (the records: identity columns, and ``title``,
``metadata`` and ``fingerprint`` in ``body``, JSONB, or ``body_text``, see
below; ``text_payloads`` is true once a session has a payload kept as
text), ``events`` (primary key ``(session_pk, seq)``; the payload is in
``data``, JSONB, so it can be queried and indexed in place, or in
``data_text`` as the exact text, with ``data`` NULL; a CHECK keeps exactly
one of the two set), ``blobs``. Schema changes are named migrations
recorded in ``chatsession_migrations``, applied once under an advisory lock,
so processes starting at once are safe. Migration ``002_events_data_jsonb``
converts the payloads of a database made by an earlier version (it rewrites
the events table under an exclusive lock: on a big table the first store to
open waits for it, and so do the others). A payload that is not valid JSON
stops it with :class:`~chatsession.errors.CorruptDataError` and changes
nothing. Migration ``003_events_data_text`` adds ``data_text``, the CHECK,
``sessions.text_payloads`` and ``fillfactor = 80`` on ``sessions``: no
rewrite, one scan of the events table to check the constraint. Migration
``004_sessions_body_text`` adds ``sessions.body_text`` and its CHECK: no
rewrite, one scan of the sessions table.

What is acknowledged reads back exactly. JSONB keeps JSON *values*, not
their text: it drops insignificant whitespace, orders object keys (shorter
keys first) and writes numbers in plain decimal. Whitespace and key order
do not change what ``json.loads`` gives back, but plain decimal would change
some numbers' types: ``1e16`` or ``1.5e1`` would come back as an ``int``,
``-0.0`` as ``0.0``. JSONB cannot hold some values at all: a ``\\u0000``
escape (NUL), an unpaired surrogate escape, a number beyond ``numeric``
(more than 131072 digits before the point or 16383 after). A payload (or a
record's body) with any of these is kept as text (``data_text``,
``body_text``) exactly as written and comes back byte for byte; every other
one is kept as JSONB and comes back as JSON that parses to equal values of
the same types (dictionaries' key order aside). The client tells them apart
(a substring test for ``\\u``, a scan of the escapes of the payloads that
have one, and one parse of each payload by the C scanner, about as long as
``json.loads``, which looks closely only at floats written with an exponent
or as ``-0``); the server finds plain-decimal numbers beyond ``numeric``: the statement fails having written
nothing and is sent once more with those payloads as text, the only append
that takes two round trips. A session whose ``text_payloads`` is false (nearly
all) reads ``data``; one that is true reads
``COALESCE(data_text::json::text, data::text)`` (the cast checks the text is
still JSON and keeps it as is); a fork reads each ancestor's part by that
ancestor's flag.

An append is one SQL statement (so one transaction and one round trip): it
moves the head only if it is still ``expected_seq`` (which locks the
session's row, so it cannot race a delete) and inserts the events: up to 16
events, none kept as text, as one ``VALUES`` row each, otherwise as
``unnest`` of arrays. The
``sessions`` fillfactor leaves room on each page so that moving the head is a
HOT update (no index entries written) on pages filled since migration 003.
Expiry is the ``expires_at`` column, checked on every read; ``purge_expired``
deletes in bounded batches that skip sessions locked by other calls.

``read`` streams: one query (keyset, ``seq > last``) per batch of
``batch_size`` events, so it holds one batch at a time whatever the
session's size. A fork's ancestry is walked by one recursive query per 1000
ancestors; a chain that loops back on itself (a hand edit, a bad restore) is
:class:`~chatsession.errors.CorruptDataError`, never an endless walk.

Driver errors are translated where they happen:

- the server or the network is down, refuses service (starting up, shutting
  down, too many connections, out of disk, read-only standby) or does not
  answer in time (``command_timeout``, ``statement_timeout``, a cancelled
  statement): :class:`~chatsession.errors.StoreUnavailableError`. A
  connection the server closed (a restart, a failover,
  ``idle_session_timeout``, ``pg_terminate_backend``, a pooler) is replaced:
  the call that was using it raises ``StoreUnavailableError``, and the same
  store object works again from the next call once the server accepts
  connections. A read (``get``, ``list_sessions``, ``read``, ``get_blob``) or
  a ``put_blob`` that finds its connection lost (closed while it sat in the
  pool) is sent once more on a fresh connection; a write is not, since it
  may have been done (an ``append`` retried by its caller then meets a
  ``ConflictError`` if it was);
- a refused login or a missing database: :class:`~chatsession.errors.InvalidURLError`;
- chatsession's tables missing or changed, or data the server reports as
  damaged: :class:`~chatsession.errors.CorruptDataError`. Rows damaged by
  hand (a record's body that is not its JSON object, a missing ancestor, a
  head before the fork point, a gap in the events, text that is not JSON)
  are ``CorruptDataError`` too, naming the session and where;
  ``list_sessions`` skips a damaged record and logs a warning on the
  ``chatsession.store`` logger;
- a value the server rejects: :class:`~chatsession.errors.UsageError`;
- a deadlock or serialization failure is retried (the transaction was rolled
  back, so nothing was written); if it persists, and for anything else the
  server refuses (a missing privilege, say): :class:`~chatsession.errors.StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, NoReturn, Self, TypeAlias, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
import asyncpg.exceptions as pgerr
from asyncpg.pool import PoolConnectionProxy
from pydantic import ValidationError

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ChatSessionError,
    ConflictError,
    CorruptDataError,
    InvalidIdError,
    InvalidURLError,
    SessionExistsError,
    SessionNotFoundError,
    StoreError,
    StoreUnavailableError,
    UsageError,
)
from chatsession.store.base import (
    DEFAULT_READ_BATCH,
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    StoredEvent,
    check_append,
    check_before,
    check_blob,
    check_filters,
    check_fork_at,
    check_fork_point,
    check_limit,
    check_read,
    check_record,
    check_version,
    decode_cursor,
    encode_cursor,
    fork_segments,
    initial_record,
    now,
    redact_url,
    updated_record,
    validate_id,
)

__all__ = ["MIGRATIONS", "PostgresStore"]

_log = logging.getLogger("chatsession.store")


async def _reset(conn: Conn) -> None:
    """The pool's reset on release: roll back a transaction left open, nothing more.

    asyncpg's own full reset (``RESET ALL`` and friends) costs a round trip
    per release and undoes nothing the store leaves behind: no ``SET`` beyond
    the pool's server settings, no ``LISTEN``, only transaction-scoped
    advisory locks. A call cancelled mid-transaction does leave one open, and
    it must not swallow the next caller's writes.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _fetch(sql: str, args: tuple[Any, ...], conn: Conn) -> list[asyncpg.Record]:
    """Every page of events ``read`` fetches goes through here (one round trip)."""
    return await conn.fetch(sql, *args)


def _alive(conn: Conn) -> bool:
    """Whether a connection taken from the pool is still attached and open.

    When the server closes a connection (a restart, ``pg_terminate_backend``,
    ``idle_session_timeout``), asyncpg hands it back to the pool by itself and
    detaches the proxy we hold: every method of the proxy then raises
    ``InterfaceError``. That is "gone", not a reason to fail every later call.
    """
    try:
        return not conn.is_closed()
    except pgerr.InterfaceError:
        return False


def _in_transaction(conn: Conn) -> bool:
    try:
        return conn.is_in_transaction()
    except pgerr.InterfaceError:  # detached: the pool already took it back
        return False


T = TypeVar("T")
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
_PURGE_BATCH = 100  # sessions deleted per purge transaction
_LINEAGE_PAGE = 1000  # ancestors fetched per recursive query
_ATTEMPTS = 3  # tries of a call the server aborted as a deadlock or serialization failure
_MIGRATION_TIMEOUT = 3600.0  # seconds a migration statement (or the wait for one) may take
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_VALUES_MAX = 16  # appends of up to this many events (all jsonb) send one VALUES row each
#: Every backslash escape of a JSON text, in order; group 1 is the hex of a
#: ``\\u0000`` or surrogate escape (``\\\\`` is one escape, so ``\\\\u0000`` is none).
_ESCAPE_RE = re.compile(r"\\(?:u(0000|[dD][89a-fA-F][0-9a-fA-F]{2})|.)", re.DOTALL)
_FIRST_RE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_NUMERIC_INT_DIGITS = 131072  # PostgreSQL numeric (so jsonb): digits before the point
_NUMERIC_SCALE = 16383  # and after it

_OPTIONS = (
    "schema",
    "synchronous_commit",
    "min_size",
    "max_size",
    "command_timeout",
    "connect_timeout",
    "sslmode",
    "application_name",
    "password",
)
_SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_WHOLE_RE = re.compile(r"[0-9]{1,9}")
_SECONDS_RE = re.compile(r"[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_APPLICATION_NAME_RE = re.compile(r"[ -~]{0,63}")  # printable ASCII: the server keeps it as is
_MAX_POOL = 1000
_MAX_SECONDS = 86400.0


def _needs_text(data: str) -> bool:
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


def _fits_numeric(data: str) -> bool:
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


def _jsonb_changes(data: str) -> bool:
    """Whether jsonb would not give JSON text ``data`` back as the same values and types.

    A ``\\u`` substring test (a scan of the escapes if there is one) and a parse
    (about 2 us a kilobyte).
    """
    if "\\u" in data and _needs_text(data):
        return True
    return _jsonb_alters_numbers(data)


def _strict_json(text: str) -> bool:
    """Whether ``text`` is JSON PostgreSQL's ``json`` type would accept (no NaN)."""

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError, TypeError):
        return False
    return True


# -- the URL ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """A parsed PostgreSQL URL and its options."""

    hosts: tuple[str, ...]
    ports: tuple[int | None, ...]
    user: str | None
    password: str | None
    database: str | None
    schema: str = "public"
    synchronous_commit: str | None = None
    min_size: int = 1
    max_size: int = 10
    command_timeout: float = 30.0
    connect_timeout: float = 10.0
    sslmode: str | None = None
    application_name: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` (every host, comma separated), for messages."""
        if not self.hosts:
            return "localhost:5432"
        return ",".join(
            f"{host or 'localhost'}:{port or 5432}"
            for host, port in zip(self.hosts, self.ports, strict=True)
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """asyncpg's connection arguments: parsed values, no connection string."""
        kwargs: dict[str, Any] = {}
        if len(self.hosts) == 1:  # "postgresql://:5433/db": the default host, that port
            if self.hosts[0]:
                kwargs["host"] = self.hosts[0]
            if self.ports[0] is not None:
                kwargs["port"] = self.ports[0]
        elif self.hosts:
            kwargs["host"] = list(self.hosts)
            kwargs["port"] = [port or 5432 for port in self.ports]
        for name in ("user", "password", "database"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.sslmode is not None:
            kwargs["ssl"] = self.sslmode
        settings = {}
        if self.synchronous_commit is not None:
            settings["synchronous_commit"] = self.synchronous_commit
        if self.application_name is not None:
            settings["application_name"] = self.application_name
        if settings:
            kwargs["server_settings"] = settings
        return kwargs


def _parse_url(url: object, options: Mapping[str, object]) -> _Settings:
    """Parse a ``postgresql://`` URL and override its options with ``options``.

    Raises:
        InvalidURLError: What is wrong; the password is never shown.
    """
    if not isinstance(url, str):
        raise InvalidURLError(f"a PostgreSQL URL must be a string, not {type(url).__name__}")
    if "#" in url:  # a '#' in a password not %-encoded would cut it: show nothing of it
        raise InvalidURLError(
            "a PostgreSQL URL must not contain '#' (the URL is not shown: it may hold a "
            "password); write '#' in a password or an option as %23"
        )
    shown = redact_url(url)

    def bad(why: str) -> InvalidURLError:
        return InvalidURLError(f"PostgreSQL URL {shown}: {why}")

    def decoded(text: str, what: str) -> str:
        try:
            value = unquote(text, errors="strict")
        except UnicodeDecodeError:
            raise bad(f"the {what} has a %-escape that is not UTF-8") from None
        if "\x00" in value:
            raise bad(f"the {what} contains NUL")
        return value

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise bad(f"it cannot be parsed ({exc})") from None
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise bad("use the postgresql:// (or postgres://) scheme")
    if "@" not in parts.netloc and "@" in url.partition("://")[2]:
        # "u:12/ss@host/db" or "u:12?ss@host": a password with a '/' or '?' cut the
        # user part short; what looks like the host, port, path or options is the
        # password, and messages that quote them would show it
        raise InvalidURLError(
            "a PostgreSQL URL has an '@' after the host (the URL is not shown: it may hold a "
            "password); write '/', '?' in a password as %2F, %3F and '@' in a database "
            "name or an option as %40"
        )

    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    user = password = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = decoded(raw_user, "user") or None
        if colon:
            password = decoded(raw_password, "password")
    hosts: list[str] = []
    ports: list[int | None] = []
    if hostinfo:
        items = hostinfo.split(",")
        for item in items:
            if item.startswith("["):
                end = item.find("]")
                rest = item[end + 1 :] if end > 0 else "?"
                if end < 0 or (rest and not rest.startswith(":")):
                    raise bad("an IPv6 host must be written [address] or [address]:port")
                host, port_text = item[1:end], rest[1:] if rest else None
            else:
                host, colon, port_text_raw = item.partition(":")
                port_text = port_text_raw if colon else None
            host = decoded(host, "host")
            if not host and len(items) > 1:
                raise bad("a host in the host list is empty")
            port: int | None = None
            if port_text:
                if _PORT_RE.fullmatch(port_text) is None or not 1 <= int(port_text) <= 65535:
                    raise bad("the port must be a number from 1 to 65535")
                port = int(port_text)
            elif port_text is not None:
                raise bad("a ':' must be followed by a port number from 1 to 65535")
            if host or port is not None:
                hosts.append(host)
                ports.append(port)
    path = parts.path
    if path and not path.startswith("/"):
        raise bad("the database must follow the host after '/'")
    database = (decoded(path[1:], "database") or None) if path else None

    given: dict[str, object] = {}
    if parts.query:
        for piece in parts.query.split("&"):
            raw_name, eq, raw_value = piece.partition("=")
            if not eq or not raw_name:
                raise bad("the options must be name=value pairs joined by '&'")
            name = decoded(raw_name, "option name")
            if name not in _OPTIONS:
                raise bad(f"unknown option {name[:40]!r}; known: {', '.join(_OPTIONS)}")
            if name in given:
                raise bad(f"the option {name!r} is given twice")
            given[name] = decoded(raw_value, f"option {name}")
    for name, value in options.items():
        if name not in _OPTIONS:
            raise bad(f"unknown option {name[:40]!r}; known: {', '.join(_OPTIONS)}")
        if value is not None:
            given[name] = value

    def shown_value(name: str, value: object) -> str:
        return "***" if name == "password" else repr(value)[:60]

    def text(name: str, choices: Sequence[str] | None = None) -> str | None:
        value = given.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            allowed = f"one of {', '.join(choices)}" if choices else "a string"
            raise bad(f"{name} must be {allowed}, not {shown_value(name, value)}")
        return value

    def whole(name: str, default: int, low: int) -> int:
        value = given.get(name, default)
        if isinstance(value, str) and _WHOLE_RE.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_POOL:
            raise bad(f"{name} must be a whole number from {low} to {_MAX_POOL}, not {value!r:.60}")
        return value

    def seconds(name: str, default: float) -> float:
        value = given.get(name, default)
        if isinstance(value, str) and _SECONDS_RE.fullmatch(value):
            value = float(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 < value <= _MAX_SECONDS
        ):
            raise bad(
                f"{name} must be a number of seconds above 0 and at most 86400, not {value!r:.60}"
            )
        return float(value)

    schema = text("schema") or "public"
    if _SCHEMA_RE.fullmatch(schema) is None:
        raise bad(
            f"schema {schema[:70]!r} is not a plain lower-case identifier "
            "(a-z, 0-9 and _, not starting with a digit, at most 63 characters)"
        )
    application_name = text("application_name")
    if application_name is not None and _APPLICATION_NAME_RE.fullmatch(application_name) is None:
        raise bad("application_name must be at most 63 printable ASCII characters")
    option_password = text("password")
    if option_password is not None:
        if password is not None:
            raise bad("the password is given twice (in the URL's user part and as an option)")
        if "\x00" in option_password:
            raise bad("the password contains NUL")
        password = option_password
    min_size = whole("min_size", 1, 0)
    max_size = whole("max_size", 10, 1)
    if min_size > max_size:
        raise bad(f"min_size ({min_size}) must not be above max_size ({max_size})")
    return _Settings(
        hosts=tuple(hosts),
        ports=tuple(ports),
        user=user,
        password=password,
        database=database,
        schema=schema,
        synchronous_commit=text("synchronous_commit", _SYNCHRONOUS_COMMIT),
        min_size=min_size,
        max_size=max_size,
        command_timeout=seconds("command_timeout", 30.0),
        connect_timeout=seconds("connect_timeout", 10.0),
        sslmode=text("sslmode", _SSLMODES),
        application_name=application_name,
    )


# -- schema ---------------------------------------------------------------------------


def _migration_1(s: str) -> list[str]:
    return [
        f"""CREATE TABLE {s}.sessions (
            pk bigserial PRIMARY KEY,
            id text NOT NULL UNIQUE,
            user_id text,
            agent_id text,
            window_id text,
            state text NOT NULL,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            expires_at double precision,
            parent_pk bigint,
            parent_seq bigint,
            head bigint NOT NULL DEFAULT 0,
            version bigint NOT NULL DEFAULT 1,
            deleted boolean NOT NULL DEFAULT false,
            children integer NOT NULL DEFAULT 0,
            body jsonb NOT NULL DEFAULT '{{}}'
        )""",
        f"CREATE INDEX sessions_by_created ON {s}.sessions (created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_user ON {s}.sessions (user_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_agent ON {s}.sessions (agent_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_window ON {s}.sessions (window_id, created_at DESC, id DESC) WHERE NOT deleted",
        f"CREATE INDEX sessions_by_expiry ON {s}.sessions (expires_at) WHERE expires_at IS NOT NULL",
        f"""CREATE TABLE {s}.events (
            session_pk bigint NOT NULL,
            seq bigint NOT NULL,
            type text NOT NULL,
            ts double precision NOT NULL,
            turn_id text,
            v smallint NOT NULL,
            data text NOT NULL,
            PRIMARY KEY (session_pk, seq)
        )""",
        f"""CREATE TABLE {s}.blobs (
            session_pk bigint NOT NULL,
            id text NOT NULL,
            media_type text NOT NULL DEFAULT '',
            data bytea NOT NULL,
            PRIMARY KEY (session_pk, id)
        )""",
    ]


def _migration_2(s: str) -> list[str]:
    # One statement, so it is atomic; a payload that is not JSON aborts it.
    return [f"ALTER TABLE {s}.events ALTER COLUMN data TYPE jsonb USING data::jsonb"]


def _migration_3(s: str) -> list[str]:
    # Catalog changes only (a new column with a constant default is not written
    # into existing rows), plus one scan of the events table to check the new
    # constraint; no rewrite. The fillfactor applies to pages filled from now on.
    return [
        f"""ALTER TABLE {s}.events
            ALTER COLUMN data DROP NOT NULL,
            ADD COLUMN data_text text,
            ADD CONSTRAINT events_data_or_data_text CHECK ((data IS NULL) <> (data_text IS NULL))""",
        f"""ALTER TABLE {s}.sessions
            ADD COLUMN text_payloads boolean NOT NULL DEFAULT false,
            SET (fillfactor = 80)""",
    ]


def _migration_4(s: str) -> list[str]:
    # A nullable column without a default and a CHECK: catalog changes plus one
    # scan of the sessions table; no rewrite.
    return [
        f"""ALTER TABLE {s}.sessions
            ALTER COLUMN body DROP NOT NULL,
            ADD COLUMN body_text text,
            ADD CONSTRAINT sessions_body_or_body_text CHECK ((body IS NULL) <> (body_text IS NULL))"""
    ]


#: Applied in order, each once, recorded by name. Never edit or reorder: append.
MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("001_sessions_events_blobs", _migration_1),
    ("002_events_data_jsonb", _migration_2),
    ("003_events_data_text", _migration_3),
    ("004_sessions_body_text", _migration_4),
]

#: The server or the network is down, refuses service, or did not answer in time.
_OUTAGE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (command_timeout) is one too
    pgerr.PostgresConnectionError,  # class 08: the connection failed or was lost
    pgerr.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
    pgerr.InsufficientResourcesError,  # class 53: too many connections, disk full, no memory
    pgerr.PostgresSystemError,  # class 58: an I/O error on the server
    pgerr.LockNotAvailableError,  # lock_timeout ran out
    pgerr.ReadOnlySQLTransactionError,  # a standby, or the server is read-only
)

#: Aborted by the server to break a deadlock or a serialization conflict:
#: nothing was written, so the call is tried again.
_RETRY: tuple[type[BaseException], ...] = (
    pgerr.DeadlockDetectedError,
    pgerr.SerializationError,
)


#: The server ended the session: shut down, crashed, or timed it out while idle.
_SESSION_ENDED: tuple[type[BaseException], ...] = (
    pgerr.AdminShutdownError,  # 57P01: a shutdown or pg_terminate_backend
    pgerr.CrashShutdownError,  # 57P02
    pgerr.IdleSessionTimeoutError,  # 57P05
    pgerr.ConnectionDoesNotExistError,  # closed in the middle of the call
    ConnectionResetError,
    BrokenPipeError,
)


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says that the connection the call used was lost (not that
    the server cannot be reached): a fresh connection may well work."""
    if isinstance(exc, _SESSION_ENDED):
        return True
    message = str(exc)
    # asyncpg's plain InterfaceError says "connection is closed" when the server
    # went away between calls, and "released back to the pool" when it closed the
    # connection we held (asyncpg then detaches our proxy); its subclasses are
    # configuration errors. A connection that took the server's goodbye while
    # idle refuses the next statement ("cannot switch to state ...").
    if type(exc) is pgerr.InterfaceError:
        return "is closed" in message or "released back to the pool" in message
    return isinstance(exc, pgerr.InternalClientError) and "cannot switch to state" in message


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, _OUTAGE) or _connection_lost(exc)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    detail = getattr(exc, "detail", None)
    return f"{text}; {detail}" if detail else text


def _body(record: SessionRecord) -> tuple[str | None, str | None]:
    """The record's ``body`` for the jsonb column and for ``body_text``: one is None.

    Kept as text when jsonb would not give it back as the same values and
    types (a NUL in a string, ``-0.0``, ``1e+16``: see the module docstring).
    """
    text = json.dumps(
        {"title": record.title, "metadata": record.metadata, "fingerprint": record.fingerprint},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return (None, text) if _jsonb_changes(text) else (text, None)


class PostgresStore:
    """The PostgreSQL store (``postgresql://``). See the module docstring.

    Payloads are kept as JSONB where JSONB gives them back as equal values
    of the same types (with whitespace and key order normalised, not byte
    for byte as the other backends do), and as exact text otherwise
    (``\\u0000``, numbers JSONB would rewrite or cannot hold); see the
    module docstring.

    Args:
        url: A ``postgresql://`` URL (see the module docstring for options).
        **options: Options overriding the URL's (``schema``, ``max_size``, ...).

    Raises:
        InvalidURLError: A malformed URL, an unknown or repeated option, a
            bad value or port (the password is never shown).
    """

    def __init__(self, url: str, **options: object) -> None:
        settings = _parse_url(url, options)
        self._settings = settings
        self.url = redact_url(url)
        self.address = settings.address
        self.schema = settings.schema
        self._s = f'"{settings.schema}"'
        #: What the URL asked for, or None: the database's and the role's setting applies.
        self.synchronous_commit = settings.synchronous_commit
        self._pool: asyncpg.Pool | None = None
        self._pool_lock: asyncio.Lock | None = None
        self._lane: PoolConnectionProxy[asyncpg.Record] | None = None
        self._lane_busy = False  # a call is using the lane (one event loop: a flag suffices)
        self._lane_retry_at = 0.0
        self._closed = False
        self._append_cache: dict[tuple[int, bool], str] = {}
        s = self._s
        where = "WHERE session_pk = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
        # a session with no payload kept as text (nearly all) reads jsonb as is
        self._read_sql = {
            False: f"SELECT seq, type, ts, turn_id, data, v FROM {s}.events {where}",
            True: f"SELECT seq, type, ts, turn_id, COALESCE(data_text::json::text, data::text), v "
            f"FROM {s}.events {where}",
        }
        self._lineage_sql = f"""
            WITH RECURSIVE chain(pk, parent_pk, parent_seq, text_payloads, depth) AS (
                SELECT pk, parent_pk, parent_seq, text_payloads, 1 FROM {s}.sessions WHERE pk = $1
                UNION ALL
                SELECT p.pk, p.parent_pk, p.parent_seq, p.text_payloads, c.depth + 1
                FROM chain c JOIN {s}.sessions p ON p.pk = c.parent_pk
                WHERE c.depth < $2
            )
            SELECT pk, parent_pk, parent_seq, text_payloads FROM chain ORDER BY depth"""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``postgresql://...`` (see the module docstring for options).

        Connections are made on first use.

        Raises:
            InvalidURLError: A malformed URL, an unknown or repeated option,
                a bad value or port.
        """
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- errors ----------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"PostgreSQL at {self.address} is unavailable ({_describe(exc)}); check "
            "that the server is running and reachable and the URL is right, then retry"
        )

    def _translate(self, exc: BaseException) -> BaseException:
        """The chatsession error for a driver or network error; any other is returned as is."""
        if isinstance(exc, ChatSessionError) or not isinstance(exc, Exception):
            return exc
        where, what = f"PostgreSQL at {self.address}", _describe(exc)
        if self._closed:
            return ChatSessionClosedError(f"store {self.url} was closed during the call")
        if isinstance(exc, pgerr.ReadOnlySQLTransactionError):
            return StoreUnavailableError(
                f"{where} refuses writes ({what}): it is a standby or read-only; point the "
                "URL at the primary, or retry once a failover has finished"
            )
        if _is_outage(exc):
            return self._unavailable(exc)
        if isinstance(exc, pgerr.InvalidAuthorizationSpecificationError):
            return InvalidURLError(
                f"{where} refused the login ({what}); check the user and password in the "
                "URL (and the server's pg_hba.conf)"
            )
        if isinstance(exc, pgerr.InvalidCatalogNameError):
            return InvalidURLError(f"{where}: {what}; create the database or fix the URL")
        if isinstance(exc, pgerr.ClientConfigurationError):
            return InvalidURLError(f"the PostgreSQL URL {self.url} cannot be used ({what})")
        if isinstance(
            exc,
            (pgerr.UndefinedTableError, pgerr.UndefinedColumnError, pgerr.InvalidSchemaNameError),
        ):
            return CorruptDataError(
                f"chatsession's tables in schema {self.schema!r} at {self.address} are missing "
                f"or were changed by hand ({what}); restore them from a backup"
            )
        if isinstance(exc, (pgerr.DataCorruptedError, pgerr.IndexCorruptedError)):
            return CorruptDataError(f"{where} reports damaged data ({what}); restore from a backup")
        if isinstance(exc, pgerr.InsufficientPrivilegeError):
            return StoreError(
                f"{where} denied access ({what}); grant the URL's user the privileges on "
                f"schema {self.schema!r} and its tables, or connect as their owner"
            )
        if isinstance(exc, _RETRY):
            return StoreError(
                f"{where} aborted the call {_ATTEMPTS} times ({what}); nothing was written: "
                "retry later"
            )
        if isinstance(exc, pgerr.DataError):  # class 22, or a value the driver cannot encode
            return UsageError(f"{where} rejected a value of the call ({what}); fix the arguments")
        if isinstance(exc, (pgerr.PostgresError, pgerr.InterfaceError, pgerr.InternalClientError)):
            return StoreError(
                f"{where} failed ({what}); nothing is known to have been written: retry, "
                "and report a bug if it persists"
            )
        return exc

    def _raise(self, exc: BaseException) -> NoReturn:
        translated = self._translate(exc)
        if translated is exc:
            raise exc
        raise translated from exc

    def _damaged(self, session_id: str, where: str, why: str) -> CorruptDataError:
        return CorruptDataError(
            f"session {session_id!r}: {where} in PostgreSQL (schema {self.schema!r} at "
            f"{self.address}) {why}; restore it from a backup, or delete the session"
        )

    # -- plumbing --------------------------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        pool = self._pool
        if pool is not None:
            return pool
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            pool = self._pool
            if pool is None:
                pool = await self._open_pool()
                self._pool = pool
            return pool

    async def _open_pool(self) -> asyncpg.Pool:
        """A new pool, with the schema migrated; any failure raises a chatsession error."""
        settings = self._settings
        try:
            pool = await asyncpg.create_pool(
                min_size=settings.min_size,
                max_size=settings.max_size,
                command_timeout=settings.command_timeout,
                timeout=settings.connect_timeout,
                reset=_reset,
                **settings.connect_kwargs(),
            )
        except Exception as exc:
            self._raise(exc)
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn)
        except BaseException as exc:
            pool.terminate()
            self._raise(exc)
        return pool

    async def _migrate(self, conn: Conn) -> None:
        s, wait = self._s, _MIGRATION_TIMEOUT
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                f"chatsession:{self.schema}",
                timeout=wait,
            )
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.chatsession_migrations "
                "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in await conn.fetch(f"SELECT name FROM {s}.chatsession_migrations")}
            for name, migration in MIGRATIONS:
                if name in done:
                    continue
                try:
                    for statement in migration(s):
                        await conn.execute(statement, timeout=wait)
                except (pgerr.DataError, pgerr.CheckViolationError) as exc:
                    raise CorruptDataError(
                        f"PostgreSQL at {self.address}, schema {self.schema!r}: migration {name} "
                        f"cannot convert the stored data ({_describe(exc)}); nothing was changed: "
                        "repair or delete the rows it names, then open the store again"
                    ) from exc
                await conn.execute(
                    f"INSERT INTO {s}.chatsession_migrations (name) VALUES ($1)", name
                )

    async def _lane_connection(
        self, pool: asyncpg.Pool
    ) -> PoolConnectionProxy[asyncpg.Record] | None:
        """The fast lane: one pooled connection kept by this store object.

        A call that finds it free uses it without a pool acquire and release
        (about 30 us each); calls that find it busy use the pool as usual. A
        lane the server closed (asyncpg has taken it back) is replaced.
        """
        lane = self._lane
        if lane is not None and not _alive(lane):
            await self._drop_lane(pool)
            lane = None
        if lane is None:
            if time.monotonic() < self._lane_retry_at:
                return None
            try:
                lane = self._lane = await pool.acquire(timeout=self._settings.connect_timeout)
            except Exception as exc:
                if not _is_outage(exc):
                    self._raise(exc)
                self._lane_retry_at = time.monotonic() + 1.0
                return None
        return lane

    async def _drop_lane(self, pool: asyncpg.Pool) -> None:
        """Hand the lane back to the pool (which rolls back what it left open)."""
        lane, self._lane = self._lane, None
        if lane is not None:
            with contextlib.suppress(Exception):
                await pool.release(lane, timeout=1)

    @staticmethod
    async def _run(conn: Conn, fn: Callable[[Conn], Awaitable[T]], tx: bool) -> T:
        if not tx:
            return await fn(conn)
        async with conn.transaction():
            return await fn(conn)

    async def _attempt(self, fn: Callable[[Conn], Awaitable[T]], tx: bool) -> T:
        pool = self._pool if self._pool is not None and not self._closed else await self._get_pool()
        if not self._lane_busy:
            self._lane_busy = True
            try:
                lane = await self._lane_connection(pool)
                if lane is not None:
                    try:
                        result = await self._run(lane, fn, tx)
                    except BaseException as exc:
                        # cancelled (it may be mid-query), broken, closed by the
                        # server, or left in a transaction: never reuse it
                        if (
                            isinstance(exc, asyncio.CancelledError)
                            or _is_outage(exc)
                            or not _alive(lane)
                            or _in_transaction(lane)
                        ):
                            await self._drop_lane(pool)
                        raise
                    if _in_transaction(lane):
                        await self._drop_lane(pool)
                    return result
            finally:
                self._lane_busy = False
        async with pool.acquire() as conn:
            try:
                return await self._run(conn, fn, tx)
            except BaseException as exc:
                if _connection_lost(exc) and _alive(conn):
                    conn.terminate()  # never handed out again
                raise

    async def _with(
        self, fn: Callable[[Conn], Awaitable[T]], *, tx: bool = False, idempotent: bool = False
    ) -> T:
        """Run ``fn`` on a connection (in a transaction if ``tx``), translating errors.

        ``idempotent`` calls (reads) whose connection was lost are sent once more
        on a fresh one: a connection closed by the server while it sat in the
        pool (a restart, ``idle_session_timeout``, a pooler) is only found out
        when a call uses it. Writes are not: they may have been done.
        """
        attempt = 1
        lost_once = False
        while True:
            try:
                return await self._attempt(fn, tx)
            except _RETRY as exc:
                if attempt >= _ATTEMPTS:
                    self._raise(exc)
                await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
                attempt += 1
            except pgerr.ReadOnlySQLTransactionError as exc:
                if self._pool is not None:  # after a failover: new connections, maybe a new primary
                    await self._pool.expire_connections()
                self._raise(exc)
            except Exception as exc:
                if idempotent and not lost_once and _connection_lost(exc):
                    lost_once = True  # once: a server that is down stays unavailable
                    continue
                self._raise(exc)

    # -- rows ------------------------------------------------------------------

    _COLUMNS = (
        "s.pk, s.id, s.user_id, s.agent_id, s.window_id, s.state, s.created_at, s.updated_at, "
        "s.expires_at, p.id AS parent_id, s.parent_seq, s.head, s.version, "
        "COALESCE(s.body_text, s.body::text) AS body, "
        "s.deleted, s.children, s.parent_pk, s.text_payloads"
    )

    def _from(self) -> str:
        return f"{self._s}.sessions s LEFT JOIN {self._s}.sessions p ON p.pk = s.parent_pk"

    def _record(self, row: asyncpg.Record) -> SessionRecord:
        """The record a ``sessions`` row holds; ``CorruptDataError`` if it is damaged."""
        session_id = row["id"]
        where = "its record (table sessions)"
        try:
            validate_id(session_id)
        except InvalidIdError as exc:
            raise self._damaged(str(session_id)[:80], where, f"has a bad id ({exc})") from None
        text = row["body"]
        if not isinstance(text, str):
            raise self._damaged(session_id, where, "has neither body nor body_text")
        try:
            body = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise self._damaged(
                session_id, where, f"has a body that is not JSON ({str(exc)[:80]})"
            ) from None
        if type(body) is not dict or not set(body) <= {"title", "metadata", "fingerprint"}:
            raise self._damaged(
                session_id,
                where,
                "has a body that is not an object of title, metadata, fingerprint",
            )
        parent: dict[str, Any] | None = None
        if row["parent_pk"] is not None:
            if row["parent_id"] is None:
                raise self._damaged(
                    session_id, where, f"names a parent (row {row['parent_pk']}) that is missing"
                )
            parent = {"session_id": row["parent_id"], "seq": row["parent_seq"]}
        head, fork_seq = row["head"], row["parent_seq"]
        if isinstance(head, int) and head < (fork_seq if parent and fork_seq is not None else 0):
            raise self._damaged(session_id, where, f"has head {head}, before its fork point")
        try:
            return SessionRecord.model_validate(
                {
                    "id": session_id,
                    "user_id": row["user_id"],
                    "agent_id": row["agent_id"],
                    "window_id": row["window_id"],
                    "state": row["state"],
                    "created_at": row["created_at"],
                    "updated_at": row["updated_at"],
                    "expires_at": row["expires_at"],
                    "parent": parent,
                    "head": head,
                    "version": row["version"],
                    **body,
                }
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "a field"
            raise self._damaged(
                session_id, where, f"has a bad {field} ({error['msg'][:80]})"
            ) from None
        except RecursionError:
            raise self._damaged(session_id, where, "has a body nested too deeply") from None

    async def _visible_row(self, conn: Conn, session_id: str, lock: bool = False) -> asyncpg.Record:
        sql = f"SELECT {self._COLUMNS} FROM {self._from()} WHERE s.id = $1"
        if lock:
            sql += " FOR UPDATE OF s"
        row = await conn.fetchrow(sql, session_id)
        if row is None or row["deleted"]:
            raise SessionNotFoundError(session_id)
        if row["expires_at"] is not None and row["expires_at"] <= now():
            raise SessionNotFoundError(session_id, "expired")
        return row

    async def _lineage(
        self, conn: Conn, session_id: str, row: asyncpg.Record
    ) -> list[tuple[tuple[int, bool], int]]:
        """``((pk, text_payloads), fork_seq)`` from ``row`` (the session's) up to the root.

        One recursive query per 1000 ancestors. Raises ``CorruptDataError`` for
        a chain that loops back on itself or names a missing row.
        """
        where = "its chain of fork parents (sessions.parent_pk)"

        def link(r: asyncpg.Record) -> tuple[tuple[int, bool], int]:
            if r["parent_pk"] is not None and r["parent_seq"] is None:
                raise self._damaged(session_id, where, f"has row {r['pk']} with no fork point")
            return ((r["pk"], r["text_payloads"]), r["parent_seq"] or 0)

        chain = [link(row)]
        seen = {row["pk"]}
        current = row["parent_pk"]
        while current is not None:
            rows = await conn.fetch(self._lineage_sql, current, _LINEAGE_PAGE)
            for r in rows:
                if r["pk"] in seen:
                    raise self._damaged(
                        session_id, where, f"loops: row {r['pk']} is its own ancestor"
                    )
                seen.add(r["pk"])
                chain.append(link(r))
            if not rows or (len(rows) < _LINEAGE_PAGE and rows[-1]["parent_pk"] is not None):
                missing = rows[-1]["parent_pk"] if rows else current
                raise self._damaged(session_id, where, f"names row {missing}, which is missing")
            current = rows[-1]["parent_pk"]
        return chain

    # -- records ---------------------------------------------------------------

    @staticmethod
    def _identity(r: SessionRecord) -> tuple[Any, ...]:
        """``id, user_id, agent_id, window_id, state, created_at, updated_at, expires_at``."""
        return (
            r.id,
            r.user_id,
            r.agent_id,
            r.window_id,
            r.state,
            r.created_at,
            r.updated_at,
            r.expires_at,
        )

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)  # checks the record before any I/O
        body, body_text = _body(stored)
        sql = (
            f"INSERT INTO {self._s}.sessions (id, user_id, agent_id, window_id, state, "
            "created_at, updated_at, expires_at, head, version, body, body_text) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)"
        )

        async def work(conn: Conn) -> None:
            try:
                await conn.execute(
                    sql, *self._identity(stored), stored.head, stored.version, body, body_text
                )
            except asyncpg.UniqueViolationError:
                raise SessionExistsError(stored.id) from None

        await self._with(work)
        return stored

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)
        row = await self._with(lambda conn: self._visible_row(conn, session_id), idempotent=True)
        return self._record(row)

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        check_record(record)  # before any I/O
        check_version(expected_version)
        sql = (
            f"UPDATE {self._s}.sessions SET user_id = $2, agent_id = $3, window_id = $4, "
            "state = $5, expires_at = $6, updated_at = $7, version = $8, body = $9::jsonb, "
            "body_text = $10 WHERE id = $1"
        )

        async def work(conn: Conn) -> SessionRecord:
            current = self._record(await self._visible_row(conn, record.id, lock=True))
            if current.version != expected_version:
                raise ConflictError(record.id, expected_version, current.version, "version")
            new = updated_record(current, record)
            await conn.execute(
                sql,
                new.id,
                new.user_id,
                new.agent_id,
                new.window_id,
                new.state,
                new.expires_at,
                new.updated_at,
                new.version,
                *_body(new),
            )
            return new

        return await self._with(work, tx=True)

    async def _remove(self, conn: Conn, pk: int) -> None:
        """Delete row ``pk`` (or mark it deleted while forks need it), then the
        ancestors that were kept only for it. A loop, not a recursion: chains can
        be long, and a damaged one may come back round."""
        current: int | None = pk
        seen: set[int] = set()
        while current is not None and current not in seen:
            seen.add(current)
            row = await conn.fetchrow(
                f"SELECT children, parent_pk FROM {self._s}.sessions WHERE pk = $1 FOR UPDATE",
                current,
            )
            if row is None:
                return
            if row["children"] > 0:
                await conn.execute(
                    f"UPDATE {self._s}.sessions SET deleted = true WHERE pk = $1", current
                )
                return
            await conn.execute(f"DELETE FROM {self._s}.events WHERE session_pk = $1", current)
            await conn.execute(f"DELETE FROM {self._s}.blobs WHERE session_pk = $1", current)
            await conn.execute(f"DELETE FROM {self._s}.sessions WHERE pk = $1", current)
            parent = row["parent_pk"]
            if parent is None:
                return
            left = await conn.fetchrow(
                f"UPDATE {self._s}.sessions SET children = children - 1 WHERE pk = $1 "
                "RETURNING children, deleted",
                parent,
            )
            if left is None or left["children"] > 0 or not left["deleted"]:
                return
            current = parent

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        validate_id(session_id)

        async def work(conn: Conn) -> None:
            row = await self._visible_row(conn, session_id, lock=True)
            await self._remove(conn, row["pk"])

        await self._with(work, tx=True)

    async def list_sessions(
        self,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        window_id: str | None = None,
        state: SessionState | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """See :meth:`Store.list_sessions`.

        A damaged record is left out of the page (the page may then be
        shorter than ``limit``; paging goes on past it) and logged as a
        warning on the ``chatsession.store`` logger, naming the session.
        """
        check_limit(limit)
        check_filters(user_id, agent_id, window_id, state)
        after = decode_cursor(cursor) if cursor is not None else None
        params: list[Any] = [now()]
        where = ["NOT s.deleted", "(s.expires_at IS NULL OR s.expires_at > $1)"]
        for column, value in (
            ("user_id", user_id),
            ("agent_id", agent_id),
            ("window_id", window_id),
            ("state", state),
        ):
            if value is None:
                continue
            params.append(value)
            where.append(f"s.{column} = ${len(params)}")
        if after is not None:
            params.extend(after)
            a, b = len(params) - 1, len(params)
            where.append(f"(s.created_at < ${a} OR (s.created_at = ${a} AND s.id < ${b}))")
        params.append(limit + 1)
        sql = (
            f"SELECT {self._COLUMNS} FROM {self._from()} WHERE {' AND '.join(where)} "
            f"ORDER BY s.created_at DESC, s.id DESC LIMIT ${len(params)}"
        )
        rows = await self._with(lambda conn: conn.fetch(sql, *params), idempotent=True)
        records: list[SessionRecord] = []
        for row in rows[:limit]:
            try:
                records.append(self._record(row))
            except CorruptDataError as exc:
                _log.warning("list_sessions left out session %r: %s", row["id"], exc)
        next_cursor = None
        if len(rows) > limit:  # from the last row read, damaged or not, so paging goes on
            last = rows[limit - 1]
            next_cursor = encode_cursor(
                SessionRecord.model_construct(id=last["id"], created_at=last["created_at"])
            )
        return Page(records, next_cursor)

    # -- events ----------------------------------------------------------------

    def _append_sql(self, n: int, text: bool) -> tuple[str, str]:
        """The append statement for ``n`` events and the status it answers on success.

        Up to ``_VALUES_MAX`` events, all kept as jsonb: a ``VALUES`` row each,
        whose parameters are the events' fields in order (cheaper than
        ``unnest``). Otherwise ``unnest`` of one array per column, with
        ``data_text`` only when some payload is kept as text.
        """
        values = n <= _VALUES_MAX and not text
        key = (n if values else 0, text)
        sql = self._append_cache.get(key)
        if sql is None:
            s = self._s
            extra = ", data_text" if text else ""
            # data_text::json checks that it is JSON and gives back the same text
            head = f"""WITH moved AS (
                UPDATE {s}.sessions SET head = head + $4, updated_at = $3
                    {", text_payloads = true" if text else ""}
                WHERE id = $1 AND head = $2 AND NOT deleted
                    AND (expires_at IS NULL OR expires_at > $3)
                RETURNING pk
            )
            INSERT INTO {s}.events (session_pk, seq, type, ts, turn_id, v, data{extra})
            SELECT moved.pk, $2 + e.ord, e.type, e.ts, e.turn_id, e.v, e.data
                {", e.data_text::json::text" if text else ""}
            FROM moved, """
            if values:  # $5... : each event's type, data, ts, turn_id, schema_version
                rows = ", ".join(
                    f"({i + 1}, ${5 + 5 * i}::text, ${6 + 5 * i}::jsonb, ${7 + 5 * i}::float8, "
                    f"${8 + 5 * i}::text, ${9 + 5 * i}::int)"
                    for i in range(n)
                )
                sql = f"{head}(VALUES {rows}) AS e(ord, type, data, ts, turn_id, v)"
            else:
                arrays = "$5::text[], $6::jsonb[], $7::float8[], $8::text[], $9::int[]"
                arrays += ", $10::text[]" if text else ""
                sql = (
                    f"{head}unnest({arrays}) "
                    f"WITH ORDINALITY AS e(type, data, ts, turn_id, v{extra}, ord)"
                )
            self._append_cache[key] = sql
        return sql, f"INSERT 0 {n}"

    async def append(self, session_id: str, events: Sequence[NewEvent], expected_seq: int) -> int:
        """See :meth:`Store.append`."""
        check_append(events, expected_seq)
        validate_id(session_id)
        n = len(events)  # schema_version <= MAX_SCHEMA_VERSION, events.v's smallint
        # a substring test and a regex search for most payloads; a scan or a parse for few
        as_text = [i for i, e in enumerate(events) if _jsonb_changes(e.data)]

        def arguments(as_text: list[int]) -> tuple[str, str, list[Any]]:
            sql, status = self._append_sql(n, bool(as_text))
            args: list[Any] = [session_id, expected_seq, now(), n]
            if n <= _VALUES_MAX and not as_text:
                for e in events:
                    args.extend(e)
                return sql, status, args
            data: list[str | None] = [e.data for e in events]
            args += ([e.type for e in events], data, [e.ts for e in events])
            args += ([e.turn_id for e in events], [e.schema_version for e in events])
            if as_text:
                texts: list[str | None] = [None] * n
                for i in as_text:
                    texts[i], data[i] = data[i], None
                args.append(texts)
            return sql, status, args

        sql, status, args = arguments(as_text)

        async def work(conn: Conn) -> int:
            nonlocal sql, status, args
            for retried in (False, True):
                try:
                    if await conn.execute(sql, *args) == status:
                        return expected_seq + n
                    break  # the head moved, or the session is gone
                except asyncpg.UniqueViolationError:
                    # the head matched but seq expected_seq + 1 is taken: unless
                    # another writer moved the head since, the log is damaged, and
                    # a conflict would send the caller's retry loop round forever
                    row = await self._visible_row(conn, session_id)
                    if row["head"] != expected_seq:
                        raise ConflictError(session_id, expected_seq, row["head"]) from None
                    raise CorruptDataError(
                        f"session {session_id!r}: PostgreSQL holds events after seq {expected_seq} "
                        f"but the session's head is {expected_seq} (the events and sessions tables "
                        "disagree, as after a partial restore); restore both from one backup"
                    ) from None
                except pgerr.DataError as exc:
                    # a number beyond numeric's range, which jsonb cannot hold: the
                    # statement wrote nothing; send it once more with those payloads as text
                    more = as_text
                    if not retried and isinstance(exc, pgerr.NumericValueOutOfRangeError):
                        more = [
                            i
                            for i, e in enumerate(events)
                            if i in as_text or not _fits_numeric(e.data)
                        ]
                    if more == as_text:
                        raise UsageError(
                            f"cannot append to session {session_id!r}: PostgreSQL rejected an "
                            f"event ({_describe(exc)}); nothing was written"
                        ) from exc
                    sql, status, args = arguments(more)
            row = await self._visible_row(conn, session_id)
            raise ConflictError(session_id, expected_seq, row["head"])

        return await self._with(work)

    async def _page(
        self,
        session_id: str,
        pk: int,
        text: bool,
        start: int,
        hi: int,
        limit: int,
        conn: Conn,
    ) -> list[asyncpg.Record]:
        """Up to ``limit`` events of row ``pk`` with ``start < seq <= hi``, in order."""
        try:
            rows = await _fetch(self._read_sql[text], (pk, start, hi, limit), conn)
        except pgerr.InvalidTextRepresentationError:  # a data_text that is not JSON
            raise await self._bad_text(conn, session_id, pk, start, hi) from None
        if not text and any(r[4] is None for r in rows):
            # payloads kept as text in a session not marked so (a partial restore):
            # read them as text, as they were acknowledged
            return await self._page(session_id, pk, True, start, hi, limit, conn)
        if text and any(r[4] is None for r in rows):
            seq = next(r[0] for r in rows if r[4] is None)
            raise self._damaged(session_id, f"event {seq} (table events)", "has no payload")
        return rows

    async def _bad_text(
        self, conn: Conn, session_id: str, pk: int, start: int, hi: int
    ) -> CorruptDataError:
        """The error naming the first event of row ``pk`` whose ``data_text`` is not JSON."""
        rows = await conn.fetch(
            f"SELECT seq, data_text FROM {self._s}.events WHERE session_pk = $1 AND seq > $2 "
            "AND seq <= $3 AND data_text IS NOT NULL ORDER BY seq",
            pk,
            start,
            hi,
        )
        bad = next((r["seq"] for r in rows if not _strict_json(r["data_text"])), None)
        where = f"event {bad}" if bad is not None else f"an event in {start + 1}..{hi}"
        return self._damaged(session_id, f"{where} (events.data_text)", "is not JSON")

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`.

        One query per batch (keyset on seq): the store holds one batch of
        ``batch_size`` events at a time. Payloads come back as JSON equal to
        what was appended, normalised by JSONB, or byte for byte for those kept
        as text (see the module docstring). A session deleted while it is read
        raises ``SessionNotFoundError`` at the next batch that misses rows.
        """
        check_read(after_seq, upto_seq, batch_size)
        validate_id(session_id)

        async def plan(
            conn: Conn,
        ) -> tuple[int, list[tuple[tuple[int, bool], int, int]], list[asyncpg.Record]]:
            row = await self._visible_row(conn, session_id)
            lineage = await self._lineage(conn, session_id, row)
            segments = fork_segments(lineage, row["head"], after_seq, upto_seq)
            first: list[asyncpg.Record] = []
            if segments:
                (pk, text), lo, hi = segments[0]
                first = await self._page(session_id, pk, text, lo, hi, batch_size, conn)
            return row["pk"], segments, first

        own_pk, segments, rows = await self._with(plan, idempotent=True)
        make = StoredEvent._make
        for index, ((pk, text), lo, hi) in enumerate(segments):
            start = lo
            while start < hi:
                if index or start != lo:
                    page = partial(self._page, session_id, pk, text, start, hi, batch_size)
                    rows = await self._with(page, idempotent=True)
                expected = min(batch_size, hi - start)
                if len(rows) != expected or (
                    rows and (rows[0][0] != start + 1 or rows[-1][0] != start + expected)
                ):
                    await self._check_still_there(session_id, own_pk)
                    raise CorruptDataError(
                        f"session {session_id!r}: events {start + 1}..{start + expected} are "
                        f"incomplete in PostgreSQL (found {len(rows)}); restore from a backup"
                    )
                batch = list(map(make, rows))
                rows = []  # hold one batch, not two, while the caller works
                yield batch
                start += expected

    async def _check_still_there(self, session_id: str, pk: int) -> None:
        """Raise ``SessionNotFoundError`` if the session read as row ``pk`` is gone."""
        try:
            row = await self._with(
                lambda conn: self._visible_row(conn, session_id), idempotent=True
            )
        except SessionNotFoundError as exc:
            raise SessionNotFoundError(session_id, "deleted or expired during the read") from exc
        if row["pk"] != pk:
            raise SessionNotFoundError(session_id, "deleted during the read, and created again")

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`."""
        validate_id(session_id)
        check_fork_at(at_seq)  # before any I/O; past the head is found by the statement
        # checks the record before any I/O
        stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
        body, body_text = _body(stored)
        s = self._s
        # one statement (one round trip, one transaction): lock the parent, insert
        # the fork if the parent is visible and has the fork point, count the fork
        sql = f"""
            WITH parent AS (
                SELECT pk, head, deleted, expires_at FROM {s}.sessions WHERE id = $1 FOR UPDATE
            ), ok AS (
                SELECT pk FROM parent
                WHERE NOT deleted AND (expires_at IS NULL OR expires_at > $15) AND $10 <= head
            ), ins AS (
                INSERT INTO {s}.sessions (id, user_id, agent_id, window_id, state, created_at,
                    updated_at, expires_at, parent_pk, parent_seq, head, version, body, body_text)
                SELECT $2, $3, $4, $5, $6, $7, $8, $9, ok.pk, $10, $11, $12, $13::jsonb, $14
                FROM ok
                RETURNING parent_pk
            ), counted AS (
                UPDATE {s}.sessions SET children = children + 1
                WHERE pk IN (SELECT parent_pk FROM ins)
            )
            SELECT head, deleted, expires_at, (SELECT count(*) FROM ins) AS made FROM parent
        """

        async def work(conn: Conn) -> SessionRecord:
            r = stored
            try:
                row = await conn.fetchrow(
                    sql,
                    session_id,
                    *self._identity(r),
                    at_seq,
                    r.head,
                    r.version,
                    body,
                    body_text,
                    now(),
                )
            except asyncpg.UniqueViolationError:
                raise SessionExistsError(r.id) from None
            if row is None or row["deleted"]:
                raise SessionNotFoundError(session_id)
            if row["expires_at"] is not None and row["expires_at"] <= now():
                raise SessionNotFoundError(session_id, "expired")
            if not row["made"]:
                check_fork_point(session_id, at_seq, row["head"])
                raise SessionNotFoundError(session_id, "expired")  # expired as the call ran
            return stored

        return await self._with(work)

    # -- blobs -----------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        check_blob(data, media_type)  # before any I/O
        content = bytes(data)
        blob_id = hashlib.sha256(content).hexdigest()

        async def work(conn: Conn) -> None:
            row = await self._visible_row(conn, session_id)
            await conn.execute(
                f"INSERT INTO {self._s}.blobs (session_pk, id, media_type, data) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                row["pk"],
                blob_id,
                media_type,
                content,
            )

        await self._with(work, idempotent=True)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")

        async def work(conn: Conn) -> bytes:
            row = await self._visible_row(conn, session_id)
            pks = [pk for (pk, _), _ in await self._lineage(conn, session_id, row)]
            # blobs are named by their content's hash: any copy found is the one
            data = await conn.fetchval(
                f"SELECT data FROM {self._s}.blobs WHERE session_pk = ANY($1::bigint[]) "
                "AND id = $2 LIMIT 1",
                pks,
                blob_id,
            )
            if data is None:
                raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")
            return bytes(data)

        return await self._with(work, idempotent=True)

    # -- upkeep ----------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`.

        Deletes in transactions of at most 100 sessions, oldest expiry first,
        skipping sessions that another call holds locked (a concurrent
        ``delete`` or ``purge_expired``): those are left for that call or the
        next purge, so purges never wait for, or deadlock with, other calls.
        """
        check_before(before)
        at = now() if before is None else before
        sql = (
            f"SELECT pk FROM {self._s}.sessions WHERE NOT deleted AND expires_at IS NOT NULL "
            "AND expires_at <= $1 ORDER BY expires_at, pk LIMIT $2 FOR UPDATE SKIP LOCKED"
        )

        async def batch(conn: Conn) -> int:
            rows = await conn.fetch(sql, at, _PURGE_BATCH)
            for row in rows:
                await self._remove(conn, row["pk"])
            return len(rows)

        total = 0
        while True:
            done = await self._with(batch, tx=True)
            total += done
            if done < _PURGE_BATCH:
                return total

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await self._drop_lane(pool)
            await pool.close()
