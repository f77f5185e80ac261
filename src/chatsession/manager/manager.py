"""``SessionManager``: many users' sessions on one store.

The layer a multi-user service calls. Every call takes the calling user's id;
another user's session is answered exactly as a missing one
(:class:`~chatsession.errors.SessionNotFoundError`, the same message, after
the same store call), and ``user_id=None`` is the trusted administrator.

States: ``ACTIVE``; ``IDLE`` (no activity for ``idle_after``: derived when
read, so no sweeper is needed); ``ARCHIVED`` (read-only: the store refuses
appends with :class:`~chatsession.errors.SessionArchivedError`); ``EXPIRED``
(its TTL passed: not found by any call at once, removed by
:meth:`SessionManager.cleanup_expired`). The TTL slides: every turn and
every :meth:`SessionManager.refresh_session` moves the expiry to ``ttl``
seconds from then. Archiving, restoring and expiring are recorded in the
session's log (``lifecycle`` events); checkpoints are ``checkpoint`` events,
so a :class:`~chatsession.ChatSession`'s ``rewind`` and ``fork_session``
accept their ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, Self

from chatsession.agent import Agent
from chatsession.errors import (
    ChatSessionClosedError,
    ConflictError,
    InvalidArgumentError,
    SessionArchivedError,
    SessionBusyError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    StoreError,
    UsageError,
)
from chatsession.log import (
    Checkpoint,
    CheckpointEntry,
    Lifecycle,
    LifecycleEntry,
    LogEvent,
    encode,
)
from chatsession.manager.locks import SessionLock
from chatsession.manager.models import (
    RESERVED_PREFIX,
    CheckpointInfo,
    LimitPolicy,
    Session,
    SessionPage,
    SessionTemplate,
)
from chatsession.session import ChatSession
from chatsession.session.keeper import LogKeeper
from chatsession.session.lease import LeaseHolder
from chatsession.store import SessionRecord, SessionState, Store, StoreStats, open_store
from chatsession.store.base import (
    MAX_FIELD_LENGTH,
    check_json_value,
    check_text,
    validate_id,
)
from chatsession.values import STATE_DEPTH

__all__ = ["SYSTEM_PREFIX", "SessionManager", "ValueRedactor", "is_system_session"]

_logger = logging.getLogger("chatsession.manager")

TTL_KEY = RESERVED_PREFIX + "ttl"
TEMPLATE_KEY = RESERVED_PREFIX + "template"

#: Tries of a conditional record update that keeps losing to other writers.
_UPDATE_TRIES = 50
#: Sessions listed per store call when the manager pages through a listing.
_PAGE = 200


class ValueRedactor(Protocol):
    """What rewrites secrets in events and values (:class:`chatsession.privacy.Redactor`)."""

    def redact_event(self, event: LogEvent) -> LogEvent:
        """The event with secrets rewritten."""
        ...

    def redact_value(self, value: Any) -> Any:
        """A JSON value with secrets rewritten in its strings."""
        ...

    def redact_text(self, text: str) -> str:
        """Text with secrets rewritten (large tool outputs kept as blobs)."""
        ...


def _check_user(user_id: object, what: str = "user_id") -> None:
    """A user id is None (the administrator) or non-blank text: ``""`` is no account."""
    if user_id is not None:
        check_text(user_id, what, controls=False)
        if isinstance(user_id, str) and not user_id.strip():
            raise InvalidArgumentError(
                f"{what} must not be blank ({user_id!r}): a missing user is no account; "
                "pass None only for the administrator"
            )


def _check_ttl(ttl: object, what: str = "ttl") -> None:
    if ttl is None:
        return
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise InvalidArgumentError(
            f"{what} must be None or a positive number of seconds, not {ttl!r}"
        )
    try:
        seconds = float(ttl)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgumentError(
            f"{what} must be None or a positive, finite number of seconds, not {ttl!r}"[:300]
        )


def _later(record: SessionRecord, expires: float) -> float:
    """The new expiry, never earlier than the record's (a clock stepped back)."""
    if record.expires_at is None:
        return expires
    return max(record.expires_at, expires)


#: Ids of chatsession's own records kept as sessions (the server's API keys):
#: never created by callers, never listed or deleted as conversations.
SYSTEM_PREFIX = "_chatsession."


def is_system_session(session_id: str) -> bool:
    """Whether ``session_id`` is one chatsession reserves for itself (``_chatsession.*``)."""
    return session_id.startswith(SYSTEM_PREFIX)


def _shown(record: SessionRecord, at: float) -> bool:
    """Whether a listed record is a conversation the manager shows at ``at``."""
    return not record.is_expired(at) and not is_system_session(record.id)


#: Ids the manager makes for windows: callers cannot choose them (another user
#: could otherwise take or probe a window's session id, which is derived from
#: public names).
_WINDOW_PREFIX = "win_"

#: ChatSession options chat() sets itself.
_CHAT_SETS = frozenset(
    {
        "store",
        "user_id",
        "agent_id",
        "window_id",
        "title",
        "redact",
        "on_turn",
        "must_exist",
        "session_id",
        "agent",
    }
)


def _check_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidArgumentError(f"metadata must be a dict with str keys, not {metadata!r}")
    reserved = sorted(k for k in metadata if k.startswith(RESERVED_PREFIX))
    if reserved:
        raise InvalidArgumentError(
            f"metadata keys starting with {RESERVED_PREFIX!r} are the manager's own: "
            f"{', '.join(reserved)}; choose other names"
        )
    return dict(metadata)


class SessionManager:
    """Many users' and windows' sessions on one store.

    Args:
        store: A store URL or object (None: the default store). A URL is
            opened here and closed by :meth:`aclose`.
        ttl: Seconds of inactivity after which a session expires (None:
            never); a template or ``create_session(ttl=...)`` may set another.
        idle_after: Seconds of inactivity after which an active session reads
            as ``IDLE``.
        max_sessions_per_user: The most sessions a user may have, archived
            ones not counted (None: no limit).
        limit_policy: At the limit, ``"refuse"`` raises
            :class:`~chatsession.errors.SessionLimitError`;
            ``"archive_oldest_idle"`` archives the user's idle session with
            the oldest activity to make room (and refuses when none is idle).
        templates: Named :class:`SessionTemplate` objects for
            ``create_session(template=name)``.
        redact: Rewrite secrets (API keys, bearer tokens, passwords, card
            numbers) in what is stored: True for the default
            :class:`chatsession.privacy.Redactor`, or your own.
        encryption_keys: Encrypt event payloads, metadata, titles, blobs and
            snapshots at rest (:class:`chatsession.privacy.EncryptingStore`):
            the first key encrypts, every key decrypts.
        clock: Unix time for TTL and idle states (tests pass a fake one);
            default ``time.time``. The store's own records (``updated_at``)
            keep the store's clock.
        busy_timeout: Seconds a manager write (archive, checkpoint) waits for
            a turn in progress; then :class:`~chatsession.errors.SessionBusyError`.
        cleanup_interval: Seconds between the background cleanups that
            :meth:`start` runs.
    """

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        ttl: float | None = 3600.0,
        idle_after: float = 900.0,
        max_sessions_per_user: int | None = None,
        limit_policy: LimitPolicy = "refuse",
        templates: Mapping[str, SessionTemplate] | None = None,
        redact: ValueRedactor | bool | None = None,
        encryption_keys: Sequence[str | bytes] | None = None,
        clock: Callable[[], float] | None = None,
        busy_timeout: float = 10.0,
        cleanup_interval: float = 60.0,
    ) -> None:
        _check_ttl(ttl)
        _check_ttl(idle_after, "idle_after")
        _check_ttl(cleanup_interval, "cleanup_interval")
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float):
            raise InvalidArgumentError(f"busy_timeout must be seconds, not {busy_timeout!r}")
        if not 0 <= busy_timeout <= 86400:
            raise InvalidArgumentError(
                f"busy_timeout must be 0 to 86400 seconds, not {busy_timeout}"
            )
        if max_sessions_per_user is not None and (
            isinstance(max_sessions_per_user, bool)
            or not isinstance(max_sessions_per_user, int)
            or max_sessions_per_user < 1
        ):
            raise InvalidArgumentError(
                f"max_sessions_per_user must be None or an int >= 1, not {max_sessions_per_user!r}"
            )
        if limit_policy not in ("refuse", "archive_oldest_idle"):
            raise InvalidArgumentError(
                f"limit_policy must be 'refuse' or 'archive_oldest_idle', not {limit_policy!r}"
            )
        self.templates: dict[str, SessionTemplate] = {}
        for name, template in (templates or {}).items():
            if not isinstance(template, SessionTemplate):
                raise InvalidArgumentError(
                    f"template {name!r} must be a SessionTemplate, not {type(template).__name__}"
                )
            self.templates[name] = template
        if redact is True:
            from chatsession.privacy import Redactor

            self.redactor: ValueRedactor | None = Redactor()
        elif redact is None or redact is False:
            self.redactor = None
        else:
            self.redactor = redact
        self._owns_store = store is None or isinstance(store, str)
        base = open_store(store) if store is None or isinstance(store, str) else store
        if encryption_keys is not None:
            from chatsession.privacy import EncryptingStore

            base = EncryptingStore(base, encryption_keys)
        self.store: Store = base
        self.ttl = ttl
        self.idle_after = idle_after
        self.max_sessions_per_user = max_sessions_per_user
        self.limit_policy: LimitPolicy = limit_policy
        self.busy_timeout = float(busy_timeout)
        self.cleanup_interval = cleanup_interval
        self._clock = clock or time.time
        self._cleaner: asyncio.Task[None] | None = None
        self._closed = False
        self._user_locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------
    # records and sessions

    def now(self) -> float:
        """The manager's clock (Unix seconds)."""
        return self._clock()

    async def _record(self, session_id: str, user_id: str | None) -> SessionRecord:
        """The visible record of a session ``user_id`` may see; else not found, the same way."""
        self._check_open()
        validate_id(session_id)
        _check_user(user_id)
        try:
            record = await self.store.get(session_id)
        except SessionNotFoundError:
            raise SessionNotFoundError(session_id) from None
        if (user_id is not None and record.user_id != user_id) or record.is_expired(self.now()):
            raise SessionNotFoundError(session_id)
        return record

    def _session(self, record: SessionRecord) -> Session:
        if record.state == SessionState.ARCHIVED:
            state = SessionState.ARCHIVED
        elif self.now() - record.updated_at >= self.idle_after:
            state = SessionState.IDLE
        else:
            state = SessionState.ACTIVE
        ttl = record.metadata.get(TTL_KEY)
        template = record.metadata.get(TEMPLATE_KEY)
        return Session(
            session_id=record.id,
            user_id=record.user_id,
            agent_id=record.agent_id,
            window_id=record.window_id,
            title=record.title,
            state=state,
            created_at=record.created_at,
            updated_at=record.updated_at,
            expires_at=record.expires_at,
            metadata={
                k: v for k, v in record.metadata.items() if not k.startswith(RESERVED_PREFIX)
            },
            template=template if isinstance(template, str) else None,
            ttl=float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) else None,
            parent=record.parent,
        )

    async def _update(
        self, session_id: str, change: Callable[[SessionRecord], SessionRecord]
    ) -> SessionRecord:
        """Apply ``change`` to the current record, again on each lost race."""
        for attempt in range(_UPDATE_TRIES):
            record = await self.store.get(session_id)
            try:
                return await self.store.update(change(record), record.version)
            except ConflictError:
                await asyncio.sleep(0.001 * min(attempt + 1, 20))
        raise SessionBusyError(session_id, f"other writers ({_UPDATE_TRIES} conflicting updates)")

    def _redact(self, value: Any) -> Any:
        return self.redactor.redact_value(value) if self.redactor is not None else value

    def _check_open(self) -> None:
        if self._closed:
            raise ChatSessionClosedError("the session manager is closed; make a new one")

    # ------------------------------------------------------------------
    # creating

    def _template(
        self, template: str | SessionTemplate | None
    ) -> tuple[str | None, SessionTemplate | None]:
        if template is None:
            return None, None
        if isinstance(template, SessionTemplate):
            return None, template
        if isinstance(template, str) and template in self.templates:
            return template, self.templates[template]
        known = ", ".join(sorted(self.templates)) or "none"
        raise InvalidArgumentError(f"no template named {template!r} (templates: {known})")

    async def create_session(
        self,
        user_id: str | None,
        agent_id: str | None = None,
        *,
        window_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        template: str | SessionTemplate | None = None,
        ttl: float | None = None,
        title: str | None = None,
        session_id: str | None = None,
    ) -> Session:
        """Create a session owned by ``user_id``.

        Args:
            user_id: The owner (None: an unowned session, for administrators).
            agent_id: The agent it is for.
            window_id: The client window it belongs to.
            metadata: Key-values (a template's defaults under them).
            template: A template name (from ``templates``) or a template.
            ttl: Seconds of inactivity before it expires (default: the
                template's, else the manager's).
            title: A title (default: the template's).
            session_id: Its id (default: a fresh ``sess_...`` id).

        Raises:
            SessionLimitError: The user is at ``max_sessions_per_user`` (and the
                policy found no idle session to archive).
            SessionExistsError: ``session_id`` is taken.
            InvalidArgumentError: A bad argument (unknown template, reserved
                metadata key, bad ttl).
        """
        if session_id is not None and str(session_id).startswith(_WINDOW_PREFIX):
            raise InvalidArgumentError(
                f"session ids starting with {_WINDOW_PREFIX!r} are the manager's own (for "
                "open_window); choose another id"
            )
        if session_id is not None and is_system_session(str(session_id)):
            raise InvalidArgumentError(
                f"session ids starting with {SYSTEM_PREFIX!r} are reserved for chatsession's "
                "own records; choose another id"
            )
        return await self._create(
            user_id,
            agent_id,
            window_id=window_id,
            metadata=metadata,
            template=template,
            ttl=ttl,
            title=title,
            session_id=session_id,
        )

    async def _create(
        self,
        user_id: str | None,
        agent_id: str | None,
        *,
        window_id: str | None,
        metadata: Mapping[str, Any] | None,
        template: str | SessionTemplate | None,
        ttl: float | None,
        title: str | None,
        session_id: str | None,
    ) -> Session:
        self._check_open()
        _check_user(user_id)
        check_text(agent_id, "agent_id", optional=True, controls=False)
        check_text(window_id, "window_id", optional=True, controls=False)
        check_text(title, "title", optional=True)
        _check_ttl(ttl)
        name, tpl = self._template(template)
        values = _check_metadata(metadata)
        if tpl is not None:
            values = {**_check_metadata(tpl.metadata), **values}
        values = self._redact(values)
        life = ttl if ttl is not None else (tpl.ttl if tpl is not None and tpl.ttl else self.ttl)
        if life is not None:
            values[TTL_KEY] = life
        if name is not None:
            values[TEMPLATE_KEY] = name
        if title is None and tpl is not None:
            title = tpl.title
        record = SessionRecord(
            id=validate_id(session_id) if session_id is not None else f"sess_{uuid.uuid4().hex}",
            user_id=user_id,
            agent_id=agent_id,
            window_id=window_id,
            title=self._redact(title),
            expires_at=self.now() + life if life is not None else None,
            metadata=values,
        )
        limit = self.max_sessions_per_user if user_id is not None else None
        for _ in range(8):
            try:
                return self._session(await self.store.create(record, max_per_user=limit))
            except SessionLimitError:
                if user_id is None:
                    raise
                async with self._user_lock(user_id):
                    # sessions expired by the manager's clock (not yet by the store's)
                    # never count; else room is made per policy, or SessionLimitError
                    if not await self._drop_expired(user_id):
                        await self._make_room(user_id)
        return self._session(await self.store.create(record, max_per_user=limit))

    def _user_lock(self, user_id: str) -> asyncio.Lock:
        """This process's lock on a user's limit bookkeeping (fewer lost races)."""
        lock = self._user_locks.get(user_id)
        if lock is None:
            lock = self._user_locks[user_id] = asyncio.Lock()
        return lock

    async def _drop_expired(self, user_id: str) -> int:
        """Delete the user's sessions that are expired by the manager's clock but not
        yet by the store's (they would count against the limit); returns how many."""
        dropped = 0
        now = self.now()
        cursor: str | None = None
        while True:
            page = await self.store.list_sessions(user_id=user_id, limit=_PAGE, cursor=cursor)
            for record in page.records:
                if record.is_expired(now):
                    with contextlib.suppress(SessionNotFoundError):
                        await self.store.delete(record.id)
                        dropped += 1
            if page.next_cursor is None:
                return dropped
            cursor = page.next_cursor

    async def _archive_oldest_idle(self, user_id: str) -> bool:
        """Archive the user's idle session with the oldest activity; False when none is idle."""
        oldest: SessionRecord | None = None
        async for record in self._listing(user_id=user_id, state=SessionState.ACTIVE):
            if self.now() - record.updated_at >= self.idle_after and (
                oldest is None or record.updated_at < oldest.updated_at
            ):
                oldest = record
        if oldest is None:
            return False
        # archived, deleted or busy meanwhile (another process): the next create counts again
        with contextlib.suppress(SessionNotFoundError, SessionBusyError, SessionArchivedError):
            await self._transition(oldest.id, "archived", "the user's session limit", None)
        return True

    async def _make_room(self, user_id: str | None) -> None:
        """Make sure one more active session fits the user's limit (archiving an idle
        one per policy), or raise :class:`SessionLimitError`. Call under the user's lock."""
        limit = self.max_sessions_per_user
        if limit is None or user_id is None:
            return
        for _ in range(8):
            count = await self.get_active_session_count(user_id)
            if count < limit:
                return
            if await self._drop_expired(user_id):
                continue
            if self.limit_policy != "archive_oldest_idle" or not await self._archive_oldest_idle(
                user_id
            ):
                raise SessionLimitError(user_id, limit, count)
        raise SessionLimitError(user_id, limit, await self.get_active_session_count(user_id))

    async def _over_limit(self, user_id: str | None) -> int | None:
        """The user's active count when it is past the limit (a race another process
        won), else None."""
        limit = self.max_sessions_per_user
        if limit is None or user_id is None:
            return None
        count = await self.get_active_session_count(user_id)
        return count if count > limit else None

    async def open_window(
        self,
        user_id: str,
        window_id: str,
        agent_id: str | None = None,
        *,
        template: str | SessionTemplate | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Session:
        """The window's current session (its newest, not archived), created when missing.

        One user, many windows, each its own conversation. Two calls at once
        for a new window get the same session.

        Raises:
            SessionLimitError: A new session would pass the user's limit.
        """
        self._check_open()
        check_text(user_id, "user_id", controls=False)
        _check_user(user_id)
        check_text(window_id, "window_id", controls=False)
        check_text(agent_id, "agent_id", optional=True, controls=False)
        async for record in self._listing(
            user_id=user_id, window_id=window_id, state=SessionState.ACTIVE
        ):
            if agent_id is None or record.agent_id == agent_id:
                return self._session(record)
        # a deterministic id per window (and generation), so racing calls meet on one
        import hashlib

        key = hashlib.sha256(f"{user_id}\0{window_id}\0{agent_id or ''}".encode()).hexdigest()[:24]
        for generation in range(100):
            sid = f"win_{key}_{generation}"
            try:
                return await self._create(
                    user_id,
                    agent_id,
                    window_id=window_id,
                    metadata=metadata,
                    template=template,
                    ttl=None,
                    title=None,
                    session_id=sid,
                )
            except SessionExistsError:
                try:
                    record = await self._record(sid, user_id)
                except SessionNotFoundError:
                    continue  # an earlier generation, deleted or expired: the next one
                if record.state != SessionState.ARCHIVED:
                    return self._session(record)
        raise SessionBusyError(window_id, "100 generations of this window's session are taken")

    # ------------------------------------------------------------------
    # reading

    async def get_session(self, session_id: str, user_id: str | None) -> Session:
        """The session, as ``user_id`` may see it.

        Raises:
            SessionNotFoundError: No such session, it expired, or it is another user's.
        """
        return self._session(await self._record(session_id, user_id))

    async def session_exists(self, session_id: str, user_id: str | None) -> bool:
        """Whether :meth:`get_session` would find it."""
        try:
            await self._record(session_id, user_id)
        except SessionNotFoundError:
            return False
        return True

    async def get_session_state(self, session_id: str, user_id: str | None) -> SessionState:
        """The session's state (``EXPIRED`` sessions are not found)."""
        return (await self.get_session(session_id, user_id)).state

    async def _listing(
        self,
        *,
        user_id: str | None = None,
        agent_id: str | None = None,
        window_id: str | None = None,
        state: SessionState | None = None,
    ) -> AsyncIterator[SessionRecord]:
        """Every visible record matching, newest first (paged through the store)."""
        cursor: str | None = None
        while True:
            page = await self.store.list_sessions(
                user_id=user_id,
                agent_id=agent_id,
                window_id=window_id,
                state=state,
                limit=_PAGE,
                cursor=cursor,
            )
            at = self.now()
            for record in page.records:
                if _shown(record, at):
                    yield record
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def get_sessions_by_user(
        self,
        user_id: str | None,
        *,
        agent_id: str | None = None,
        window_id: str | None = None,
        state: SessionState | str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> SessionPage:
        """A page of the user's sessions, newest first (``user_id=None``: everyone's).

        Args:
            user_id: Whose sessions.
            agent_id: Only this agent's.
            window_id: Only this window's.
            state: Only ``ACTIVE``, ``IDLE`` or ``ARCHIVED`` ones.
            cursor: ``next_cursor`` of the previous page.
            limit: Page size, 1-1000.

        Raises:
            InvalidArgumentError: A bad filter, limit or cursor.
        """
        self._check_open()
        _check_user(user_id)
        wanted: SessionState | None = None
        if state is not None:
            try:
                wanted = SessionState(state)
            except ValueError:
                raise InvalidArgumentError(
                    f"state must be ACTIVE, IDLE or ARCHIVED, not {state!r}"
                ) from None
            if wanted == SessionState.EXPIRED:
                raise InvalidArgumentError("expired sessions are not listed: they are gone")
        stored = (
            None
            if wanted is None
            else (SessionState.ARCHIVED if wanted == SessionState.ARCHIVED else SessionState.ACTIVE)
        )
        page = await self.store.list_sessions(
            user_id=user_id,
            agent_id=agent_id,
            window_id=window_id,
            state=stored,
            limit=limit,
            cursor=cursor,
        )
        at = self.now()
        sessions = [self._session(r) for r in page.records if _shown(r, at)]
        if wanted in (SessionState.ACTIVE, SessionState.IDLE):
            sessions = [s for s in sessions if s.state == wanted]
        return SessionPage(sessions=sessions, next_cursor=page.next_cursor)

    async def get_active_session_count(self, user_id: str | None) -> int:
        """How many sessions the user has that are not archived (active or idle)."""
        self._check_open()
        _check_user(user_id)
        count = 0
        async for _ in self._listing(user_id=user_id, state=SessionState.ACTIVE):
            count += 1
        return count

    # ------------------------------------------------------------------
    # changing

    async def update_session_metadata(
        self, session_id: str, user_id: str | None, metadata: Mapping[str, Any]
    ) -> Session:
        """Merge ``metadata`` into the session's (a None value deletes the key).

        Two callers at once never lose each other's keys: the merge is a
        conditional update, retried on a lost race.
        """
        values = _check_metadata(metadata)
        await self._record(session_id, user_id)
        values = self._redact(values)
        check_json_value(values, "metadata", max_depth=STATE_DEPTH)

        def merge(record: SessionRecord) -> SessionRecord:
            merged = dict(record.metadata)
            for key, value in values.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            return record.model_copy(update={"metadata": merged})

        return self._session(await self._checked_update(session_id, user_id, merge))

    async def _checked_update(
        self,
        session_id: str,
        user_id: str | None,
        change: Callable[[SessionRecord], SessionRecord],
    ) -> SessionRecord:
        """:meth:`_update`, but only while the record is still one ``user_id`` may see."""

        def guarded(record: SessionRecord) -> SessionRecord:
            if (user_id is not None and record.user_id != user_id) or record.is_expired(self.now()):
                raise SessionNotFoundError(session_id)
            return change(record)

        try:
            return await self._update(session_id, guarded)
        except SessionNotFoundError:
            raise SessionNotFoundError(session_id) from None

    async def refresh_session(
        self, session_id: str, user_id: str | None, *, ttl: float | None = None
    ) -> Session:
        """Move the session's expiry to ``ttl`` (default: its own TTL) seconds from now.

        Every turn of a session from :meth:`chat` does this too.
        """
        _check_ttl(ttl)
        await self._record(session_id, user_id)

        def slide(record: SessionRecord) -> SessionRecord:
            life = ttl if ttl is not None else record.metadata.get(TTL_KEY)
            if life is None:
                return record.model_copy(update={"expires_at": None})
            return record.model_copy(update={"expires_at": _later(record, self.now() + life)})

        return self._session(await self._checked_update(session_id, user_id, slide))

    async def set_session_state(
        self,
        session_id: str,
        user_id: str | None,
        state: SessionState | str,
        *,
        reason: str | None = None,
    ) -> Session | None:
        """Change the state: ``ARCHIVED`` archives, ``ACTIVE`` restores (or refreshes),
        ``EXPIRED`` expires it now (then it is gone: returns None).

        Raises:
            InvalidArgumentError: ``IDLE`` (it is derived from inactivity) or an unknown state.
        """
        try:
            wanted = SessionState(state)
        except ValueError:
            raise InvalidArgumentError(f"not a session state: {state!r}") from None
        if wanted == SessionState.ARCHIVED:
            return await self.archive_session(session_id, user_id, reason=reason)
        if wanted == SessionState.ACTIVE:
            record = await self._record(session_id, user_id)
            if record.state == SessionState.ARCHIVED:
                return await self.restore_session(session_id, user_id, reason=reason)
            return await self.refresh_session(session_id, user_id)
        if wanted == SessionState.EXPIRED:
            await self.expire_session(session_id, user_id, reason=reason)
            return None
        raise InvalidArgumentError(
            "IDLE cannot be set: a session reads as idle after idle_after seconds without activity"
        )

    async def _log_write(
        self,
        session_id: str,
        events: list[LogEvent],
        then: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Append ``events`` under the session's lease (after any turn in progress),
        then run ``then`` still holding it (a state change no turn may slip into)."""
        if self.redactor is not None:
            events = [self.redactor.redact_event(e) for e in events]
        rows = [encode(e) for e in events]
        holder = LeaseHolder(
            self.store, session_id, ttl=30.0, busy_timeout=self.busy_timeout, linger=0
        )
        lease = await holder.acquire()
        try:
            for _ in range(20):
                head = (await self.store.get(session_id)).head
                try:
                    if rows:
                        await self.store.append(session_id, rows, head, lease=lease)
                    if then is not None:
                        await then()
                    return
                except ConflictError as exc:
                    if type(exc) is not ConflictError:
                        raise
            raise SessionBusyError(session_id, "other writers (20 conflicts in a row)")
        finally:
            await holder.done()

    async def _transition(
        self, session_id: str, state: str, reason: str | None, by: str | None
    ) -> SessionRecord:
        event = LifecycleEntry(data=Lifecycle(state=state, reason=reason, by=by))  # type: ignore[arg-type]
        done: list[SessionRecord] = []

        async def change(update: dict[str, Any]) -> None:
            done.append(await self._update(session_id, lambda r: r.model_copy(update=update)))

        if state == "archived":
            # recorded first (an archived session takes no events), and made so while
            # the lease is still held: no turn can begin in between
            await self._log_write(
                session_id, [event], lambda: change({"state": SessionState.ARCHIVED})
            )
            return done[-1]
        if state == "active":
            await change({"state": SessionState.ACTIVE})
            await self._log_write(session_id, [event])
            return done[-1]
        now = self.now()  # expired: recorded, then made so (an archived log takes no event)
        archived = (await self.store.get(session_id)).state == SessionState.ARCHIVED
        await self._log_write(
            session_id, [] if archived else [event], lambda: change({"expires_at": now})
        )
        return done[-1]

    async def archive_session(
        self, session_id: str, user_id: str | None, *, reason: str | None = None
    ) -> Session:
        """Make the session read-only (recorded in its log). Idempotent.

        Turns are refused with :class:`~chatsession.errors.SessionArchivedError`
        until :meth:`restore_session`; reading, exporting and forking work.
        Waits up to ``busy_timeout`` for a turn in progress to end.
        """
        record = await self._record(session_id, user_id)
        if record.state == SessionState.ARCHIVED:
            return self._session(record)
        return self._session(await self._transition(session_id, "archived", reason, user_id))

    async def restore_session(
        self, session_id: str, user_id: str | None, *, reason: str | None = None
    ) -> Session:
        """Make an archived session writable again (recorded in its log). Idempotent.

        Raises:
            SessionLimitError: Restoring would take the user past
                ``max_sessions_per_user`` (archived sessions do not count; with
                ``archive_oldest_idle`` an idle session is archived to make room).
        """
        record = await self._record(session_id, user_id)
        if record.state != SessionState.ARCHIVED:
            return self._session(record)
        owner = record.user_id
        if owner is None or self.max_sessions_per_user is None:
            return self._session(await self._transition(session_id, "active", reason, user_id))
        async with self._user_lock(owner):
            await self._make_room(owner)
            restored = await self._update(
                session_id, lambda r: r.model_copy(update={"state": SessionState.ACTIVE})
            )
            count = await self._over_limit(owner)
            if count is not None:  # another process took the room meanwhile: undone
                await self._update(
                    session_id, lambda r: r.model_copy(update={"state": SessionState.ARCHIVED})
                )
                raise SessionLimitError(owner, self.max_sessions_per_user, count - 1)
            await self._log_write(
                session_id,
                [LifecycleEntry(data=Lifecycle(state="active", reason=reason, by=user_id))],
            )
        return self._session(restored)

    async def expire_session(
        self, session_id: str, user_id: str | None, *, reason: str | None = None
    ) -> None:
        """Expire the session now (recorded in its log): it is gone for every call at once,
        and :meth:`cleanup_expired` removes it."""
        await self._record(session_id, user_id)
        await self._transition(session_id, "expired", reason, user_id)

    async def delete_session(self, session_id: str, user_id: str | None) -> None:
        """Delete the session, its events and blobs (its forks keep working).

        Raises:
            SessionNotFoundError: No such session (or another user's).
        """
        await self._record(session_id, user_id)
        await self.store.delete(session_id)

    async def delete_user_sessions(self, user_id: str) -> int:
        """Delete every session of ``user_id``; returns how many."""
        check_text(user_id, "user_id", controls=False)
        return await self._delete_all(user_id=user_id)

    async def delete_agent_sessions(self, agent_id: str, user_id: str | None = None) -> int:
        """Delete every session of ``agent_id`` (only ``user_id``'s, unless None); returns how many."""
        check_text(agent_id, "agent_id", controls=False)
        _check_user(user_id)
        return await self._delete_all(user_id=user_id, agent_id=agent_id)

    async def _delete_all(self, *, user_id: str | None, agent_id: str | None = None) -> int:
        self._check_open()
        deleted = 0
        cursor: str | None = None
        while True:
            page = await self.store.list_sessions(
                user_id=user_id, agent_id=agent_id, limit=_PAGE, cursor=cursor
            )
            for record in page.records:
                if is_system_session(record.id):
                    continue  # not a conversation (the server's API keys)
                try:
                    await self.store.delete(record.id)
                    deleted += 1
                except SessionNotFoundError:
                    pass  # deleted or expired meanwhile
            if page.next_cursor is None:
                return deleted
            cursor = page.next_cursor

    # ------------------------------------------------------------------
    # conversations

    async def chat(
        self, session_id: str, user_id: str | None, agent: Agent, **options: Any
    ) -> ChatSession:
        """A :class:`~chatsession.ChatSession` on the session, opened, taking turns under its lease.

        The session's template (system prompt, agent settings) applies to
        ``agent``; each turn slides its TTL; the manager's redactor rewrites
        what is stored. ``options`` are :class:`~chatsession.ChatSession`
        options (``timeout``, ``busy_timeout``, ...). Close it when done
        (``async with``).

        Raises:
            SessionNotFoundError: No such session (or another user's, or expired).
        """
        record = await self._record(session_id, user_id)
        for name in sorted(options):
            if name in _CHAT_SETS:
                raise UsageError(f"chat() sets {name} itself; leave it out")
            if name not in _chat_options():
                raise UsageError(
                    f"chat() got an unknown option {name!r}; it takes ChatSession's: "
                    f"{', '.join(sorted(_chat_options() - _CHAT_SETS))}"
                )
        options.setdefault("busy_timeout", self.busy_timeout)
        session = _ManagedChatSession(
            self._agent_for(agent, record),
            session_id,
            store=self.store,
            must_exist=True,
            redact=self.redactor,
            on_turn=self._slide,
            **options,
        )
        session._manager = self
        try:
            await session.open()
        except BaseException:
            await session.close()
            raise
        return session

    async def _fork(
        self, parent: _ManagedChatSession, at: int | str | None, session_id: str | None
    ) -> ChatSession:
        """A fork through the manager: the owner's limit applies, the TTL starts afresh."""
        owner = parent.record.user_id if parent.record is not None else None
        if session_id is not None and (
            str(session_id).startswith(_WINDOW_PREFIX) or is_system_session(str(session_id))
        ):
            raise InvalidArgumentError(
                f"session ids starting with {_WINDOW_PREFIX!r} or {SYSTEM_PREFIX!r} are "
                "reserved; choose another id"
            )
        if owner is None or self.max_sessions_per_user is None:
            fork = await ChatSession.fork_session(parent, at, session_id=session_id)
        else:
            async with self._user_lock(owner):
                await self._make_room(owner)
                fork = await ChatSession.fork_session(parent, at, session_id=session_id)
                count = await self._over_limit(owner)
                if count is not None:  # another process took the room meanwhile: undone
                    await fork.close()
                    with contextlib.suppress(SessionNotFoundError):
                        await self.store.delete(fork.session_id)
                    raise SessionLimitError(owner, self.max_sessions_per_user, count - 1)
        if isinstance(fork, _ManagedChatSession):
            fork._manager = self
        await self._slide(fork)
        return fork

    def _agent_for(self, agent: Agent, record: SessionRecord) -> Agent:
        name = record.metadata.get(TEMPLATE_KEY)
        if not isinstance(name, str):
            return agent
        template = self.templates.get(name)
        if template is None:
            _logger.warning(
                "session %r was made from template %r, which this manager does not have; "
                "using the agent as given",
                record.id,
                name,
            )
            return agent
        return Agent(
            agent.llm,
            agent.tools,
            system_prompt=template.system_prompt
            if template.system_prompt is not None
            else agent.system_prompt,
            max_steps=template.max_steps if template.max_steps is not None else agent.max_steps,
            level=agent.level,
            name=agent.name,
            settings={**agent.settings, **template.settings},
            prices=agent.prices,
        )

    async def _slide(self, session: ChatSession) -> None:
        """Each turn moves the expiry to the session's TTL from now (at most every 1 % of it)."""
        record = session.record
        if record is None:
            return
        life = record.metadata.get(TTL_KEY)
        if not isinstance(life, int | float) or isinstance(life, bool):
            return
        now = self.now()
        if record.expires_at is not None and record.expires_at - now > life - max(1.0, life * 0.01):
            return  # slid a moment ago
        session.record = await self._update(
            session.session_id,
            lambda r: r.model_copy(update={"expires_at": _later(r, now + life)}),
        )

    # ------------------------------------------------------------------
    # checkpoints

    async def save_checkpoint(
        self, session_id: str, user_id: str | None, data: Any = None, *, name: str | None = None
    ) -> str:
        """Save ``data`` as a checkpoint of the session's current point; returns its id.

        The id is ``name`` when given (saving a name again moves it), else a
        fresh ``ckpt_...`` id. A checkpoint is an event in the session's log:
        ``ChatSession.rewind(id)`` and ``fork_session(id)`` go back to it.

        Raises:
            UnsupportedValueError: ``data`` cannot be stored exactly.
            SessionArchivedError: The session is archived.
        """
        if name is not None:
            check_text(name, "checkpoint name", controls=False)
            if not name.strip() or len(name) > MAX_FIELD_LENGTH:
                raise InvalidArgumentError(
                    f"a checkpoint name must be non-empty text, not {name!r}"
                )
        check_json_value(data, "checkpoint data", max_depth=STATE_DEPTH)
        await self._record(session_id, user_id)
        checkpoint_id = name if name is not None else f"ckpt_{uuid.uuid4().hex[:20]}"
        await self._log_write(
            session_id, [CheckpointEntry(data=Checkpoint(name=checkpoint_id, data=data))]
        )
        return checkpoint_id

    async def _checkpoints(
        self, session_id: str, user_id: str | None
    ) -> list[tuple[str, int, Any]]:
        """The session's checkpoints as ``(id, seq, data)``, in save order."""
        record = await self._record(session_id, user_id)
        keeper = LogKeeper(self.store, session_id)
        await keeper.load(record)
        found = [(name, seq, cp.data) for name, (seq, cp) in keeper.state.checkpoints.items()]
        return sorted(found, key=lambda item: item[1])

    async def _info(
        self, session_id: str, checkpoint_id: str, seq: int, data: Any
    ) -> CheckpointInfo:
        created = 0.0
        async for batch in self.store.read(session_id, after_seq=seq - 1, upto_seq=seq):
            created = batch[0].ts
        return CheckpointInfo(
            checkpoint_id=checkpoint_id,
            session_id=session_id,
            seq=seq,
            data=data,
            created_at=created,
        )

    async def list_checkpoints(self, session_id: str, user_id: str | None) -> list[CheckpointInfo]:
        """The session's checkpoints in the order they were saved."""
        found = await self._checkpoints(session_id, user_id)
        return list(
            await asyncio.gather(
                *(self._info(session_id, cid, seq, data) for cid, seq, data in found)
            )
        )

    async def get_latest_checkpoint(
        self, session_id: str, user_id: str | None
    ) -> CheckpointInfo | None:
        """The checkpoint saved last (by save order), or None when there is none."""
        found = await self._checkpoints(session_id, user_id)
        if not found:
            return None
        checkpoint_id, seq, data = found[-1]
        return await self._info(session_id, checkpoint_id, seq, data)

    async def get_checkpoint(
        self, session_id: str, user_id: str | None, checkpoint_id: str
    ) -> CheckpointInfo | None:
        """The checkpoint with that id, or None when there is none."""
        check_text(checkpoint_id, "checkpoint id", controls=False)
        for cid, seq, data in await self._checkpoints(session_id, user_id):
            if cid == checkpoint_id:
                return await self._info(session_id, cid, seq, data)
        return None

    async def delete_checkpoint(
        self, session_id: str, user_id: str | None, checkpoint_id: str
    ) -> bool:
        """Remove a checkpoint (the log keeps that it existed); False when there was none."""
        check_text(checkpoint_id, "checkpoint id", controls=False)
        ids = {cid for cid, _, _ in await self._checkpoints(session_id, user_id)}
        if checkpoint_id not in ids:
            return False
        await self._log_write(
            session_id, [CheckpointEntry(data=Checkpoint(name=checkpoint_id, deleted=True))]
        )
        return True

    async def clear_checkpoints(self, session_id: str, user_id: str | None) -> int:
        """Remove every checkpoint of the session; returns how many."""
        found = await self._checkpoints(session_id, user_id)
        if found:
            await self._log_write(
                session_id,
                [CheckpointEntry(data=Checkpoint(name=cid, deleted=True)) for cid, _, _ in found],
            )
        return len(found)

    # ------------------------------------------------------------------
    # locks

    def lock(
        self,
        session_id: str,
        user_id: str | None,
        *,
        owner: str | None = None,
        ttl: float = 30.0,
        timeout: float = 0.0,
    ) -> SessionLock:
        """The session's lease as a lock: ``async with manager.lock(sid, user) as lock:``.

        Args:
            session_id: The session.
            user_id: The caller (another user's session is not found).
            owner: Who holds it, as others are told (default: host, process, random).
            ttl: Seconds it lasts unrenewed (it is renewed while held).
            timeout: Seconds to wait for another holder; 0 fails at once.

        Raises:
            SessionBusyError: Another holder (a turn, another lock) kept it
                past ``timeout`` (on entering the block).
        """
        _check_ttl(ttl)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 <= timeout <= 86400
        ):
            raise InvalidArgumentError(f"timeout must be 0 to 86400 seconds, not {timeout!r}")
        if owner is not None:
            check_text(owner, "owner", controls=False)
        return SessionLock(
            self.store,
            session_id,
            owner=owner,
            ttl=float(ttl),
            timeout=float(timeout),
            check=lambda: self._record(session_id, user_id),
        )

    # ------------------------------------------------------------------
    # the whole store

    async def stats(self, *, top: int = 100) -> StoreStats:
        """Sessions by state, user and agent; messages, tokens and bytes (computed by the store).

        ``idle`` counts active sessions without activity for ``idle_after``;
        ``expired`` counts sessions past their expiry by the store's clock and
        not yet cleaned up.
        """
        self._check_open()
        return await self.store.stats(idle_before=self.now() - self.idle_after, top=top)

    async def cleanup_expired(self) -> int:
        """Remove expired sessions and everything they had; returns how many.

        Safe when several processes run it at once: each session is removed
        (and counted) by one of them.
        """
        self._check_open()
        return await self.store.purge_expired(before=self.now())

    def start(self) -> None:
        """Run :meth:`cleanup_expired` every ``cleanup_interval`` seconds in the background."""
        self._check_open()
        if self._cleaner is None or self._cleaner.done():
            self._cleaner = asyncio.get_running_loop().create_task(
                self._clean_forever(), name="chatsession-cleanup"
            )

    async def _clean_forever(self) -> None:
        while True:
            try:
                removed = await self.cleanup_expired()
                if removed:
                    _logger.info("cleanup removed %d expired session(s)", removed)
            except StoreError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # being stopped: not a failure
                _logger.warning("cleanup of expired sessions failed (will retry): %s", exc)
            await asyncio.sleep(self.cleanup_interval)

    async def stop(self) -> None:
        """Stop the background cleanup (if running)."""
        task, self._cleaner = self._cleaner, None
        if task is None:
            return
        # a driver may turn the cancellation of a call in flight into an error the
        # cleanup logs and goes on from: cancel until the task has ended
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError):
            failure = task.exception()
            if failure is not None:
                _logger.warning("the background cleanup had stopped: %r", failure)

    async def aclose(self) -> None:
        """Stop the cleanup and close the store if the manager opened it. Idempotent."""
        await self.stop()
        if not self._closed:
            self._closed = True
            if self._owns_store:
                await self.store.aclose()

    async def __aenter__(self) -> Self:
        """Start the background cleanup; ``async with`` closes the manager after."""
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@functools.cache
def _chat_options() -> frozenset[str]:
    """The keyword options :class:`ChatSession` takes."""
    import inspect

    return frozenset(
        name
        for name, p in inspect.signature(ChatSession.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    )


class _ManagedChatSession(ChatSession):
    """A :class:`ChatSession` handed out by :meth:`SessionManager.chat`: its forks go
    through the manager (the owner's limit, a fresh TTL)."""

    _manager: SessionManager | None = None

    async def fork_session(
        self, at: int | str | None = None, *, session_id: str | None = None
    ) -> ChatSession:
        """See :meth:`ChatSession.fork_session`; also refused with
        :class:`~chatsession.errors.SessionLimitError` past the owner's limit."""
        if self._manager is None:
            return await super().fork_session(at, session_id=session_id)
        return await self._manager._fork(self, at, session_id)
