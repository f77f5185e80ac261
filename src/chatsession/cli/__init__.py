"""The ``chatsession`` command line: ``chatsession chat`` (a REPL).

Errors are turned into a message and an exit code here, in one place.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from chatsession.errors import ChatSessionError, MissingDependencyError, UsageError

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

#: exit codes: 1 a run-time failure (store, model), 2 a usage problem
EXIT_FAILURE = 1
EXIT_USAGE = 2


def handle_errors(fn: F) -> F:
    """Turn chatsession's errors into a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UsageError, MissingDependencyError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except ChatSessionError as exc:
            click.echo(f"error: {exc}", err=True)
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

main.add_command(chat)
