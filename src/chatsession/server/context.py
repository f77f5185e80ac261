"""What the routes share: the manager, the agent, the key ring, the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatsession.agent import Agent
from chatsession.manager import SessionManager
from chatsession.server.keys import KeyRing, hash_key
from chatsession.server.metrics import Metrics
from chatsession.server.settings import ServerSettings

if TYPE_CHECKING:
    from chatsession.server.live import LiveHub
    from chatsession.server.turns import RunningTurn

__all__ = ["ServerContext"]

_logger = logging.getLogger("chatsession.server")


@dataclass
class ServerContext:
    """One app's shared objects, made in its lifespan.

    Attributes:
        settings: The settings the app was made with.
        manager: The session manager on the store.
        agent: The agent every turn runs.
        keys: The API key table.
        metrics: The app's Prometheus metrics.
        turns: Turns in flight (finished or cancelled at shutdown).
        live: The worker's live events (``GET /v1/sessions/{id}/events``).
    """

    settings: ServerSettings
    manager: SessionManager
    agent: Agent
    keys: KeyRing
    metrics: Metrics
    turns: set[RunningTurn] = field(default_factory=set)
    closing: bool = False
    live: LiveHub | None = None

    def chat_options(self) -> dict[str, Any]:
        """The :class:`~chatsession.ChatSession` options the settings give every session."""
        settings = self.settings
        return {
            "busy_timeout": settings.busy_timeout,
            "timeout": settings.timeout,
            "lease_ttl": settings.lease_ttl,
            "lease_linger": settings.lease_linger,
            "snapshot_every": settings.snapshot_every,
            # a server whose model changed keeps serving its sessions (no warnings)
            "consistency": "ignore",
        }

    def is_admin_key(self, key: str) -> bool:
        """Whether ``key`` is ``CHATSESSION_ADMIN_KEY`` (compared in constant time)."""
        admin = self.settings.admin_key
        if admin is None:
            return False
        expected = hashlib.sha256(admin.get_secret_value().encode()).hexdigest()
        return hmac.compare_digest(expected, hash_key(key))

    async def finish_turns(self) -> None:
        """Let turns in flight finish for ``shutdown_grace`` seconds, then cancel the rest.

        A cancelled turn is recorded ``cancelled`` by the session itself.
        """
        self.closing = True
        tasks = [t.task for t in self.turns if t.task is not None and not t.task.done()]
        if not tasks:
            return
        _logger.info("waiting for %d turn(s) in flight", len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
