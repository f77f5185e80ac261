"""How the command line prints: a Rich console that never reads markup from text.

Rich parses ``[style]...[/]`` markup and ``:emoji:`` codes in every string it
prints, so a title, a checkpoint name or an answer holding ``[/]`` raised a
markup error, and ``[bold]`` in an answer changed its look. The console made
here has markup, emoji codes and highlighting switched off: text prints as
it is, and styles come only from :class:`rich.text.Text` objects built with
:func:`styled`.

Warnings and log records raised while a command runs (a resumed session
written by another agent, a store repairing a file) are printed through the
same console by :func:`route_diagnostics`, redacted and sanitized, instead of
Python's raw ``file:line: UserWarning`` lines.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from chatsession.cli.redaction import Redactor
from chatsession.cli.terminal import sanitize

__all__ = ["make_console", "route_diagnostics", "styled"]


def make_console(**options: Any) -> Console:
    """A console that prints strings literally (no markup, emoji codes or highlighting).

    Long lines are left to the terminal to wrap (``soft_wrap``), as streamed
    answers are, so ids and URLs stay whole when copied.
    """
    options.setdefault("soft_wrap", True)
    return Console(markup=False, emoji=False, highlight=False, **options)


def styled(*parts: str | tuple[str, str]) -> Text:
    """A line from parts: plain strings, or ``(text, style)`` pairs. Text is never parsed."""
    return Text.assemble(*parts)


class _ConsoleHandler(logging.Handler):
    def __init__(self, show: Any) -> None:
        super().__init__(logging.WARNING)
        self._show = show

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._show(record.getMessage())
        except Exception:  # a broken log call must not break the chat
            self.handleError(record)


@contextlib.contextmanager
def route_diagnostics(console: Console, redactor: Redactor) -> Iterator[None]:
    """Print warnings and chatsession's log records as ``warning: ...`` lines on ``console``.

    The same message sent both as a warning and as a log record prints once.
    """
    last: list[str] = []

    def show(message: str) -> None:
        text = sanitize(redactor(message))
        if last and last[0] == text:
            return
        last[:] = [text]
        console.print(styled(("warning: ", "yellow"), text))

    def show_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        show(str(message))

    logger = logging.getLogger("chatsession")
    handler = _ConsoleHandler(show)
    saved_show, saved_propagate = warnings.showwarning, logger.propagate
    warnings.showwarning = show_warning
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        warnings.showwarning = saved_show
        logger.removeHandler(handler)
        logger.propagate = saved_propagate
