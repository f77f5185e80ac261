"""``redis://host:6379/0``: sessions in Redis, for many processes on many machines.

URL: ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS), with
query options:

``prefix`` (default ``chatsession:``)
    Put before every key, so applications sharing a server stay apart.
``socket_timeout``, ``socket_connect_timeout`` (seconds, default 5)
    How long a call waits before the store reports itself unavailable.
``max_connections`` (default 50)
    The size of the connection pool.

Keys (every key of one session shares the hash tag ``{SESSION_ID}``, so the
layout works on Redis Cluster; indexes live in their own slot)::

    PREFIX{ID}:rec            hash: the record, head, version, tombstone, fork count
    PREFIX{ID}:ev             list: the session's own events, in seq order
    PREFIX{ID}:blob           hash: blob id -> bytes
    PREFIX{idx}:all           sorted set of session ids by created_at
    PREFIX{idx}:user:USER     the same, per user (and :agent:AGENT, :window:WINDOW)

Guarantees:

- Each append is one Lua script on the session's keys: it checks visibility
  and the head, pushes the events and moves the head, atomically. There is no
  read-modify-write from the client, no ``KEYS`` and no ``SCAN`` on any request
  path. Durability is the server's: with ``appendonly yes`` and
  ``appendfsync always`` an acknowledged append survives a server crash.
- Sessions with ``expires_at`` get Redis's own expiry (``PEXPIREAT``) on all
  their keys. Listings filter by ``expires_at`` at read time, so an expired
  session is invisible before Redis evicts it; ``purge_expired`` deletes what
  is left and removes stale index members. A session with live forks is never
  given a native expiry (its forks read its events); it becomes an invisible
  tombstone instead, and goes when its last fork goes.
- Forks and deletes touch two sessions (two hash slots), so they run as two
  atomic steps in a safe order: the parent's fork count is raised before the
  fork is created (and lowered again if creating fails), and lowered only
  after a fork is gone. A crash between steps can leave a parent kept longer
  than needed, never a fork without its parent.
- Connection failures, timeouts and a loading server raise
  :class:`~chatsession.errors.StoreUnavailableError`; the same store object
  works again once the server is back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc

from chatsession.errors import (
    BlobNotFoundError,
    ChatSessionClosedError,
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    SessionExistsError,
    SessionNotFoundError,
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
_OPTIONS = {"prefix", "socket_timeout", "socket_connect_timeout", "max_connections"}

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

# KEYS: rec.  ARGV: field, value, ...   returns 1 created | 0 exists
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: rec.  ARGV: expected version, now, field, value, ...
# returns {version} | {-1} | {-2} | {-3, version}
_UPDATE = """
local r = redis.call('HMGET', KEYS[1], 'version', 'deleted', 'expires_at')
if not r[1] or r[2] == '1' then return {-1} end
if r[3] and r[3] ~= '' and tonumber(r[3]) <= tonumber(ARGV[2]) then return {-2} end
if tonumber(r[1]) ~= tonumber(ARGV[1]) then return {-3, tonumber(r[1])} end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('HINCRBY', KEYS[1], 'version', 1)
return {tonumber(r[1]) + 1}
"""

# KEYS: rec.  ARGV: at_seq, now.  Reserve a fork: check, count it, drop native expiry.
# returns {head} | {-1} | {-2} | {-4, head} bad fork point
_RESERVE_FORK = """
local r = redis.call('HMGET', KEYS[1], 'head', 'deleted', 'expires_at')
if not r[1] or r[2] == '1' then return {-1} end
if r[3] and r[3] ~= '' and tonumber(r[3]) <= tonumber(ARGV[2]) then return {-2} end
local head = tonumber(r[1])
local at = tonumber(ARGV[1])
if at < 0 or at > head then return {-4, head} end
redis.call('HINCRBY', KEYS[1], 'children', 1)
for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
return {head}
"""

# KEYS: rec, ev, blob.  ARGV: now, check (1 = must be visible).
# A session with forks becomes a tombstone; otherwise its keys go.
# returns {-1} not found | {-2} expired | {0, parent_id} removed | {1} tombstoned
_REMOVE = """
local r = redis.call('HMGET', KEYS[1], 'children', 'deleted', 'expires_at', 'parent_id')
if not r[1] then return {-1} end
if ARGV[2] == '1' then
  if r[2] == '1' then return {-1} end
  if r[3] and r[3] ~= '' and tonumber(r[3]) <= tonumber(ARGV[1]) then return {-2} end
end
if tonumber(r[1]) > 0 then
  redis.call('HSET', KEYS[1], 'deleted', '1')
  return {1}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {0, r[4] or ''}
"""

# KEYS: rec, ev, blob of a parent whose fork went away.  ARGV: now
# returns {1} when the parent is now unneeded (a tombstone with no forks)
_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local left = redis.call('HINCRBY', KEYS[1], 'children', -1)
local r = redis.call('HMGET', KEYS[1], 'deleted', 'expires_at')
if left <= 0 and r[1] == '1' then return {1} end
if left <= 0 and r[2] and r[2] ~= '' then
  local ms = math.floor(tonumber(r[2]) * 1000)
  for i = 1, #KEYS do redis.call('PEXPIREAT', KEYS[i], ms) end
end
return {0}
"""


def _parse_url(url: str, options: dict[str, Any]) -> tuple[str, dict[str, str]]:
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
    return urlunsplit(parts._replace(query="")), query


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
    ) -> None:
        if any(c in prefix for c in "{}") or any(ord(c) < 32 for c in prefix):
            raise InvalidURLError(
                f"redis key prefix {prefix!r} must not contain braces or control characters"
            )
        parts = urlsplit(url)
        self._connect_url = url
        shown = parts._replace(netloc=parts.netloc.split("@")[-1]) if parts.password else parts
        if parts.password:
            user = parts.username or ""
            shown = parts._replace(netloc=f"{user}:***@{parts.netloc.split('@')[-1]}")
        self.url = urlunsplit(shown._replace(query=f"prefix={prefix}"))
        self.address = f"{parts.hostname}:{parts.port or 6379}"
        self.prefix = prefix
        self._socket_timeout = float(socket_timeout)
        self._connect_timeout = float(socket_connect_timeout)
        self._max_connections = int(max_connections)
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``redis://...`` (see the module docstring for options).

        Raises:
            InvalidURLError: A malformed URL or an unknown option.
        """
        connect_url, query = _parse_url(url, options)
        try:
            kwargs: dict[str, Any] = {}
            if "prefix" in query:
                kwargs["prefix"] = query["prefix"]
            for name in ("socket_timeout", "socket_connect_timeout"):
                if name in query:
                    kwargs[name] = float(query[name])
            if "max_connections" in query:
                kwargs["max_connections"] = int(query["max_connections"])
        except ValueError as exc:
            raise InvalidURLError(f"bad redis option value in {url!r}: {exc}") from exc
        return cls(connect_url, **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing --------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._closed:
            raise ChatSessionClosedError(f"store {self.url} is closed")
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self._connect_url,
                decode_responses=False,
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._connect_timeout,
                max_connections=self._max_connections,
            )
            for name, source in (
                ("append", _APPEND),
                ("create", _CREATE),
                ("update", _UPDATE),
                ("reserve_fork", _RESERVE_FORK),
                ("remove", _REMOVE),
                ("release", _RELEASE),
            ):
                self._scripts[name] = self._client.register_script(source)
        return self._client

    async def _call(self, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        return await self._do(fn(self._redis()))

    async def _do(self, awaitable: Awaitable[T]) -> T:
        """Await a Redis call, translating the driver's errors."""
        try:
            return await awaitable
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            raise StoreUnavailableError(
                f"Redis at {self.address} is unreachable ({type(exc).__name__}: {exc}); check "
                "that the server is running and the URL is right, then retry"
            ) from exc
        except rexc.BusyLoadingError as exc:
            raise StoreUnavailableError(
                f"Redis at {self.address} is still loading its data; retry in a moment"
            ) from exc
        except rexc.ResponseError as exc:
            message = str(exc)
            if "LOADING" in message or "MASTERDOWN" in message or "READONLY" in message:
                raise StoreUnavailableError(f"Redis at {self.address} refused: {message}") from exc
            raise

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        script = self._scripts.get(name)
        if script is None:
            self._redis()
            script = self._scripts[name]
        result: list[Any] = await self._do(script(keys=keys, args=args))
        return result

    def _keys(self, session_id: str) -> tuple[str, str, str]:
        base = f"{self.prefix}{{{session_id}}}"
        return f"{base}:rec", f"{base}:ev", f"{base}:blob"

    def _index(self, kind: str = "all", value: str | None = None) -> str:
        return f"{self.prefix}{{idx}}:{kind}" + (f":{value}" if value is not None else "")

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

    def _record(self, raw: dict[bytes, bytes]) -> SessionRecord:
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
                f"the Redis record of a session under {self.prefix!r} is damaged ({exc}); "
                "restore it from a backup or delete the key"
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
        raw: dict[bytes, bytes] = await self._do(self._redis().hgetall(rec))  # type: ignore[arg-type]
        return raw

    async def _index_add(self, record: SessionRecord) -> None:
        def work(r: aioredis.Redis) -> Awaitable[Any]:
            pipe = r.pipeline(transaction=False)
            for key in self._index_keys(record):
                pipe.zadd(key, {record.id: record.created_at})
            return pipe.execute()

        await self._call(work)

    async def _index_remove(self, record: SessionRecord) -> None:
        def work(r: aioredis.Redis) -> Awaitable[Any]:
            pipe = r.pipeline(transaction=False)
            for key in self._index_keys(record):
                pipe.zrem(key, record.id)
            return pipe.execute()

        await self._call(work)

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

    async def _set_expiry(self, record: SessionRecord) -> None:
        keys = self._keys(record.id)

        def work(r: aioredis.Redis) -> Awaitable[Any]:
            pipe = r.pipeline(transaction=True)
            for key in keys:
                if record.expires_at is None:
                    pipe.persist(key)
                else:
                    pipe.pexpireat(key, int(record.expires_at * 1000))
            return pipe.execute()

        await self._call(work)

    async def create(self, record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.create`."""
        stored = initial_record(record)
        await self._write_new(stored)
        return stored

    async def _write_new(self, stored: SessionRecord) -> None:
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
        args = [x for pair in fields.items() for x in pair]
        created = await self._script("create", [self._keys(stored.id)[0]], args)
        if not created:
            raise SessionExistsError(stored.id)
        if stored.expires_at is not None:
            await self._set_expiry(stored)
        await self._index_add(stored)

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`."""
        validate_id(session_id)
        raw = await self._raw(session_id)
        self._visible(raw, session_id)
        return self._record(raw)

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

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`."""
        validate_id(record.id)
        current = await self.get(record.id)
        new = updated_record(current, record).model_copy(update={"version": expected_version + 1})
        fields = self._fields(new)
        del fields["id"], fields["created_at"]
        args: list[Any] = [expected_version, repr(now())]
        args.extend(x for pair in fields.items() for x in pair)
        result = await self._script("update", [self._keys(record.id)[0]], args)
        self._status(result, record.id, expected_version, "version")
        if (current.user_id, current.agent_id, current.window_id) != (
            new.user_id,
            new.agent_id,
            new.window_id,
        ):
            await self._index_remove(current)
            await self._index_add(new)
        if new.expires_at != current.expires_at:
            raw = await self._raw(record.id)
            if int(raw.get(b"children", b"0")) == 0:
                await self._set_expiry(new)
        return new.model_copy(update={"head": current.head})

    async def _remove(self, session_id: str, check: bool) -> None:
        """Delete or tombstone a session, then release its parent (and so on up)."""
        record_raw = await self._raw(session_id)
        result = await self._script(
            "remove", list(self._keys(session_id)), [repr(now()), "1" if check else "0"]
        )
        code = int(result[0])
        if code == -1:
            raise SessionNotFoundError(session_id)
        if code == -2:
            raise SessionNotFoundError(session_id, "expired")
        if record_raw:
            await self._index_remove(self._record(record_raw))
        if code == 1:
            return
        parent_id = result[1].decode() if len(result) > 1 and result[1] else ""
        while parent_id:
            released = await self._script("release", list(self._keys(parent_id)), [repr(now())])
            if not int(released[0]):
                return
            parent_raw = await self._raw(parent_id)
            gone = await self._script("remove", list(self._keys(parent_id)), [repr(now()), "0"])
            if int(gone[0]) != 0:
                return
            parent_id = gone[1].decode() if len(gone) > 1 and gone[1] else ""
            del parent_raw

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        validate_id(session_id)
        await self._remove(session_id, check=True)

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
        """See :meth:`Store.list_sessions`."""
        check_limit(limit)
        after = decode_cursor(cursor) if cursor else None
        if user_id is not None:
            index = self._index("user", user_id)
        elif agent_id is not None:
            index = self._index("agent", agent_id)
        elif window_id is not None:
            index = self._index("window", window_id)
        else:
            index = self._index()
        at = now()
        found: list[SessionRecord] = []
        offset = 0
        chunk = max(2 * limit, 50)
        top: float | str = after[0] if after else "+inf"
        while len(found) <= limit:
            members: list[Any] = await self._do(
                self._redis().zrange(
                    index,
                    top,
                    "-inf",
                    desc=True,
                    byscore=True,
                    offset=offset,
                    num=chunk,
                    withscores=True,
                )
            )
            if not members:
                break
            offset += len(members)
            candidates = []
            for member, score in members:
                sid = member.decode()
                if after is not None and (score, sid) >= after:
                    continue
                candidates.append(sid)
            raws = await self._do(self._hgetall_many(self._redis(), candidates))
            for raw in raws:
                if not raw or raw.get(b"deleted") == b"1":
                    continue
                expires = raw.get(b"expires_at")
                if expires and float(expires) <= at:
                    continue
                record = self._record(raw)
                if (
                    (user_id is not None and record.user_id != user_id)
                    or (agent_id is not None and record.agent_id != agent_id)
                    or (window_id is not None and record.window_id != window_id)
                    or (state is not None and record.state != state)
                ):
                    continue
                found.append(record)
            if len(members) < chunk:
                break
        found.sort(key=lambda rec: (rec.created_at, rec.id), reverse=True)
        page = found[:limit]
        return Page(page, encode_cursor(page[-1]) if len(found) > limit else None)

    async def _hgetall_many(self, r: aioredis.Redis, ids: list[str]) -> list[dict[bytes, bytes]]:
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
        result = await self._script("append", [rec, ev], [expected_seq, repr(now()), *entries])
        return self._status(result, session_id, expected_seq)

    async def _lineage(self, session_id: str) -> tuple[int, list[tuple[str, int]]]:
        raw = await self._raw(session_id)
        self._visible(raw, session_id)
        try:
            head = int(raw[b"head"])
            chain = [(session_id, int(raw.get(b"parent_seq", b"0")))]
            parent = raw.get(b"parent_id", b"").decode()
            while parent:
                keys = self._keys(parent)[0]
                got: list[Any] = await self._do(
                    self._redis().hmget(keys, ["parent_id", "parent_seq"])
                )
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
        head, chain = await self._lineage(session_id)
        starts = dict(chain)
        for seg_id, lo, hi in fork_segments(chain, head, after_seq, upto_seq):
            key = self._keys(seg_id)[1]
            base = starts[seg_id]
            start = lo
            while start < hi:
                stop = min(hi, start + batch_size)
                items: list[bytes] = await self._do(
                    self._redis().lrange(key, start - base, stop - base - 1)  # type: ignore[arg-type]
                )
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
        result = await self._script(
            "reserve_fork", list(self._keys(session_id)), [at_seq, repr(now())]
        )
        code = int(result[0])
        if code == -4:
            check_fork_point(session_id, at_seq, int(result[1]))
        self._status(result, session_id, 0)
        stored = initial_record(new_record, ParentRef(session_id=session_id, seq=at_seq))
        try:
            await self._write_new(stored)
        except BaseException:
            await self._script("release", list(self._keys(session_id)), [repr(now())])
            raise
        return stored

    # -- blobs -----------------------------------------------------------------

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`."""
        validate_id(session_id)
        blob_id = hashlib.sha256(data).hexdigest()
        raw = await self._raw(session_id)
        self._visible(raw, session_id)
        rec, _, blob = self._keys(session_id)

        async def work(r: aioredis.Redis) -> None:
            await r.hsetnx(blob, blob_id, bytes(data))
            ms = await r.pexpiretime(rec)
            if ms > 0:
                await r.pexpireat(blob, ms)

        await self._call(work)
        return blob_id

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`."""
        validate_id(session_id)
        validate_id(blob_id, "blob id")
        _, chain = await self._lineage(session_id)
        for seg_id, _ in chain:
            key = self._keys(seg_id)[2]
            data: bytes | None = await self._do(self._redis().hget(key, blob_id))  # type: ignore[arg-type]
            if data is not None:
                return bytes(data)
        raise BlobNotFoundError(f"blob {blob_id!r} not found for session {session_id!r}")

    # -- upkeep ----------------------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired`.

        Walks the ``all`` index (cleanup, not a request path), deletes expired
        sessions and removes index members whose keys Redis already evicted.
        """
        at = now() if before is None else before
        index = self._index()
        count = 0
        start = 0
        while True:
            members: list[bytes] = await self._do(self._redis().zrange(index, start, start + 499))  # type: ignore[arg-type]
            if not members:
                break
            ids = [m.decode() for m in members]
            raws = await self._do(self._hgetall_many(self._redis(), ids))
            kept = 0
            for sid, raw in zip(ids, raws, strict=True):
                if not raw:  # evicted by Redis's own expiry: drop the stale members
                    await self._do(self._zrem_everywhere(self._redis(), sid))
                    count += 1
                    continue
                expires = raw.get(b"expires_at")
                if raw.get(b"deleted") != b"1" and expires and float(expires) <= at:
                    await self._remove(sid, check=False)
                    count += 1
                    continue
                kept += 1
            start += kept
            if len(members) < 500:
                break
        return count

    async def _zrem_everywhere(self, r: aioredis.Redis, session_id: str) -> None:
        async for key in r.scan_iter(match=f"{self.prefix}{{idx}}:*", count=500):
            await r.zrem(key, session_id)

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
