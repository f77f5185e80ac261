"""``redis://host:6379/0``: sessions in Redis, for many processes on many machines.

Needs Redis 7.0 or later (the scripts use ``PEXPIRETIME``); the store checks
the server's version on its first call and says so when it is older. It runs
on one Redis server (standalone, or a primary with replicas behind Sentinel);
Redis Cluster is not supported, because a fork or a listing index update is
one script over the keys of several sessions.

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

Keys (every key of one session shares the hash tag ``{SESSION_ID}``)::

    PREFIX{ID}:rec            hash: the record, head, version, tombstone, fork count
    PREFIX{ID}:ev             list: the session's own events, in seq order
    PREFIX{ID}:blob           hash: blob id -> bytes
    PREFIX{idx}:all           sorted set of session ids by created_at
    PREFIX{idx}:user:USER     the same, per user (and :agent:AGENT, :window:WINDOW)
    PREFIX{idx}:expiry        sorted set of session ids by expires_at
    PREFIX{idx}:where         hash: session id -> the index keys it is in, its parent

Guarantees:

- Every write is one Lua script, so it happens entirely or not at all:
  ``append`` checks visibility and the head, pushes the events and moves the
  head; ``create`` and ``fork`` write the record, the parent's fork count and
  every index entry; ``update`` checks the version and moves the indexes and
  the expiry; ``delete`` and ``purge_expired`` remove a session, its index
  entries, and release its ancestors. There is no read-modify-write from the
  client, and no ``KEYS`` or ``SCAN`` anywhere.
- Durability is the server's: with ``appendonly yes`` and ``appendfsync
  always`` an acknowledged write survives a server crash.
- The client never retries a call by itself (redis-py would re-send a script
  whose reply was lost, and run it twice). A call that fails raises
  :class:`~chatsession.errors.StoreUnavailableError`; for a write whose reply
  was lost the message says it may have been applied: re-read before retrying.
- Sessions with ``expires_at`` get Redis's own expiry (``PEXPIREAT``) on all
  their keys, and read as gone from ``expires_at`` on, even before Redis
  evicts them. ``purge_expired`` reads the ``expiry`` set up to now in batches and
  removes what is left, the index entries (from ``where``, which outlives the
  session's own keys) and the fork counts held on parents. A session with
  live forks is never given a native expiry (its forks read its events); it
  becomes an invisible tombstone instead, and goes when its last fork goes.
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
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Self, TypeVar, cast
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
_PURGE_BATCH = 200  # sessions per purge script
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

# Shared by the scripts that take ARGV[1] = key prefix, ARGV[2] = now (Unix seconds).
# They name other sessions' keys themselves (parents, index keys from ``where``),
# which is why the store needs one Redis server rather than a cluster.
_PRELUDE = """
local P = ARGV[1]
local NOW = tonumber(ARGV[2])
local WHERE = P .. '{idx}:where'
local EXPIRY = P .. '{idx}:expiry'
local function keys_of(id)
  local base = P .. '{' .. id .. '}'
  return base .. ':rec', base .. ':ev', base .. ':blob'
end
local function expired(v, at)
  return v and v ~= '' and tonumber(v) <= at
end
local function decode(w)
  local ok, info = pcall(cjson.decode, w)
  if ok and type(info) == 'table' then return info end
  return {}
end
-- drop a session's index entries and expiry entry; returns its old `where`
local function unindex(id)
  local w = redis.call('HGET', WHERE, id)
  if w then
    local info = decode(w)
    if type(info.idx) == 'table' then
      for _, k in ipairs(info.idx) do redis.call('ZREM', k, id) end
    end
    redis.call('HDEL', WHERE, id)
  end
  redis.call('ZREM', EXPIRY, id)
  return w
end
-- a fork of `pid` went away: lower its count; remove tombstones nobody needs
local function release(pid)
  while type(pid) == 'string' and pid ~= '' do
    local rec, ev, blob = keys_of(pid)
    if redis.call('EXISTS', rec) == 0 then return end
    local left = redis.call('HINCRBY', rec, 'children', -1)
    if left > 0 then return end
    local r = redis.call('HMGET', rec, 'deleted', 'expires_at', 'parent_id')
    if r[1] ~= '1' then
      if r[2] and r[2] ~= '' then
        local ms = string.format('%d', math.floor(tonumber(r[2]) * 1000))
        redis.call('PEXPIREAT', rec, ms)
        redis.call('PEXPIREAT', ev, ms)
        redis.call('PEXPIREAT', blob, ms)
      end
      return
    end
    redis.call('UNLINK', rec, ev, blob)
    pid = r[3]
  end
end
-- the leftovers of a session whose keys Redis already expired
local function forget_evicted(id)
  local w = unindex(id)
  if w then release(decode(w).parent) end
  return w
end
-- delete or tombstone a session known to exist
local function remove(id, children, parent)
  local rec, ev, blob = keys_of(id)
  unindex(id)
  if (tonumber(children or '0') or 0) > 0 then
    redis.call('HSET', rec, 'deleted', '1')
    return 1
  end
  redis.call('UNLINK', rec, ev, blob)
  release(parent)
  return 0
end
-- ARGV[i..]: id, created_at, expires_at, expires_ms, where, n, n index keys, field, value, ...
local function write_new(i)
  local id = ARGV[i]
  local rec, ev, blob = keys_of(id)
  forget_evicted(id)
  redis.call('UNLINK', ev, blob)
  local n = tonumber(ARGV[i + 5])
  redis.call('HSET', rec, unpack(ARGV, i + 6 + n))
  for j = i + 6, i + 5 + n do redis.call('ZADD', ARGV[j], ARGV[i + 1], id) end
  redis.call('HSET', WHERE, id, ARGV[i + 4])
  if ARGV[i + 2] ~= '' then
    redis.call('ZADD', EXPIRY, ARGV[i + 2], id)
    redis.call('PEXPIREAT', rec, ARGV[i + 3])
  end
end
"""

# KEYS: rec, ev.  ARGV: expected head, now, entries...
# returns {head} | {-1} not found | {-2} expired | {-3, head} conflict
_APPEND = """
local r = redis.call('HMGET', KEYS[1], 'head', 'deleted', 'expires_at')
if not r[1] or r[2] == '1' then return {-1} end
if r[3] and r[3] ~= '' and tonumber(r[3]) <= tonumber(ARGV[2]) then return {-2} end
local head = tonumber(r[1])
if head ~= tonumber(ARGV[1]) then return {-3, head} end
local n = #ARGV - 2
for i = 3, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HSET', KEYS[1], 'head', head + n, 'updated_at', ARGV[2])
local at = redis.call('PEXPIRETIME', KEYS[1])
if at > 0 then redis.call('PEXPIREAT', KEYS[2], at) end
return {head + n}
"""

# ARGV: prefix, now, <write_new arguments>.  returns {1} created | {0} id taken
_CREATE = (
    _PRELUDE
    + """
if redis.call('EXISTS', (keys_of(ARGV[3]))) == 1 then return {0} end
write_new(3)
return {1}
"""
)

# ARGV: prefix, now, parent id, at_seq, <write_new arguments>.
# returns {1} | {-1} | {-2} | {-4, head} bad fork point | {-5} id taken
_FORK = (
    _PRELUDE
    + """
local prec, pev, pblob = keys_of(ARGV[3])
local r = redis.call('HMGET', prec, 'head', 'deleted', 'expires_at')
if not r[1] or r[2] == '1' then return {-1} end
if expired(r[3], NOW) then return {-2} end
local head = tonumber(r[1])
local at = tonumber(ARGV[4])
if at < 0 or at > head then return {-4, head} end
if redis.call('EXISTS', (keys_of(ARGV[5]))) == 1 then return {-5} end
write_new(5)
redis.call('HINCRBY', prec, 'children', 1)
redis.call('PERSIST', prec)
redis.call('PERSIST', pev)
redis.call('PERSIST', pblob)
return {1}
"""
)

# ARGV: prefix, now, id, expected version, where, expires_at, expires_ms, n,
#       n index keys, field, value, ...
# returns {version} | {-1} | {-2} | {-3, version}
_UPDATE = (
    _PRELUDE
    + """
local id = ARGV[3]
local rec, ev, blob = keys_of(id)
local r = redis.call('HMGET', rec, 'version', 'deleted', 'expires_at', 'children', 'created_at')
if not r[1] or r[2] == '1' then return {-1} end
if expired(r[3], NOW) then return {-2} end
local version = tonumber(r[1])
if version ~= tonumber(ARGV[4]) then return {-3, version} end
local n = tonumber(ARGV[8])
local wanted = {}
for j = 9, 8 + n do wanted[ARGV[j]] = true end
local old = redis.call('HGET', WHERE, id)
if old then
  local info = decode(old)
  if type(info.idx) == 'table' then
    for _, k in ipairs(info.idx) do
      if not wanted[k] then redis.call('ZREM', k, id) end
    end
  end
end
for j = 9, 8 + n do redis.call('ZADD', ARGV[j], r[5], id) end
redis.call('HSET', WHERE, id, ARGV[5])
redis.call('HSET', rec, unpack(ARGV, 9 + n))
redis.call('HSET', rec, 'version', version + 1)
if ARGV[6] ~= '' then
  redis.call('ZADD', EXPIRY, ARGV[6], id)
else
  redis.call('ZREM', EXPIRY, id)
end
if (tonumber(r[4] or '0') or 0) == 0 then
  for _, k in ipairs({rec, ev, blob}) do
    if ARGV[6] ~= '' then redis.call('PEXPIREAT', k, ARGV[7]) else redis.call('PERSIST', k) end
  end
end
return {version + 1}
"""
)

# ARGV: prefix, now, id.  returns {-1} | {-2} | {0} removed | {1} tombstoned (has forks)
_DELETE = (
    _PRELUDE
    + """
local rec = keys_of(ARGV[3])
local r = redis.call('HMGET', rec, 'head', 'deleted', 'expires_at', 'children', 'parent_id')
if not r[1] or r[2] == '1' then return {-1} end
if expired(r[3], NOW) then return {-2} end
return {remove(ARGV[3], r[4], r[5])}
"""
)

# ARGV: prefix, before, batch size.  Handles up to one batch of the expiry set.
# returns {members handled, sessions deleted}
_PURGE = (
    _PRELUDE
    + """
local ids = redis.call('ZRANGE', EXPIRY, '-inf', ARGV[2], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
local deleted = 0
for _, id in ipairs(ids) do
  local rec = keys_of(id)
  local r = redis.call('HMGET', rec, 'head', 'deleted', 'expires_at', 'children', 'parent_id')
  if not r[1] then
    if forget_evicted(id) then deleted = deleted + 1 end
  elseif r[2] == '1' then
    redis.call('ZREM', EXPIRY, id)
  elseif expired(r[3], NOW) then
    remove(id, r[4], r[5])
    deleted = deleted + 1
  elseif r[3] and r[3] ~= '' then
    redis.call('ZADD', EXPIRY, r[3], id)
  else
    redis.call('ZREM', EXPIRY, id)
  end
end
return {#ids, deleted}
"""
)

# ARGV: prefix, now, id, blob id, bytes.  returns {1} | {-1} | {-2}
_PUT_BLOB = (
    _PRELUDE
    + """
local rec, ev, blob = keys_of(ARGV[3])
local r = redis.call('HMGET', rec, 'head', 'deleted', 'expires_at')
if not r[1] or r[2] == '1' then return {-1} end
if expired(r[3], NOW) then return {-2} end
redis.call('HSETNX', blob, ARGV[4], ARGV[5])
local at = redis.call('PEXPIRETIME', rec)
if at > 0 then redis.call('PEXPIREAT', blob, at) end
return {1}
"""
)

# KEYS: an index.  ARGV: cursor score, cursor id ('' for the first page), n.
# Returns the next n members (flat: id, score, ...) after the cursor in
# (score, id) descending order, in one atomic step so that concurrent inserts
# and removals never shift the window.
_PAGE = """
local key, n = KEYS[1], tonumber(ARGV[3])
local start = 0
local function before(a, b)  -- byte order, as Redis sorts equal scores
  local len = math.min(#a, #b)
  for i = 1, len do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
if ARGV[2] ~= '' then
  local s, m = ARGV[1], ARGV[2]
  local own = redis.call('ZSCORE', key, m)
  if own and tonumber(own) == tonumber(s) then
    start = redis.call('ZREVRANK', key, m) + 1
  else
    start = redis.call('ZCOUNT', key, '(' .. s, '+inf')
    local off, done = 0, false
    while not done do
      local ties = redis.call('ZRANGE', key, s, s, 'BYSCORE', 'REV', 'LIMIT', off, 200)
      for _, t in ipairs(ties) do
        if before(t, m) then done = true break end
        start = start + 1
      end
      if #ties < 200 then done = true end
      off = off + 200
    end
  end
end
return redis.call('ZRANGE', key, start, start + n - 1, 'REV', 'WITHSCORES')
"""

_SCRIPTS = {
    "append": _APPEND,
    "create": _CREATE,
    "fork": _FORK,
    "update": _UPDATE,
    "delete": _DELETE,
    "purge": _PURGE,
    "put_blob": _PUT_BLOB,
    "page": _PAGE,
}


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
            for name, source in _SCRIPTS.items():
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

    def _keys(self, session_id: str) -> tuple[str, str, str]:
        base = f"{self.prefix}{{{session_id}}}"
        return f"{base}:rec", f"{base}:ev", f"{base}:blob"

    def _index(self, kind: str = "all", value: str | None = None) -> str:
        return f"{self.prefix}{{idx}}:{kind}" + (f":{value}" if value is not None else "")

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

    def _placement(self, record: SessionRecord) -> list[str]:
        """Script arguments: where, expires_at, expires_ms, n, the n index keys."""
        keys = self._index_keys(record)
        where = json.dumps(
            {"idx": keys, "parent": record.parent.session_id if record.parent else ""},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        if record.expires_at is None:
            expires, expires_ms = "", ""
        else:
            expires, expires_ms = repr(record.expires_at), str(int(record.expires_at * 1000))
        return [where, expires, expires_ms, str(len(keys)), *keys]

    def _new_args(self, stored: SessionRecord) -> list[str]:
        fields = self._fields(stored)
        fields.update(
            {
                "head": str(stored.head),
                "version": "1",
                "deleted": "0",
                "children": "0",
                "parent_id": stored.parent.session_id if stored.parent else "",
                "parent_seq": str(stored.parent.seq) if stored.parent else "0",
            }
        )
        where, expires, expires_ms, *keys = self._placement(stored)
        head = [stored.id, repr(stored.created_at), expires, expires_ms, where, *keys]
        return head + [x for pair in fields.items() for x in pair]

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

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)
        result = await self._script("create", [self.prefix, repr(now()), *self._new_args(stored)])
        if not int(result[0]):
            raise SessionExistsError(stored.id)
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
        current = await self.get(record.id)
        new = updated_record(current, record).model_copy(update={"version": expected_version + 1})
        fields = self._fields(new)
        del fields["id"], fields["created_at"]
        args: list[Any] = [self.prefix, repr(now()), record.id, expected_version]
        args.extend(self._placement(new))
        args.extend(x for pair in fields.items() for x in pair)
        result = await self._script("update", args)
        self._status(result, record.id, expected_version, "version")
        return new.model_copy(update={"head": current.head})

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        validate_id(session_id)
        result = await self._script("delete", [self.prefix, repr(now()), session_id])
        self._status(result, session_id, 0)

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
                ["+inf", "", want] if position is None else [repr(position[0]), position[1], want]
            )
            flat = await self._script("page", args, [index], write=False)
            members = [(flat[i].decode(), float(flat[i + 1])) for i in range(0, len(flat), 2)]
            raws = await self._run(partial(self._hgetall_many, ids=[sid for sid, _ in members]))
            taken = 0
            for (sid, score), raw in zip(members, raws, strict=True):
                taken += 1
                position = (score, sid)
                if not raw or raw.get(b"deleted") == b"1":
                    continue  # removed, or evicted by Redis and not yet purged
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
        rec, ev, _ = self._keys(session_id)
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
        """See :meth:`Store.fork`."""
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
        args = [self.prefix, repr(now()), session_id, at_seq, *self._new_args(stored)]
        result = await self._script("fork", args)
        code = int(result[0])
        if code == -4:
            check_fork_point(session_id, at_seq, int(result[1]))
        if code == -5:
            raise SessionExistsError(stored.id)
        self._status(result, session_id, 0)
        return stored

    # -- blobs -----------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        blob_id = hashlib.sha256(data).hexdigest()
        args = [self.prefix, repr(now()), session_id, blob_id, bytes(data)]
        self._status(await self._script("put_blob", args), session_id, 0)
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

        Reads the ``expiry`` sorted set up to ``before`` in batches of 200, one
        script each: deletes expired sessions (or makes
        tombstones of those with forks), drops the index entries of sessions
        Redis already evicted, and releases their parents.
        """
        at = now() if before is None else before
        count = 0
        while True:
            result = await self._script("purge", [self.prefix, repr(at), _PURGE_BATCH])
            count += int(result[1])
            if int(result[0]) < _PURGE_BATCH:
                return count

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
