"""``SessionManager.lock``: hold a session's write lease for a block of code."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

from chatsession.errors import ChatSessionClosedError
from chatsession.session.lease import LeaseHolder
from chatsession.store import Lease, Store

__all__ = ["SessionLock"]


class SessionLock:
    """The session's lease, held inside ``async with manager.lock(...)``.

    It is the same lease every turn takes: while it is held, turns of that
    session (in any process) wait for it or get
    :class:`~chatsession.errors.SessionBusyError`. It is renewed in the
    background while held, and given up when the block ends; a process that
    dies holding it frees the session after ``ttl`` seconds.

    Attributes:
        session_id: The session.
        owner: Who holds it, as other writers are told.
    """

    def __init__(
        self,
        store: Store,
        session_id: str,
        *,
        owner: str | None,
        ttl: float,
        timeout: float,
        check: Callable[[], Awaitable[object]],
    ) -> None:
        self.session_id = session_id
        self._holder = LeaseHolder(
            store, session_id, ttl=ttl, busy_timeout=timeout, linger=0, owner=owner
        )
        self.owner = self._holder.owner
        self._check = check
        self._held = False

    @property
    def lease(self) -> Lease:
        """The lease as held now (its ``token`` is the fencing token).

        Raises:
            ChatSessionClosedError: Outside the ``async with`` block.
        """
        lease = self._holder.lease
        if not self._held or lease is None:
            raise ChatSessionClosedError(
                f"the lock on session {self.session_id!r} is not held: use it inside "
                "`async with manager.lock(...)`"
            )
        return lease

    @property
    def token(self) -> int:
        """The lease's fencing token."""
        return self.lease.token

    async def __aenter__(self) -> SessionLock:
        if self._held:
            raise ChatSessionClosedError(
                f"the lock on session {self.session_id!r} is already held by this object"
            )
        await self._check()
        await self._holder.acquire()
        self._held = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._held = False
        await self._holder.done()
