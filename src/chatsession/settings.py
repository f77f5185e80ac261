"""Settings: every ``CHATSESSION_*`` environment variable, read in one place.

:func:`get_settings` reads the environment each time it is called (cheap),
so a setting changed by a test or a launcher is seen at once. Arguments and
command-line flags override what is read here.

=============================  ===================================================
variable                       meaning
=============================  ===================================================
``CHATSESSION_STORE_URL``      the store to use when none is given
``CHATSESSION_DATA_DIR``       where the default SQLite file and the CLI's files live
``CHATSESSION_MODEL``          the model spec when none is given
``CHATSESSION_BASE_URL``       the ``openai:`` adapter's server
``CHATSESSION_API_KEY``        its key (``OPENAI_API_KEY`` also works)
``CHATSESSION_BUSY_TIMEOUT``   seconds a writer waits for another (default 10)
``CHATSESSION_LEASE_TTL``      seconds a session's lease lasts unrenewed (default 30)
``CHATSESSION_LEASE_LINGER``   seconds a lease is kept after a write (default 0)
``CHATSESSION_TIMEOUT``        seconds a turn may take (default: no limit)
``CHATSESSION_SNAPSHOT_EVERY`` events between snapshots of a session (default 1000)
=============================  ===================================================
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatsession.errors import UsageError

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """The settings read from ``CHATSESSION_*`` variables (see the module docstring)."""

    # an empty variable counts as unset, as it did before this object existed
    model_config = SettingsConfigDict(
        env_prefix="CHATSESSION_", extra="ignore", env_ignore_empty=True
    )

    store_url: str | None = None
    data_dir: Path | None = None
    model: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    busy_timeout: float = Field(default=10.0, ge=0, le=86400)
    lease_ttl: float = Field(default=30.0, gt=0, le=86400)
    lease_linger: float = Field(default=0.0, ge=0, le=3600)
    timeout: float | None = Field(default=None, gt=0)
    snapshot_every: int = Field(default=1000, ge=0)


_cache: dict[tuple[tuple[str, str], ...], Settings] = {}


def get_settings() -> Settings:
    """The settings as the environment says now (read again only when a
    ``CHATSESSION_*`` variable changed).

    Raises:
        UsageError: A variable holds a value that cannot be used (it is named).
    """
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("CHATSESSION_")))
    cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        name = "CHATSESSION_" + field.upper() if field else "a setting"
        shown = "" if field == "api_key" else f" (it is {os.environ.get(name, '')!r})"
        raise UsageError(
            f"{name} cannot be used{shown}: {first['msg']}; fix it or unset it"
        ) from None
    if len(_cache) > 16:
        _cache.clear()
    _cache[key] = settings
    return settings
