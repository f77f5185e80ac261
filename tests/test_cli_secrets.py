"""Credentials given to the command line never show, and its local files are private.

Run against the real PostgreSQL test server (its trust authentication
accepts any password, so a URL with a password connects) and real SQLite
files, through a pseudo-terminal and ``CliRunner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pexpect
import pytest
from click.testing import CliRunner

from chatsession.cli import main
from chatsession.cli.local_state import HEADER, last_session, remember_session
from chatsession.cli.redaction import Redactor, display_url
from chatsession.errors import SessionNotFoundError
from chatsession.store import open_store
from tests.cli_pty import spawn
from tests.conftest import POSTGRES_URL

PASSWORD = "S3cret-Pa55word"


def with_password(url: str, password: str = PASSWORD, host: str | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    netloc = f"{user}:{password}@{host or parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def session_id() -> Iterator[str]:
    """A fresh session id on the shared PostgreSQL server, deleted afterwards."""
    sid = f"cli-secret-{uuid.uuid4().hex[:12]}"
    yield sid

    async def delete() -> None:
        store = open_store(POSTGRES_URL)
        try:
            with contextlib.suppress(SessionNotFoundError):
                await store.delete(sid)
        finally:
            await store.aclose()

    asyncio.run(delete())


def test_a_store_password_never_shows_and_local_files_are_private(
    env_setup: Path, session_id: str
) -> None:
    home = env_setup / "new-data-dir"  # created by the CLI
    url = with_password(POSTGRES_URL)
    transcript = io.StringIO()
    child = spawn(home, "--model", "scripted", "--store", url, "--session", session_id)
    child.logfile_read = transcript
    child.expect("you>")
    child.sendline("remember the number 42")
    child.expect("You said: remember the number 42")
    child.expect("you>")
    child.sendline("/sessions")
    child.expect(session_id)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    shown = transcript.getvalue()
    assert f"saved: session {session_id} in {display_url(url)}" in shown
    assert ":***@" in shown
    assert PASSWORD not in shown

    # the data directory is 0700, last_session 0600, and holds no URL, no password
    assert mode(home) == 0o700
    state = home / "last_session"
    assert mode(state) == 0o600
    text = state.read_text()
    assert PASSWORD not in text and "postgres" not in text and "127.0.0.1" not in text
    assert text.startswith(HEADER + "\n") and f" {session_id}\n" in text
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp")]

    # a changed password still finds the session (the hash is of the URL without it)
    transcript = io.StringIO()
    child = spawn(
        home, "--model", "scripted", "--store", with_password(url, "rotated-pw-2"), "--resume"
    )
    child.logfile_read = transcript
    child.expect(f"session {session_id}")
    child.expect("resumed: 2 messages")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    assert "rotated-pw-2" not in transcript.getvalue()

    # another store: --resume fails, and says which store without its password
    other = with_password(url, host="localhost")
    result = CliRunner().invoke(
        main, ["chat", "--model", "scripted", "--store", other, "--resume"], input=""
    )
    assert result.exit_code == 1
    assert f"no earlier session with {display_url(other)}" in result.output
    assert PASSWORD not in result.output


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test", "unavailable"),
        (f"redis://:{PASSWORD}@127.0.0.1:notaport/0", "port"),
        (
            f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/test?password={PASSWORD}",
            "password",
        ),
        (f"mongo://admin:{PASSWORD}@db.example/x", "unknown store URL scheme"),
    ],
)
def test_a_failing_store_url_is_reported_without_its_password(
    env_setup: Path, url: str, message: str
) -> None:
    result = CliRunner().invoke(main, ["chat", "--model", "scripted", "--store", url], input="")
    assert result.exit_code in (1, 2)
    assert message in result.output
    assert PASSWORD not in result.output
    assert "error: " in result.output


def test_an_old_last_session_file_with_a_plain_url_still_resumes(env_setup: Path) -> None:
    url = f"sqlite:///{env_setup / 'old.db'}"
    child = spawn(env_setup, "--model", "scripted", "--store", url, "--session", "older")
    child.expect("you>")
    child.sendline("hello")
    child.expect("You said: hello")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    # what earlier versions wrote: the URL, then the id, world-readable
    state = env_setup / "last_session"
    state.write_text(f"{url}\nolder\n")
    state.chmod(0o644)
    assert last_session(url) == "older"

    child = spawn(env_setup, "--model", "scripted", "--store", url, "--resume")
    child.expect("session older")
    child.expect("resumed: 2 messages")
    child.sendline("/quit")
    child.expect(f"saved: session older in {url}")  # shown as given: nothing to hide
    child.expect(pexpect.EOF)
    text = state.read_text()
    assert url not in text and text.startswith(HEADER)
    assert mode(state) == 0o600
    assert last_session(url) == "older"


def test_last_session_keeps_one_entry_per_store(env_setup: Path) -> None:
    remember_session("sqlite:///a.db", "first")
    remember_session(f"redis://:{PASSWORD}@127.0.0.1:6379/0", "second")
    remember_session("sqlite:///a.db", "third")
    assert last_session("sqlite:///a.db") == "third"
    assert last_session("redis://:other@127.0.0.1:6379/0") == "second"
    assert last_session("sqlite:///b.db") is None
    text = (env_setup / "last_session").read_text()
    assert len(text.splitlines()) == 3 and PASSWORD not in text


def test_redactor_hides_passwords_keys_and_secret_query_values() -> None:
    redact = Redactor()
    redact.add_url(f"postgresql://u:{PASSWORD}@h/db?sslmode=require&sslpassword=k3y-pass")
    redact.add_options({"api_key": "sk-abcdef123456", "base_url": "http://me:tok3n-x@h/v1"})
    message = (
        f"failed: postgresql://u:{PASSWORD}@h/db?sslmode=require&sslpassword=k3y-pass; "
        f"password {PASSWORD!r} and key sk-abcdef123456, k3y-pass, tok3n-x, "
        "S3cret%2DPa55word"
    )
    shown = redact(message)
    for secret in (PASSWORD, "sk-abcdef123456", "k3y-pass", "tok3n-x"):
        assert secret not in shown
    assert "postgresql://u:***@h/db?sslmode=require&sslpassword=***;" in shown
    # URLs with nothing to hide are shown exactly as given
    for url in ("sqlite:///tmp/x.db", "sqlite:////abs/x.db", "memory://", "file:///d"):
        assert display_url(url) == url
        assert redact(f"in {url}.") == f"in {url}."
