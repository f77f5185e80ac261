"""``PostgresStore``: the concerns of the PostgreSQL backend, put together."""

from __future__ import annotations

from typing import Any, Self

from chatsession.store.postgres.blobs import Blobs
from chatsession.store.postgres.events import Events
from chatsession.store.postgres.leases import Leases
from chatsession.store.postgres.records import Records


class PostgresStore(Records, Events, Leases, Blobs):
    """The PostgreSQL store (``postgresql://``). See :mod:`chatsession.store.postgres`.

    Payloads are kept as JSONB where JSONB gives them back as equal values
    of the same types (with whitespace and key order normalised, not byte
    for byte as the other backends do), and as exact text otherwise
    (``\\u0000``, numbers JSONB would rewrite or cannot hold); see the
    package docstring.

    Args:
        url: A ``postgresql://`` URL (see the package docstring for options).
        **options: Options overriding the URL's (``schema``, ``max_size``, ...).

    Raises:
        InvalidURLError: A malformed URL, an unknown or repeated option, a
            bad value or port (the password is never shown).
    """

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open ``postgresql://...`` (see the package docstring for options).

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
