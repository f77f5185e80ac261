"""The HTTP server: the session manager behind REST and server-sent events.

``create_app(settings)`` makes the FastAPI app; ``chatsession serve`` runs
it with uvicorn. Needs the ``server`` extra (``pip install
'chatsession[server]'``); see ``docs/server.md``.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from chatsession.errors import MissingDependencyError
from chatsession.server.keys import KEYS_SESSION, APIKey, KeyRing
from chatsession.server.settings import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from chatsession.agent import Agent

__all__ = [
    "KEYS_SESSION",
    "APIKey",
    "KeyRing",
    "ServerSettings",
    "app_factory",
    "create_app",
    "require_server_extra",
]


def require_server_extra() -> None:
    """Check that the ``server`` extra is installed.

    Raises:
        MissingDependencyError: A package of the extra is missing (it is named).
    """
    for module in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError("the HTTP server", "server", module)


def create_app(settings: ServerSettings | None = None, *, agent: Agent | None = None) -> FastAPI:
    """The HTTP server's FastAPI app (see :func:`chatsession.server.app.create_app`).

    Raises:
        MissingDependencyError: The ``server`` extra is not installed.
    """
    require_server_extra()
    from chatsession.server.app import create_app as make

    app: FastAPI = make(settings, agent=agent)
    return app


def app_factory() -> Any:
    """The app made from the environment (``uvicorn --factory chatsession.server:app_factory``)."""
    return create_app()
