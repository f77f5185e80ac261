"""``chatsession chat``: a chat in the terminal, every turn saved as it happens.

Answers stream token by token. Ctrl+C stops the current answer and keeps the
history; a second Ctrl+C (at the prompt) leaves. Commands start with ``/``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from chatsession.agent import Agent, resolve_llm
from chatsession.agent.events import (
    ErrorEvent,
    StopEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from chatsession.blocking import SyncChatSession
from chatsession.cli import handle_errors, parse_options
from chatsession.errors import ChatSessionError, SessionNotFoundError, UsageError
from chatsession.store import default_store_url

__all__ = ["chat"]

COMMANDS = {
    "/history": "show the conversation (all of it: cleared and rewound turns too)",
    "/stats": "turns, messages, tokens, cost and context use",
    "/clear": "clear the history (the model forgets; the record keeps it)",
    "/fork": "continue in a fork of this session (the original stays as it is)",
    "/checkpoint NAME": "name this point of the conversation",
    "/rewind NAME": "return to a checkpoint (or a seq)",
    "/sessions": "list the sessions in the store",
    "/help": "this list",
    "/quit": "leave (so does Ctrl+D, or Ctrl+C twice)",
}


def _data_dir() -> Path:
    configured = os.environ.get("CHATSESSION_DATA_DIR")
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_data_dir("chatsession", appauthor=False))


def _remember(store_url: str, session_id: str) -> None:
    path = _data_dir() / "last_session"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{store_url}\n{session_id}\n")


def _last_session(store_url: str) -> str | None:
    try:
        url, session_id = (_data_dir() / "last_session").read_text().split("\n")[:2]
    except (OSError, ValueError):
        return None
    return session_id if url == store_url and session_id else None


class Repl:
    """The loop: read a line, run a turn or a command, print."""

    def __init__(self, session: SyncChatSession, console: Console, store_url: str) -> None:
        self.session = session
        self.console = console
        self.store_url = store_url
        self.leave_on_interrupt = False

    def run(self) -> None:
        self.console.print(
            f"[bold]chatsession[/] · session [cyan]{self.session.session_id}[/] · "
            f"model {self.session.session.agent.llm.model} · /help for commands"
        )
        if self.session.history:
            self.console.print(f"[dim]resumed: {len(self.session.history)} messages[/]")
        while True:
            try:
                line = self.console.input("[bold green]you>[/] ")
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                if self.leave_on_interrupt:
                    self.console.print()
                    return
                self.leave_on_interrupt = True
                self.console.print("\n[dim](Ctrl+C again, Ctrl+D or /quit to leave)[/]")
                continue
            self.leave_on_interrupt = False
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.turn(line)

    def turn(self, text: str) -> None:
        console = self.console
        try:
            console.print("[bold blue]ai>[/] ", end="")
            for event in self.session.query_stream(text):
                if isinstance(event, TextEvent):
                    console.print(event.content, end="", markup=False, highlight=False)
                elif isinstance(event, ToolCallEvent):
                    console.print(f"\n[dim]→ {event.call.name}({event.call.arguments})[/]")
                elif isinstance(event, ToolResultEvent):
                    preview = (
                        event.content if len(event.content) < 200 else event.content[:200] + "…"
                    )
                    style = "red" if event.is_error else "dim"
                    console.print(f"[{style}]← {preview}[/]", markup=True)
                elif isinstance(event, ErrorEvent):
                    console.print(f"\n[red]model error: {event.error}[/]")
                elif isinstance(event, StopEvent) and event.reason == "max_steps":
                    console.print("\n[yellow](stopped: too many tool steps)[/]", end="")
            console.print()
        except KeyboardInterrupt:
            console.print("\n[yellow]stopped; the history is kept (Ctrl+C again to leave)[/]")
            self.leave_on_interrupt = True
        except ChatSessionError as exc:
            console.print(f"\n[red]{exc}[/]")

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        try:
            name, *args = shlex.split(line)
        except ValueError as exc:
            self.console.print(f"[red]{exc}[/]")
            return True
        try:
            return self._command(name.lower(), args)
        except ChatSessionError as exc:
            self.console.print(f"[red]{exc}[/]")
            return True

    def _command(self, name: str, args: list[str]) -> bool:
        session, console = self.session, self.console
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            table = Table(show_header=False, box=None)
            for command, text in COMMANDS.items():
                table.add_row(f"[cyan]{command}[/]", text)
            console.print(table)
        elif name == "/history":
            context = {id(m) for m in session.messages}
            for seq, message in session.session.conversation.history:
                mark = "" if id(message) in context else " [dim](not in context)[/]"
                text = message.text or ", ".join(
                    f"{c.name}({c.arguments})" for c in message.tool_calls
                )
                console.print(f"[dim]{seq:>4}[/] [bold]{message.role}[/]{mark}: ", end="")
                console.print(text, markup=False, highlight=False)
        elif name == "/stats":
            usage = session.get_usage()
            info = session.get_context_info()
            conversation = session.session.conversation
            turns = sum(conversation.turns.values())
            by_status = ", ".join(f"{k} {v}" for k, v in sorted(conversation.turns.items()))
            console.print(f"turns: {turns} ({by_status or 'none'})")
            console.print(
                f"messages: {len(session.history)} recorded, {len(session.messages)} in context"
            )
            console.print(
                f"tokens: {usage.total_tokens} (prompt {usage.total_prompt_tokens}, "
                f"completion {usage.total_completion_tokens}) in {usage.calls} model calls"
            )
            if usage.inherited.calls:
                console.print(f"inherited from the parent: {usage.inherited.total_tokens} tokens")
            console.print(f"cost: ${usage.total_cost:.6f}")
            label = "" if not info.estimated else f" ({info.method}, estimated)"
            console.print(
                f"context: {info.current_tokens} of {info.budget_tokens} tokens "
                f"({info.utilisation:.1%}){label}"
            )
        elif name == "/clear":
            session.clear_history()
            console.print("[green]history cleared (the record keeps it)[/]")
        elif name == "/fork":
            fork = session.fork_session()
            self.session = fork
            _remember(self.store_url, fork.session_id)
            console.print(
                f"[green]now in fork [cyan]{fork.session_id}[/] of the previous session[/]"
            )
        elif name == "/checkpoint":
            if len(args) != 1:
                console.print("[red]usage: /checkpoint NAME[/]")
            else:
                seq = session.checkpoint(args[0])
                console.print(f"[green]checkpoint {args[0]!r} at seq {seq}[/]")
        elif name == "/rewind":
            if len(args) != 1:
                console.print("[red]usage: /rewind NAME (or a seq)[/]")
            else:
                target: int | str = int(args[0]) if args[0].isdigit() else args[0]
                seq = session.rewind(target)
                console.print(
                    f"[green]rewound to seq {seq}: {len(session.messages)} messages in context[/]"
                )
        elif name == "/sessions":
            page = session._portal.run(lambda: session.session.store.list_sessions(limit=50))
            table = Table("id", "title", "events", "parent")
            for record in page.records:
                current = " *" if record.id == session.session_id else ""
                parent = record.parent.session_id if record.parent else ""
                table.add_row(record.id + current, record.title or "", str(record.head), parent)
            console.print(table)
        else:
            console.print(f"[red]unknown command {name}; /help lists them[/]")
        return True


@click.command()
@click.option("--session", "session_id", metavar="ID", help="Open (or create) this session.")
@click.option("--resume", is_flag=True, help="Continue the last session used with this store.")
@click.option("--fork", "fork_id", metavar="ID", help="Chat in a new fork of session ID.")
@click.option(
    "--model",
    metavar="SPEC",
    help="scripted, openai:MODEL or local (default: CHATSESSION_MODEL, else local).",
)
@click.option(
    "--model-option",
    "model_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Passed to the model (base_url=..., max_tokens=...).",
)
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="Store URL (default: CHATSESSION_STORE_URL or SQLite in the data directory).",
)
@click.option("--system", "system_prompt", metavar="TEXT", help="A system prompt.")
@click.option("--timeout", type=float, help="Seconds a turn may take.")
@handle_errors
def chat(
    session_id: str | None,
    resume: bool,
    fork_id: str | None,
    model: str | None,
    model_options: tuple[str, ...],
    store_url: str | None,
    system_prompt: str | None,
    timeout: float | None,
) -> None:
    """Chat in the terminal; every turn is saved as it happens."""
    if sum(bool(x) for x in (session_id, resume, fork_id)) > 1:
        raise UsageError("choose one of --session, --resume and --fork")
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    url = store_url or default_store_url()
    llm = resolve_llm(model, **parse_options(model_options))
    agent = Agent(llm, system_prompt=system_prompt)
    options: dict[str, Any] = {"store": url, "timeout": timeout}
    if resume:
        last = _last_session(url)
        if last is None:
            raise SessionNotFoundError(
                "(last)", f"no earlier session with {url}; start one without --resume"
            )
        session = SyncChatSession.resume(agent, last, **options)
    elif fork_id:
        parent = SyncChatSession.resume(agent, fork_id, **options)
        session = parent.fork_session()
    else:
        session = SyncChatSession(agent, session_id, **options).open()
    _remember(url, session.session_id)
    console = Console(highlight=False)
    repl = Repl(session, console, url)
    try:
        repl.run()
    finally:
        repl.session.close()
        if repl.session is not session:
            session.close()
        console.print(f"[dim]saved: session {repl.session.session_id} in {url}[/]")
