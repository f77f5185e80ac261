"""One writer at a time: the session's lease, taken for each write and kept alive.

A :class:`LeaseHolder` takes the store's lease on the session (waiting up to
``busy_timeout`` for another writer), renews it in the background while it
is held, and gives it up a moment after the last write (``linger``), so
turns that follow each other closely do not pay for it again. Appends carry
the lease, so a holder whose lease ran out (a paused process) writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid

from chatsession.errors import LeaseLostError, SessionBusyError, StoreError
from chatsession.store import Lease, Store

__all__ = ["LeaseHolder", "lease_owner"]


def lease_owner() -> str:
    """A name for this writer: host, process and a random part (unique per holder)."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class LeaseHolder:
    """Holds a session's lease for its writes.

    Args:
        store: The store.
        session_id: The session.
        ttl: Seconds a lease lasts without renewal (a dead holder frees the
            session after at most this long).
        busy_timeout: Seconds to wait for another writer; 0 fails at once.
        linger: Seconds the lease is kept after the last write before it is
            given up (0: at once).
        owner: Who holds it, as other writers are told (default: host, process
            and a random part).
    """

    def __init__(
        self,
        store: Store,
        session_id: str,
        *,
        ttl: float,
        busy_timeout: float,
        linger: float,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.owner = owner if owner is not None else lease_owner()
        self.ttl = ttl
        self.busy_timeout = busy_timeout
        self.linger = linger
        self.lease: Lease | None = None
        self._users = 0
        self._renewer: asyncio.Task[None] | None = None
        self._release_at = 0.0
        # one lease call at a time: a release and the next acquire must reach the
        # store in that order (two connections could swap them otherwise)
        self._calls = asyncio.Lock()

    @property
    def held(self) -> Lease | None:
        """The lease when it is held and not about to run out, else None."""
        lease = self.lease
        if lease is None or lease.expires_at - time.time() < min(1.0, self.ttl / 4):
            return None
        return lease

    async def acquire(self) -> Lease:
        """Take the lease (or keep the one held), waiting up to ``busy_timeout``.

        Raises:
            SessionBusyError: Another writer held it all that time.
        """
        self._users += 1
        try:
            async with self._calls:
                lease = self.held
                if lease is None:
                    lease = await self._take()
            self._ensure_renewer()
            return lease
        except BaseException:
            self._users -= 1
            raise

    async def _take(self) -> Lease:
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.005
        while True:
            try:
                self.lease = await self.store.acquire_lease(self.session_id, self.owner, self.ttl)
                return self.lease
            except SessionBusyError as busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SessionBusyError(
                        self.session_id,
                        busy.holder,
                        busy.retry_after,
                    ) from None
                hint = busy.retry_after if busy.retry_after is not None else pause
                # jittered, so waiting writers do not all ask again at the same moment
                await asyncio.sleep(min(pause * (0.5 + random.random()), hint, left))
                pause = min(pause * 2, 0.05)

    async def done(self) -> None:
        """One write is over; the lease is given up ``linger`` seconds after the last
        (at once when ``linger`` is 0)."""
        self._users = max(0, self._users - 1)
        if self._users == 0:
            if self.linger <= 0:
                await self.release()
            else:
                self._release_at = time.monotonic() + self.linger

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._keep(), name=f"chatsession-lease-{self.session_id}"
            )

    async def _keep(self) -> None:
        """Renew while in use; give the lease up once idle past ``linger``."""
        try:
            while self.lease is not None:
                now = time.monotonic()
                if self._users == 0 and now >= self._release_at:
                    await self.release()
                    return
                left = self.lease.expires_at - time.time()
                wake = min(self.ttl / 3, max(left - self.ttl / 3, 0.0))
                if self._users == 0:
                    wake = min(wake, max(self._release_at - now, 0.0))
                await asyncio.sleep(max(wake, 0.001))
                if (
                    self.lease is not None
                    and self._users
                    and (self.lease.expires_at - time.time() < self.ttl * 2 / 3)
                ):
                    try:
                        self.lease = await self.store.renew_lease(self.lease, self.ttl)
                    except LeaseLostError:
                        self.lease = None  # the next write is refused by the store
                        return
                    except StoreError:
                        continue  # try again at the next wake; the store fences writes
        except asyncio.CancelledError:
            raise

    async def release(self) -> None:
        """Give the lease up now (if held) and stop renewing it."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not asyncio.current_task():
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await renewer
        async with self._calls:
            lease, self.lease = self.lease, None
            if lease is not None:
                with contextlib.suppress(StoreError):
                    await self.store.release_lease(lease)
