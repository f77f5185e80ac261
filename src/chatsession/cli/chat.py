"""``chatsession chat``: a chat in the terminal, every turn saved as it happens.

Answers stream token by token. Ctrl+C stops the current answer and keeps the
history; a second Ctrl+C (at the prompt) leaves. Commands start with ``/``.

What the REPL prints that came from elsewhere (the model, tools, the store,
the user's own history) is stripped of terminal control sequences
(:mod:`chatsession.cli.terminal`) and never read as Rich markup
(:mod:`chatsession.cli.output`); messages that may name a store or a model
server are redacted (:mod:`chatsession.cli.redaction`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from typing import Any
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from chatsession.agent import Agent, resolve_llm
from chatsession.agent.events import (
    AssistantMessageEvent,
    ErrorEvent,
    StopEvent,
    TextEvent,
    ToolCallEvent,
    ToolResultEvent,
)
from chatsession.blocking import SyncChatSession
from chatsession.cli import current_redactor, handle_errors, parse_options, printable
from chatsession.cli.history import context_lines, record_lines
from chatsession.cli.local_state import ensure_data_dir, last_session, remember_session
from chatsession.cli.output import make_console, route_diagnostics, styled
from chatsession.cli.redaction import Redactor, display_url
from chatsession.cli.terminal import TerminalSanitizer, sanitize
from chatsession.errors import ChatSessionError, ModelError, SessionNotFoundError, UsageError
from chatsession.session import ModelUsage, UsageSummary
from chatsession.settings import get_settings
from chatsession.store import SessionRecord, default_store_url, open_store

__all__ = ["COMMANDS", "Repl", "chat", "read_sessions"]

COMMANDS = {
    "/history": "what the model sees now (empty after /clear; the rewound context after /rewind)",
    "/history all": "the whole record: cleared and rewound turns too, with marks for clears, "
    "rewinds, compactions, checkpoints and turns that did not complete",
    "/stats": "turns, messages, tokens (~ marks estimates), cost and context use",
    "/clear": "clear the history (the model forgets; the record keeps it)",
    "/fork": "continue in a fork of this session (the original stays as it is)",
    "/checkpoint NAME": "name this point of the conversation",
    "/rewind NAME": "return to a checkpoint (or a seq)",
    "/sessions": "list the sessions in the store",
    "/help": "this list",
    "/quit": "leave (so does Ctrl+D, or Ctrl+C twice)",
}

#: how much of a tool's result is shown as it runs
TOOL_PREVIEW = 200
#: how many sessions ``/sessions`` lists
SESSIONS_SHOWN = 50


def _tokens(count: int, estimated: bool) -> str:
    return f"~{count:,}" if estimated else f"{count:,}"


def _usage_line(label: str, usage: ModelUsage | UsageSummary) -> str:
    if isinstance(usage, UsageSummary):
        total, prompt, completion = (
            usage.total_tokens,
            usage.total_prompt_tokens,
            usage.total_completion_tokens,
        )
    else:
        total, prompt, completion = usage.total_tokens, usage.prompt_tokens, usage.completion_tokens
    est = usage.estimated
    calls = f"{usage.calls} model call" + ("" if usage.calls == 1 else "s")
    return (
        f"{label}{_tokens(total, est)}{' estimated' if est else ''} "
        f"(prompt {_tokens(prompt, est)}, completion {_tokens(completion, est)}) in {calls}"
    )


class Repl:
    """The loop: read a line, run a turn or a command, print.

    Args:
        session: The open session to chat in.
        console: Where to print (see :func:`~chatsession.cli.output.make_console`).
        store_url: The store's URL, to remember forks for ``--resume``.
        redactor: Hides the credentials in what is printed (default: the
            running command's).
    """

    def __init__(
        self,
        session: SyncChatSession,
        console: Console,
        store_url: str,
        redactor: Redactor | None = None,
    ) -> None:
        self.session = session
        self.console = console
        self.store_url = store_url
        self.redactor = redactor or current_redactor()
        self.leave_on_interrupt = False
        #: every session this REPL chatted in (forks made with /fork too), to close at the end
        self.opened: list[SyncChatSession] = [session]

    def say(self, text: str, style: str = "") -> None:
        """Print one line of the REPL's own words (``text`` is printed literally)."""
        self.console.print(Text(text, style=style))

    def printable(self, text: str) -> str:
        """``text`` from elsewhere, safe to print: sanitized and redacted."""
        return printable(text, self.redactor)

    def error(self, message: str) -> None:
        """Print an error message, redacted and sanitized, in red."""
        self.console.print(Text(printable(message, self.redactor), style="red"))

    def run(self) -> None:
        """Read and answer lines until the user leaves."""
        llm = self.session.agent.llm
        self.console.print(
            styled(
                ("chatsession", "bold"),
                " · session ",
                (self.session.session_id, "cyan"),
                f" · model {printable(str(llm.model), self.redactor)} · /help for commands",
            )
        )
        if self.session.message_count:
            self.say(f"resumed: {self.session.message_count} messages", "dim")
        prompt = Text("you> ", style="bold green")
        while True:
            try:
                line = self.console.input(prompt)
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                if self.leave_on_interrupt:
                    self.console.print()
                    return
                self.leave_on_interrupt = True
                self.say("\n(Ctrl+C again, Ctrl+D or /quit to leave)", "dim")
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
        """Run one turn, streaming its answer."""
        console = self.console
        text_stream = TerminalSanitizer()
        error_shown = False
        try:
            console.print(Text("ai> ", style="bold blue"), end="")
            for event in self.session.query_stream(text):
                if isinstance(event, TextEvent):
                    piece = text_stream.feed(event.content)
                    if piece:
                        console.print(piece, end="")
                    continue
                text_stream.flush()
                if isinstance(event, ToolCallEvent):
                    call = event.call
                    self.say(f"\n→ {sanitize(call.name)}({sanitize(call.arguments)})", "dim")
                elif isinstance(event, ToolResultEvent):
                    preview = sanitize(event.content)
                    if len(preview) > TOOL_PREVIEW:
                        preview = preview[:TOOL_PREVIEW] + "…"
                    self.say(f"← {preview}", "red" if event.is_error else "dim")
                elif isinstance(event, AssistantMessageEvent) and event.message.truncated:
                    self.say("\n(the answer stopped at the model's output limit)", "yellow")
                elif isinstance(event, ErrorEvent):
                    console.print()
                    self.error(f"model error: {event.error}")
                    error_shown = True
                elif isinstance(event, StopEvent) and event.reason == "max_steps":
                    console.print(Text("\n(stopped: too many tool steps)", style="yellow"), end="")
            console.print()
        except KeyboardInterrupt:
            self.say("\nstopped; the history is kept (Ctrl+C again to leave)", "yellow")
            self.leave_on_interrupt = True
        except ModelError as exc:
            if not error_shown:
                console.print()
                self.error(f"model error: {exc}")
        except ChatSessionError as exc:
            console.print()
            self.error(str(exc))

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        try:
            name, *args = shlex.split(line)
        except ValueError as exc:
            self.error(f"{exc} (quote names with spaces: /checkpoint 'my point')")
            return True
        try:
            return self.dispatch(name.lower(), args)
        except ChatSessionError as exc:
            self.error(str(exc))
            return True

    def dispatch(self, name: str, args: list[str]) -> bool:
        """Run the command ``name`` with its arguments; False means leave."""
        session, console = self.session, self.console
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            table = Table(show_header=False, box=None)
            for command, text in COMMANDS.items():
                table.add_row(Text(command, style="cyan"), Text(text))
            console.print(table)
        elif name == "/history":
            self.show_history(args)
        elif name == "/stats":
            self.show_stats()
        elif name == "/clear":
            session.clear_history()
            self.say("history cleared (the record keeps it)", "green")
        elif name == "/fork":
            fork = session.fork_session()
            self.session = fork
            self.opened.append(fork)
            self.remember(fork.session_id)
            console.print(
                styled(
                    ("now in fork ", "green"),
                    (fork.session_id, "cyan"),
                    (" of the previous session", "green"),
                )
            )
        elif name == "/checkpoint":
            if len(args) != 1:
                self.error("usage: /checkpoint NAME")
            else:
                seq = session.checkpoint(args[0])
                self.say(f"checkpoint {sanitize(repr(args[0]))} at seq {seq}", "green")
        elif name == "/rewind":
            if len(args) != 1:
                self.error("usage: /rewind NAME (or a seq)")
            else:
                given = args[0]
                target: int | str = int(given) if given.isascii() and given.isdigit() else given
                seq = session.rewind(target)
                self.say(
                    f"rewound to seq {seq}: {len(session.messages)} messages in context", "green"
                )
        elif name == "/sessions":
            self.show_sessions()
        else:
            self.error(f"unknown command {name}; /help lists them")
        return True

    def show_history(self, args: list[str]) -> None:
        """``/history``: the context; ``/history all``: the whole record, marked."""
        session = self.session
        if not args:
            lines = context_lines(session.conversation.context, self.printable)
        elif args == ["all"]:
            events = session.read_events()
            in_context = {seq for seq, _ in session.conversation.context}
            record = session.record
            parent = record.parent if record else None
            lines = record_lines(events, in_context, parent, self.printable)
        else:
            self.error("usage: /history (what the model sees) or /history all (the record)")
            return
        for line in lines:
            self.console.print(line)

    def show_stats(self) -> None:
        """``/stats``: turns, messages, tokens, cost and context use."""
        session = self.session
        usage = session.get_usage()
        info = session.get_context_info()
        conversation = session.conversation
        turns = sum(conversation.turns.values())
        by_status = ", ".join(f"{k} {v}" for k, v in sorted(conversation.turns.items()))
        self.say(f"turns: {turns} ({by_status or 'none'})")
        self.say(f"messages: {session.message_count} recorded, {len(session.messages)} in context")
        self.say(_usage_line("tokens: ", usage))
        if len(usage.by_model) > 1:
            for model, part in sorted(usage.by_model.items()):
                self.say(_usage_line(f"  {sanitize(model)}: ", part))
        if usage.inherited.calls:
            self.say(_usage_line("inherited from the parent: ", usage.inherited))
        cost = f"${usage.total_cost:.6f}"
        self.say(f"cost: ~{cost} (estimated)" if usage.estimated else f"cost: {cost}")
        label = "" if not info.estimated else f" ({info.method}, estimated)"
        self.say(
            f"context: {info.current_tokens} of {info.budget_tokens} tokens "
            f"({info.utilisation:.1%}){label}"
        )

    def show_sessions(self) -> None:
        """``/sessions``: the newest sessions in the store, the current one marked ``*``."""
        session = self.session
        if urlsplit(self.store_url).scheme == "memory":
            # a memory:// store lives in this process: its sessions are this REPL's
            records = [
                s.record.model_copy(update={"head": s.conversation.head})
                for s in reversed(self.opened)
                if s.record is not None
            ]
        else:
            records = read_sessions(self.store_url, SESSIONS_SHOWN)
        table = Table("id", "title", "user", "events", "parent")
        for record in records:
            current = " *" if record.id == session.session_id else ""
            parent = record.parent.session_id if record.parent else ""
            table.add_row(
                Text(sanitize(record.id) + current),
                Text(sanitize(record.title or "")),
                Text(sanitize(record.user_id or "")),
                Text(str(record.head)),
                Text(sanitize(parent)),
            )
        self.console.print(table)

    def remember(self, session_id: str) -> None:
        """Remember ``session_id`` for ``--resume`` (a failure is printed, not raised)."""
        try:
            remember_session(self.store_url, session_id)
        except OSError as exc:
            self.error(f"could not remember the session for --resume: {exc}")


def read_sessions(store_url: str, limit: int) -> list[SessionRecord]:
    """The newest ``limit`` sessions of a store, read through a connection of their own.

    Runs its own event loop (the chat's session runs on another thread's).
    """

    async def read() -> list[SessionRecord]:
        store = open_store(store_url)
        try:
            page = await store.list_sessions(limit=limit)
        finally:
            await store.aclose()
        return page.records

    return asyncio.run(read())


def _close_all(sessions: list[SyncChatSession]) -> None:
    """Close every session, newest first; the first failure is raised after all are closed."""
    failure: BaseException | None = None
    for session in reversed(sessions):
        try:
            session.close()
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


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
@click.option(
    "--timeout",
    type=float,
    metavar="SECONDS",
    help="Seconds a turn may take (default: CHATSESSION_TIMEOUT, else no limit).",
)
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
    """Chat in the terminal; every turn is saved as it happens.

    The last session used with each store is remembered for --resume in the
    data directory (CHATSESSION_DATA_DIR), created 0700, its file 0600, with
    a hash of the store URL, never the URL or its password. Flags override
    the CHATSESSION_* variables (a bad value in one is reported first).
    """
    get_settings()  # a CHATSESSION_* variable that cannot be used: said before anything
    redactor = current_redactor()
    redactor.add_url(store_url)
    url = store_url or default_store_url()
    redactor.add_url(url)
    options = parse_options(model_options)
    redactor.add_options(options)
    if sum(bool(x) for x in (session_id, resume, fork_id)) > 1:
        raise UsageError("choose one of --session, --resume and --fork")
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    with contextlib.suppress(OSError):  # the store or remembering reports it if it matters
        ensure_data_dir()
    console = make_console()
    with route_diagnostics(console, redactor):
        llm = resolve_llm(model, **options)
        agent = Agent(llm, system_prompt=system_prompt)
        session_options: dict[str, Any] = {"store": url, "timeout": timeout}
        opened: list[SyncChatSession] = []
        if resume:
            last = last_session(url)
            if last is None:
                raise SessionNotFoundError(
                    "(last)",
                    f"no earlier session with {display_url(url)}; start one without --resume",
                )
            session = SyncChatSession.resume(agent, last, **session_options)
        elif fork_id:
            parent = SyncChatSession.resume(agent, fork_id, **session_options)
            opened.append(parent)
            try:
                session = parent.fork_session()
            except BaseException:
                parent.close()
                raise
        else:
            session = SyncChatSession(agent, session_id, **session_options).open()
        repl = Repl(session, console, url, redactor)
        repl.remember(session.session_id)
        try:
            repl.run()
        finally:
            _close_all([*opened, *repl.opened])
            console.print(
                styled(
                    (
                        f"saved: session {repl.session.session_id} in "
                        f"{printable(display_url(url), redactor)}",
                        "dim",
                    )
                )
            )
