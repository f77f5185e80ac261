"""``redis://host:6379/0``: sessions in Redis, for many processes on many machines.

Needs Redis 7.0 or later (the scripts use ``PEXPIRETIME``); the store checks
the server's version on its first call and says so when it is older.

URL: ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS), with
query options:

``prefix`` (default ``chatsession:``)
    Put before every key, so applications sharing a server stay apart.
``socket_timeout``, ``socket_connect_timeout`` (seconds, default 5)
    How long a call waits before the store reports itself unavailable.
``max_connections`` (default 50), ``pool_timeout`` (seconds, default 10)
    The size of the connection pool, and how long a call waits for a free
    connection when all are busy before it reports the store unavailable.
``ssl_cert_reqs`` (``none``, ``optional``, ``required``), ``ssl_ca_certs``,
``ssl_ca_path``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``,
``ssl_check_hostname`` (``true``/``false``), ``ssl_ciphers``, ``ssl_min_version``
(``TLSv1_2``, ``TLSv1_3``)
    TLS settings, for ``rediss://`` URLs only.
``username``, ``password``
    Credentials, instead of (or overriding) the URL's; ``open_store(url,
    password=...)`` keeps the password out of the URL.

Options may also be given as keyword arguments of :func:`~chatsession.open_store`
(they override the URL's). A port that is not a number from 1 to 65535, a
database that is not a number, an option given twice, an unknown option or a
bad value raises :class:`~chatsession.errors.InvalidURLError`. Passwords
(the URL's, ``password``, ``ssl_password``) never appear in ``store.url``,
``repr(store)`` or any message.

Keys. A session's keys share the hash tag ``{ID}``, the indexes share
``{idx}``, and every script call is given all the keys it touches, all under
one tag (no script builds a key name): each call runs on one hash slot, so
the layout works on Redis Cluster. (The store connects to one server:
standalone, or a primary behind Sentinel.) ::

    PREFIX{ID}:rec       hash: the record, head, version, stamp, tombstone flag
    PREFIX{ID}:ev        list: the session's own events (parent_seq+1..head), in order
    PREFIX{ID}:blob      hash: blob id -> bytes
    PREFIX{ID}:forks     sorted set: its forks (ID#STAMP), by when each fork began
    PREFIX{idx}:all      sorted set of sessions (ID#STAMP) by created_at
    PREFIX{idx}:user:U   the same, per user (and :agent:A, :window:W)
    PREFIX{idx}:expiry   sorted set of sessions by expires_at
    PREFIX{idx}:where    hash: ID#STAMP -> the indexes it is in, its parent, version
    PREFIX{idx}:due      sorted set: sessions a change across slots is under way
                         for, by when cleanup may finish that change

Values. Whatever a write acknowledged reads back exactly (same values, same
types): an event is stored as one list item, a JSON header
``[seq,type,ts,turn_id,schema_version]`` (ASCII, so it holds no raw line
break), a line break, then the payload text as given; nothing in a payload or
a turn id can be mistaken for the end of a field, and ``""`` stays ``""``
(``ts`` reads back as a float, as on every backend).
The record's ``user_id``/``agent_id``/``window_id`` are hash fields as given,
and its ``unset`` field names those that are None; ``title``, ``metadata``
and ``fingerprint`` are JSON in ``body``. Events and records written by
earlier versions (fields joined by ``\x1f``, no ``unset``) still read. No
script decodes a payload or a record's JSON (cjson would change big numbers
and empty arrays).

Damage. A read checks, in one ``MULTI`` per session of the fork chain, that
the event list holds exactly the events its record counts, and each event's
header carries its seq; ``append`` checks the list ends at the head before
it pushes. A stray item after the head, a missing or moved event, a fork
chain that loops or names a missing parent, and a record with a missing or
unreadable field all raise :class:`~chatsession.errors.CorruptDataError`
naming the session, the key and what to do, from every call (a listing
leaves such a session out and logs a warning on the ``chatsession.store``
logger; ``purge_expired`` skips it the same way).

``STAMP`` is random, given by ``create`` and ``fork``: ``ID#STAMP`` names one
*incarnation* of an id, so what is left of a deleted session never touches a
new session with the same id.

What is atomic: everything on one session is one script on its slot.
``append`` checks visibility and the head, pushes the events and moves the
head, and never touches the index slot (listings are ordered by
``created_at``, which never changes). So is ``put_blob``, and so is the step of
each other write that decides whether it happens (its *commit*). The record is
the truth; the index slot is derived from it. Writes across slots are short
sequences of single-slot scripts, each idempotent:

- ``create``: (1) index: list ``ID#STAMP`` and mark it *due*; (2) session:
  write the record unless the id is taken (commit); (3) index: clear the mark.
  If (2) finds the id taken, (1) is undone.
- ``fork``: (1) index: as create's; (2) parent: add ``ID#STAMP`` to its
  forks and drop its native expiry (fails if the parent is gone or the fork
  point is past its head); (3) child: write the record with its parent
  pointer unless the id is taken (commit); (4) index: clear the mark. If (2)
  or (3) fails, the steps before it are undone.
- ``update``: (1) index: mark, add the indexes the new version needs;
  (2) session: check the version, write (commit); (3) index: record the new
  placement, drop memberships it no longer needs, clear the mark.
- ``delete``: (1) index: mark; (2) session: remove its keys, or make it a
  tombstone if it has forks (commit); (3) parent: drop it from its parent's
  forks (a tombstone left with no forks goes too, and so on up the chain);
  (4) index: remove its entries (a tombstone's entry stays, due for a check
  of its forks).
- ``purge_expired``: for each batch of the expiry set, steps like delete's;
  then it finishes the changes whose marks are due.

Why a crash, a lost reply or a race between steps never corrupts anything:

- Listings show a member only when its session's record exists with that
  stamp, is visible and matches the filters, so a half-made session, a
  deleted one's leftovers, or a membership an interrupted update did not drop
  yet is never shown. Entries are added before a commit and dropped after it,
  so every visible session is listed.
- Nothing is removed on a guess. A mark is due 300 s (``_GRACE``) after its
  change began, and every commit refuses to run (writing nothing:
  "took too long, retry") once half of that has passed, both by server
  clocks. So when cleanup meets a due mark and no record with that stamp, the
  record will never be written: it removes the leftovers (index entries, the
  parent's hold). When the record is there, it re-derives the index entries
  from it. Only server clocks are compared; they must agree within a quarter
  of the grace. Every change marks its session first, so every leftover of
  one cut short is found from the due set: cleanup never searches.
- Members name incarnations: releasing or forgetting ``ID#STAMP`` never
  touches a later session with the same id. A parent's fork count is the size
  of its forks set, so a repeated hold never counts twice; an operation
  retried after a lost reply is a new incarnation, and whichever attempt did
  not commit is released by its own undo or by cleanup.
- Deleting a parent while it is being forked: the hold (fork step 2) and the
  delete's commit are scripts on the parent's slot, so one runs first. If the
  hold does, the delete leaves a tombstone that keeps the events; the fork
  then commits and reads them, or is undone or cleaned up, which releases the
  tombstone. If the delete does, the hold finds no parent, and the fork undoes
  its index step and fails. A tombstone's keys go only in the script that
  removes its last fork, and a fork is removed from its parent only after its
  own keys are gone.
- Should a mark be lost all the same (a failover that drops the index
  primary's last writes), what is left is a parent holding a fork that never
  came to be: its events are kept longer, nothing worse. So cleanup also
  checks the forks of tombstones (up to 100 per look, in rotation, again
  every hour) and drops those older than the grace that have no record.

Other guarantees:

- Durability is the server's: with ``appendonly yes`` and ``appendfsync
  always`` an acknowledged write survives a server crash.
- The client never retries a call by itself (redis-py would re-send a script
  whose reply was lost, and run it twice). The pool checks a pooled
  connection before it sends anything on it, and reconnects one the server
  closed (a restart, ``CLIENT KILL``, an idle timeout): that sends nothing
  twice. A call that fails raises
  :class:`~chatsession.errors.StoreUnavailableError`; for a write whose reply
  was lost the message says it may have been applied: re-read before retrying.
  No ``KEYS`` or ``SCAN`` anywhere.
- Sessions with ``expires_at`` get Redis's own expiry (``PEXPIREAT``) on their
  keys, and read as gone from ``expires_at`` on, even before Redis evicts
  them. A session with forks never has a native expiry (its forks read its
  events); once expired it becomes an invisible tombstone, and goes with its
  last fork. An ``expires_at`` from the year 10000 on gets no native expiry
  (Redis cannot hold it); the session is hidden and purged all the same.
  ``purge_expired`` reads the expiry set up to ``before`` in
  batches, removes what is left, and releases parents.
- A listing reads at most ``max(10 * limit, 100)`` index members per call: a
  page that filters out many members is shorter than ``limit`` but carries a
  cursor, so paging always progresses.
- Connection failures, timeouts, a full pool past ``pool_timeout``, and a
  server that refuses service (loading, out of memory, read-only, ACL denial,
  bad credentials) raise ``StoreUnavailableError``; other error replies raise
  :class:`~chatsession.errors.StoreError` (``CorruptDataError`` for a key of the
  wrong type), never ``SessionNotFoundError``. The same store object works
  again once the server is back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple, Self, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ConflictError,
    CorruptDataError,
    InvalidArgumentError,
    InvalidURLError,
    SessionExistsError,
    SessionNotFoundError,
    StoreError,
    StoreUnavailableError,
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
from chatsession.store.redis_scripts import (
    MARK,
    NATIVE_EXPIRY_LIMIT,
    SCRIPTS,
    key_list,
    member_of,
    split_member,
    where_entry,
)

try:  # redis-py 7+: its "maintenance notifications" skip the check for dead pooled connections
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py checks them always
    MaintNotificationsConfig = None  # type: ignore[assignment, misc]

__all__ = ["RedisStore"]

log = logging.getLogger("chatsession.store")

T = TypeVar("T")
LEGACY_SEP = "\x1f"  # between the fields of an event written before the header format
_TLS_OPTIONS = frozenset(
    {
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_check_hostname",
        "ssl_ciphers",
        "ssl_min_version",
    }
)
_OPTIONS = frozenset(
    {
        "prefix",
        "socket_timeout",
        "socket_connect_timeout",
        "max_connections",
        "pool_timeout",
        "username",
        "password",
    }
    | _TLS_OPTIONS
)
#: The record fields that may be None; the ``unset`` field names those that are.
_WHO = ("user_id", "agent_id", "window_id")
_BODY = frozenset({"title", "metadata", "fingerprint"})
#: What a read needs of each ancestor's record.
_CHAIN_FIELDS = ("head", "parent_seq", "parent_id", "stamp")
_CHAIN_KEYS = tuple(name.encode() for name in _CHAIN_FIELDS)
_MAX_DB = 2**31 - 1
_SCAN_FACTOR, _SCAN_MIN = 10, 100  # a listing reads at most max(10 * limit, 100) members
_PURGE_BATCH = 200  # expiry-set members, or due marks, per batch
_DUE_BATCHES = 50  # batches of due marks finished per purge_expired call, at most
_GRACE = 300.0  # seconds before cleanup may finish a change; commits refuse after half
_RECHECK = 3600.0  # seconds between two checks of one tombstone's forks
_FORK_CHECK = 100  # forks of one tombstone checked per look
_INDEX_TRIES = 4  # calls of an index script that asks for keys it was not given
_REQUIRED_VERSION = (7, 0)

# Error replies that mean "the server refuses service right now", by code.
_REFUSALS = {
    "OOM": "is out of memory (maxmemory reached) and refuses writes",
    "READONLY": "is a read-only replica",
    "MASTERDOWN": "lost its link to the primary",
    "LOADING": "is still loading its data",
    "MISCONF": "cannot persist its data (MISCONF) and refuses writes",
    "NOPERM": "denies this user a command the store needs (ACL)",
    "NOAUTH": "requires a password",
    "WRONGPASS": "rejected the user name or password",
    "BUSY": "is busy running a long script",
    "NOREPLICAS": "has too few replicas to accept writes",
    "CLUSTERDOWN": "reports its cluster down",
    "TRYAGAIN": "asked to try again",
    "NOSCRIPT": "lost the store's Lua scripts (SCRIPT FLUSH?)",
}
_REFUSAL_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (rexc.OutOfMemoryError, "OOM"),
    (rexc.ReadOnlyError, "READONLY"),
    (rexc.MasterDownError, "MASTERDOWN"),
    (rexc.NoPermissionError, "NOPERM"),
    (rexc.NoScriptError, "NOSCRIPT"),
    (rexc.ClusterDownError, "CLUSTERDOWN"),
    (rexc.TryAgainError, "TRYAGAIN"),
)


class _Change(NamedTuple):
    """A change across slots under way: its incarnation and its mark on the due set."""

    member: str  # ID#STAMP
    t: str  # when it began (server clock), for the commit's deadline
    due: str  # its score in the due set, to clear the mark it set and no other


class _Node(NamedTuple):
    """One session of a fork chain as read for a read: its own events are ``base+1..head``."""

    session_id: str
    head: int
    base: int  # parent_seq: the last seq it inherits
    parent: str  # '' for a root
    stamp: str


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Address(NamedTuple):
    """Where the server is, parsed from a ``redis://`` URL."""

    scheme: str
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    query: dict[str, str]


def _parse_address(url: object) -> _Address:
    """Split a store URL into its parts, refusing anything that would be ignored or guessed."""
    if not isinstance(url, str):
        raise InvalidURLError(f"a redis store URL must be a string, not {type(url).__name__}")
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        # an unencoded '/', '?' or '#' in a password ends the netloc early: the
        # rest of the credentials then shows up where no '@' belongs
        misplaced = (
            "@" in parts.path or "@" in parts.fragment or "@" in parts.query.partition("=")[0]
        )
        port = None if misplaced else parts.port
    except ValueError as exc:
        reason = "its port must be a number from 1 to 65535" if "port" in str(exc).lower() else exc
        raise InvalidURLError(
            f"redis URL {shown} cannot be used: {reason}; e.g. redis://127.0.0.1:6379/0"
        ) from None
    if misplaced:
        raise InvalidURLError(
            f"redis URL {shown}: its user name or password holds '/', '?' or '#'; "
            "percent-encode them (%2F, %3F, %23), or pass password= as an option"
        )
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise InvalidURLError(f"redis URL {shown} must start with redis:// or rediss://")
    if not parts.hostname:
        raise InvalidURLError(f"redis URL {shown} names no host; e.g. redis://127.0.0.1:6379/0")
    if port == 0:
        raise InvalidURLError(f"redis URL {shown}: its port must be a number from 1 to 65535")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if path and not (path.isascii() and path.isdigit() and int(path) <= _MAX_DB):
        raise InvalidURLError(
            f"redis URL {shown}: the database after the host must be a number "
            f"(0 to {_MAX_DB}), as in redis://127.0.0.1:6379/0"
        )
    if parts.fragment:
        raise InvalidURLError(f"redis URL {shown} has a '#' part; remove it")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise InvalidURLError(
            f"redis URL {shown} has a malformed query; write options as ?name=value&name=value"
        ) from None
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidURLError(f"redis URL {shown} gives option(s) {repeated} more than once")
    return _Address(
        scheme=parts.scheme.lower(),
        host=parts.hostname,
        port=port or 6379,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        query=dict(pairs),
    )


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _seconds(name: str, value: Any, *, zero: bool) -> float:
    """A timeout option: a finite number of seconds, > 0 (or >= 0 when ``zero``)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        least = ">= 0" if zero else "> 0"
        raise InvalidURLError(
            f"redis option {name}={value!r} must be a finite number of seconds {least}"
        )
    return number


def _count(name: str, value: Any) -> int:
    """A count option: a whole number >= 1."""
    text = _option_text(value)
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise InvalidURLError(f"redis option {name}={value!r} must be a whole number >= 1")
    return int(text)


def _tls_value(name: str, value: str) -> Any:
    if name == "ssl_cert_reqs":
        if value.lower() not in ("none", "optional", "required"):
            raise InvalidURLError(
                f"redis option ssl_cert_reqs must be none, optional or required, not {value!r}"
            )
        return value.lower()
    if name == "ssl_check_hostname":
        flag = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if value.lower() not in flag:
            raise InvalidURLError(
                f"redis option ssl_check_hostname must be true or false, not {value!r}"
            )
        return flag[value.lower()]
    if name == "ssl_min_version":
        names = {v.name: v for v in ssl.TLSVersion if v.name.startswith("TLSv1_")}
        if value not in names:
            raise InvalidURLError(
                f"redis option ssl_min_version must be one of {sorted(names)}, not {value!r}"
            )
        return names[value]
    return value


def _entry(seq: int, event: NewEvent) -> str:
    """One event as a list item: a JSON header ``[seq,type,ts,turn_id,version]``, a
    line break, then the payload as given.

    The header is ASCII JSON (``json.dumps`` escapes every line break), so
    the first line break ends it whatever the payload or the strings hold.
    """
    ts = float(event.ts)  # read back as a float on every backend
    header = json.dumps([seq, event.type, ts, event.turn_id, event.schema_version])
    return f"{header}\n{event.data}"


def _event(seq: int, header: Any, data: str) -> StoredEvent:
    """The event ``seq`` from its list item's header and payload (see :func:`_entry`)."""
    got, kind, ts, turn, version = header
    if got != seq or type(got) is not int:
        raise ValueError(f"the item at seq {seq} says it is seq {got!r}")
    if (
        type(kind) is not str
        or type(ts) not in (int, float)
        or not (turn is None or type(turn) is str)
        or type(version) is not int
    ):
        raise TypeError(f"a header field has the wrong type: {header!r}"[:200])
    return StoredEvent(seq, kind, float(ts), turn, data, version)


class RedisStore:
    """The Redis store (``redis://``, ``rediss://``). See the module docstring.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...``
            (query options are read by :meth:`from_url`, not here).
        prefix: Put before every key.
        socket_timeout: Seconds a call waits for the server (> 0).
        socket_connect_timeout: Seconds a connection attempt waits (> 0).
        max_connections: The size of the connection pool (>= 1).
        pool_timeout: Seconds a call waits for a free connection (>= 0).
        username: The user name; overrides the URL's.
        password: The password; overrides the URL's. Never shown in
            :attr:`url`, ``repr`` or messages.
        tls: TLS settings for ``rediss://`` (``ssl_*`` options, already parsed).

    Raises:
        InvalidURLError: A malformed URL or a bad option value.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "chatsession:",
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 5.0,
        max_connections: int = 50,
        pool_timeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        tls: Mapping[str, Any] | None = None,
    ) -> None:
        address = _parse_address(url)
        if address.query:
            raise InvalidURLError(
                f"redis URL {redact_url(url)}: pass options to RedisStore.from_url (or "
                "open_store), or as keyword arguments"
            )
        if (
            not isinstance(prefix, str)
            or any(c in prefix for c in "{}")
            or any(ord(c) < 32 or c == "\x7f" for c in prefix)
        ):
            raise InvalidURLError(
                f"redis key prefix {prefix!r} must be a string without braces or control characters"
            )
        for name, value in (("username", username), ("password", password)):
            if value is not None and not isinstance(value, str):
                raise InvalidURLError(f"redis option {name} must be a string")
        tls = dict(tls or {})
        if tls and address.scheme != "rediss":
            raise InvalidURLError(
                f"TLS option(s) {sorted(tls)} need a rediss:// URL; {redact_url(url)} is plain TCP"
            )
        self.prefix = prefix
        self._socket_timeout = _seconds("socket_timeout", socket_timeout, zero=False)
        self._connect_timeout = _seconds(
            "socket_connect_timeout", socket_connect_timeout, zero=False
        )
        self._max_connections = _count("max_connections", max_connections)
        self._pool_timeout = _seconds("pool_timeout", pool_timeout, zero=True)
        self._connection: dict[str, Any] = {
            "host": address.host,
            "port": address.port,
            "db": address.db,
            "username": username if username is not None else address.username,
            "password": password if password is not None else address.password,
            **tls,
        }
        self._tls = address.scheme == "rediss"
        host = f"[{address.host}]" if ":" in address.host else address.host
        user = self._connection["username"] or ""
        secret = ":***" if address.password else ""
        login = f"{user}{secret}@" if user or secret else ""
        netloc = f"{login}{host}:{address.port}"
        #: The store's URL, password masked (``***``); shows the prefix.
        self.url = urlunsplit((address.scheme, netloc, f"/{address.db}", f"prefix={prefix}", ""))
        self.address = f"{host}:{address.port}"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._grace = _GRACE
        self._recheck = _RECHECK
        self._server_checked = False
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``redis://...`` (see the module docstring for options).

        Args:
            url: The store URL, with query options.
            **options: Options that override the URL's (``password`` among
                them, to keep it out of the URL).

        Raises:
            InvalidURLError: A malformed URL, an unknown option or a bad value.
        """
        address = _parse_address(url)
        query = dict(address.query)
        query.update({name: _option_text(value) for name, value in options.items()})
        unknown = set(query) - _OPTIONS
        if unknown:
            raise InvalidURLError(
                f"unknown redis option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}"
            )
        kwargs: dict[str, Any] = {}
        if "prefix" in query:
            kwargs["prefix"] = query["prefix"]
        for name in ("socket_timeout", "socket_connect_timeout"):
            if name in query:
                kwargs[name] = _seconds(name, query[name], zero=False)
        if "pool_timeout" in query:
            kwargs["pool_timeout"] = _seconds("pool_timeout", query["pool_timeout"], zero=True)
        if "max_connections" in query:
            kwargs["max_connections"] = _count("max_connections", query["max_connections"])
        for name in ("username", "password"):
            if name in query:
                kwargs[name] = query[name]
        tls = {name: _tls_value(name, query[name]) for name in _TLS_OPTIONS if name in query}
        parts = urlsplit(url)
        return cls(urlunsplit(parts._replace(query="")), tls=tls, **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing --------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        if self._client is None:
            extra: dict[str, Any] = {}
            if MaintNotificationsConfig is not None:
                # With them on, redis-py hands out pooled connections the server
                # has closed (restart, CLIENT KILL, idle timeout) without noticing,
                # and the call fails. Off, the pool sees the closed socket before
                # sending anything and reconnects: safe, as nothing was sent.
                extra["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
            pool = aioredis.BlockingConnectionPool(
                connection_class=SSLConnection if self._tls else Connection,
                max_connections=self._max_connections,
                timeout=self._pool_timeout,
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._connect_timeout,
                # never re-send a call: a lost reply to a script that ran would run it twice
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
                **self._connection,
                **extra,
            )
            self._client = aioredis.Redis.from_pool(pool)
            for name, source in SCRIPTS.items():
                self._scripts[name] = self._client.register_script(source)
        return self._client

    async def _run(
        self,
        fn: Callable[[aioredis.Redis], Awaitable[T]],
        *,
        write: bool = False,
        keys: Sequence[str] = (),
    ) -> T:
        """Run Redis calls, translating the driver's errors into ours (``keys``: for messages)."""
        client = self._redis()
        try:
            if not self._server_checked:
                await self._check_server(client)
            return await fn(client)
        except (rexc.RedisError, OSError) as exc:
            raise self._translate(exc, write, keys) from exc

    async def _check_server(self, client: aioredis.Redis) -> None:
        try:
            info = await client.info("server")
        except rexc.NoPermissionError:  # INFO denied by an ACL: a script will tell
            self._server_checked = True
            return
        version = str(info.get("redis_version", ""))
        numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
        if numbers and numbers < _REQUIRED_VERSION:
            raise StoreError(
                f"Redis at {self.address} runs version {version}, but chatsession's Redis "
                "store needs Redis 7.0 or later (it uses PEXPIRETIME); upgrade the server"
            )
        self._server_checked = True

    def _translate(self, exc: BaseException, write: bool, keys: Sequence[str] = ()) -> StoreError:
        where = f"Redis at {self.address}"
        maybe = (
            " The write may or may not have been applied: re-read before retrying." if write else ""
        )
        message = str(exc)
        if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
            return StoreUnavailableError(
                f"{where} refused the credentials ({message}); check the user and password "
                "in the store URL"
            )
        if isinstance(exc, rexc.BusyLoadingError):
            return StoreUnavailableError(f"{where} is still loading its data; retry in a moment")
        if isinstance(exc, rexc.ConnectionError) and "No connection available" in message:
            return StoreUnavailableError(
                f"all {self._max_connections} connections to {where} stayed busy for "
                f"{self._pool_timeout:g} s; raise max_connections or pool_timeout in the store "
                "URL, or send fewer calls at once"
            )
        if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | OSError):
            return StoreUnavailableError(
                f"{where} is unreachable ({type(exc).__name__}: {message}); check that the "
                f"server is running and the URL is right, then retry.{maybe}"
            )
        if isinstance(exc, rexc.ResponseError):
            code = self._error_code(exc)
            if code in _REFUSALS:
                return StoreUnavailableError(
                    f"{where} {_REFUSALS[code]} ({code} {message}); fix the server's condition "
                    "(see its log), then retry"
                )
            if code == "WRONGTYPE":
                named = f" (one of {', '.join(keys)})" if keys else ""
                return CorruptDataError(
                    f"a key under prefix {self.prefix!r} at {where}{named} holds the wrong kind "
                    f"of value ({message}); another program may write under this prefix: give "
                    "chatsession a prefix of its own, and remove or restore the damaged key"
                )
            if "unknown command" in message.lower() or "unknown redis command" in message.lower():
                return StoreError(
                    f"{where} does not know a command the store needs ({message}); chatsession "
                    "needs Redis 7.0 or later with scripting and no renamed commands"
                )
            return StoreError(
                f"{where} answered with an error ({message}); check the server's log and "
                "configuration"
            )
        return StoreError(f"{where} failed ({type(exc).__name__}: {message})")

    @staticmethod
    def _error_code(exc: rexc.ResponseError) -> str:
        for cls, code in _REFUSAL_CLASSES:
            if isinstance(exc, cls):
                return code
        status = getattr(exc, "status_code", None)
        if isinstance(status, str) and status:
            return status
        message = str(exc)
        first = message.split(" ", 1)[0]
        if first.isupper():
            return first
        # an error of a pipelined command: "Command # 2 (LLEN k) of pipeline caused error: ('CODE ..."
        inner = re.search(r"caused error: \(?['\"]?([A-Z]+) ", message)
        return inner.group(1) if inner else ""

    async def _script(
        self, name: str, args: list[Any], keys: Sequence[str] = (), *, write: bool = True
    ) -> list[Any]:
        async def work(r: aioredis.Redis) -> list[Any]:
            result: list[Any] = await self._scripts[name](keys=list(keys), args=args, client=r)
            return result

        return await self._run(work, write=write, keys=keys)

    def _keys(self, session_id: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}{{{session_id}}}"
        return f"{base}:rec", f"{base}:ev", f"{base}:blob", f"{base}:forks"

    def _index(self, kind: str = "all", value: str | None = None) -> str:
        return f"{self.prefix}{{idx}}:{kind}" + (f":{value}" if value is not None else "")

    @property
    def _fixed(self) -> list[str]:
        """The keys every index script gets first: ``where``, ``due``, ``expiry``."""
        return [self._index("where"), self._index("due"), self._index("expiry")]

    def _index_keys(self, record: SessionRecord) -> list[str]:
        keys = [self._index()]
        for kind, value in (
            ("user", record.user_id),
            ("agent", record.agent_id),
            ("window", record.window_id),
        ):
            if value is not None:
                keys.append(self._index(kind, value))
        return keys

    async def _index_call(
        self,
        name: str,
        member: str,
        listing: Sequence[str],
        args: Sequence[Any],
        known: Sequence[str] = (),
    ) -> list[Any]:
        """Run an index script with ``listing`` (and ``known``) as its index keys.

        A script that finds the entry in an index it was not given changes
        nothing and names the keys; it is called again with them.
        """
        keys = [*self._fixed, *listing]
        keys += [k for k in dict.fromkeys(known) if k not in keys]
        for _ in range(_INDEX_TRIES):
            result = await self._script(name, [member, *args], keys)
            if result[0] != -1:
                return result
            keys += [k for k in key_list(result[1]) if k not in keys]
        raise StoreError(
            f"the index entry of session {split_member(member)[0]!r} kept changing while the store "
            "was updating it; retry"
        )

    def _too_late(self, what: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"{what} took more than {self._grace / 2:g} s between its steps on Redis at "
            f"{self.address} (a slow or overloaded connection), so it was not applied; retry"
        )

    # -- records ---------------------------------------------------------------

    @staticmethod
    def _fields(record: SessionRecord) -> dict[str, str]:
        """The record as hash fields.

        ``user_id``, ``agent_id`` and ``window_id`` are stored as they are
        (``""`` for None, as older versions of this store read them) and
        ``unset`` names those that are None, so ``""`` and None each read back
        as themselves. ``title``, ``metadata`` and ``fingerprint`` are JSON in
        ``body``.
        """
        body = json.dumps(
            {"title": record.title, "metadata": record.metadata, "fingerprint": record.fingerprint},
            separators=(",", ":"),
        )
        return {
            "id": record.id,
            "user_id": record.user_id or "",
            "agent_id": record.agent_id or "",
            "window_id": record.window_id or "",
            "unset": " ".join(name for name in _WHO if getattr(record, name) is None),
            "state": record.state,
            "created_at": repr(record.created_at),
            "updated_at": repr(record.updated_at),
            "expires_at": "" if record.expires_at is None else repr(record.expires_at),
            "body": body,
        }

    @staticmethod
    def _expiry(record: SessionRecord) -> tuple[str, str]:
        """``expires_at`` as script arguments: seconds, and milliseconds for ``PEXPIREAT``.

        The milliseconds are ``""`` (no native expiry) from
        :data:`~chatsession.store.redis_scripts.NATIVE_EXPIRY_LIMIT` on.
        """
        if record.expires_at is None:
            return "", ""
        native = record.expires_at < NATIVE_EXPIRY_LIMIT
        return repr(record.expires_at), str(math.floor(record.expires_at * 1000)) if native else ""

    def _damaged(self, session_id: str, what: str) -> CorruptDataError:
        return CorruptDataError(
            f"the Redis record of session {session_id!r} ({self._keys(session_id)[0]}) is "
            f"damaged: {what}; restore the session from a backup, or remove its keys "
            f"({self.prefix}{{{session_id}}}:*)"
        )

    def _record(self, raw: dict[bytes, bytes], session_id: str) -> SessionRecord:
        try:
            f = {k.decode(): v.decode() for k, v in raw.items()}
        except UnicodeDecodeError as exc:
            raise self._damaged(session_id, f"a field is not UTF-8 ({exc})") from exc
        try:
            if f["id"] != session_id:
                raise ValueError(f"its id field says {f['id'][:140]!r}")
            head, version, fork_seq = int(f["head"]), int(f["version"]), int(f["parent_seq"])
            if min(head, version, fork_seq) < 0:
                raise ValueError(
                    f"head, version and parent_seq must be >= 0: {f['head']}, "
                    f"{f['version']}, {f['parent_seq']}"
                )
            body = json.loads(f["body"])
            if type(body) is not dict or not set(body) <= _BODY:
                raise ValueError("body is not an object of title, metadata and fingerprint")
            unset = f.get("unset")
            who: dict[str, Any] = {
                name: (f[name] or None)  # written before ``unset``: "" was None
                if unset is None
                else (None if name in unset.split() else f[name])
                for name in _WHO
            }
            parent = (
                ParentRef(session_id=self._stored_id(f["parent_id"]), seq=fork_seq)
                if f.get("parent_id")
                else None
            )
            return SessionRecord(
                id=session_id,
                state=f["state"],  # type: ignore[arg-type]
                created_at=float(f["created_at"]),
                updated_at=float(f["updated_at"]),
                expires_at=float(f["expires_at"]) if f["expires_at"] else None,
                parent=parent,
                head=head,
                version=version,
                **who,
                **body,
            )
        except KeyError as exc:
            raise self._damaged(session_id, f"the field {exc} is missing") from exc
        except (ValueError, TypeError, RecursionError, InvalidArgumentError) as exc:
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise self._damaged(session_id, reason) from exc

    @staticmethod
    def _stored_id(value: str) -> str:
        """An id read back from Redis (a parent id): a bad one is damage, not a caller's mistake."""
        try:
            return validate_id(value, "parent id")
        except InvalidArgumentError as exc:
            raise ValueError(str(exc)) from None

    def _expires(self, raw: dict[bytes, bytes], session_id: str) -> float | None:
        value = raw.get(b"expires_at")
        if not value:
            return None
        try:
            return float(value)
        except ValueError:
            raise self._damaged(session_id, f"expires_at is {value[:40]!r}") from None

    def _visible(self, raw: dict[bytes, bytes], session_id: str, at: float | None = None) -> None:
        if not raw or raw.get(b"deleted") == b"1":
            raise SessionNotFoundError(session_id)
        expires = self._expires(raw, session_id)
        if expires is not None and expires <= (now() if at is None else at):
            raise SessionNotFoundError(session_id, "expired")

    async def _raw(self, session_id: str) -> dict[bytes, bytes]:
        rec = self._keys(session_id)[0]

        async def work(r: aioredis.Redis) -> dict[bytes, bytes]:
            return cast(dict[bytes, bytes], await r.hgetall(rec))

        return await self._run(work, keys=[rec])

    def _status(
        self, result: list[Any], session_id: str, expected: int, what: str = "head seq"
    ) -> int:
        code = int(result[0])
        if code == -1:
            raise SessionNotFoundError(session_id)
        if code == -2:
            raise SessionNotFoundError(session_id, "expired")
        if code == -3:
            raise ConflictError(session_id, expected, int(result[1]), what)
        if code == -5:
            raise self._stray(session_id, int(result[1]), int(result[2]), int(result[3]))
        if code == -8:
            raise self._damaged(session_id, f"its field {_text(result[1])!r} is missing or bad")
        return code

    def _stray(
        self, session_id: str, head: int, length: int, base: int = 0, *, reading: str = ""
    ) -> CorruptDataError:
        """The session's event list does not end at its head (a hand edit, a partial restore)."""
        own = f"{head - base} (its events {base + 1}..{head})"
        what = f"reading {reading!r}" if reading else "nothing was written"
        return CorruptDataError(
            f"session {session_id!r}: its event list {self._keys(session_id)[1]} holds "
            f"{length} item(s) where its record says {own}: events are missing or stray items "
            f"follow the head ({what}); restore the session from a backup, or repair the list "
            "to match the head"
        )

    async def _intent(self, stored: SessionRecord, stamp: str) -> _Change:
        """Create and fork, index step: list the new incarnation and mark it due."""
        member = member_of(stored.id, stamp)
        expires, _ = self._expiry(stored)
        parent = stored.parent.session_id if stored.parent else ""
        args = [member, repr(stored.created_at), expires, parent, self._grace]
        t, due = await self._script("intent", args, [*self._fixed, *self._index_keys(stored)])
        return _Change(member, _text(t), _text(due))

    async def _create_record(self, stored: SessionRecord, stamp: str, t: str) -> int:
        """Create and fork, commit: 1 written, 0 the id is taken, -6 too late."""
        fields = self._fields(stored)
        fields.update(
            {
                "head": str(stored.head),
                "version": "1",
                "deleted": "0",
                "stamp": stamp,
                "parent_id": stored.parent.session_id if stored.parent else "",
                "parent_seq": str(stored.parent.seq) if stored.parent else "0",
            }
        )
        _, expires_ms = self._expiry(stored)
        args = [t, self._grace / 2, expires_ms, *(x for pair in fields.items() for x in pair)]
        return int((await self._script("create_record", args, self._keys(stored.id)))[0])

    async def _disarm(self, change: _Change) -> None:
        await self._script("disarm", [change.member, change.due], self._fixed)

    async def _place(
        self, member: str, due: str, record: SessionRecord, known: Sequence[str] = ()
    ) -> None:
        """Make the index entry of ``member`` follow ``record`` (see ``place`` in the scripts)."""
        listing = self._index_keys(record)
        expires, _ = self._expiry(record)
        args = [record.version, repr(record.created_at), expires, due, len(listing)]
        await self._index_call("place", member, listing, args, known)

    async def _release(self, parent_id: str, member: str) -> bool:
        """Drop ``member`` from ``parent_id``'s forks, and every tombstone this empties.

        Returns:
            Whether ``parent_id`` itself went (it was a tombstone and had no
            other forks).
        """
        if not parent_id:
            return False
        result = await self._script("release", [member], self._keys(parent_id))
        if int(result[0]) != 1:
            return False
        while True:
            gone = member_of(parent_id, _text(result[2]))
            await self._index_call("forget", gone, [], [])
            parent_id = _text(result[1])
            if not parent_id:
                return True
            result = await self._script("release", [gone], self._keys(parent_id))
            if int(result[0]) != 1:
                return True

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)
        stamp = secrets.token_hex(8)
        change = await self._intent(stored, stamp)
        code = await self._create_record(stored, stamp, change.t)
        if code != 1:
            await self._index_call("forget", change.member, self._index_keys(stored), [])
            if code == -6:
                raise self._too_late(f"creating session {stored.id!r}")
            raise SessionExistsError(stored.id)
        await self._disarm(change)
        return stored

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)
        raw = await self._raw(session_id)
        self._visible(raw, session_id)
        return self._record(raw, session_id)

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        check_record(record)
        check_version(expected_version)
        raw = await self._raw(record.id)
        self._visible(raw, record.id)
        current = self._record(raw, record.id)
        if current.version != expected_version:
            raise ConflictError(record.id, expected_version, current.version, "version")
        stamp = _text(raw.get(b"stamp", b""))
        new = updated_record(current, record)
        old_keys, new_keys = self._index_keys(current), self._index_keys(new)
        expires, expires_ms = self._expiry(new)
        member = member_of(record.id, stamp)
        args: list[Any] = [member, repr(new.created_at), expires, self._grace]
        t, due = await self._script("widen", args, [*self._fixed, *new_keys])
        fields = self._fields(new)
        del fields["id"], fields["created_at"]
        args = [repr(now()), expected_version, stamp, _text(t), self._grace / 2, expires_ms]
        args.extend(x for pair in fields.items() for x in pair)
        result = await self._script("update_record", args, self._keys(record.id))
        code = int(result[0])
        if code < 0:  # nothing was written: put the index entry back as it was
            await self._place(member, _text(due), current, new_keys)
            if code == -6:
                raise self._too_late(f"updating session {record.id!r}")
            self._status(result, record.id, expected_version, "version")
        await self._place(member, _text(due), new, old_keys)
        return new.model_copy(update={"head": current.head})

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        validate_id(session_id)
        for _ in range(_INDEX_TRIES):  # -7: the session read was replaced before the delete ran
            raw = await self._raw(session_id)
            self._visible(raw, session_id)
            record = self._record(raw, session_id)
            stamp = _text(raw.get(b"stamp", b""))
            member = member_of(session_id, stamp)
            t, _ = await self._script("widen", [member, "", "", self._grace], self._fixed)
            args = [repr(now()), stamp, _text(t), self._grace / 2]
            result = await self._script("delete_record", args, self._keys(session_id))
            code = int(result[0])
            if code != -7:
                break
        if code == -7:
            raise SessionNotFoundError(session_id)
        if code == -6:
            raise self._too_late(f"deleting session {session_id!r}")
        self._status(result, session_id, 0)
        listing = self._index_keys(record)
        if code == 1:  # a tombstone, kept for its forks
            parent = record.parent.session_id if record.parent else ""
            await self._index_call("bury", member, listing, [parent])
        else:
            await self._release(_text(result[1]), member)
            await self._index_call("forget", member, listing, [])

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

        Reads at most ``max(10 * limit, 100)`` index members: when filters or
        expired sessions reject many, the page is shorter than ``limit`` but
        ``next_cursor`` still moves past everything read.
        """
        check_limit(limit)
        check_filters(user_id, agent_id, window_id, state)
        if cursor is not None and not isinstance(cursor, str):
            raise InvalidArgumentError(
                f"cursor must be a next_cursor from list_sessions, not {type(cursor).__name__}"
            )
        position = decode_cursor(cursor) if cursor else None
        if user_id is not None:
            index = self._index("user", user_id)
        elif agent_id is not None:
            index = self._index("agent", agent_id)
        elif window_id is not None:
            index = self._index("window", window_id)
        else:
            index = self._index()
        at = now()
        budget = max(_SCAN_FACTOR * limit, _SCAN_MIN)
        found: list[SessionRecord] = []
        scanned = 0
        exhausted = False
        while len(found) < limit and scanned < budget:
            want = min(budget - scanned, max(2 * (limit - len(found)), 50))
            args = (
                ["+inf", "", want]
                if position is None
                else [repr(position[0]), position[1] + MARK, want]
            )
            flat = await self._script("page", args, [index], write=False)
            members = [(split_member(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]
            ids = [sid for (sid, _), _ in members]
            raws = await self._run(partial(self._hgetall_many, ids=ids))
            taken = 0
            for ((sid, stamp), score), raw in zip(members, raws, strict=True):
                taken += 1
                position = (score, sid)
                record = self._listed(sid, stamp, raw, at)
                if record is None or (
                    (user_id is not None and record.user_id != user_id)
                    or (agent_id is not None and record.agent_id != agent_id)
                    or (window_id is not None and record.window_id != window_id)
                    or (state is not None and record.state != state)
                ):
                    continue
                found.append(record)
                if len(found) == limit:
                    break
            scanned += taken
            if len(members) < want and taken == len(members):
                exhausted = True
                break
        if exhausted or position is None:
            return Page(found, None)
        score, sid = position
        return Page(found, encode_cursor(SessionRecord(id=sid, created_at=score)))

    def _listed(
        self, session_id: str, stamp: str, raw: dict[bytes, bytes] | Exception, at: float
    ) -> SessionRecord | None:
        """The record a listing shows for the member ``ID#STAMP``, or None.

        None for a half-made, removed or expired session (or one Redis evicted
        and cleanup has not purged yet), and for a damaged one, which is
        logged as a warning and left out so that the rest of the listing works.
        """
        try:
            if isinstance(raw, Exception):
                raise self._translate(raw, False, [self._keys(session_id)[0]])
            if not raw or raw.get(b"deleted") == b"1":
                return None
            if b"stamp" not in raw:
                raise self._damaged(session_id, "the field 'stamp' is missing")
            if raw[b"stamp"] != stamp.encode():
                return None  # another incarnation of the id
            expires = self._expires(raw, session_id)
            if expires is not None and expires <= at:
                return None
            return self._record(raw, session_id)
        except CorruptDataError as exc:
            log.warning("listing sessions: left out session %r: %s", session_id, exc)
            return None

    async def _hgetall_many(
        self, r: aioredis.Redis, ids: list[str]
    ) -> list[dict[bytes, bytes] | Exception]:
        if not ids:
            return []
        pipe = r.pipeline(transaction=False)
        for sid in ids:
            pipe.hgetall(self._keys(sid)[0])
        raws: list[dict[bytes, bytes] | Exception] = await pipe.execute(raise_on_error=False)
        return raws

    # -- events ----------------------------------------------------------------

    async def append(self, session_id: str, events: Sequence[NewEvent], expected_seq: int) -> int:
        """See :meth:`Store.append`.

        One script: it checks the session, the head and that the event list
        ends at the head (a stray or missing item would put the new events at
        the wrong seqs: that is reported as :class:`CorruptDataError` and
        nothing is written), pushes the events and moves the head.
        """
        check_append(events, expected_seq)
        validate_id(session_id)
        rec, ev, _, _ = self._keys(session_id)
        entries = [_entry(seq, e) for seq, e in enumerate(events, expected_seq + 1)]
        result = await self._script("append", [expected_seq, repr(now()), *entries], [rec, ev])
        return self._status(result, session_id, expected_seq)

    async def _node(
        self, session_id: str, *, events: bool, whole: bool = True
    ) -> tuple[dict[bytes, bytes], int]:
        """The record of ``session_id`` and (when ``events``) the length of its event list.

        Both in one ``MULTI``/``EXEC``: an append in between cannot make them
        disagree. Unless ``whole``, only the fields a fork chain needs.
        """
        rec, ev, _, _ = self._keys(session_id)

        async def work(r: aioredis.Redis) -> tuple[dict[bytes, bytes], int]:
            pipe = r.pipeline(transaction=events)
            if whole:
                pipe.hgetall(rec)
            else:
                pipe.hmget(rec, _CHAIN_FIELDS)
            if events:
                pipe.llen(ev)
            got = await pipe.execute()
            if whole:
                raw = got[0]
            else:
                raw = {k: v for k, v in zip(_CHAIN_KEYS, got[0], strict=True) if v is not None}
            return cast(dict[bytes, bytes], raw), (int(got[1]) if events else -1)

        return await self._run(work, keys=[rec, ev] if events else [rec])

    def _chain_node(self, raw: dict[bytes, bytes], session_id: str) -> _Node:
        """One session of a fork chain, from its record's fields."""
        try:
            head = int(raw[b"head"])
            base = int(raw.get(b"parent_seq") or b"0")
            parent = (raw.get(b"parent_id") or b"").decode()
            stamp = (raw.get(b"stamp") or b"").decode()
            if parent:
                self._stored_id(parent)
            if head < 0 or base < 0:
                raise ValueError(f"head {head} and parent_seq {base} must be >= 0")
        except KeyError as exc:
            raise self._damaged(session_id, f"the field {exc} is missing") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._damaged(session_id, str(exc)[:300]) from exc
        return _Node(session_id, head, base, parent, stamp)

    async def _lineage(self, session_id: str, *, events: bool = False) -> list[_Node]:
        """The session and its ancestors, nearest first.

        A fork chain that loops back on itself (a hand edit, a bad restore),
        names a missing parent or holds a damaged record is
        :class:`CorruptDataError`. With ``events``, each session's event list
        must also hold exactly its own events (``parent_seq+1..head``: no
        stray item after the head, none missing), and each fork point must
        lie within its parent's events.
        """
        raw, length = await self._node(session_id, events=events)
        self._visible(raw, session_id)
        self._record(raw, session_id)  # damage anywhere in it is reported by every call
        node = self._chain_node(raw, session_id)
        chain, lengths = [node], [length]
        seen = {session_id}
        while node.parent:
            child, parent = node, node.parent
            if parent in seen:
                path = " -> ".join([n.session_id for n in chain] + [parent])
                raise CorruptDataError(
                    f"session {session_id!r}: its fork chain loops back on itself ({path}); "
                    "restore the sessions' records from a backup, or repair their parent_id "
                    "fields"
                )
            seen.add(parent)
            raw, length = await self._node(parent, events=events, whole=False)
            if not raw:
                await self._check_still_there(chain[0])  # deleted meanwhile: not damage
                raise CorruptDataError(
                    f"session {session_id!r}: {child.session_id!r} is a fork of {parent!r}, whose "
                    "record is missing from Redis; restore it from a backup"
                )
            node = self._chain_node(raw, parent)
            chain.append(node)
            lengths.append(length)
        if events:
            for i, (child, length) in enumerate(zip(chain, lengths, strict=True)):
                if length != child.head - child.base:
                    raise self._stray(
                        child.session_id, child.head, length, child.base, reading=session_id
                    )
                up = chain[i + 1] if i + 1 < len(chain) else None
                if up is not None and child.base > up.head:
                    raise CorruptDataError(
                        f"session {session_id!r}: {child.session_id!r} is a fork of "
                        f"{up.session_id!r} at seq {child.base}, past that session's head "
                        f"{up.head}; restore the sessions from a backup"
                    )
        return chain

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`.

        Every session of the fork chain is checked first: its event list must
        hold exactly the events its record counts (no stray item after the
        head, none missing), and every event must carry its own seq.
        Anything else is :class:`CorruptDataError`.
        """
        validate_id(session_id)
        check_read(after_seq, upto_seq, batch_size)
        chain = await self._lineage(session_id, events=True)
        bases = {node.session_id: node.base for node in chain}
        lineage = [(node.session_id, node.base) for node in chain]
        for seg_id, lo, hi in fork_segments(lineage, chain[0].head, after_seq, upto_seq):
            key = self._keys(seg_id)[1]
            base = bases[seg_id]
            start = lo
            while start < hi:
                stop = min(hi, start + batch_size)

                async def work(
                    r: aioredis.Redis, key: str = key, lo: int = start - base, hi: int = stop - base
                ) -> list[bytes]:
                    return cast(list[bytes], await r.lrange(key, lo, hi - 1))

                items = await self._run(work, keys=[key])
                if len(items) != stop - start:
                    await self._check_still_there(chain[0])
                    raise CorruptDataError(
                        f"session {session_id!r}: events {start + 1}..{stop} of {seg_id!r} are "
                        f"missing from Redis ({key} gave {len(items)}); restore from a backup"
                    )
                yield self._decode(session_id, seg_id, start, items)
                start = stop

    async def _check_still_there(self, node: _Node) -> None:
        """Raise not-found when the session being read was deleted (or replaced) meanwhile."""
        raw = await self._raw(node.session_id)
        self._visible(raw, node.session_id)
        if (raw.get(b"stamp") or b"").decode() != node.stamp:
            raise SessionNotFoundError(node.session_id, "deleted while it was being read")

    def _decode(
        self, session_id: str, seg_id: str, start: int, items: list[bytes]
    ) -> list[StoredEvent]:
        """Events ``start+1...`` of ``seg_id`` (read for ``session_id``) from their list items.

        See :func:`_entry` for the format.
        """
        try:
            texts = [item.decode() for item in items]
        except UnicodeDecodeError:
            return self._decode_each(session_id, seg_id, start, items)
        if not all(text[:1] == "[" for text in texts):
            return self._decode_each(session_id, seg_id, start, items)
        cut = [text.split("\n", 1) for text in texts]
        try:
            headers = json.loads("[" + ",".join(c[0] for c in cut) + "]")
            out = [
                _event(seq, header, c[1])
                for seq, header, c in zip(
                    range(start + 1, start + 1 + len(cut)), headers, cut, strict=True
                )
            ]
        except (ValueError, TypeError, IndexError, RecursionError):
            return self._decode_each(session_id, seg_id, start, items)  # finds the damaged one
        return out

    def _decode_each(
        self, session_id: str, seg_id: str, start: int, items: list[bytes]
    ) -> list[StoredEvent]:
        """One by one: reads events of the older format, and names a damaged event's seq."""
        out = []
        for seq, item in enumerate(items, start + 1):
            try:
                text = item.decode()
                if text[:1] == "[":
                    header, data = text.split("\n", 1)
                    out.append(_event(seq, json.loads(header), data))
                else:  # written before the header format: type, ts, turn, version, data
                    kind, ts, turn, version, data = text.split(LEGACY_SEP, 4)
                    out.append(StoredEvent(seq, kind, float(ts), turn or None, data, int(version)))
            except (ValueError, TypeError, IndexError, RecursionError, UnicodeDecodeError) as exc:
                inherited = f" (inherited from {seg_id!r})" if seg_id != session_id else ""
                raise CorruptDataError(
                    f"session {session_id!r}, seq {seq}{inherited}: the stored event in "
                    f"{self._keys(seg_id)[1]} is damaged ({str(exc)[:200]}); restore it "
                    "from a backup"
                ) from exc
        return out

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`.

        Four steps (see the module docstring): the index lists the fork, the
        parent holds it, its record is written, the index mark is cleared.
        """
        validate_id(session_id)
        check_fork_at(at_seq)
        stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
        stamp = secrets.token_hex(8)
        listing = self._index_keys(stored)
        change = await self._intent(stored, stamp)
        args = [repr(now()), at_seq, change.member]
        held = await self._script("hold", args, self._keys(session_id))
        if int(held[0]) < 0:
            await self._index_call("forget", change.member, listing, [])
            if int(held[0]) == -4:
                check_fork_point(session_id, at_seq, int(held[1]))
            self._status(held, session_id, 0)
        code = await self._create_record(stored, stamp, change.t)
        if code != 1:
            await self._release(session_id, change.member)
            await self._index_call("forget", change.member, listing, [])
            if code == -6:
                raise self._too_late(f"forking {session_id!r} into {stored.id!r}")
            raise SessionExistsError(stored.id)
        await self._disarm(change)
        return stored

    # -- blobs -----------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        check_blob(data, media_type)
        blob_id = hashlib.sha256(data).hexdigest()
        rec, _, blob, _ = self._keys(session_id)
        args = [repr(now()), blob_id, bytes(data)]
        self._status(await self._script("put_blob", args, [rec, blob]), session_id, 0)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")
        for node in await self._lineage(session_id):
            key = self._keys(node.session_id)[2]

            async def work(r: aioredis.Redis, key: str = key) -> bytes | None:
                return cast(bytes | None, await r.hget(key, blob_id))

            data = await self._run(work, keys=[key])
            if data is not None:
                return bytes(data)
        raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")

    # -- upkeep ----------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`.

        Reads the ``expiry`` set up to ``before`` in batches of 200: deletes
        expired sessions (or makes tombstones of those with forks), drops the
        entries of sessions Redis already evicted, and releases their parents.
        Then it finishes the changes across slots whose marks are due (a crash
        or a lost reply between steps; see the module docstring) and checks
        the forks of tombstones. Each step is one script on one slot.
        """
        check_before(before)
        at = now() if before is None else before
        count = skipped = 0
        while True:
            args = [repr(at), _PURGE_BATCH, skipped]
            flat = await self._script("expiry_batch", args, self._fixed, write=False)
            for i in range(0, len(flat), 4):
                member, score, where = _text(flat[i]), _text(flat[i + 1]), _text(flat[i + 2])
                try:
                    done = await self._expire(member, score, where, bool(flat[i + 3]), at)
                except CorruptDataError as exc:  # reported by every read of it: skip it
                    log.warning(
                        "purge_expired: left session %r alone: %s", split_member(member)[0], exc
                    )
                    done = None
                if done is None:
                    skipped += 1
                else:
                    count += done
            if len(flat) < 4 * _PURGE_BATCH:
                break
        await self._settle_due()
        return count

    async def _expire(
        self, member: str, score: str, where: str, changing: bool, at: float
    ) -> int | None:
        """Purge one member of the expiry set; how many sessions went (None: left for later)."""
        session_id, stamp = split_member(member)
        parent, known = where_entry(where)
        result = await self._script("expire", [stamp, repr(at)], self._keys(session_id))
        code = self._status(result, session_id, 0)
        if code == 0:  # evicted by Redis, or a create still under way
            if changing:
                return None  # its mark settles it once due
            await self._release(parent, member)
            await self._index_call("forget", member, [], [], known)
            return 1 if where else 0
        if code == 1:
            await self._release(_text(result[1]), member)
            await self._index_call("forget", member, [], [], known)
            return 1
        if code in (2, 3):
            await self._index_call("bury", member, [], [parent], known)
            return 1 if code == 2 else 0
        await self._script("reschedule", [member, score, _text(result[1])], self._fixed)
        return 0

    async def _settle_due(self) -> None:
        for _ in range(_DUE_BATCHES):
            flat = await self._script("due_batch", [_PURGE_BATCH], self._fixed, write=False)
            for i in range(0, len(flat), 3):
                member, score = _text(flat[i]), _text(flat[i + 1])
                try:
                    await self._settle(member, score, _text(flat[i + 2]))
                except CorruptDataError as exc:  # reported by every read of it; look again later
                    log.warning(
                        "purge_expired: left session %r alone: %s", split_member(member)[0], exc
                    )
                    await self._script("requeue", [member, score, self._recheck], self._fixed)
            if len(flat) < 3 * _PURGE_BATCH:
                return

    async def _settle(self, member: str, score: str, where: str) -> None:
        """Finish the change marked on ``member``, from what its record says now."""
        session_id, stamp = split_member(member)
        parent, known = where_entry(where)
        raw = await self._raw(session_id)
        if not raw or _text(raw.get(b"stamp", b"")) != stamp:
            # never committed, and never will be (the grace is over), or gone since
            await self._release(parent, member)
            await self._index_call("forget", member, [], [], known)
        elif raw.get(b"deleted") == b"1":
            await self._check_forks(session_id, member, score)
        else:
            await self._place(member, score, self._record(raw, session_id), known)

    async def _check_forks(self, session_id: str, member: str, score: str) -> None:
        """Drop a tombstone's forks that have no record; the tombstone goes with the last."""
        rec, _, _, forks = self._keys(session_id)
        got = await self._script("old_forks", [self._grace, _FORK_CHECK], [rec, forks])
        if int(got[0]) == 0 and await self._release(session_id, ""):
            return
        pairs = [_text(got[i]) for i in range(1, len(got), 2)]
        if pairs:
            ids = [split_member(child)[0] for child in pairs]
            stamps = await self._run(partial(self._stamps, ids=ids))
            for child, stamp in zip(pairs, stamps, strict=True):
                if stamp != split_member(child)[1] and await self._release(session_id, child):
                    return
        delay = 0.0 if len(pairs) == _FORK_CHECK else self._recheck
        await self._script("requeue", [member, score, delay], self._fixed)

    async def _stamps(self, r: aioredis.Redis, ids: list[str]) -> list[str]:
        pipe = r.pipeline(transaction=False)
        for sid in ids:
            pipe.hget(self._keys(sid)[0], "stamp")
        return [_text(x) if x is not None else "" for x in await pipe.execute()]

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
