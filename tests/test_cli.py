"""The chat REPL, driven as a person would: in a pseudo-terminal with pexpect."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner

from chatsession.cli import main
from tests.cli_pty import spawn


def quit_(child: pexpect.spawn) -> None:
    child.sendline("/quit")
    child.expect("saved: session")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_conversation_with_every_command(env_setup: Path) -> None:
    child = spawn(env_setup, "--model", "scripted", "--model-option", "chunk_delay=0.01")
    child.expect("you>")
    child.sendline("/help")
    child.expect("/checkpoint NAME")
    child.sendline("hello there")
    child.expect("You said: hello there")
    child.sendline("/checkpoint start")
    child.expect("checkpoint 'start' at seq 6")
    child.sendline("second message")
    child.expect("You said: second message")
    child.sendline("/stats")
    child.expect(r"turns: 2 \(completed 2\)")
    child.expect(r"messages: 4 recorded, 4 in context")
    child.expect(r"context: \d+ of 8192 tokens")
    child.sendline("/rewind start")
    child.expect("rewound to seq 6: 2 messages in context")
    child.sendline("/history")
    child.expect(r"   3 assistant: You said: hello there\r?\n")
    child.expect("you>")
    assert "second message" not in child.before
    child.sendline("/history all")
    child.expect(r"assistant \(not in context\): You said: second message")
    child.expect(r"── rewound to seq 6 \(checkpoint 'start'\) ──")
    child.sendline("/clear")
    child.expect("history cleared")
    child.sendline("/stats")
    child.expect("0 in context")
    child.sendline("/fork")
    child.expect(r"now in fork (\w+)")
    fork_id = child.match.group(1)
    child.sendline("/sessions")
    child.expect(fork_id[:20])
    child.sendline("/nonsense")
    child.expect("unknown command /nonsense")
    quit_(child)


def at_prompt(child: pexpect.spawn) -> None:
    """Wait for the prompt, then a moment: a SIGINT that lands after the prompt is
    printed but before input() waits on the terminal is only seen once a key
    arrives (a race in CPython's input(), not the REPL's; a person is never
    that quick)."""
    child.expect("you>")
    time.sleep(0.3)


def test_ctrl_c_stops_the_answer_keeps_history_and_twice_leaves(env_setup: Path) -> None:
    child = spawn(env_setup, "--model", "scripted", "--model-option", "chunk_delay=0.05")
    child.expect("you>")
    child.sendline(" ".join(f"w{i}" for i in range(300)))
    child.expect("You said: w0 w1 w2")
    child.sendintr()
    child.expect("stopped; the history is kept")
    child.expect("you>")
    child.sendline("/stats")
    child.expect(r"interrupted 1")
    # the interrupted call's tokens are counted, marked as an estimate
    child.expect(r"tokens: ~[\d,]+ estimated \(prompt ~[\d,]+, completion ~[\d,]+\)")
    child.expect(r"cost: ~\$[\d.]+ \(estimated\)")
    child.expect("you>")
    child.sendline("/history")
    child.expect(r"assistant \(cut short\): You said: w0 w1 w2")
    at_prompt(child)
    child.sendintr()
    child.expect("Ctrl\\+C again")
    at_prompt(child)
    child.sendintr()
    child.expect("saved: session")
    child.expect(pexpect.EOF)


def test_resume_and_fork_from_the_command_line(env_setup: Path) -> None:
    child = spawn(env_setup, "--model", "scripted", "--session", "mine")
    child.expect("you>")
    child.sendline("remember the number 42")
    child.expect("You said: remember the number 42")
    quit_(child)

    child = spawn(env_setup, "--model", "scripted", "--resume")
    child.expect("session mine")
    child.expect("resumed: 2 messages")
    child.sendline("/history")
    child.expect("user: remember the number 42")
    quit_(child)

    child = spawn(env_setup, "--model", "scripted", "--fork", "mine")
    child.expect(r"session (\w+)")
    assert child.match.group(1) != "mine"
    child.expect("resumed: 2 messages")
    child.sendline("/sessions")
    child.expect("mine")
    quit_(child)


def test_the_default_model_works_offline(env_setup: Path) -> None:
    child = spawn(env_setup, "--model-option", "max_tokens=12", timeout=120)
    child.expect(r"model\s+SmolLM2-135M-Instruct")
    child.expect("you>")
    child.sendline("What is the capital of France?")
    child.expect("ai>")
    child.expect("you>")
    child.sendline("/stats")
    child.expect(r"turns: 1 \(completed 1\)")
    child.expect("tokenizer|context: ")
    quit_(child)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-9"], "unknown model spec 'gpt-9'"),
        (["--model", "scripted", "--session", "a", "--resume"], "choose one of"),
        (["--model", "scripted", "--resume"], "no earlier session"),
        (["--model", "scripted", "--session", "../etc"], "session id '../etc' is not allowed"),
        (["--model", "scripted", "--store", "mongo://x"], "unknown store URL scheme"),
        (["--model", "scripted", "--model-option", "novalue"], "KEY=VALUE"),
    ],
)
def test_bad_input_is_a_clear_error(env_setup: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["chat", *args], input="")
    assert result.exit_code in (1, 2)
    assert message in result.output


def test_history_is_the_context_and_history_all_the_marked_record(env_setup: Path) -> None:
    # names with Rich markup, a timed-out turn, a rewind and a clear
    child = spawn(
        env_setup,
        "--model",
        "scripted",
        "--model-option",
        "chunk_delay=0.05",
        "--timeout",
        "3",
        "--session",
        "marked",
    )
    child.expect("you>")
    child.sendline("first question")
    child.expect("You said: first question")
    child.sendline("/checkpoint [/]")
    child.expect(r"checkpoint '\[/\]' at seq 6")
    child.sendline("/checkpoint '[bold]x[/bold] [/]'")
    child.expect(r"checkpoint '\[bold\]x\[/bold\] \[/\]' at seq 7")
    child.sendline("second question")
    child.expect("You said: second question")
    child.sendline("slow " * 200)
    child.expect("took longer than 3.0 s")
    child.expect("you>")
    child.sendline("/stats")
    child.expect(r"turns: 3 \(completed 2, timeout 1\)")
    child.expect(
        r"tokens: ~[\d,]+ estimated \(prompt ~[\d,]+, completion ~[\d,]+\) in 3 model calls"
    )
    child.sendline("/rewind [/]")
    child.expect(r"rewound to seq 6: 2 messages in context")
    child.sendline("/history")
    child.expect(r"   3 assistant: You said: first question\r\n")
    child.expect("you>")
    assert "second question" not in child.before and "slow" not in child.before
    child.sendline("/clear")
    child.expect("history cleared")
    child.sendline("/history")
    child.expect(r"\(the model's context is empty; /history all shows the whole record\)")
    child.expect("you>")
    child.sendline("/history all")
    for expected in (
        r"   2 user \(not in context\): first question",
        r"   6 ── checkpoint '\[/\]' ──",
        r"   7 ── checkpoint '\[bold\]x\[/bold\] \[/\]' ──",
        r"  10 assistant \(not in context\): You said: second question",
        r"assistant \(not in context; cut short\): You said: slow slow",
        r"── turn ended: timeout: the turn ran past its timeout of 3.0 s ──",
        r"── rewound to seq 6 \(checkpoint '\[/\]'\) ──",
        r"── history cleared: the model forgot what is above ──",
    ):
        child.expect(expected)
    child.expect("you>")
    child.sendline("/help")
    child.expect(r"/history all\s+the whole record")
    quit_(child)


def test_markup_in_titles_and_rewind_names_is_printed_as_text(env_setup: Path) -> None:
    from chatsession.agent import Agent
    from chatsession.agent.llm.scripted import ScriptedLLM
    from chatsession.blocking import SyncChatSession
    from chatsession.store import default_store_url

    url = default_store_url()
    with SyncChatSession(Agent(ScriptedLLM()), "titled", store=url, title="[/] a [red]title"):
        pass
    child = spawn(env_setup, "--model", "scripted", "--session", "titled")
    child.expect("you>")
    child.sendline("/sessions")
    child.expect(r"\[/\] a \[red\]title")
    child.expect("you>")
    child.sendline("/rewind [/]")
    child.expect(r"checkpoint '\[/\]' not found|no checkpoint")
    child.expect("you>")
    child.sendline("/rewind ²")  # a digit to str.isdigit, not to int()
    child.expect("you>")
    child.sendline("/checkpoint 'unclosed")
    child.expect("No closing quotation")
    quit_(child)


def test_warnings_are_printed_as_one_clean_line(env_setup: Path) -> None:
    child = spawn(env_setup, "--model", "scripted", "--session", "warned")
    child.expect("you>")
    child.sendline("hello")
    child.expect("You said: hello")
    quit_(child)
    # resumed by another model: the consistency warning is one line, no Python frames
    child = spawn(env_setup, "--model", "scripted:other", "--resume")
    child.expect(r"warning: session 'warned' was written by a different agent: model: 'scripted'")
    child.expect("you>")
    assert "UserWarning" not in child.before and "warnings.warn" not in child.before
    quit_(child)


def test_the_command_line_uses_only_public_api() -> None:
    # no private attribute of another object (its own, self._x, are its business),
    # no private name imported: the CLI is built on what users call
    import chatsession.cli

    offenders = []
    for path in sorted(Path(chatsession.cli.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if not own and not node.attr.startswith("__"):
                    offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chatsession"):
                module = node.module or ""
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or any(part.startswith("_") for part in module.split(".")):
                    offenders.append(f"{path.name}:{node.lineno}: {node.module} {private}")
    assert not offenders


def test_sessions_lists_a_memory_stores_sessions(env_setup: Path) -> None:
    # memory:// lives in the process: /sessions shows the sessions this chat made
    result = CliRunner().invoke(
        main,
        ["chat", "--model", "scripted", "--store", "memory://", "--session", "first"],
        input="hi\n/fork\n/sessions\n/quit\n",
    )
    assert result.exit_code == 0, result.output
    fork_id = result.output.split("now in fork ")[1].split()[0]
    table = result.output.split("/sessions")[-1]
    assert f"{fork_id} *" in result.output and "│ first " in result.output, table
