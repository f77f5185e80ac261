"""The ``chatsession`` command line: ``chatsession chat`` (a REPL).

Errors are turned into a message and an exit code here, in one place
(:func:`handle_errors`). Every message printed there is redacted (store
passwords, API keys, secret query values: :mod:`chatsession.cli.redaction`)
and stripped of terminal control sequences (:mod:`chatsession.cli.terminal`).
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

from chatsession.cli.redaction import Redactor
from chatsession.cli.terminal import sanitize
from chatsession.errors import ChatSessionError, MissingDependencyError, UsageError

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

#: exit codes: 1 a run-time failure (store, model), 2 a usage problem
EXIT_FAILURE = 1
EXIT_USAGE = 2

_REDACTOR = "chatsession.redactor"


def current_redactor() -> Redactor:
    """The redactor of the command running now (a fresh one outside a command).

    Commands register the secrets they read (store URLs, model options) with
    it; :func:`handle_errors` and the REPL pass everything they print through it.
    """
    context = click.get_current_context(silent=True)
    if context is None:
        return Redactor()
    redactor = context.meta.get(_REDACTOR)
    if not isinstance(redactor, Redactor):
        redactor = context.meta[_REDACTOR] = Redactor()
    return redactor


def printable(text: str, redactor: Redactor | None = None) -> str:
    """``text`` safe to print: credentials redacted, terminal control sequences removed."""
    return sanitize((redactor or current_redactor())(text))


def handle_errors(fn: F) -> F:
    """Turn errors into a one-line, redacted message and an exit code.

    ``ChatSessionError``: exit 2 for usage mistakes, 1 for run-time failures.
    Any other exception is a bug: its traceback is printed, redacted, with exit 1.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        redactor = current_redactor()
        try:
            return fn(*args, **kwargs)
        except (UsageError, MissingDependencyError) as exc:
            click.echo(f"error: {printable(str(exc), redactor)}", err=True)
            sys.exit(EXIT_USAGE)
        except ChatSessionError as exc:
            click.echo(f"error: {printable(str(exc), redactor)}", err=True)
            sys.exit(EXIT_FAILURE)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            trace = "".join(traceback.format_exception(exc))
            click.echo(printable(trace, redactor), err=True, nl=False)
            click.echo(
                "error: an unexpected failure (a bug in chatsession; please report it "
                "with the lines above)",
                err=True,
            )
            sys.exit(EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]


def parse_options(values: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON when they parse as JSON, else text."""
    options: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chatsession")
def main() -> None:
    """Durable, resumable, forkable conversations with LLM agents."""


from chatsession.cli.chat import chat  # noqa: E402  (registers the command)
from chatsession.cli.keys import keys  # noqa: E402
from chatsession.cli.serve import serve  # noqa: E402

main.add_command(chat)
main.add_command(keys)
main.add_command(serve)
