"""The server over every durable backend; two servers on one store share keys and sessions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.conftest import cleanup, make_url
from tests.server.conftest import live_server, sse_events


@pytest.fixture(params=["sqlite", "file", "redis", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store URL of each durable backend."""
    url, namespace = make_url(request.param, tmp_path)
    yield url
    asyncio.run(cleanup(request.param, namespace))


def test_two_servers_share_keys_and_sessions(durable_url: str) -> None:
    with live_server(durable_url) as one, live_server(durable_url) as two:
        key = one.user("alice")
        two.keys["alice"] = key
        headers = one.headers("alice")
        with one.client() as a, two.client() as b:
            # a key made through one worker works at once on the other (unknown key: re-read)
            made = b.post("/v1/sessions", json={"window_id": "w"}, headers=headers)
            assert made.status_code == 201, made.text
            sid = made.json()["session_id"]
            streamed = a.post(
                f"/v1/sessions/{sid}/messages",
                json={"message": "please add", "stream": True},
                headers=headers,
            )
            names = [e["event"] for e in sse_events(streamed.text)]
            assert names[-1] == "stop" and "tool_result" in names
            history = b.get(f"/v1/sessions/{sid}/history", headers=headers).json()
            assert [e["type"] for e in history["events"]][-1] == "turn_end"
            fork = b.post(f"/v1/sessions/{sid}/fork", json={"at": 2}, headers=headers)
            assert fork.status_code == 201
            # the reserved key session is in no user's listing
            listed = a.get("/v1/sessions", headers=headers).json()["sessions"]
            assert {s["session_id"] for s in listed} == {sid, fork.json()["session_id"]}
            # revoked on one worker: refused there at once, on the other within the cache time
            key_id = key[4:16]
            assert (
                a.delete(f"/v1/admin/keys/{key_id}", headers=one.headers("admin")).status_code
                == 200
            )
            assert a.get("/v1/sessions", headers=headers).status_code == 401
            deadline = (
                time.monotonic() + 0.5 + 2
            )  # key_cache_seconds of the test servers, and slack
            while b.get("/v1/sessions", headers=headers).status_code != 401:
                assert time.monotonic() < deadline, "the revoked key still works"
                time.sleep(0.05)
