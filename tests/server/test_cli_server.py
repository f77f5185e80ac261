"""``chatsession serve`` and ``chatsession keys`` (CliRunner and real subprocesses)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx
from click.testing import CliRunner

from chatsession.cli import main
from chatsession.store import open_store
from tests.server.conftest import serve_process, sse_events


def _keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatsession", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/keys.db"
    runner = CliRunner()
    made = runner.invoke(
        main, ["keys", "create", "--user", "alice", "--name", "laptop", "--store", store]
    )
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert key.startswith("csk_") and len(key) > 40
    admin = _keys("create", "--admin", "--store", store)
    assert admin.returncode == 0, admin.stderr
    listed = _keys("list", "--store", store)
    assert listed.returncode == 0
    assert "alice" in listed.stdout and "laptop" in listed.stdout
    secret = key[17:]
    assert secret not in listed.stdout and key not in listed.stdout
    # not the hash either
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()
    assert digest[:16] not in listed.stdout + listed.stderr
    key_id = key[4:16]
    revoked = _keys("revoke", key_id, "--store", store)
    assert revoked.returncode == 0 and key_id in revoked.stderr
    assert "REVOKED" in _keys("list", "--store", store).stdout
    assert _keys("revoke", "000000000000", "--store", store).returncode == 2
    assert _keys("create", "--store", store).returncode == 2  # no --user, not --admin


def test_serve_subprocess_with_cli_keys_and_graceful_stop(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/serve.db"
    key = _keys("create", "--user", "alice", "--store", store).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    with (
        serve_process(
            tmp_path, "--store", store, "--model", "scripted", "--model-option", "chunk_delay=0.05"
        ) as served,
        httpx.Client(base_url=served.url, timeout=30) as client,
    ):
        assert client.get("/readyz").status_code == 200
        sid = client.post("/v1/sessions", json={}, headers=headers).json()["session_id"]
        reply = client.post(f"/v1/sessions/{sid}/messages", json={"message": "hi"}, headers=headers)
        assert reply.json()["text"] == "You said: hi"
        words = " ".join(f"w{i}" for i in range(200))
        request = client.build_request(
            "POST",
            f"/v1/sessions/{sid}/messages",
            json={"message": words, "stream": True},
            headers=headers,
        )
        response = client.send(request, stream=True)
        lines = response.iter_lines()
        got = [next(lines) for _ in range(8)]  # a few text deltas: the turn is in flight
        assert "event: text" in got
        # uvicorn shuts down gracefully, then ends by the signal it caught
        assert served.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        assert "Finished server process" in served.log.read_text()
        response.close()

    async def read_back() -> list[str]:
        async with open_store(store) as opened:
            statuses = []
            async for batch in opened.read(sid):
                statuses += [row.data for row in batch if row.type == "turn_end"]
            return statuses

    ends = asyncio.run(read_back())
    assert len(ends) == 2  # the turn in flight was recorded too (finished or cancelled)
    statuses = [json.loads(end).get("status", "completed") for end in ends]
    assert statuses[0] == "completed"
    assert statuses[1] in ("cancelled", "completed")


def test_serve_with_two_workers(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/workers.db"
    key = _keys("create", "--user", "alice", "--store", store).stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    with (
        serve_process(
            tmp_path, "--store", store, "--model", "scripted", "--workers", "2"
        ) as served,
        httpx.Client(base_url=served.url, timeout=30) as client,
    ):
        sid = client.post("/v1/sessions", json={}, headers=headers).json()["session_id"]
        for n in range(6):
            streamed = client.post(
                f"/v1/sessions/{sid}/messages",
                json={"message": f"n{n}", "stream": True},
                headers=headers,
            )
            assert sse_events(streamed.text)[-1]["data"]["text"] == f"You said: n{n}"
        history = client.get(f"/v1/sessions/{sid}/history", headers=headers).json()
        assert [e["type"] for e in history["events"]].count("turn_end") == 6
        served.stop()


def test_serve_refuses_memory_with_workers() -> None:
    result = CliRunner().invoke(main, ["serve", "--store", "memory://", "--workers", "2"])
    assert result.exit_code == 2 and "memory://" in result.output


def test_serve_help_lists_options() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    for option in ("--store", "--model", "--host", "--port", "--workers"):
        assert option in result.output
