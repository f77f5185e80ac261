"""``chatsession serve``: the HTTP server (uvicorn), on the embedded defaults
unless told otherwise."""

from __future__ import annotations

import os
import sys

import click

from chatsession.cli import current_redactor, handle_errors, parse_options, printable
from chatsession.cli.redaction import display_url
from chatsession.errors import UsageError

__all__ = ["serve"]


@click.command()
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="The store (default: SQLite in the user data folder).",
)
@click.option(
    "--model",
    metavar="SPEC",
    help="The model: scripted, openai:MODEL or local (default: local when installed, else scripted).",
)
@click.option(
    "--model-option",
    "model_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option for the model adapter (repeatable; JSON values).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="The port."
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Worker processes (they share the store; not with memory://).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@handle_errors
def serve(
    store_url: str | None,
    model: str | None,
    model_options: tuple[str, ...],
    host: str,
    port: int,
    workers: int,
    log_level: str,
) -> None:
    """Serve sessions over HTTP: REST and server-sent events under /v1 (see docs/server.md).

    Every setting can also come from a CHATSESSION_* variable (flags win);
    the admin key only from CHATSESSION_ADMIN_KEY, never from a flag.
    """
    from chatsession.server import ServerSettings, create_app, require_server_extra
    from chatsession.server.app import default_model_spec
    from chatsession.server.settings import environment_for

    require_server_extra()
    import uvicorn

    redactor = current_redactor()
    redactor.add_url(store_url)
    options = parse_options(model_options)
    redactor.add_options(options)
    # the flags go to the environment: worker processes read the same settings
    os.environ.update(
        environment_for(
            store_url=store_url or None, model=model or None, model_options=options or None
        )
    )
    try:
        settings = ServerSettings()
    except ValueError as exc:
        raise UsageError(f"a CHATSESSION_* setting cannot be used: {exc}") from None
    if not settings.model:
        settings.model = default_model_spec()
        os.environ.update(environment_for(model=settings.model))
    if workers > 1 and (settings.store_url or "").startswith("memory:"):
        raise UsageError(
            "memory:// is one process's memory: several workers cannot share it; "
            "use a SQLite file, Redis or PostgreSQL, or --workers 1"
        )
    from chatsession.store import default_store_url

    shown = display_url(settings.store_url or default_store_url())
    click.echo(
        printable(
            f"chatsession: serving {shown} with the model {settings.model} on "
            f"http://{host}:{port} ({workers} worker{'s' if workers > 1 else ''})",
            redactor,
        ),
        err=True,
    )
    if workers > 1:
        uvicorn.run(
            "chatsession.server:app_factory",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        )
    else:
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
        )
    sys.stderr.flush()
