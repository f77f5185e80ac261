"""``create_app``: the FastAPI app that puts a :class:`~chatsession.SessionManager` behind HTTP."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from chatsession.agent import Agent, resolve_llm
from chatsession.manager import SessionManager
from chatsession.server.context import ServerContext
from chatsession.server.errors import install_error_handlers
from chatsession.server.keys import KeyRing
from chatsession.server.limits import BodyLimit, CountRequests, HeadAsGet
from chatsession.server.live import LiveHub
from chatsession.server.metrics import Metrics
from chatsession.server.routes import admin, aliases, conversation, health, page, sessions
from chatsession.server.settings import ServerSettings

__all__ = ["create_app", "default_model_spec"]

_logger = logging.getLogger("chatsession.server")


def default_model_spec() -> str:
    """``local`` when the ``local`` extra is installed, else ``scripted``."""
    from chatsession.agent.llm import local

    return "local" if local.available() else "scripted"


def _agent(settings: ServerSettings) -> Agent:
    spec = settings.model or default_model_spec()
    llm = resolve_llm(spec, **settings.model_options)
    return Agent(llm, system_prompt=settings.system_prompt, max_steps=settings.max_steps)


def create_app(settings: ServerSettings | None = None, *, agent: Agent | None = None) -> Any:
    """The HTTP server's app (FastAPI).

    One :class:`~chatsession.SessionManager` is opened on the store when the
    app starts (its lifespan) and closed when it stops; turns in flight then
    get ``shutdown_grace`` seconds to finish, and the rest are cancelled
    (each recorded ``cancelled`` in its session's log).

    Args:
        settings: The settings (default: read from ``CHATSESSION_*`` variables).
        agent: The agent every turn runs (default: one on the model
            ``settings.model`` names, with ``model_options``).

    Returns:
        A :class:`fastapi.FastAPI` app, for uvicorn or any ASGI server.

    Raises:
        UsageError: A bad setting or model spec.
        MissingDependencyError: The ``server`` extra (or the model's) is not installed.
    """
    settings = settings or ServerSettings()
    the_agent = agent or _agent(settings)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = SessionManager(
            settings.store_url,
            ttl=settings.session_ttl,
            idle_after=settings.idle_after,
            max_sessions_per_user=settings.max_sessions_per_user,
            busy_timeout=settings.busy_timeout,
        )
        manager.start()
        live = LiveHub(
            manager.store,
            settings.store_url or manager.store.url,  # the default: SQLite (no password)
            queue_size=settings.live_queue_size,
            poll_interval=settings.live_poll_interval,
        )
        await live.start()
        context = ServerContext(
            settings=settings,
            manager=manager,
            agent=the_agent,
            keys=KeyRing(manager.store, cache_seconds=settings.key_cache_seconds),
            metrics=metrics,
            live=live,
        )
        app.state.chatsession = context
        _logger.info("serving the store %s", manager.store.url)
        try:
            yield
        finally:
            try:
                await context.finish_turns()
            finally:
                app.state.chatsession = None
                try:
                    await live.aclose()
                finally:
                    await manager.aclose()

    app = FastAPI(
        title="chatsession",
        summary="Durable, resumable, forkable conversation sessions for LLM agents",
        version=_version(),
        lifespan=lifespan,
        # the interactive docs pages load their scripts from a CDN: off, so nothing
        # the server serves fetches from the network; /openapi.json stays
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app, on_error=lambda kind: metrics.errors.labels(type=kind).inc())
    for module in (sessions, conversation, admin, aliases, health, page):
        app.include_router(module.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-API-Key"],
            expose_headers=["Retry-After", "X-Session-Id"],
            max_age=600,
        )
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(HeadAsGet)
    app.add_middleware(
        CountRequests,
        record=lambda method, status: metrics.requests.labels(
            method=method, status=str(status)
        ).inc(),
    )
    return app


def _version() -> str:
    from chatsession import __version__

    return __version__
