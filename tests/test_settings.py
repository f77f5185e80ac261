"""One settings object: every CHATSESSION_* variable reaches its reader through it,
a bad value is a usage error naming the variable, and flags override the variables."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import chatsession
from chatsession import Agent, ChatSession, ScriptedLLM
from chatsession.agent.llm import resolve_llm
from chatsession.agent.llm.openai import OpenAILLM
from chatsession.cli import main
from chatsession.cli.local_state import data_dir, last_session
from chatsession.errors import SessionBusyError, UsageError
from chatsession.settings import Settings, get_settings
from chatsession.store import default_store_url, open_store
from tests.agent.loopback import Respond, ScriptedHTTP

SRC = Path(chatsession.__file__).parent
VARIABLE = re.compile(r"CHATSESSION_[A-Z_]+")


def chat(*args: str, lines: str = "/quit\n") -> tuple[int, str]:
    result = CliRunner().invoke(main, ["chat", *args], input=lines)
    return result.exit_code, result.output


# --------------------------------------------------------------------------
# each variable reaches its reader


def test_the_model_variable_reaches_resolve_llm_and_the_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATSESSION_MODEL", "scripted:from-env")
    assert resolve_llm().model == "from-env"
    code, output = chat()
    assert code == 0 and "model from-env" in output


async def test_base_url_and_api_key_reach_the_openai_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with ScriptedHTTP(lambda request, n: Respond(200, {"data": []})) as server:
        monkeypatch.setenv("CHATSESSION_BASE_URL", server.url)
        monkeypatch.setenv("CHATSESSION_API_KEY", "sk-from-chatsession")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai")
        llm = resolve_llm("openai:m")
        assert isinstance(llm, OpenAILLM) and llm.base_url == server.url
        await llm.get_context_window()  # one request to the server the variable names
        await llm.aclose()
        monkeypatch.delenv("CHATSESSION_API_KEY")  # OPENAI_API_KEY stays a fallback
        fallback = OpenAILLM("m")
        await fallback.get_context_window()
        await fallback.aclose()
    keys = [r.headers.get("authorization") for r in server.requests]
    assert keys[0] == "Bearer sk-from-chatsession" and keys[-1] == "Bearer sk-from-openai"


def test_data_dir_and_store_url_reach_the_cli_and_the_default_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("CHATSESSION_DATA_DIR", str(home))
    assert data_dir() == home
    assert default_store_url() == f"sqlite:///{home / 'sessions.db'}"
    code, _ = chat("--model", "scripted", "--session", "in-home", lines="hi\n/quit\n")
    assert code == 0 and (home / "sessions.db").exists()
    assert last_session(default_store_url()) == "in-home"  # remembered in the data dir

    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("CHATSESSION_STORE_URL", store)
    assert default_store_url() == store
    code, output = chat("--model", "scripted", "--session", "there", lines="hi\n/quit\n")
    assert code == 0 and "elsewhere.db" in output and (tmp_path / "elsewhere.db").exists()
    assert last_session(store) == "there"


async def test_the_session_variables_reach_chat_session(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "TIMEOUT": "42",
        "BUSY_TIMEOUT": "0",
        "LEASE_TTL": "3",
        "LEASE_LINGER": "60",
        "SNAPSHOT_EVERY": "2",
    }.items():
        monkeypatch.setenv(f"CHATSESSION_{name}", value)
    store = open_store("memory://")
    async with ChatSession(Agent(ScriptedLLM()), "s", store=store) as session:
        assert (session.timeout, session.busy_timeout) == (42, 0)
        await session.query("hello")
        assert await store.get_snapshot("s") is not None  # every 2 events, not at close
        # the lease lingers after the write (LEASE_LINGER) and runs out in 3 s (LEASE_TTL)
        with pytest.raises(SessionBusyError) as busy:
            await store.acquire_lease("s", "another writer", 1)
        assert busy.value.retry_after is not None and 0 < busy.value.retry_after <= 3
    await store.aclose()


# --------------------------------------------------------------------------
# a bad value is named


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHATSESSION_BUSY_TIMEOUT", "soon"),
        ("CHATSESSION_LEASE_TTL", "0"),
        ("CHATSESSION_SNAPSHOT_EVERY", "-1"),
        ("CHATSESSION_TIMEOUT", "never"),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("CHATSESSION_MODEL", "scripted")
    with pytest.raises(UsageError, match=name):
        get_settings()
    with pytest.raises(UsageError, match=name):
        resolve_llm()
    with pytest.raises(UsageError, match=name):
        ChatSession(Agent(ScriptedLLM()), "s", store="memory://")
    code, output = chat("--model", "scripted", "--store", "memory://")
    assert code == 2 and f"error: {name} cannot be used" in output
    assert "Traceback" not in output


# --------------------------------------------------------------------------
# flags override the variables


def test_flags_override_the_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATSESSION_MODEL", "scripted:env-model")
    monkeypatch.setenv("CHATSESSION_STORE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("CHATSESSION_TIMEOUT", "0.05")  # too short for this answer
    slow = ("--model-option", "chunk_delay=0.05")
    code, output = chat(*slow, lines="one two three four five\n/quit\n")
    assert code == 0 and "model env-model" in output and "took longer than 0.05 s" in output

    flag_store = tmp_path / "flag.db"
    code, output = chat(
        *slow,
        "--model",
        "scripted:flag-model",
        "--store",
        f"sqlite:///{flag_store}",
        "--timeout",
        "30",
        lines="one two three four five\n/quit\n",
    )
    assert code == 0 and "model flag-model" in output
    assert "You said: one two three four five" in output and "took longer" not in output
    assert "saved: session" in output and "flag.db" in output
    assert last_session(f"sqlite:///{flag_store}") is not None


# --------------------------------------------------------------------------
# one place


def test_no_module_but_settings_reads_a_chatsession_variable() -> None:
    # a variable's name alone as a string (an environment key) appears only in
    # settings.py; docstrings and messages mention names inside longer text
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "settings.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            literal = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if literal and VARIABLE.fullmatch(node.value):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value}")
    assert not offenders, "read these through chatsession.settings.get_settings()"
    documented = set(VARIABLE.findall((SRC / "settings.py").read_text(encoding="utf-8")))
    fields = {f"CHATSESSION_{name.upper()}" for name in Settings.model_fields}
    assert fields <= documented  # every setting is in the module's table
