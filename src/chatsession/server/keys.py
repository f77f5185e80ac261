"""API keys: each maps to a user; stored hashed, in the store itself.

The key table lives in a reserved system session, :data:`KEYS_SESSION`
(``_chatsession.apikeys``, no owner), as an append-only log of ``metadata``
events, one per change: ``{"values": {"apikey.<id>": {...}}}`` when a key is
created or revoked. Folding the log gives the table. So every backend
(memory, SQLite, files, Redis, PostgreSQL) shares the keys between all the
workers of one store, through the :class:`~chatsession.store.Store`
protocol alone, and the log keeps who created and revoked what, and when.

A key reads ``csk_<key id>_<secret>``: 12 hex digits naming the entry, then
32 random bytes (URL-safe base64). Only the SHA-256 of the whole key is
stored; a presented key is hashed and compared in constant time.

Each worker keeps a copy of the table for ``cache_seconds`` (default 2) and
reads the log's new events (only those) when the copy is older, or at once
when a key it does not know is presented. A key revoked on one worker stops
working there at once and on the others within ``cache_seconds``.

This module does not need the ``server`` extra: ``chatsession keys`` uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from chatsession.errors import (
    ConflictError,
    InvalidArgumentError,
    SessionExistsError,
    SessionNotFoundError,
)
from chatsession.log import Metadata, MetadataEntry, encode
from chatsession.manager.manager import SYSTEM_PREFIX, is_system_session
from chatsession.store import SessionRecord, Store
from chatsession.store.base import check_text

__all__ = ["KEYS_SESSION", "APIKey", "KeyRing", "hash_key", "is_system_session"]

#: The reserved session that holds the key table (no owner, never expires).
KEYS_SESSION = SYSTEM_PREFIX + "apikeys"
#: The agent id recorded on system sessions.
SYSTEM_AGENT = "_chatsession"
#: Metadata keys of key entries start with this.
_ENTRY_PREFIX = "apikey."
_KEY_PREFIX = "csk_"
_ID_HEX = 12
_APPEND_TRIES = 50
#: Seconds between re-reads of the key table for key ids it does not hold.
_MISS_REFRESH = 0.1


def hash_key(key: str) -> str:
    """The stored form of a key: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _key_id(key: str) -> str | None:
    """The key id a presented key names, or None when it is not shaped like a key."""
    if not key.startswith(_KEY_PREFIX) or len(key) < len(_KEY_PREFIX) + _ID_HEX + 2:
        return None
    key_id = key[len(_KEY_PREFIX) : len(_KEY_PREFIX) + _ID_HEX]
    if key[len(_KEY_PREFIX) + _ID_HEX] != "_" or any(c not in "0123456789abcdef" for c in key_id):
        return None
    return key_id


@dataclass(frozen=True)
class APIKey:
    """One API key as the table keeps it (never the key itself).

    Attributes:
        key_id: Its id (the 12 hex digits after ``csk_``); shown in listings.
        user_id: The user it acts as (None: an admin key without a user).
        name: A label.
        admin: Whether it may manage users and keys.
        created_at: Unix seconds.
        revoked_at: Unix seconds it was revoked, or None while it is valid.
        key_hash: The SHA-256 of the key (hex); never shown in full.
    """

    key_id: str
    user_id: str | None
    name: str | None
    admin: bool
    created_at: float
    revoked_at: float | None = None
    key_hash: str = ""

    @property
    def hint(self) -> str:
        """How the key is shown: ``csk_<id>_...`` (the secret never is)."""
        return f"{_KEY_PREFIX}{self.key_id}_..."

    def to_json(self) -> dict[str, object]:
        """The entry as stored (with its hash)."""
        return {
            "user_id": self.user_id,
            "name": self.name,
            "admin": self.admin,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "hash": self.key_hash,
        }

    @classmethod
    def from_json(cls, key_id: str, value: object) -> APIKey | None:
        """An entry from its stored form (None when it is not one)."""
        if not isinstance(value, dict):
            return None
        user = value.get("user_id")
        name = value.get("name")
        created = value.get("created_at")
        revoked = value.get("revoked_at")
        digest = value.get("hash")
        if not isinstance(digest, str) or not isinstance(created, int | float):
            return None
        return cls(
            key_id=key_id,
            user_id=user if isinstance(user, str) else None,
            name=name if isinstance(name, str) else None,
            admin=value.get("admin") is True,
            created_at=float(created),
            revoked_at=float(revoked) if isinstance(revoked, int | float) else None,
            key_hash=digest,
        )


class KeyRing:
    """The API key table of one store, cached for ``cache_seconds``.

    Args:
        store: The store that holds the table (in :data:`KEYS_SESSION`).
        cache_seconds: How long the copy is used before new changes are read.
        clock: Unix time (tests pass a fake one).
    """

    def __init__(
        self,
        store: Store,
        *,
        cache_seconds: float = 2.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self._clock = clock or time.time
        self._keys: dict[str, APIKey] = {}
        self._seq = 0
        self._read_at = -float("inf")
        self._lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------
    # reading

    async def refresh(self) -> None:
        """Read the changes made since the last read (by any worker).

        Raises:
            StoreUnavailableError: The store cannot be reached.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        started = time.monotonic()
        async with self._lock:
            if self._read_at >= started:
                return  # another caller read while we waited
            try:
                record = await self.store.get(KEYS_SESSION)
            except SessionNotFoundError:
                self._keys, self._seq = {}, 0
                self._read_at = time.monotonic()
                return
            if record.head < self._seq:  # deleted and made again: read it all
                self._keys, self._seq = {}, 0
            if record.head > self._seq:
                keys = dict(self._keys)
                seq = self._seq
                async for batch in self.store.read(KEYS_SESSION, after_seq=seq):
                    for row in batch:
                        seq = row.seq
                        if row.type != "metadata":
                            continue
                        try:
                            values = json.loads(row.data).get("values", {})
                        except (ValueError, AttributeError):
                            continue
                        for name, value in values.items():
                            if not name.startswith(_ENTRY_PREFIX):
                                continue
                            key_id = name[len(_ENTRY_PREFIX) :]
                            entry = APIKey.from_json(key_id, value)
                            if entry is None:
                                keys.pop(key_id, None)
                            else:
                                keys[key_id] = entry
                self._keys, self._seq = keys, seq
            self._read_at = time.monotonic()

    async def _fresh(self) -> None:
        if time.monotonic() - self._read_at >= self.cache_seconds:
            await self.refresh()

    async def authenticate(self, key: str) -> APIKey | None:
        """The valid (not revoked) entry of a presented key, or None.

        The table is read again when the cached copy is older than
        ``cache_seconds``, or when the key's id is not in it (a key just
        created by another worker).

        Raises:
            StoreUnavailableError: The store cannot be reached.
        """
        key_id = _key_id(key)
        if key_id is None:
            return None
        await self._fresh()
        entry = self._keys.get(key_id)
        if entry is None and time.monotonic() - self._read_at >= _MISS_REFRESH:
            # an id made by another worker since the last read: read again, but at most
            # every _MISS_REFRESH seconds, so made-up keys cannot make every request
            # read the store
            await self.refresh()
            entry = self._keys.get(key_id)
        if entry is None or entry.revoked_at is not None:
            return None
        if not hmac.compare_digest(entry.key_hash, hash_key(key)):
            return None
        return entry

    async def list_keys(self, *, user_id: str | None = None) -> list[APIKey]:
        """Every key (revoked ones too), oldest first; only ``user_id``'s when given."""
        await self.refresh()
        keys = sorted(self._keys.values(), key=lambda k: (k.created_at, k.key_id))
        return [k for k in keys if user_id is None or k.user_id == user_id]

    async def get_key(self, key_id: str) -> APIKey | None:
        """The entry with that id, or None."""
        await self.refresh()
        return self._keys.get(key_id)

    # ------------------------------------------------------------------
    # changing

    async def create_key(
        self, user_id: str | None, *, name: str | None = None, admin: bool = False
    ) -> tuple[APIKey, str]:
        """Make a new key for ``user_id``; returns its entry and the key (shown once).

        Raises:
            InvalidArgumentError: No user for a key that is not an admin key,
                or a bad user id or name.
            StoreUnavailableError: The store cannot be reached.
        """
        if user_id is None and not admin:
            raise InvalidArgumentError("a key that is not an admin key needs a user_id")
        if user_id is not None:
            check_text(user_id, "user_id", controls=False)
            if not user_id.strip():
                raise InvalidArgumentError("user_id must not be empty")
        if name is not None:
            check_text(name, "name", controls=False)
        key_id = secrets.token_hex(_ID_HEX // 2)
        key = f"{_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        entry = APIKey(
            key_id=key_id,
            user_id=user_id,
            name=name,
            admin=admin,
            created_at=self._clock(),
            key_hash=hash_key(key),
        )
        await self._write({_ENTRY_PREFIX + key_id: entry.to_json()})
        self._keys[key_id] = entry
        return entry, key

    async def revoke_key(self, key_id: str) -> APIKey | None:
        """Revoke a key (the log keeps that it existed); None when there is no such key.

        Revoking twice keeps the first time.
        """
        entry = await self.get_key(key_id)
        if entry is None:
            return None
        if entry.revoked_at is not None:
            return entry
        revoked = replace(entry, revoked_at=self._clock())
        await self._write({_ENTRY_PREFIX + key_id: revoked.to_json()})
        self._keys[key_id] = revoked
        return revoked

    async def _write(self, values: dict[str, object]) -> None:
        """Append one change to the table's log (creating the log when missing)."""
        event = encode(MetadataEntry(data=Metadata(values=values)))
        for attempt in range(_APPEND_TRIES):
            try:
                head = (await self.store.get(KEYS_SESSION)).head
            except SessionNotFoundError:
                with contextlib.suppress(SessionExistsError):
                    await self.store.create(
                        SessionRecord(
                            id=KEYS_SESSION,
                            user_id=None,
                            agent_id=SYSTEM_AGENT,
                            title="API keys (chatsession server)",
                        )
                    )
                continue
            try:
                await self.store.append(KEYS_SESSION, [event], head)
                return
            except ConflictError:
                await asyncio.sleep(0.002 * min(attempt + 1, 20))
        raise ConflictError(KEYS_SESSION, 0, None, "head (the key table kept moving)")
