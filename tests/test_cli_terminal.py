"""Nothing the REPL prints from a model, a tool or the store can drive the terminal.

The sanitizer is tested on its own (every kind of sequence, split at every
point), then through the real REPL: in a pseudo-terminal with the scripted
model streaming an answer full of escape sequences, and in process with a
real SQLite store for tool calls, model errors, /history and /sessions.
"""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pexpect
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatsession.agent import Agent, tool
from chatsession.agent.llm.scripted import Reply, ScriptedLLM
from chatsession.blocking import SyncChatSession
from chatsession.cli.chat import Repl
from chatsession.cli.output import make_console
from chatsession.cli.redaction import Redactor
from chatsession.cli.terminal import TerminalSanitizer, sanitize
from chatsession.errors import ModelError
from tests.cli_pty import spawn

ESC = "\x1b"
CLIPBOARD = f"{ESC}]52;c;cm0gLXJmIH4K{ESC}\\"  # OSC 52 (clipboard write) ended by ST
TITLE = f"{ESC}]0;pwned title\x07"  # OSC 0 (window title) ended by BEL
HOSTILE = (
    f"one {CLIPBOARD} two {TITLE} three {ESC}[2J{ESC}[H four {ESC}[31mred{ESC}[0m five "
    f"{ESC}[2 q six {ESC}P1$r evil{ESC}\\ seven {ESC}7{ESC}8 eight \x9b31m nine \x9d0;t\x07 ten"
)
CLEAN = "one  two  three  four red five  six  seven  eight  nine  ten"


def no_control(text: str) -> bool:
    return not any((ord(c) < 0x20 and c not in "\n\t\r") or 0x7F <= ord(c) <= 0x9F for c in text)


# --------------------------------------------------------------------------
# the sanitizer


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (
            "plain text, unicode é ✓ and [bold]markup[/]",
            "plain text, unicode é ✓ and [bold]markup[/]",
        ),
        ("tab\tand\nnewline", "tab\tand\nnewline"),
        ("windows\r\nline", "windows\nline"),
        ("over\rwrite", "overwrite"),
        ("bell\x07 back\x08 nul\x00 del\x7f", "bell␇ back␈ nul␀ del␡"),
        ("c1 \x85 next line", "c1 \ufffd next line"),
        (f"{ESC}]52;c;ZXZpbA=={ESC}\\after", "after"),
        (f"{ESC}]8;;http://evil{ESC}\\link{ESC}]8;;{ESC}\\", "link"),
        (f"a{ESC}[1;31;48;5;200mb{ESC}[m", "ab"),
        (f"a{ESC}[?1049h{ESC}[?25lb", "ab"),
        (f"{ESC}Pq#0;2;0;0;0#1~~{ESC}\\sixel", "sixel"),
        (f"{ESC}_apc{ESC}\\{ESC}^pm\x07{ESC}Xsos{ESC}\\x", "x"),
        (f"{ESC}(0{ESC})B{ESC} Fnf", "nf"),
        (f"{ESC}c{ESC}=reset", "reset"),
        (f"{ESC}{ESC}[31mdouble", "double"),
        (f"{ESC}é", "é"),
        (f"{ESC}]0;no end\nnext line", "\nnext line"),
        (f"{ESC}[31\nbroken csi", "\nbroken csi"),
        ("\x9b2J\x9d0;t\x9cc1 forms\x90dcs\x9c", "c1 forms"),
        (f"unfinished {ESC}]52;c;abc", "unfinished "),
        (f"unfinished {ESC}[", "unfinished "),
        (f"unfinished {ESC}", "unfinished "),
        (HOSTILE, CLEAN),
    ],
)
def test_sanitize_drops_sequences_and_shows_lone_controls(raw: str, shown: str) -> None:
    assert sanitize(raw) == shown


def test_a_sequence_split_across_deltas_is_still_dropped() -> None:
    for cut in range(1, len(HOSTILE)):
        sanitizer = TerminalSanitizer()
        out = sanitizer.feed(HOSTILE[:cut]) + sanitizer.feed(HOSTILE[cut:])
        sanitizer.flush()
        assert out == CLEAN, cut
    # one character at a time
    sanitizer = TerminalSanitizer()
    assert "".join(sanitizer.feed(c) for c in HOSTILE) == CLEAN
    assert not sanitizer.pending


def test_flush_ends_an_unfinished_sequence() -> None:
    sanitizer = TerminalSanitizer()
    assert sanitizer.feed(f"text {ESC}]0;half a title") == "text "
    assert sanitizer.pending
    sanitizer.flush()
    assert sanitizer.feed("next answer") == "next answer"


@given(
    st.text(
        alphabet=st.sampled_from(
            [
                ESC,
                "[",
                "]",
                "\x07",
                "\\",
                "P",
                "\x9b",
                "\x9c",
                "\n",
                "a",
                "1",
                ";",
                " ",
                "\r",
                "\x00",
                "é",
            ]
        )
    ),
    st.lists(st.integers(0, 60), max_size=6),
)
def test_any_split_gives_the_same_safe_text(text: str, cuts: list[int]) -> None:
    whole = sanitize(text)
    assert ESC not in whole and no_control(whole.replace("\r", ""))
    assert "\r" not in whole
    sanitizer = TerminalSanitizer()
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert "".join(sanitizer.feed(p) for p in pieces) == whole


# --------------------------------------------------------------------------
# the REPL in a pseudo-terminal


def test_escape_sequences_in_a_streamed_answer_never_reach_the_terminal(env_setup: Path) -> None:
    # the scripted model streams word by word: the title's OSC, the CSI "ESC [2 q"
    # and the nF "ESC SP F" are each split across two deltas
    answer = f"{HOSTILE} {ESC}]0;split title\x07 {ESC} F end"
    child = spawn(
        env_setup,
        "--model",
        "scripted",
        "--session",
        "hostile",
        "--model-option",
        "replies=" + json.dumps([answer]),
    )
    transcript = io.StringIO()
    child.logfile_read = transcript
    child.expect("you>")
    child.sendline("say something")
    child.expect("ten")
    child.expect("end")
    child.expect("you>")
    child.sendline("/history")
    child.expect("/history")
    child.expect("ten")
    child.expect("you>")
    child.sendline("/history all")
    child.expect("/history all")
    child.expect("ten")
    child.expect("you>")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    output = transcript.getvalue()
    assert CLEAN in output
    assert ESC not in output and "\x9b" not in output and "\x9d" not in output
    assert "pwned" not in output and "cm0gLXJmIH4K" not in output
    assert output.count(CLEAN) == 3  # the answer, /history and /history all


# --------------------------------------------------------------------------
# the REPL in process, on a real SQLite store


def repl_for(tmp_path: Path, llm: ScriptedLLM, tools: list = ()) -> tuple[Repl, io.StringIO]:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    session = SyncChatSession(Agent(llm, tools=list(tools)), "s1", store=url).open()
    out = io.StringIO()
    console = make_console(file=out, width=200)
    return Repl(session, console, url, Redactor()), out


@tool
def lookup(query: str) -> str:
    """Look something up.

    Args:
        query: What to look up.
    """
    return f"found {ESC}]52;c;c2VjcmV0{ESC}\\ for {query} {ESC}[2J[/] done"


def test_tool_calls_results_and_model_errors_are_shown_sanitized(tmp_path: Path) -> None:
    llm = ScriptedLLM(
        [
            Reply.call("lookup", query=f"x{ESC}]0;t\x07y"),
            f"answer {ESC}[31m[/]{ESC}[0m",
            ModelError(f"server said {ESC}]0;title\x07 no [/] via http://u:hunter22@h/v1"),
            "still here",
        ]
    )
    repl, out = repl_for(tmp_path, llm, [lookup])
    repl.redactor.add_url("http://u:hunter22@h/v1")
    try:
        repl.turn("look it up")
        repl.turn("again")  # the model fails: shown, and the REPL carries on
        repl.turn("and again")
        repl.command("/history all")
    finally:
        repl.session.close()
    text = out.getvalue()
    assert "→ lookup(" in text
    assert "← found  for xy [/] done" in text
    assert "answer [/]" in text
    assert "model error: server said  no [/] via http://u:***@h/v1" in text
    assert "still here" in text
    assert "── turn ended: error" in text
    assert ESC not in text and "hunter22" not in text and "c2VjcmV0" not in text


def test_stored_titles_ids_and_users_are_shown_sanitized(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    with SyncChatSession(Agent(ScriptedLLM()), "plain", store=url, title="[/] fine [bold]"):
        pass
    # values written by another program (or an older version) into the same file
    with sqlite3.connect(tmp_path / "sessions.db") as db:
        db.execute(
            "UPDATE sessions SET body = json_set(body, '$.title', ?), user_id = ?",
            (f"my{ESC}]0;evil\x07 title", f"alice{ESC}[2J-bob"),
        )
    repl, out = repl_for(tmp_path, ScriptedLLM())
    try:
        repl.command("/sessions")
    finally:
        repl.session.close()
    text = out.getvalue()
    assert "my title" in text and "alice-bob" in text and "[/] fine [bold]" not in text
    assert ESC not in text and "evil" not in text
