"""Encryption at rest: a store wrapper that encrypts what it keeps (AES-256-GCM).

:class:`EncryptingStore` takes any :class:`~chatsession.store.base.Store` and
a list of keys. It meets the whole ``Store`` contract itself, delegating every
call to the store it wraps and encrypting on the way in, decrypting on the
way out. The first key encrypts; every key decrypts (key rotation). It needs
the ``encryption`` extra (``cryptography``), imported when a store is made.

What the wrapped store sees:

- **Encrypted**: event payloads (the ``data`` JSON becomes
  ``{"enc": "cse1.<key id>.<base64>"}``; ``usage`` events keep their
  ``total_tokens`` beside it, ``{"total_tokens": 42, "enc": ...}``, so the
  store's :meth:`~chatsession.store.base.Store.stats` still sums tokens); a
  record's ``title``, ``metadata`` (keys and values) and ``fingerprint``
  (sealed together into one value, stored as the record's only metadata key
  ``$encrypted``; title and fingerprint are stored as None); snapshots; blobs.
- **Plain** (the store needs them to find, list, limit, expire, lease and
  count): ids, ``user_id``/``agent_id``/``window_id``, ``state``, times,
  ``parent``, ``head``/``version``; each event's ``type``, ``ts``,
  ``turn_id``, ``event_id`` and ``schema_version``; blob media types;
  payload sizes (roughly), and which key id wrote each value.

Every ciphertext is bound, by the associated data of AES-GCM, to where it
belongs: an event to the session that wrote it, its seq, type, turn id and
time; a record to its session; a snapshot to its session and seq; a blob to
the session that wrote it. A fork reads its parent's events: the fork's
(encrypted) record keeps the list of sessions it inherits from and up to
which seq (its *lineage*), so an inherited event is checked against the
session that wrote it, and a ciphertext moved from another session, or to
another place in the same session, or changed in any bit, does not decrypt:
:class:`~chatsession.errors.DecryptionError`.

Snapshots are a cache: one that does not decrypt reads as missing (logged),
and the session rebuilds its state from the log. A record that does not
decrypt is skipped by ``list_sessions`` (logged), as damaged records are.

Blob ids are the wrapped store's content hash of the encrypted bytes. Blobs
are encrypted deterministically (the nonce is derived from the key, the
session and the content), so putting the same bytes twice in a session gives
the same id; the id is not the sha256 of the plain bytes (that would tell
anyone holding a guess of the content whether a session has it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

from chatsession.errors import (
    CorruptDataError,
    DecryptionError,
    InvalidArgumentError,
    MissingDependencyError,
    SessionNotFoundError,
    UnsupportedValueError,
)
from chatsession.store.base import (
    DEFAULT_READ_BATCH,
    MAX_BLOB_BYTES,
    MAX_PAYLOAD_BYTES,
    Lease,
    NewEvent,
    Page,
    SessionRecord,
    SessionState,
    Store,
    StoredEvent,
    StoreStats,
    check_append,
    check_blob,
    check_create,
    check_fork_at,
    check_read,
    check_record,
    check_snapshot,
    check_version,
    count_events,
    validate_id,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_BYTES", "EncryptingStore", "generate_key", "key_id"]

_logger = logging.getLogger(__name__)

#: The length of an AES-256 key in bytes.
KEY_BYTES = 32

_NONCE_BYTES = 12
_TAG_BYTES = 16
_TOKEN_PREFIX = "cse1"  # chatsession encryption, format 1
_SNAPSHOT_MAGIC = b"CSE1"
_BLOB_MAGIC = b"CSB1"
_RECORD_FIELD = "$encrypted"
#: data of more bytes than this is encrypted in a worker thread, not in the event loop
_THREAD_ABOVE = 1 << 20
#: lineages remembered between a get and the update that follows it
_LINEAGE_CACHE = 4096

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_SEALED_EVENT = re.compile(
    r'\{\s*(?:"total_tokens"\s*:\s*\d+\s*,\s*)?"enc"\s*:\s*"(?P<token>[A-Za-z0-9._\-]+)"'
    r'\s*(?:,\s*"total_tokens"\s*:\s*\d+\s*)?\}'
)

#: sessions a fork's events come from: ``(session_id, last seq)`` from the root on
Lineage = tuple[tuple[str, int], ...]


def _aesgcm() -> type[AESGCM]:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:
        raise MissingDependencyError(
            "encryption at rest (EncryptingStore, encryption_keys=)", "encryption", "cryptography"
        ) from exc
    return AESGCM


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def _key_bytes(key: object, index: int = 0) -> bytes:
    """The 32 raw bytes of a key given as bytes, or as base64 or hex text."""
    what = f"encryption key #{index + 1}"
    if isinstance(key, bytes | bytearray):
        if len(key) != KEY_BYTES:
            raise InvalidArgumentError(
                f"{what} is {len(key)} bytes; an AES-256 key is {KEY_BYTES} random bytes (or "
                "their base64 or hex text, as a str): make one with generate_key()"
            )
        return bytes(key)
    if not isinstance(key, str):
        raise InvalidArgumentError(
            f"{what} must be bytes or a str (base64 or hex), not {type(key).__name__}"
        )
    text = key.strip()
    if _HEX64.fullmatch(text):
        return bytes.fromhex(text)
    standard = text.replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        # never show the text: it may be a real key with a typo
        raise InvalidArgumentError(
            f"{what} (a str of {len(text)} characters) is not the base64 or hex text of "
            f"{KEY_BYTES} bytes; make one with generate_key()"
        )
    return raw


def _id_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:8]


def key_id(key: str | bytes) -> str:
    """The id a key is known by in stored ciphertexts: 8 hex digits of its sha256.

    Args:
        key: 32 raw bytes, or their base64 or hex text.

    Returns:
        The key id, e.g. ``"3fa4c2b1"``.

    Raises:
        InvalidArgumentError: Not a 32-byte key in one of those forms.
    """
    return _id_of(_key_bytes(key))


def generate_key() -> str:
    """A new random AES-256 key, as URL-safe base64 text (44 characters).

    Keep it secret and keep it safe: data encrypted with it cannot be read
    without it.

    Returns:
        The key, usable in ``encryption_keys`` and :class:`EncryptingStore`.
    """
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")


class _Key:
    """One key: its id (text and raw), its cipher, and the key blob nonces derive from."""

    __slots__ = ("aead", "id", "nonce_key", "raw_id")

    def __init__(self, raw: bytes, aead: AESGCM) -> None:
        self.id = _id_of(raw)
        self.raw_id = bytes.fromhex(self.id)
        self.aead = aead
        self.nonce_key = hmac.new(raw, b"chatsession blob nonce 1", hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _event_aad(writer: str, seq: int, kind: str, turn_id: str | None, ts: float) -> bytes:
    turn = "-" if turn_id is None else "+" + turn_id
    parts = ("chatsession/event/1", writer, str(seq), kind, turn, float(ts).hex())
    return "\x00".join(parts).encode("utf-8", "surrogatepass")


def _record_aad(session_id: str) -> bytes:
    return b"chatsession/record/1\x00" + session_id.encode()


def _snapshot_aad(session_id: str, seq: int) -> bytes:
    return f"chatsession/snapshot/1\x00{session_id}\x00{seq}".encode()


def _blob_aad(writer: str) -> bytes:
    return b"chatsession/blob/1\x00" + writer.encode()


def _child_lineage(parent_id: str, parent: Lineage, at_seq: int) -> Lineage:
    """The lineage of a fork of ``parent_id`` (whose lineage is ``parent``) at ``at_seq``."""
    out: list[tuple[str, int]] = []
    done = 0
    for writer, upto in parent:
        high = min(upto, at_seq)
        if high > done:
            out.append((writer, high))
            done = high
        if upto >= at_seq:
            return tuple(out)
    if at_seq > done:
        out.append((parent_id, at_seq))
    return tuple(out)


def _writer(lineage: Lineage, seq: int, session_id: str) -> str:
    """The session that wrote event ``seq`` of ``session_id``."""
    for writer, upto in lineage:
        if seq <= upto:
            return writer
    return session_id


_CHANGED = "it was changed after it was written, or moved from another session or place"


class EncryptingStore:
    """A :class:`~chatsession.store.base.Store` that encrypts what it keeps in another store.

    ``SessionManager(encryption_keys=[...])`` wraps its store in one. See the
    module docstring (and ``docs/privacy.md``) for what is encrypted and what
    the wrapped store still sees in plain.

    Args:
        base: The store that keeps the encrypted data (any ``Store``).
        keys: AES-256 keys, each 32 random bytes or their base64 or hex text
            (:func:`generate_key`). The first encrypts everything written
            from now on; all of them decrypt. To rotate, put a new key first
            and keep the old ones after it for as long as data written with
            them is kept.
        allow_plaintext: Read values that are not encrypted (written to the
            store before encryption was turned on) as they are, instead of
            raising :class:`~chatsession.errors.DecryptionError`. Off by
            default: with it on, whoever can write to the store can also put
            in plain events that would be taken as genuine.

    Raises:
        InvalidArgumentError: No keys, a key that is not 32 bytes (or their
            base64 or hex text), the same key twice, or ``base`` not a store.
        MissingDependencyError: ``cryptography`` is not installed (the
            ``encryption`` extra).

    Example::

        key = generate_key()  # keep it in a secret manager
        store = EncryptingStore(open_store("sqlite:///chats.db"), [key])
    """

    def __init__(
        self, base: Store, keys: Sequence[str | bytes], *, allow_plaintext: bool = False
    ) -> None:
        aesgcm = _aesgcm()
        self._invalid_tag = _invalid_tag()
        if not isinstance(base, Store):
            raise InvalidArgumentError(
                f"base must be a store (open_store(url) or your own Store), not "
                f"{type(base).__name__}"
            )
        if isinstance(keys, str | bytes | bytearray) or not isinstance(keys, Sequence):
            raise InvalidArgumentError(
                "keys must be a list of keys (the first encrypts, all decrypt), e.g. "
                "[generate_key()], not a single "
                f"{type(keys).__name__}"
            )
        if not keys:
            raise InvalidArgumentError(
                "keys is empty: give at least one key (make one with generate_key())"
            )
        self._keys: list[_Key] = []
        self._by_id: dict[str, _Key] = {}
        for index, key in enumerate(keys):
            raw = _key_bytes(key, index)
            made = _Key(raw, aesgcm(raw))
            if made.id in self._by_id:
                raise InvalidArgumentError(
                    f"encryption key #{index + 1} (id {made.id}) is listed twice; list each key once"
                )
            self._keys.append(made)
            self._by_id[made.id] = made
        self._by_raw_id = {key.raw_id: key for key in self._keys}
        self.base = base
        self.allow_plaintext = bool(allow_plaintext)
        self.url: str = base.url
        self._lineages: OrderedDict[tuple[str, float, str | None, int], Lineage] = OrderedDict()

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the keys, the encrypting one first."""
        return tuple(key.id for key in self._keys)

    def __repr__(self) -> str:
        return f"EncryptingStore({self.url!r}, key_ids={list(self.key_ids)!r})"

    # -- ciphers -----------------------------------------------------------------

    def _token(self, plain: bytes, aad: bytes) -> str:
        key = self._keys[0]
        nonce = os.urandom(_NONCE_BYTES)
        sealed = key.aead.encrypt(nonce, plain, aad)
        return f"{_TOKEN_PREFIX}.{key.id}.{_b64(nonce + sealed)}"

    def _open_token(self, token: str, aad: bytes, session_id: str, what: str) -> bytes | None:
        """The plain bytes of a token; None when it does not authenticate with ``aad``."""
        prefix, _, rest = token.partition(".")
        kid, _, body = rest.partition(".")
        if prefix != _TOKEN_PREFIX or not body:
            raise DecryptionError(session_id, what, "its ciphertext is malformed")
        key = self._key(kid, session_id, what)
        try:
            raw = _unb64(body)
        except (binascii.Error, ValueError):
            raise DecryptionError(session_id, what, "its ciphertext is malformed") from None
        return self._decrypt(key, raw, aad)

    def _key(self, kid: str, session_id: str, what: str) -> _Key:
        key = self._by_id.get(kid)
        if key is None:
            known = ", ".join(self.key_ids)
            raise DecryptionError(
                session_id,
                what,
                f"it was encrypted with key id {kid[:16]!r}, which is not among the keys given "
                f"({known})",
            )
        return key

    def _decrypt(self, key: _Key, raw: bytes, aad: bytes) -> bytes | None:
        if len(raw) < _NONCE_BYTES + _TAG_BYTES:
            return None
        try:
            return key.aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], aad)
        except self._invalid_tag:
            return None

    async def _run(self, size: int, work: Callable[[], Any]) -> Any:
        """Run ``work`` here, or in a thread when it handles many bytes."""
        if size > _THREAD_ABOVE:
            return await asyncio.to_thread(work)
        return work()

    # -- records -----------------------------------------------------------------

    def _seal_record(self, record: SessionRecord, lineage: Lineage) -> SessionRecord:
        body = {
            "t": record.title,
            "m": record.metadata,
            "f": record.fingerprint,
            "l": [list(entry) for entry in lineage],
        }
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        token = self._token(text.encode("utf-8"), _record_aad(record.id))
        return record.model_copy(
            update={"title": None, "metadata": {_RECORD_FIELD: token}, "fingerprint": None}
        )

    def _is_sealed(self, stored: SessionRecord) -> bool:
        metadata = stored.metadata
        return (
            len(metadata) == 1
            and type(metadata.get(_RECORD_FIELD)) is str
            and stored.title is None
            and stored.fingerprint is None
        )

    def _unseal_record(self, stored: SessionRecord) -> tuple[SessionRecord, Lineage | None]:
        """The plain record and its lineage (None for a record stored in plain)."""
        if not self._is_sealed(stored):
            if self.allow_plaintext:
                return stored, None
            raise DecryptionError(
                stored.id,
                "record",
                "it is not encrypted: it was written without encryption (pass "
                "allow_plaintext=True to read data written before encryption was turned on)",
            )
        plain = self._open_token(
            stored.metadata[_RECORD_FIELD], _record_aad(stored.id), stored.id, "record"
        )
        if plain is None:
            raise DecryptionError(stored.id, "record", _CHANGED)
        try:
            body = json.loads(plain)
            title, metadata, fingerprint = body["t"], body["m"], body["f"]
            lineage = tuple((str(writer), int(upto)) for writer, upto in body["l"])
            if (
                (title is not None and type(title) is not str)
                or type(metadata) is not dict
                or (fingerprint is not None and type(fingerprint) is not dict)
            ):
                raise TypeError("a field of the wrong type")
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptDataError(
                f"session {stored.id!r}: its record decrypts to something that is not a "
                f"record ({exc}); it was written by another program: restore it from a backup"
            ) from None
        record = stored.model_copy(
            update={"title": title, "metadata": metadata, "fingerprint": fingerprint}
        )
        self._remember(record, lineage)
        return record, lineage

    def _open_record(self, stored: SessionRecord) -> SessionRecord:
        return self._unseal_record(stored)[0]

    @staticmethod
    def _cache_key(record: SessionRecord) -> tuple[str, float, str | None, int]:
        parent = record.parent
        return (
            record.id,
            record.created_at,
            parent.session_id if parent else None,
            parent.seq if parent else 0,
        )

    def _remember(self, record: SessionRecord, lineage: Lineage) -> None:
        key = self._cache_key(record)
        self._lineages[key] = lineage
        self._lineages.move_to_end(key)
        while len(self._lineages) > _LINEAGE_CACHE:
            self._lineages.popitem(last=False)

    def _forget(self, session_id: str) -> None:
        for key in [key for key in self._lineages if key[0] == session_id]:
            del self._lineages[key]

    async def _lineage_of(self, session_id: str) -> Lineage:
        """The lineage of a visible session, from its stored record.

        Raises:
            SessionNotFoundError: No visible session with that id.
        """
        stored = await self.base.get(session_id)
        lineage = self._unseal_record(stored)[1]
        if lineage is None:  # a record kept in plain (allow_plaintext)
            lineage = await self._lineage_in_store(stored)
        return lineage

    async def _lineage_in_store(self, stored: SessionRecord) -> Lineage:
        """The lineage of a record kept in plain, from the parents the store still shows."""
        forks: list[tuple[str, int]] = []  # (parent, fork seq), from the record up
        base_lineage: Lineage = ()
        node = stored
        seen = {stored.id}
        while node.parent is not None and node.parent.session_id not in seen:
            forks.append((node.parent.session_id, node.parent.seq))
            seen.add(node.parent.session_id)
            try:
                node = await self.base.get(node.parent.session_id)
            except SessionNotFoundError:
                break  # deleted: its own parents are no longer known
            if self._is_sealed(node):
                base_lineage = self._unseal_record(node)[1] or ()
                break
        lineage = base_lineage
        for parent_id, at_seq in reversed(forks):
            lineage = _child_lineage(parent_id, lineage, at_seq)
        return lineage

    async def _lineage_for_update(self, record: SessionRecord) -> Lineage:
        cached = self._lineages.get(self._cache_key(record))
        if cached is not None:
            return cached
        return await self._lineage_of(record.id)

    # -- the Store protocol: records -----------------------------------------------

    async def create(
        self, record: SessionRecord, *, max_per_user: int | None = None
    ) -> SessionRecord:
        """See :meth:`Store.create`; title, metadata and fingerprint are stored encrypted."""
        check_create(record, max_per_user)
        stored = await self.base.create(self._seal_record(record, ()), max_per_user=max_per_user)
        return self._open_record(stored)

    async def get(self, session_id: str) -> SessionRecord:
        """See :meth:`Store.get`.

        Raises:
            DecryptionError: The record was encrypted with a key not given,
                or changed since.
        """
        return self._open_record(await self.base.get(session_id))

    async def update(self, record: SessionRecord, expected_version: int) -> SessionRecord:
        """See :meth:`Store.update`; the record is encrypted again with the first key."""
        check_record(record)
        check_version(expected_version)
        lineage = await self._lineage_for_update(record)
        stored = await self.base.update(self._seal_record(record, lineage), expected_version)
        return self._open_record(stored)

    async def delete(self, session_id: str) -> None:
        """See :meth:`Store.delete`."""
        await self.base.delete(session_id)
        self._forget(session_id)

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

        A record that does not decrypt is left out of the page (and logged),
        as stores leave out damaged records.
        """
        page = await self.base.list_sessions(
            user_id=user_id,
            agent_id=agent_id,
            window_id=window_id,
            state=state,
            limit=limit,
            cursor=cursor,
        )
        records: list[SessionRecord] = []
        for stored in page.records:
            try:
                records.append(self._open_record(stored))
            except CorruptDataError as exc:
                _logger.warning("listing sessions: left out %r: %s", stored.id, exc)
        return Page(records, page.next_cursor)

    async def fork(self, session_id: str, at_seq: int, new_record: SessionRecord) -> SessionRecord:
        """See :meth:`Store.fork`; the fork's record keeps where its events come from."""
        validate_id(session_id)
        check_fork_at(at_seq)
        check_record(new_record)
        lineage = _child_lineage(session_id, await self._lineage_of(session_id), at_seq)
        stored = await self.base.fork(session_id, at_seq, self._seal_record(new_record, lineage))
        return self._open_record(stored)

    # -- the Store protocol: events --------------------------------------------------

    def _seal_event(self, session_id: str, seq: int, event: NewEvent, index: int) -> NewEvent:
        aad = _event_aad(session_id, seq, event.type, event.turn_id, event.ts)
        token = self._token(event.data.encode("utf-8"), aad)
        if event.type == "usage":
            data = f'{{"total_tokens":{count_events([event]).tokens},"enc":"{token}"}}'
        else:
            data = f'{{"enc":"{token}"}}'
        if len(data) > MAX_PAYLOAD_BYTES:
            raise UnsupportedValueError(
                f"events[{index}].data cannot be stored exactly: encrypted it is {len(data)} "
                f"bytes; the limit is {MAX_PAYLOAD_BYTES} (about {MAX_PAYLOAD_BYTES * 3 // 4} "
                "bytes before encryption): keep large data in blobs"
            )
        return event._replace(data=data)

    async def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_seq: int,
        *,
        lease: Lease | None = None,
    ) -> int:
        """See :meth:`Store.append`; each payload is encrypted, bound to its session and seq."""
        validate_id(session_id)
        check_append(events, expected_seq)
        size = sum(len(event.data) for event in events)

        def seal() -> list[NewEvent]:
            return [
                self._seal_event(session_id, expected_seq + index + 1, event, index)
                for index, event in enumerate(events)
            ]

        sealed: list[NewEvent] = await self._run(size, seal)
        return await self.base.append(session_id, sealed, expected_seq, lease=lease)

    def _open_event(
        self, session_id: str, event: StoredEvent, writer: str, *, strict: bool
    ) -> StoredEvent | None:
        """The event with its plain payload; None (unless ``strict``) when ``writer`` is wrong."""
        what = f"event {event.seq}"
        match = _SEALED_EVENT.fullmatch(event.data)
        if match is None:
            if self.allow_plaintext:
                return event
            raise DecryptionError(
                session_id,
                what,
                "it is not encrypted: it was written without encryption (pass "
                "allow_plaintext=True to read data written before encryption was turned on)",
            )
        aad = _event_aad(writer, event.seq, event.type, event.turn_id, event.ts)
        plain = self._open_token(match["token"], aad, session_id, what)
        if plain is None:
            if strict:
                raise DecryptionError(session_id, what, _CHANGED)
            return None
        try:
            text = plain.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError(
                session_id, what, "it decrypts to text that is not UTF-8"
            ) from None
        return event._replace(data=text)

    async def read(
        self,
        session_id: str,
        after_seq: int = 0,
        upto_seq: int | None = None,
        *,
        batch_size: int = DEFAULT_READ_BATCH,
    ) -> AsyncIterator[list[StoredEvent]]:
        """See :meth:`Store.read`.

        Raises:
            DecryptionError: An event was encrypted with a key not given, was
                changed, or was moved from another session or seq.
        """
        check_read(after_seq, upto_seq, batch_size)
        validate_id(session_id)
        lineage: Lineage | None = None  # loaded when an event is not the session's own
        async for batch in self.base.read(session_id, after_seq, upto_seq, batch_size=batch_size):
            opened: list[StoredEvent] = []
            for event in batch:
                plain = None
                if lineage is None:
                    plain = self._open_event(session_id, event, session_id, strict=False)
                    if plain is None:
                        lineage = await self._lineage_of(session_id)
                if plain is None:
                    writer = _writer(lineage or (), event.seq, session_id)
                    plain = self._open_event(session_id, event, writer, strict=True)
                assert plain is not None
                opened.append(plain)
            yield opened

    # -- the Store protocol: leases (nothing secret in them) -------------------------

    async def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Lease:
        """See :meth:`Store.acquire_lease` (delegated)."""
        return await self.base.acquire_lease(session_id, owner, ttl)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """See :meth:`Store.renew_lease` (delegated)."""
        return await self.base.renew_lease(lease, ttl)

    async def release_lease(self, lease: Lease) -> None:
        """See :meth:`Store.release_lease` (delegated)."""
        await self.base.release_lease(lease)

    # -- the Store protocol: snapshots and blobs ----------------------------------------

    async def put_snapshot(self, session_id: str, seq: int, data: bytes) -> None:
        """See :meth:`Store.put_snapshot`; the snapshot is encrypted, bound to its session and seq."""
        validate_id(session_id)
        check_snapshot(seq, data)
        key = self._keys[0]

        def seal() -> bytes:
            nonce = os.urandom(_NONCE_BYTES)
            sealed = key.aead.encrypt(nonce, data, _snapshot_aad(session_id, seq))
            return _SNAPSHOT_MAGIC + key.raw_id + nonce + sealed

        sealed: bytes = await self._run(len(data), seal)
        if len(sealed) > MAX_BLOB_BYTES:
            raise UnsupportedValueError(
                f"snapshot cannot be stored exactly: encrypted it is {len(sealed)} bytes; the "
                f"limit is {MAX_BLOB_BYTES}"
            )
        await self.base.put_snapshot(session_id, seq, sealed)

    async def get_snapshot(self, session_id: str) -> tuple[int, bytes] | None:
        """See :meth:`Store.get_snapshot`.

        A snapshot that does not decrypt (a key not given, or changed since)
        reads as None, and a warning is logged: snapshots are a cache, and
        the session rebuilds its state from the log.
        """
        got = await self.base.get_snapshot(session_id)
        if got is None:
            return None
        seq, sealed = got
        header = len(_SNAPSHOT_MAGIC) + 4
        if sealed[: len(_SNAPSHOT_MAGIC)] != _SNAPSHOT_MAGIC:
            if self.allow_plaintext:
                return got
            why = "it is not encrypted"
        else:
            key = self._by_raw_id.get(sealed[len(_SNAPSHOT_MAGIC) : header])
            if key is None:
                why = f"it was encrypted with key id {sealed[4:8].hex()!r}, which is not given"
            else:
                aad = _snapshot_aad(session_id, seq)
                plain = await self._run(
                    len(sealed), lambda: self._decrypt(key, sealed[header:], aad)
                )
                if plain is not None:
                    return seq, plain
                why = _CHANGED
        _logger.warning(
            "session %r: its snapshot at seq %s cannot be decrypted (%s); it is ignored and "
            "the state is read from the log",
            session_id,
            seq,
            why,
        )
        return None

    async def put_blob(self, session_id: str, data: bytes, media_type: str = "") -> str:
        """See :meth:`Store.put_blob`; the blob is encrypted (the same bytes give the same id)."""
        validate_id(session_id)
        check_blob(data, media_type)
        kept = bytes(data)
        key = self._keys[0]
        writer = session_id.encode()
        aad = _blob_aad(session_id)

        def seal() -> bytes:
            nonce = hmac.new(key.nonce_key, aad + b"\x00" + kept, hashlib.sha256).digest()
            nonce = nonce[:_NONCE_BYTES]
            sealed = key.aead.encrypt(nonce, kept, aad)
            return _BLOB_MAGIC + key.raw_id + bytes([len(writer)]) + writer + nonce + sealed

        sealed: bytes = await self._run(len(kept), seal)
        if len(sealed) > MAX_BLOB_BYTES:
            raise UnsupportedValueError(
                f"blob cannot be stored exactly: encrypted it is {len(sealed)} bytes; the limit "
                f"is {MAX_BLOB_BYTES}"
            )
        return await self.base.put_blob(session_id, sealed, media_type)

    async def get_blob(self, session_id: str, blob_id: str) -> bytes:
        """See :meth:`Store.get_blob`.

        Raises:
            DecryptionError: The blob was encrypted with a key not given, was
                changed, or was written by a session this one does not
                descend from.
        """
        sealed = await self.base.get_blob(session_id, blob_id)
        what = f"blob {blob_id}"
        if sealed[: len(_BLOB_MAGIC)] != _BLOB_MAGIC or len(sealed) < 9:
            if self.allow_plaintext:
                return sealed
            raise DecryptionError(session_id, what, "it is not encrypted")
        key = self._by_raw_id.get(sealed[4:8])
        if key is None:
            self._key(sealed[4:8].hex(), session_id, what)  # raises
        assert key is not None
        end = 9 + sealed[8]
        try:
            writer = sealed[9:end].decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionError(session_id, what, "its ciphertext is malformed") from None
        if writer != session_id:
            lineage = await self._lineage_of(session_id)
            if writer not in {ancestor for ancestor, _ in lineage}:
                raise DecryptionError(
                    session_id, what, "it was written by a session this one does not descend from"
                )
        aad = _blob_aad(writer)
        plain = await self._run(len(sealed), lambda: self._decrypt(key, sealed[end:], aad))
        if plain is None:
            raise DecryptionError(session_id, what, _CHANGED)
        return bytes(plain)

    # -- the Store protocol: upkeep ----------------------------------------------------

    async def purge_expired(self, before: float | None = None) -> int:
        """See :meth:`Store.purge_expired` (delegated)."""
        return await self.base.purge_expired(before)

    async def stats(self, *, idle_before: float | None = None, top: int = 100) -> StoreStats:
        """See :meth:`Store.stats` (delegated).

        ``messages`` and ``tokens`` are exact; ``bytes`` counts the encrypted
        payloads the store keeps (about 4/3 of the plain ones, plus ~60 each).
        """
        return await self.base.stats(idle_before=idle_before, top=top)

    async def aclose(self) -> None:
        """Close the wrapped store. Idempotent."""
        await self.base.aclose()

    async def __aenter__(self) -> Self:
        """Return the store itself."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the store (:meth:`aclose`)."""
        await self.aclose()
