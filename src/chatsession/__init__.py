"""chatsession: durable, resumable, forkable conversation sessions for LLM agents."""

from __future__ import annotations

from chatsession.errors import (
    AgentError,
    BlobNotFoundError,
    ChatSessionClosedError,
    ChatSessionError,
    ConflictError,
    ConsistencyError,
    CorruptDataError,
    InvalidIdError,
    InvalidURLError,
    MissingDependencyError,
    ModelError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    SessionTimeoutError,
    StoreError,
    StoreUnavailableError,
    ToolError,
    UsageError,
)
from chatsession.store import (
    NewEvent,
    Page,
    ParentRef,
    SessionRecord,
    Store,
    StoredEvent,
    default_store_url,
    open_store,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AgentError",
    "BlobNotFoundError",
    "ChatSessionClosedError",
    "ChatSessionError",
    "ConflictError",
    "ConsistencyError",
    "CorruptDataError",
    "InvalidIdError",
    "InvalidURLError",
    "MissingDependencyError",
    "ModelError",
    "NewEvent",
    "Page",
    "ParentRef",
    "SessionBusyError",
    "SessionExistsError",
    "SessionNotFoundError",
    "SessionRecord",
    "SessionTimeoutError",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "StoredEvent",
    "ToolError",
    "UsageError",
    "__version__",
    "default_store_url",
    "open_store",
]
