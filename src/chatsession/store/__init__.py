"""Stores chosen by URL.

=========================  ==========================================  =========
URL                        backend                                     extra
=========================  ==========================================  =========
``memory://``              in this process only (tests, throwaways)    -
``sqlite:///rel/path.db``  embedded SQLite (the default); four slashes -
                           for an absolute path: ``sqlite:////a/b.db``
``file:///abs/dir``        a folder per session, JSONL (``cat``/``jq``) -
``redis://host:6379/0``    Redis (``rediss://`` for TLS)               ``redis``
``postgresql://u@h/db``    PostgreSQL                                  ``postgres``
=========================  ==========================================  =========

With no URL, :func:`open_store` uses ``CHATSESSION_STORE_URL`` or, when that is
unset, ``sqlite:///`` + the platform's user data directory + ``sessions.db``.

Passwords never leave :func:`open_store` and the stores it opens: error
messages, ``repr`` and ``store.url`` show them as ``***``
(:func:`~chatsession.store.base.redact_url`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chatsession.errors import InvalidURLError, MissingDependencyError
from chatsession.store.base import (
    Lease,
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    SessionState,
    Store,
    StoredEvent,
    StoreStats,
    redact_url,
    validate_id,
)

__all__ = [
    "Lease",
    "NewEvent",
    "Page",
    "ParentRef",
    "SessionRecord",
    "SessionState",
    "Store",
    "StoreStats",
    "StoredEvent",
    "default_store_url",
    "open_store",
    "validate_id",
]

# scheme -> (module, class, extra needed or None, python module the extra provides)
_BACKENDS: dict[str, tuple[str, str, str | None, str | None]] = {
    "memory": ("chatsession.store.memory", "MemoryStore", None, None),
    "sqlite": ("chatsession.store.sqlite", "SQLiteStore", None, None),
    "file": ("chatsession.store.jsonl", "JSONLStore", None, None),
    "redis": ("chatsession.store.redis", "RedisStore", "redis", "redis"),
    "rediss": ("chatsession.store.redis", "RedisStore", "redis", "redis"),
    "postgresql": ("chatsession.store.postgres", "PostgresStore", "postgres", "asyncpg"),
    "postgres": ("chatsession.store.postgres", "PostgresStore", "postgres", "asyncpg"),
}


def default_store_url() -> str:
    """The store used when none is given.

    ``CHATSESSION_STORE_URL`` if set, else a SQLite file ``sessions.db`` in
    ``CHATSESSION_DATA_DIR`` or the platform's user data directory (for
    example ``~/.local/share/chatsession`` on Linux), as read by
    :func:`chatsession.settings.get_settings`.

    Raises:
        UsageError: One of those variables holds a value that cannot be used.
    """
    from chatsession.settings import get_settings

    settings = get_settings()
    if settings.store_url:
        return settings.store_url
    data_dir = settings.data_dir
    if data_dir is None:
        import platformdirs

        data_dir = Path(platformdirs.user_data_dir("chatsession", appauthor=False))
    return "sqlite:///" + str(data_dir.expanduser().absolute() / "sessions.db")


def open_store(url: str | None = None, **options: Any) -> Store:
    """Open the store a URL names. Connections are made lazily, on first use.

    Args:
        url: A store URL (see the table above); None for the default.
        **options: Backend options, overriding the URL's query parameters.

    Returns:
        A :class:`~chatsession.store.base.Store`. Close it with ``await store.aclose()``.

    Raises:
        InvalidURLError: The URL is malformed (a port that is not a number from
            0 to 65535 included) or its scheme is unknown. The message shows the
            URL with its password masked.
        MissingDependencyError: The backend needs an extra that is not installed.
    """
    if url is None:
        url = default_store_url()
    if not isinstance(url, str) or not url.strip():
        shown = redact_url(url) if isinstance(url, str) else type(url).__name__
        raise InvalidURLError(f"store URL must be a non-empty string, got {shown}")
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:  # its text may quote the URL's parts: keep it out
        why = "its port is not a number from 0 to 65535"
        if "port" not in str(exc).lower():
            why = "it cannot be parsed (is a [bracketed] IPv6 host left open?)"
        raise InvalidURLError(f"store URL {shown} is malformed: {why}") from None
    scheme = parts.scheme.lower()
    if scheme not in _BACKENDS:
        known = ", ".join(f"{s}://" for s in sorted(_BACKENDS))
        raise InvalidURLError(
            f"unknown store URL scheme {scheme + '://' if scheme else '(none)'} in {shown}; "
            f"use one of: {known} (for example sqlite:///sessions.db)"
        )
    module_name, class_name, extra, driver = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or ""
        if extra is not None and driver is not None and missing.split(".")[0] == driver:
            raise MissingDependencyError(f"the {scheme}:// store", extra, driver) from exc
        raise
    cls = getattr(module, class_name)
    store: Store = cls.from_url(url, **options)
    return store
