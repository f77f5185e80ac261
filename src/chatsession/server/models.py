"""The JSON bodies of the HTTP API (requests and answers), as pydantic models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from chatsession.manager import CheckpointInfo, Session

__all__ = [
    "AliasChatIn",
    "AliasChatOut",
    "AliasSessionIn",
    "AliasSessionOut",
    "CheckpointIn",
    "CheckpointInfo",
    "CheckpointList",
    "ClearIn",
    "ContextOut",
    "CreateSessionIn",
    "ErrorOut",
    "EventOut",
    "ForkIn",
    "HistoryOut",
    "KeyCreateIn",
    "KeyCreatedOut",
    "KeyList",
    "KeyOut",
    "MessageIn",
    "MetadataPatch",
    "ReplyOut",
    "RewindIn",
    "RewindOut",
    "Session",
    "SessionList",
    "UsageOut",
    "UsageTotalsOut",
    "UserList",
    "UserOut",
    "WindowIn",
]

_STRICT = ConfigDict(extra="forbid")

#: A session, checkpoint or window id as the path takes it.
ID_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$"


class ErrorDetail(BaseModel):
    """What went wrong."""

    type: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class CreateSessionIn(BaseModel):
    """A new session."""

    model_config = _STRICT

    agent_id: str | None = Field(default=None, max_length=1024)
    window_id: str | None = Field(default=None, max_length=1024)
    title: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, Any] | None = None
    ttl: float | None = Field(default=None, gt=0, le=10 * 365 * 86400)


class SessionList(BaseModel):
    """A page of sessions, newest first."""

    sessions: list[Session]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class MetadataPatch(BaseModel):
    """Metadata to merge in (a null value deletes the key)."""

    model_config = _STRICT

    metadata: dict[str, Any]


class MessageIn(BaseModel):
    """A user's message."""

    model_config = _STRICT

    message: str = Field(min_length=1, max_length=1_000_000)
    stream: StrictBool = Field(default=False, description="answer with server-sent events")


class ReplyOut(BaseModel):
    """The answer to a message (``stream=false``)."""

    session_id: str
    text: str
    stop_reason: str | None
    usage: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]
    seq: int = Field(description="the seq of the last event the turn stored")


class EventOut(BaseModel):
    """One event of the session's log."""

    seq: int
    type: str
    ts: float
    turn_id: str | None
    data: Any


class HistoryOut(BaseModel):
    """A page of the session's log, oldest first."""

    session_id: str
    events: list[EventOut]
    head: int = Field(description="the seq of the session's last event")
    next_after_seq: int | None = Field(description="pass as `after_seq` for the next page")


class ForkIn(BaseModel):
    """Where to fork: a seq, a checkpoint id or a turn id (null: now)."""

    model_config = _STRICT

    at: StrictInt | StrictStr | None = None
    session_id: str | None = Field(default=None, pattern=ID_PATTERN)


class RewindIn(BaseModel):
    """Where to rewind the context to: a seq, a checkpoint id or a turn id."""

    model_config = _STRICT

    to: StrictInt | StrictStr


class RewindOut(BaseModel):
    """The seq rewound to."""

    session_id: str
    seq: int


class CheckpointIn(BaseModel):
    """A checkpoint of the session's current point."""

    model_config = _STRICT

    name: str | None = Field(default=None, min_length=1, max_length=1024)
    data: Any = None


class CheckpointList(BaseModel):
    """The session's checkpoints, in save order."""

    checkpoints: list[CheckpointInfo]


class ClearIn(BaseModel):
    """Clear the model's context (the record keeps everything)."""

    model_config = _STRICT

    clear_state: StrictBool = False


class UsageTotalsOut(BaseModel):
    """Summed usage."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float
    calls: int
    estimated: bool


class UsageOut(BaseModel):
    """What the session's model calls used."""

    total_prompt_tokens: int
    total_completion_tokens: int
    total_tokens: int
    total_cost: float
    calls: int
    estimated: bool
    by_model: dict[str, UsageTotalsOut]
    by_level: dict[str, UsageTotalsOut]
    inherited: UsageTotalsOut
    including_inherited: UsageTotalsOut


class ContextOut(BaseModel):
    """How full the model's context is."""

    current_tokens: int
    budget_tokens: int
    messages: int
    utilisation: float
    method: Literal["provider", "tokenizer", "estimate"]
    estimated: bool


class WindowIn(BaseModel):
    """Options for a window's session when it is created."""

    model_config = _STRICT

    agent_id: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, Any] | None = None


class KeyCreateIn(BaseModel):
    """A new API key."""

    model_config = _STRICT

    user_id: str | None = Field(default=None, min_length=1, max_length=1024)
    name: str | None = Field(default=None, max_length=1024)
    admin: StrictBool = False


class KeyOut(BaseModel):
    """An API key as listed (never the key, never its hash)."""

    key_id: str
    hint: str
    user_id: str | None
    name: str | None
    admin: bool
    created_at: float
    revoked_at: float | None


class KeyCreatedOut(KeyOut):
    """A new API key: ``key`` is shown this once."""

    key: str


class KeyList(BaseModel):
    """API keys, oldest first."""

    keys: list[KeyOut]


class UserOut(BaseModel):
    """A user, as the key table knows them."""

    user_id: str
    keys: int
    active_keys: int


class UserList(BaseModel):
    """Users with keys."""

    users: list[UserOut]


class AliasSessionIn(BaseModel):
    """Seed 003's ``POST /sessions``."""

    user_id: str = Field(min_length=1, max_length=1024)
    window_id: str | None = Field(default=None, max_length=1024)
    agent_id: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, Any] | None = None


class AliasSessionOut(BaseModel):
    """The session ``POST /sessions`` made."""

    session_id: str
    user_id: str
    window_id: str | None
    created_at: float


class AliasChatIn(BaseModel):
    """Seed 003's ``POST /chat``: a session id, else the window's session, else a new one."""

    user_id: str = Field(min_length=1, max_length=1024)
    message: str = Field(min_length=1, max_length=1_000_000)
    window_id: str | None = Field(default=None, max_length=1024)
    session_id: str | None = Field(default=None, pattern=ID_PATTERN)
    stream: StrictBool = False


class AliasChatOut(BaseModel):
    """The answer of ``POST /chat``."""

    session_id: str
    response: str
    stop_reason: str | None
    usage: list[dict[str, Any]]
