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

Keys. A session's keys share the hash tag ``{ID}``, the indexes share
``{idx}``, and every script call is given all the keys it touches, all under
one tag (no script builds a key name): each call runs on one hash slot, so
the layout works on Redis Cluster. (The store connects to one server:
standalone, or a primary behind Sentinel.) ::

    PREFIX{ID}:rec       hash: the record, head, version, stamp, tombstone flag
    PREFIX{ID}:ev        list: the session's own events, in seq order
    PREFIX{ID}:blob      hash: blob id -> bytes
    PREFIX{ID}:forks     sorted set: its forks (ID#STAMP), by when each fork began
    PREFIX{idx}:all      sorted set of sessions (ID#STAMP) by created_at
    PREFIX{idx}:user:U   the same, per user (and :agent:A, :window:W)
    PREFIX{idx}:expiry   sorted set of sessions by expires_at
    PREFIX{idx}:where    hash: ID#STAMP -> the indexes it is in, its parent, version
    PREFIX{idx}:due      sorted set: sessions a change across slots is under way
                         for, by when cleanup may finish that change

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
  whose reply was lost, and run it twice). A call that fails raises
  :class:`~chatsession.errors.StoreUnavailableError`; for a write whose reply
  was lost the message says it may have been applied: re-read before retrying.
  No ``KEYS`` or ``SCAN`` anywhere.
- Sessions with ``expires_at`` get Redis's own expiry (``PEXPIREAT``) on their
  keys, and read as gone from ``expires_at`` on, even before Redis evicts
  them. A session with forks never has a native expiry (its forks read its
  events); once expired it becomes an invisible tombstone, and goes with its
  last fork. ``purge_expired`` reads the expiry set up to ``before`` in
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
import re
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple, Self, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ConflictError,
    CorruptDataError,
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
    check_fork_point,
    check_limit,
    check_read,
    decode_cursor,
    encode_cursor,
    fork_segments,
    initial_record,
    now,
    updated_record,
    validate_id,
)
from chatsession.store.redis_scripts import (
    MARK,
    SCRIPTS,
    key_list,
    member_of,
    split_member,
    where_entry,
)

__all__ = ["RedisStore"]

T = TypeVar("T")
SEP = "\x1f"  # never appears raw in JSON text (control characters are escaped)
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
    {"prefix", "socket_timeout", "socket_connect_timeout", "max_connections", "pool_timeout"}
    | _TLS_OPTIONS
)
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_url(url: str, options: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update({k: str(v) for k, v in options.items()})
    unknown = set(query) - _OPTIONS
    if unknown:
        raise InvalidURLError(
            f"unknown redis option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}"
        )
    if not parts.hostname:
        raise InvalidURLError(f"redis URL {url!r} names no host; e.g. redis://127.0.0.1:6379/0")
    tls = sorted(set(query) & _TLS_OPTIONS)
    if tls and parts.scheme != "rediss":
        raise InvalidURLError(
            f"TLS option(s) {tls} need a rediss:// URL; {url.split('?')[0]!r} is plain TCP"
        )
    return urlunsplit(parts._replace(query="")), query


def _tls_value(name: str, value: str) -> Any:
    if name == "ssl_cert_reqs":
        if value.lower() not in ("none", "optional", "required"):
            raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {value!r}")
        return value.lower()
    if name == "ssl_check_hostname":
        flag = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if value.lower() not in flag:
            raise ValueError(f"ssl_check_hostname must be true or false, not {value!r}")
        return flag[value.lower()]
    if name == "ssl_min_version":
        names = {v.name: v for v in ssl.TLSVersion if v.name.startswith("TLSv1_")}
        if value not in names:
            raise ValueError(f"ssl_min_version must be one of {sorted(names)}, not {value!r}")
        return names[value]
    return value


class RedisStore:
    """The Redis store (``redis://``, ``rediss://``). See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "chatsession:",
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 5.0,
        max_connections: int = 50,
        pool_timeout: float = 10.0,
        tls: Mapping[str, Any] | None = None,
    ) -> None:
        if any(c in prefix for c in "{}") or any(ord(c) < 32 for c in prefix):
            raise InvalidURLError(
                f"redis key prefix {prefix!r} must not contain braces or control characters"
            )
        if max_connections < 1 or pool_timeout < 0:
            raise InvalidURLError(
                f"max_connections must be >= 1 and pool_timeout >= 0, got {max_connections} "
                f"and {pool_timeout}"
            )
        parts = urlsplit(url)
        self._connect_url = url
        shown = parts
        if parts.password:
            user = parts.username or ""
            shown = parts._replace(netloc=f"{user}:***@{parts.netloc.split('@')[-1]}")
        self.url = urlunsplit(shown._replace(query=f"prefix={prefix}"))
        self.address = f"{parts.hostname}:{parts.port or 6379}"
        self.prefix = prefix
        self._socket_timeout = float(socket_timeout)
        self._connect_timeout = float(socket_connect_timeout)
        self._max_connections = int(max_connections)
        self._pool_timeout = float(pool_timeout)
        self._tls = dict(tls or {})
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._grace = _GRACE
        self._recheck = _RECHECK
        self._server_checked = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``redis://...`` (see the module docstring for options).

        Raises:
            InvalidURLError: A malformed URL, an unknown option or a bad value.
        """
        connect_url, query = _parse_url(url, options)
        try:
            kwargs: dict[str, Any] = {}
            if "prefix" in query:
                kwargs["prefix"] = query["prefix"]
            for name in ("socket_timeout", "socket_connect_timeout", "pool_timeout"):
                if name in query:
                    kwargs[name] = float(query[name])
            if "max_connections" in query:
                kwargs["max_connections"] = int(query["max_connections"])
            tls = {name: _tls_value(name, query[name]) for name in _TLS_OPTIONS if name in query}
        except ValueError as exc:
            raise InvalidURLError(f"bad redis option value in {url!r}: {exc}") from exc
        return cls(connect_url, tls=tls, **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing --------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        if self._client is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self._connect_url,
                max_connections=self._max_connections,
                timeout=self._pool_timeout,
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._connect_timeout,
                decode_responses=False,
                # never re-send a call: a lost reply to a script that ran would run it twice
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
                **self._tls,
            )
            self._client = aioredis.Redis.from_pool(pool)
            for name, source in SCRIPTS.items():
                self._scripts[name] = self._client.register_script(source)
        return self._client

    async def _run(self, fn: Callable[[aioredis.Redis], Awaitable[T]], *, write: bool = False) -> T:
        """Run Redis calls, translating the driver's errors into ours."""
        client = self._redis()
        try:
            if not self._server_checked:
                await self._check_server(client)
            return await fn(client)
        except (rexc.RedisError, OSError) as exc:
            raise self._translate(exc, write) from exc

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

    def _translate(self, exc: BaseException, write: bool) -> StoreError:
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
                return CorruptDataError(
                    f"a key under prefix {self.prefix!r} at {where} holds the wrong kind of "
                    f"value ({message}); another program may write under this prefix: give "
                    "chatsession a prefix of its own"
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
        first = str(exc).split(" ", 1)[0]
        return first if first.isupper() else ""

    async def _script(
        self, name: str, args: list[Any], keys: Sequence[str] = (), *, write: bool = True
    ) -> list[Any]:
        async def work(r: aioredis.Redis) -> list[Any]:
            result: list[Any] = await self._scripts[name](keys=list(keys), args=args, client=r)
            return result

        return await self._run(work, write=write)

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
        body = json.dumps(
            {"title": record.title, "metadata": record.metadata, "fingerprint": record.fingerprint},
            separators=(",", ":"),
        )
        return {
            "id": record.id,
            "user_id": record.user_id or "",
            "agent_id": record.agent_id or "",
            "window_id": record.window_id or "",
            "state": record.state,
            "created_at": repr(record.created_at),
            "updated_at": repr(record.updated_at),
            "expires_at": "" if record.expires_at is None else repr(record.expires_at),
            "body": body,
        }

    @staticmethod
    def _expiry(record: SessionRecord) -> tuple[str, str]:
        """``expires_at`` as script arguments: seconds, and milliseconds for ``PEXPIREAT``."""
        if record.expires_at is None:
            return "", ""
        return repr(record.expires_at), str(int(record.expires_at * 1000))

    def _record(self, raw: dict[bytes, bytes], session_id: str) -> SessionRecord:
        try:
            f = {k.decode(): v.decode() for k, v in raw.items()}
            body = json.loads(f.get("body", "{}"))
            parent = (
                ParentRef(session_id=f["parent_id"], seq=int(f["parent_seq"]))
                if f.get("parent_id")
                else None
            )
            return SessionRecord(
                id=f["id"],
                user_id=f["user_id"] or None,
                agent_id=f["agent_id"] or None,
                window_id=f["window_id"] or None,
                state=f["state"],  # type: ignore[arg-type]
                created_at=float(f["created_at"]),
                updated_at=float(f["updated_at"]),
                expires_at=float(f["expires_at"]) if f.get("expires_at") else None,
                parent=parent,
                head=int(f["head"]),
                version=int(f["version"]),
                **body,
            )
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptDataError(
                f"the Redis record of session {session_id!r} ({self._keys(session_id)[0]}) is "
                f"damaged ({exc}); restore it from a backup or delete the key"
            ) from exc

    @staticmethod
    def _visible(raw: dict[bytes, bytes], session_id: str, at: float | None = None) -> None:
        if not raw or raw.get(b"deleted") == b"1":
            raise SessionNotFoundError(session_id)
        expires = raw.get(b"expires_at")
        if expires and float(expires) <= (now() if at is None else at):
            raise SessionNotFoundError(session_id, "expired")

    async def _raw(self, session_id: str) -> dict[bytes, bytes]:
        rec = self._keys(session_id)[0]

        async def work(r: aioredis.Redis) -> dict[bytes, bytes]:
            return cast(dict[bytes, bytes], await r.hgetall(rec))

        return await self._run(work)

    @staticmethod
    def _status(result: list[Any], session_id: str, expected: int, what: str = "head seq") -> int:
        code = int(result[0])
        if code == -1:
            raise SessionNotFoundError(session_id)
        if code == -2:
            raise SessionNotFoundError(session_id, "expired")
        if code == -3:
            raise ConflictError(session_id, expected, int(result[1]), what)
        return code

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
        validate_id(record.id)
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
                if not raw or raw.get(b"deleted") == b"1" or raw.get(b"stamp") != stamp.encode():
                    continue  # half made, removed, or evicted by Redis and not yet purged
                expires = raw.get(b"expires_at")
                if expires and float(expires) <= at:
                    continue
                record = self._record(raw, sid)
                if (
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

    async def _hgetall_many(self, r: aioredis.Redis, ids: list[str]) -> list[dict[bytes, bytes]]:
        if not ids:
            return []
        pipe = r.pipeline(transaction=False)
        for sid in ids:
            pipe.hgetall(self._keys(sid)[0])
        raws: list[dict[bytes, bytes]] = await pipe.execute()
        return raws

    # -- events ----------------------------------------------------------------

    async def append(self, session_id: str, events: Sequence[NewEvent], expected_seq: int) -> int:
        """See :meth:`Store.append`."""
        check_append(events, expected_seq)
        validate_id(session_id)
        rec, ev, _, _ = self._keys(session_id)
        entries = [
            f"{e.type}{SEP}{e.ts!r}{SEP}{e.turn_id or ''}{SEP}{e.schema_version}{SEP}{e.data}"
            for e in events
        ]
        result = await self._script("append", [expected_seq, repr(now()), *entries], [rec, ev])
        return self._status(result, session_id, expected_seq)

    async def _lineage(self, session_id: str) -> tuple[int, list[tuple[str, int]]]:
        raw = await self._raw(session_id)
        self._visible(raw, session_id)
        try:
            head = int(raw[b"head"])
            chain = [(session_id, int(raw.get(b"parent_seq", b"0")))]
            parent = raw.get(b"parent_id", b"").decode()
            while parent:
                key = self._keys(parent)[0]

                async def work(r: aioredis.Redis, key: str = key) -> list[Any]:
                    return cast(list[Any], await r.hmget(key, ["parent_id", "parent_seq"]))

                got = await self._run(work)
                if got[1] is None:
                    raise CorruptDataError(f"the parent {parent!r} of a fork is missing from Redis")
                chain.append((parent, int(got[1])))
                parent = (got[0] or b"").decode()
        except (KeyError, ValueError) as exc:
            raise CorruptDataError(
                f"the Redis record of session {session_id!r} is damaged ({exc})"
            ) from exc
        return head, chain

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`."""
        validate_id(session_id)
        check_read(after_seq, upto_seq, batch_size)
        head, chain = await self._lineage(session_id)
        starts = dict(chain)
        for seg_id, lo, hi in fork_segments(chain, head, after_seq, upto_seq):
            key = self._keys(seg_id)[1]
            base = starts[seg_id]
            start = lo
            while start < hi:
                stop = min(hi, start + batch_size)

                async def work(
                    r: aioredis.Redis, key: str = key, lo: int = start - base, hi: int = stop - base
                ) -> list[bytes]:
                    return cast(list[bytes], await r.lrange(key, lo, hi - 1))

                items = await self._run(work)
                if len(items) != stop - start:
                    raise CorruptDataError(
                        f"session {session_id!r}: events {start + 1}..{stop} of {seg_id!r} are "
                        f"missing from Redis (found {len(items)}); restore from a backup"
                    )
                yield self._decode(seg_id, start, items)
                start = stop

    @staticmethod
    def _decode(session_id: str, start: int, items: list[bytes]) -> list[StoredEvent]:
        out = []
        seq = start
        try:
            for item in items:
                seq += 1
                kind, ts, turn, version, data = item.decode().split(SEP, 4)
                out.append(StoredEvent(seq, kind, float(ts), turn or None, data, int(version)))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptDataError(
                f"session {session_id!r}, seq {seq}: the stored event is damaged ({exc}); "
                "restore it from a backup"
            ) from exc
        return out

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`.

        Four steps (see the module docstring): the index lists the fork, the
        parent holds it, its record is written, the index mark is cleared.
        """
        validate_id(session_id)
        validate_id(new_record.id)
        if isinstance(at_seq, bool) or not isinstance(at_seq, int):
            check_fork_point(session_id, at_seq, 0)
        if at_seq < 0:
            raise ValueError(
                f"cannot fork {session_id!r} at seq {at_seq}: a fork point is a seq from 0 to "
                "the session's head"
            )
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
        blob_id = hashlib.sha256(data).hexdigest()
        rec, _, blob, _ = self._keys(session_id)
        args = [repr(now()), blob_id, bytes(data)]
        self._status(await self._script("put_blob", args, [rec, blob]), session_id, 0)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")
        _, chain = await self._lineage(session_id)
        for seg_id, _ in chain:
            key = self._keys(seg_id)[2]

            async def work(r: aioredis.Redis, key: str = key) -> bytes | None:
                return cast(bytes | None, await r.hget(key, blob_id))

            data = await self._run(work)
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
        at = now() if before is None else before
        count = skipped = 0
        while True:
            args = [repr(at), _PURGE_BATCH, skipped]
            flat = await self._script("expiry_batch", args, self._fixed, write=False)
            for i in range(0, len(flat), 4):
                member, score, where = _text(flat[i]), _text(flat[i + 1]), _text(flat[i + 2])
                done = await self._expire(member, score, where, bool(flat[i + 3]), at)
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
        code = int(result[0])
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
                await self._settle(_text(flat[i]), _text(flat[i + 1]), _text(flat[i + 2]))
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
            try:
                record = self._record(raw, session_id)
            except CorruptDataError:  # reported by every read of it; look again later
                await self._script("requeue", [member, score, self._recheck], self._fixed)
                return
            await self._place(member, score, record, known)

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
