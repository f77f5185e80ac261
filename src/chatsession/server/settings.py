"""``ServerSettings``: the HTTP server's ``CHATSESSION_*`` variables.

They extend :class:`chatsession.settings.Settings` (the store, the model, the
busy timeout are the same variables the library reads), so one environment
configures both. ``chatsession serve`` flags override them.

===================================  =========================================================
variable                             meaning
===================================  =========================================================
``CHATSESSION_STORE_URL``            the store (default: SQLite in the user data folder)
``CHATSESSION_MODEL``                the model spec (default: ``local`` if installed, else
                                     ``scripted``)
``CHATSESSION_MODEL_OPTIONS``        JSON object of options for the model adapter
``CHATSESSION_SYSTEM_PROMPT``        the agent's system prompt
``CHATSESSION_ADMIN_KEY``            a key that may manage users and keys over HTTP
``CHATSESSION_CORS_ORIGINS``         origins allowed by CORS: comma-separated or a JSON list
``CHATSESSION_MAX_REQUEST_BYTES``    the largest request body (default 1 MiB; 413 above)
``CHATSESSION_BUSY_TIMEOUT``         seconds a turn waits for a busy session (then 409)
``CHATSESSION_SESSION_TTL``          seconds of inactivity before a session expires
``CHATSESSION_MAX_SESSIONS_PER_USER``  the most sessions a user may have (unset: no limit)
``CHATSESSION_KEY_CACHE_SECONDS``    how long a worker trusts its copy of the key table (2)
``CHATSESSION_SHUTDOWN_GRACE``       seconds turns in flight get to finish at shutdown (10)
``CHATSESSION_LIVE_QUEUE_SIZE``      events a live watcher may fall behind before it is told
                                     to reconnect (1000)
``CHATSESSION_LIVE_POLL_INTERVAL``   seconds between reads of a watched session's log on
                                     ``sqlite://`` and ``file://`` stores (0.1)
===================================  =========================================================
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from chatsession.settings import Settings

__all__ = ["ServerSettings", "environment_for"]


def environment_for(**values: Any) -> dict[str, str]:
    """The ``CHATSESSION_*`` variables that set these settings (for worker processes).

    Args:
        **values: Setting names and values (None values are left out; dicts
            and lists become JSON).

    Returns:
        Variable names and their text.
    """
    prefix = str(ServerSettings.model_config.get("env_prefix", ""))
    out: dict[str, str] = {}
    for name, value in values.items():
        if name not in ServerSettings.model_fields:
            raise ValueError(f"no setting named {name!r}")
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        out[prefix + name.upper()] = text
    return out


class ServerSettings(Settings):
    """The server's settings, read from ``CHATSESSION_*`` variables (see the module docstring).

    Attributes:
        model_options: Options passed to the model adapter (e.g.
            ``{"chunk_delay": 0.05}`` for ``scripted``).
        system_prompt: The agent's system prompt.
        agent_id: The agent id recorded on sessions created without one.
        admin_key: A key with admin rights (besides keys created with ``--admin``).
        cors_origins: Origins allowed by CORS (empty: no CORS headers).
        max_request_bytes: The largest request body accepted.
        session_ttl: Seconds of inactivity before a session expires (None: never).
        idle_after: Seconds of inactivity after which a session reads as idle.
        max_sessions_per_user: The most sessions a user may have.
        key_cache_seconds: How long a worker uses its copy of the API key
            table before reading changes (a revoked key works that long at
            most on other workers).
        shutdown_grace: Seconds turns in flight get to finish at shutdown
            before they are cancelled (and recorded as ``cancelled``).
        max_steps: The agent's step limit per turn.
        live_queue_size: How many events a live watcher (``GET .../events``)
            may fall behind before it is told to reconnect.
        live_poll_interval: Seconds between reads of a watched session's log
            on ``sqlite://`` and ``file://`` stores (other workers' turns).
    """

    model_options: dict[str, Any] = Field(default_factory=dict)
    system_prompt: str | None = None
    agent_id: str | None = None
    admin_key: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    session_ttl: float | None = Field(default=None, gt=0)
    idle_after: float = Field(default=900.0, gt=0)
    max_sessions_per_user: int | None = Field(default=None, ge=1)
    key_cache_seconds: float = Field(default=2.0, ge=0, le=3600)
    shutdown_grace: float = Field(default=10.0, ge=0, le=3600)
    max_steps: int = Field(default=10, ge=1, le=1000)
    live_queue_size: int = Field(default=1000, ge=1, le=1_000_000)
    live_poll_interval: float = Field(default=0.1, gt=0, le=60)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("admin_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("the admin key must be at least 16 characters")
        return value
