"""What :class:`~chatsession.manager.SessionManager` hands out: sessions, templates, checkpoints."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chatsession.errors import InvalidArgumentError
from chatsession.store.types import ParentRef, SessionState

__all__ = [
    "RESERVED_PREFIX",
    "CheckpointInfo",
    "LimitPolicy",
    "Session",
    "SessionPage",
    "SessionTemplate",
]

#: Metadata keys the manager keeps for itself (a session's TTL and template);
#: they are not shown in :attr:`Session.metadata` and callers cannot set them.
RESERVED_PREFIX = "chatsession."

LimitPolicy = Literal["refuse", "archive_oldest_idle"]


class Session(BaseModel):
    """A session as the manager shows it (a snapshot: it does not change by itself).

    Attributes:
        session_id: The id.
        user_id: The owner (None: an administrator's unowned session).
        agent_id: The agent it is for.
        window_id: The client window (tab, device) it belongs to, if any.
        title: A human title.
        state: ``ACTIVE``, ``IDLE`` (no activity for the manager's
            ``idle_after``) or ``ARCHIVED`` (read-only). An expired session
            is never shown: it is not found.
        created_at: Unix seconds.
        updated_at: Unix seconds of the last activity (a turn, a change).
        expires_at: Unix seconds after which it expires, or None.
        metadata: The caller's key-values.
        template: The template it was created from, if any.
        ttl: Seconds of inactivity after which it expires (None: never).
        parent: The fork point, for a fork.
    """

    model_config = ConfigDict(frozen=True)

    session_id: str
    user_id: str | None
    agent_id: str | None
    window_id: str | None = None
    title: str | None = None
    state: SessionState
    created_at: float
    updated_at: float
    expires_at: float | None
    metadata: dict[str, Any] = Field(default_factory=dict)
    template: str | None = None
    ttl: float | None = None
    parent: ParentRef | None = None


class SessionPage(BaseModel):
    """One page of a user's sessions, newest first.

    Attributes:
        sessions: The sessions on this page (it may be shorter than the limit
            when some were left out by a state filter; keep paging).
        next_cursor: Pass to the next call; None on the last page.
    """

    model_config = ConfigDict(frozen=True)

    sessions: list[Session]
    next_cursor: str | None

    def __iter__(self) -> Any:  # iterate the sessions, as seed code does with a list
        return iter(self.sessions)

    def __len__(self) -> int:
        return len(self.sessions)


class SessionTemplate(BaseModel):
    """Defaults a session is created with (``create_session(template=...)``).

    Attributes:
        system_prompt: The agent's system prompt in this session's turns
            (replaces the agent's own).
        max_steps: The agent's step limit in this session's turns.
        settings: Agent settings merged over the agent's own.
        metadata: Metadata defaults; what ``create_session`` is given wins.
        ttl: Seconds of inactivity before the session expires (None: the
            manager's ``ttl``).
        title: A default title.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    system_prompt: str | None = None
    max_steps: int | None = Field(default=None, ge=1)
    settings: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    ttl: float | None = None
    title: str | None = None

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'template'}: {e['msg']}"
                for e in exc.errors()
            )
            raise InvalidArgumentError(f"bad SessionTemplate: {problems}"[:2000]) from None

    @field_validator("ttl", mode="before")
    @classmethod
    def _positive_ttl(cls, value: object) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"ttl must be None or a number of seconds, not {type(value).__name__}")
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError("ttl must be a positive, finite number of seconds")
        return seconds

    @field_validator("metadata")
    @classmethod
    def _own_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(k for k in value if k.startswith(RESERVED_PREFIX))
        if reserved:
            raise ValueError(
                f"metadata keys starting with {RESERVED_PREFIX!r} are the manager's own: "
                f"{', '.join(reserved)}"
            )
        return value


class CheckpointInfo(BaseModel):
    """A saved checkpoint.

    ``checkpoint["data"]`` works as well as ``checkpoint.data`` (the names of
    seed code that kept checkpoints as dicts).

    Attributes:
        checkpoint_id: Its id (its name): ``rewind`` and ``fork_session`` of a
            :class:`~chatsession.ChatSession` accept it.
        session_id: The session.
        seq: The seq of its event in the session's log.
        data: What was saved with it.
        created_at: Unix seconds it was saved.
    """

    model_config = ConfigDict(frozen=True)

    checkpoint_id: str
    session_id: str
    seq: int
    data: Any = None
    created_at: float

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)
