"""The Redis store's connection: the URL and its options, the pool, calls and their errors.

Every call to Redis goes through :meth:`RedisConnection.run` (or
:meth:`~RedisConnection.script`): it checks the server's version once,
re-sends a call that is safe to repeat when the connection drops before its reply
(with a jittered exponential backoff), and turns the driver's errors into
the store's (:func:`translate`).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff

from chatsession.errors import (
    ChatSessionClosedError,
    CorruptDataError,
    InvalidURLError,
    StoreError,
    StoreUnavailableError,
)
from chatsession.store.options import Option, choice, integer, parse_options, seconds, text
from chatsession.store.urls import redact_url

from .scripts import SCRIPTS, SessionKeys

try:  # redis-py 7+: its "maintenance notifications" skip the check for dead pooled connections
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py checks them always
    MaintNotificationsConfig = None  # type: ignore[assignment, misc]

__all__ = ["OPTIONS", "RedisConnection"]

T = TypeVar("T")

_MAX_DB = 2**31 - 1
_REQUIRED_VERSION = (7, 0)
#: Seconds before cleanup may finish a change across slots; commits refuse after half.
GRACE = 300.0
#: Seconds between two checks of one tombstone's forks.
RECHECK = 3600.0
_STEP = 64  # replies read between two moves of script_each's deadline
_BACKOFF_BASE, _BACKOFF_CAP = 0.05, 1.0  # seconds: the first wait before a re-send, the longest

#: The options a ``redis://`` URL (or ``open_store`` keywords) may give.
OPTIONS: dict[str, Option] = {
    "prefix": text(
        "chatsession:",
        pattern=r"[^{}\x00-\x1f\x7f]*",
        describe="text without braces or control characters",
    ),
    "socket_timeout": seconds(0, 86_400, default=5.0, low_open=True),
    "socket_connect_timeout": seconds(0, 86_400, default=5.0, low_open=True),
    "max_connections": integer(1, 1_000_000, default=50),
    "pool_timeout": seconds(0, 86_400, default=10.0),
    "retries": integer(0, 100, default=3),
    "username": text(),
    "password": text(secret=True),
    "ssl_cert_reqs": choice("none", "optional", "required"),
    "ssl_ca_certs": text(),
    "ssl_ca_path": text(),
    "ssl_certfile": text(),
    "ssl_keyfile": text(),
    "ssl_password": text(secret=True),
    "ssl_check_hostname": Option("flag"),
    "ssl_ciphers": text(),
    "ssl_min_version": choice("TLSv1_2", "TLSv1_3"),
}
_TLS_OPTIONS = tuple(name for name in OPTIONS if name.startswith("ssl_"))

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


class _PoolBusy(rexc.RedisError):
    """Every connection stayed busy for ``pool_timeout``: not a lost connection."""


class _Final(rexc.RedisError):
    """A connection error that a re-send cannot cure (bad credentials, a full pool)."""

    def __init__(self, original: rexc.RedisError) -> None:
        super().__init__(str(original))
        self.original = original


class Address(NamedTuple):
    """Where the server is, parsed from a ``redis://`` URL."""

    scheme: str
    host: str
    port: int
    db: int
    username: str | None
    password: str | None


def parse_address(url: object) -> Address:
    """Split a store URL into its parts, refusing anything that would be ignored or guessed.

    Raises:
        InvalidURLError: What is wrong with it (its password never shown).
    """
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
    return Address(
        scheme=parts.scheme.lower(),
        host=parts.hostname,
        port=port or 6379,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def _tls_value(name: str, value: Any) -> Any:
    if name == "ssl_min_version":
        import ssl

        return ssl.TLSVersion[{"tlsv1_2": "TLSv1_2", "tlsv1_3": "TLSv1_3"}[value]]
    return value


class RedisConnection:
    """One Redis server as the store uses it: settings, pool, calls, errors and key names.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...``,
            with query options (see :data:`OPTIONS`).
        options: Options that replace the URL's (None values count as not given).

    Raises:
        InvalidURLError: A malformed URL, an unknown option or a bad value.
    """

    def __init__(self, url: str, options: Mapping[str, object]) -> None:
        address = parse_address(url)
        given = {name: value for name, value in options.items() if value is not None}
        values = parse_options(url, OPTIONS, given, backend="redis")
        tls = {
            name: _tls_value(name, values[name])
            for name in _TLS_OPTIONS
            if values[name] is not None
        }
        if tls and address.scheme != "rediss":
            raise InvalidURLError(
                f"TLS option(s) {sorted(tls)} need a rediss:// URL; {redact_url(url)} is plain TCP"
            )
        #: Put before every key.
        self.prefix: str = values["prefix"]
        self.max_connections: int = values["max_connections"]
        self.pool_timeout: float = values["pool_timeout"]
        self._socket_timeout: float = values["socket_timeout"]
        self._connect_timeout: float = values["socket_connect_timeout"]
        self._retries: int = values["retries"]
        username = values["username"] if values["username"] is not None else address.username
        password = values["password"] if values["password"] is not None else address.password
        self._connection: dict[str, Any] = {
            "host": address.host,
            "port": address.port,
            "db": address.db,
            "username": username,
            "password": password,
            **tls,
        }
        self._tls = address.scheme == "rediss"
        host = f"[{address.host}]" if ":" in address.host else address.host
        secret = ":***" if address.password else ""
        login = f"{username or ''}{secret}@" if username or secret else ""
        #: The URL, password masked (``***``), with the prefix.
        self.url = urlunsplit(
            (
                address.scheme,
                f"{login}{host}:{address.port}",
                f"/{address.db}",
                f"prefix={self.prefix}",
                "",
            )
        )
        #: ``host:port``, for messages.
        self.address = f"{host}:{address.port}"
        #: Seconds before cleanup may finish a change across slots (tests shorten it).
        self.grace = GRACE
        #: Seconds between two checks of one tombstone's forks.
        self.recheck = RECHECK
        #: Whether the store's layout was found current (or upgraded) by this object.
        self.layout_ready = False
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        # re-sent after a dropped connection only: one that timed out already waited
        # socket_timeout, and waiting that long again per re-send would multiply it
        backoff = EqualJitterBackoff(cap=_BACKOFF_CAP, base=_BACKOFF_BASE)
        self._retry = Retry(backoff, self._retries, supported_errors=(rexc.ConnectionError,))
        self._server_checked = False
        self._closed = False

    # -- key names -------------------------------------------------------------

    def session_keys(self, session_id: str) -> SessionKeys:
        """The session's keys, all under the hash tag ``{ID}``."""
        base = f"{self.prefix}{{{session_id}}}"
        return SessionKeys(
            f"{base}:rec",
            f"{base}:ev",
            f"{base}:blob",
            f"{base}:forks",
            f"{base}:lease",
            f"{base}:snap",
        )

    def record_key(self, session_id: str) -> str:
        """The session's record (``session_keys(session_id).rec``, made alone)."""
        return f"{self.prefix}{{{session_id}}}:rec"

    def index(self, kind: str = "all", value: str | None = None) -> str:
        """A key of the index slot ``{idx}``: a listing index, ``where``, ``due``, ``expiry``."""
        return f"{self.prefix}{{idx}}:{kind}" + (f":{value}" if value is not None else "")

    @property
    def fixed(self) -> list[str]:
        """The keys every index script gets first: ``where``, ``due``, ``expiry``."""
        return [self.index("where"), self.index("due"), self.index("expiry")]

    # -- calls -----------------------------------------------------------------

    def client(self) -> aioredis.Redis:
        """The client over the pool (made on first use; connects nothing by itself).

        Raises:
            ChatSessionClosedError: The store was closed.
        """
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
                max_connections=self.max_connections,
                timeout=self.pool_timeout,
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._connect_timeout,
                # the driver never re-sends by itself: run() decides which calls may be
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
                **self._connection,
                **extra,
            )
            self._client = aioredis.Redis.from_pool(pool)
            for name, source in SCRIPTS.items():
                self._scripts[name] = self._client.register_script(source)
        return self._client

    async def run(
        self,
        fn: Callable[[aioredis.Redis], Awaitable[T]],
        *,
        write: bool = False,
        keys: Sequence[str] = (),
        resend: bool = True,
        sent: list[int] | None = None,
    ) -> T:
        """Run Redis calls, translating the driver's errors into the store's.

        Args:
            fn: The calls, given the client.
            write: Whether they may change data (for the message of an error).
            keys: The keys they touch (for messages).
            resend: Whether ``fn`` is safe to run again when the connection
                drops before its reply (the ``retries`` option; a timeout is not
                re-sent: it already waited ``socket_timeout``).
            sent: Gets one item per time ``fn`` was started (to tell a
                re-sent call's answer from the first one's).

        Raises:
            StoreUnavailableError: The server cannot be reached, timed out (also
                after the re-sends) or refuses service.
            StoreError: Another error reply (``CorruptDataError`` for a key of
                the wrong type).
        """
        client = self.client()

        async def attempt() -> T:
            if sent is not None:
                sent.append(1)
            try:
                if not self._server_checked:
                    await self._check_server(client)
                return await fn(client)
            except (rexc.AuthenticationError, rexc.AuthorizationError) as exc:
                raise _Final(exc) from exc
            except rexc.ConnectionError as exc:
                if "No connection available" in str(exc):
                    raise _Final(_PoolBusy(str(exc))) from exc
                raise

        try:
            if resend and self._retries:
                return await self._retry.call_with_retry(attempt, _forget)
            return await attempt()
        except _Final as exc:
            raise self.translate(exc.original, write, keys) from exc.original
        except (rexc.RedisError, OSError) as exc:
            raise self.translate(exc, write, keys) from exc

    async def script(
        self,
        name: str,
        args: Sequence[Any],
        keys: Sequence[str],
        *,
        write: bool = True,
        resend: bool = True,
        sent: list[int] | None = None,
    ) -> list[Any]:
        """Run the script ``name`` (see :mod:`.scripts`) with ``keys`` and ``args``."""

        async def work(r: aioredis.Redis) -> list[Any]:
            result: list[Any] = await self._scripts[name](
                keys=list(keys), args=list(args), client=r
            )
            return result

        return await self.run(work, write=write, keys=keys, resend=resend, sent=sent)

    async def script_each(
        self,
        name: str,
        calls: Sequence[tuple[bytes, Sequence[bytes]]],
        shared: Sequence[bytes] = (),
        *,
        write: bool = False,
    ) -> list[Any]:
        """Run the script ``name`` once per call, all in one round trip on one connection.

        Each call is ``(key, args)``: the script's one key, and its first
        arguments (as many in every call); ``shared`` follows them in every
        call. Each call may be on another hash slot. For many small calls (``stats()`` sends one per
        session): the commands are packed here, once for what they share,
        rather than one by one by the driver's pipeline, whose packing and
        per-command bookkeeping cost several times more than the calls
        themselves. The script goes by its SHA (loaded, and the calls sent
        again, if the server lacks it). Every call is sent again after a
        dropped connection: use it for scripts that are safe to repeat. (On
        Redis Cluster, the calls would have to be grouped by node.)

        Returns:
            The replies, in the order of ``calls``.

        Raises:
            StoreUnavailableError, StoreError: As :meth:`run` (the first error
                reply of any call).
        """
        if not calls:
            return []
        source = SCRIPTS[name]
        sha = hashlib.sha1(source.encode()).hexdigest().encode()  # as SCRIPT LOAD names it
        rest = b"".join(_bulk(arg) for arg in shared)
        head = f"*{4 + len(shared) + len(calls[0][1])}\r\n$7\r\nEVALSHA\r\n".encode()
        head += _bulk(sha) + b"$1\r\n1\r\n"
        payload = b"".join(
            head + _bulk(key) + b"".join(_bulk(arg) for arg in args) + rest for key, args in calls
        )

        async def work(r: aioredis.Redis) -> list[Any]:
            for loaded in (False, True):
                replies = await _exchange(r, payload, len(calls), self._socket_timeout)
                first = next((x for x in replies if isinstance(x, Exception)), None)
                if isinstance(first, rexc.NoScriptError) and not loaded:
                    await r.script_load(source)
                    continue
                if first is not None:
                    raise first
                break
            return replies

        return await self.run(work, write=write)

    async def in_order(
        self, calls: Sequence[tuple[str, Sequence[Any], Sequence[str]]]
    ) -> list[list[Any] | StoreError]:
        """Run scripts one after the other in one round trip: their replies, or their errors.

        One connection keeps their order: the server runs each after the one
        before it, and a script that fails does not stop the next one (the
        caller undoes what it must). They are sent as ``EVAL``, so a server
        that lost its script cache runs them all the same. Sent again, all of
        them, after a dropped connection (every step they are used for is safe
        to repeat). On Redis Cluster, calls to different slots would have to be
        sent one after the other instead.

        Raises:
            StoreUnavailableError: As :meth:`run`, for the round trip.
        """

        async def work(r: aioredis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for name, args, keys in calls:
                pipe.execute_command("EVAL", SCRIPTS[name], len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

        keys = [key for _, _, call_keys in calls for key in call_keys]
        replies = await self.run(work, write=True, keys=keys)
        return [
            self.translate(reply, True, call[2]) if isinstance(reply, Exception) else reply
            for reply, call in zip(replies, calls, strict=True)
        ]

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

    def translate(self, exc: BaseException, write: bool, keys: Sequence[str] = ()) -> StoreError:
        """The store's error for a driver error (``keys``: what the call touched, for messages)."""
        where = f"Redis at {self.address}"
        maybe = (
            " The write may or may not have been applied: re-read before retrying." if write else ""
        )
        message = str(exc)
        if isinstance(exc, _PoolBusy):
            return StoreUnavailableError(
                f"all {self.max_connections} connections to {where} stayed busy for "
                f"{self.pool_timeout:g} s; raise max_connections or pool_timeout in the store "
                "URL, or send fewer calls at once"
            )
        if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
            return StoreUnavailableError(
                f"{where} refused the credentials ({message}); check the user and password "
                "in the store URL"
            )
        if isinstance(exc, rexc.BusyLoadingError):
            return StoreUnavailableError(f"{where} is still loading its data; retry in a moment")
        if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | OSError):
            return StoreUnavailableError(
                f"{where} is unreachable ({type(exc).__name__}: {message}); check that the "
                f"server is running and the URL is right, then retry.{maybe}"
            )
        if isinstance(exc, rexc.ResponseError):
            code = _error_code(exc)
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

    def too_late(self, what: str) -> StoreUnavailableError:
        """A change across slots whose commit came after half the grace: not applied."""
        return StoreUnavailableError(
            f"{what} took more than {self.grace / 2:g} s between its steps on Redis at "
            f"{self.address} (a slow or overloaded connection), so it was not applied; retry"
        )

    async def aclose(self) -> None:
        """Close the pool. Idempotent; the connection refuses calls afterwards."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


async def _forget(error: Exception) -> None:
    """Before a re-send: nothing to do (the client already dropped the broken connection)."""


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


def _bulk(value: bytes) -> bytes:
    """One argument of a command in the Redis protocol (RESP)."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


async def _exchange(r: aioredis.Redis, payload: bytes, count: int, timeout: float) -> list[Any]:
    """Send ``payload`` (``count`` packed commands) on one pooled connection; read every reply.

    An error reply is kept in its place (the replies after it are still
    read, so the connection stays in step); a connection that failed half
    way is closed, never handed out again with replies left unread. The
    replies are read under one deadline, moved ``timeout`` seconds on every
    :data:`_STEP` replies (a deadline per reply, as the driver sets, costs
    more than reading the reply): a server that sends nothing for
    ``timeout`` seconds fails the call.
    """
    pool = r.connection_pool
    # typed loosely: untyped in some versions of redis-py
    get_connection = cast(Callable[[], Awaitable[Any]], pool.get_connection)
    connection = await get_connection()
    loop = asyncio.get_running_loop()
    try:
        await connection.send_packed_command(payload)
        replies: list[Any] = []
        async with asyncio.timeout_at(loop.time() + timeout) as deadline:
            for i in range(count):
                if i % _STEP == 0 and i:
                    deadline.reschedule(loop.time() + timeout)
                try:
                    replies.append(await connection.read_response(timeout=math.inf))
                except rexc.ResponseError as exc:
                    replies.append(exc)
        return replies
    except TimeoutError:
        await connection.disconnect(nowait=True)
        raise rexc.TimeoutError("Timeout reading the replies of a batch of script calls") from None
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)
