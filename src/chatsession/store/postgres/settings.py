"""The PostgreSQL URL: hosts, ports, user, password, database and options, parsed strictly.

The options are read by the shared :func:`~chatsession.store.options.parse_options`
(unknown, repeated and malformed options refused, typed values with ranges);
what only a PostgreSQL URL has (a host list, IPv6 hosts, a password that a
reserved character cut short) is checked here. The result becomes asyncpg's
connection arguments as parsed values, never a connection string.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from chatsession.errors import InvalidURLError
from chatsession.store.options import choice, integer, parse_options, seconds, text
from chatsession.store.urls import redact_url

_PORT_RE = re.compile(r"[0-9]{1,5}")

#: The options a ``postgresql://`` URL takes (see the package docstring).
OPTIONS = {
    "schema": text(
        "public",
        pattern=r"[a-z_][a-z0-9_]{0,62}",
        describe="a plain lower-case identifier (a-z, 0-9 and _, not starting with a digit, "
        "at most 63 characters)",
    ),
    "synchronous_commit": choice("on", "off", "local", "remote_write", "remote_apply"),
    "min_size": integer(0, 1000, default=1),
    "max_size": integer(1, 1000, default=10),
    "command_timeout": seconds(0, 86400, default=30.0, low_open=True),
    "connect_timeout": seconds(0, 86400, default=10.0, low_open=True),
    "sslmode": choice("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "application_name": text(
        pattern=r"[ -~]{0,63}",  # printable ASCII: the server keeps it as is
        describe="at most 63 printable ASCII characters",
    ),
    "password": text(secret=True, describe="the password (no NUL)"),
}


@dataclass(frozen=True)
class Settings:
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


def _hosts(
    hostinfo: str,
    bad: Callable[[str], InvalidURLError],
    decoded: Callable[[str, str], str],
) -> tuple[list[str], list[int | None]]:
    """The hosts and ports of ``host[:port][,host2[:port2]...]`` (IPv6 as ``[addr]``)."""
    hosts: list[str] = []
    ports: list[int | None] = []
    items = hostinfo.split(",") if hostinfo else []
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
    return hosts, ports


def parse_url(url: object, overrides: Mapping[str, object]) -> Settings:
    """Parse a ``postgresql://`` URL and override its options with ``overrides``.

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
    hosts, ports = _hosts(hostinfo, bad, decoded)
    path = parts.path
    if path and not path.startswith("/"):
        raise bad("the database must follow the host after '/'")
    database = (decoded(path[1:], "database") or None) if path else None

    # libpq reads '+' in a value as itself (a form's query would read a space), and
    # a %-escape that is not UTF-8 is an error, not a replacement character
    decoded(parts.query, "options")
    query = parts.query.replace("+", "%2B")
    options = parse_options(
        urlunsplit(parts._replace(query=query)), OPTIONS, overrides, backend="PostgreSQL"
    )
    option_password = options["password"]
    if option_password is not None:
        if password is not None:
            raise bad("the password is given twice (in the URL's user part and as an option)")
        password = option_password
    if options["min_size"] > options["max_size"]:
        raise bad(
            f"min_size ({options['min_size']}) must not be above max_size ({options['max_size']})"
        )
    return Settings(
        hosts=tuple(hosts),
        ports=tuple(ports),
        user=user,
        password=password,
        database=database,
        schema=options["schema"],
        synchronous_commit=options["synchronous_commit"],
        min_size=options["min_size"],
        max_size=options["max_size"],
        command_timeout=options["command_timeout"],
        connect_timeout=options["connect_timeout"],
        sslmode=options["sslmode"],
        application_name=options["application_name"],
    )
