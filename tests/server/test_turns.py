"""Turns over HTTP: busy sessions, clients that go away, the store going away, seed aliases."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

from tests.server.conftest import LiveServer, free_port, live_server, sse_events


def _session(live: LiveServer, who: str = "alice") -> str:
    with live.client() as client:
        reply = client.post("/v1/sessions", json={}, headers=live.headers(who))
    sid: str = reply.json()["session_id"]
    return sid


def _history(live: LiveServer, sid: str) -> list[dict[str, Any]]:
    with live.client() as client:
        events: list[dict[str, Any]] = client.get(
            f"/v1/sessions/{sid}/history", params={"limit": 1000}, headers=live.headers("alice")
        ).json()["events"]
    return events


def _wait_for(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _start_slow_stream(live: LiveServer, sid: str) -> tuple[httpx.Client, Any, list[str]]:
    """Open a streamed turn that waits in a tool; returns once its tool_call arrived."""
    client = httpx.Client(base_url=live.url, timeout=60)
    request = client.build_request(
        "POST",
        f"/v1/sessions/{sid}/messages",
        json={"message": "please wait", "stream": True},
        headers=live.headers("alice"),
    )
    response = client.send(request, stream=True)
    assert response.status_code == 200
    seen: list[str] = []
    lines = response.iter_lines()  # kept open: leaving a for loop over it would close it
    while not seen or seen[-1] != "event: tool_call":
        seen.append(next(lines))
    response.lines = lines  # keep a reference until the test closes the response
    return client, response, seen


def test_busy_session_is_409_with_retry_after(live: LiveServer) -> None:
    sid = _session(live)
    client, response, _ = _start_slow_stream(live, sid)
    try:
        with live.client() as other:
            busy = other.post(
                f"/v1/sessions/{sid}/messages",
                json={"message": "me too"},
                headers=live.headers("alice"),
            )
        assert busy.status_code == 409, busy.text
        assert busy.json()["error"]["type"] == "session_busy"
        assert int(busy.headers["retry-after"]) >= 1
    finally:
        response.close()
        client.close()


def test_client_disconnect_cancels_the_turn(live: LiveServer) -> None:
    sid = _session(live)
    client, response, seen = _start_slow_stream(live, sid)
    assert "event: tool_call" in seen
    response.close()  # the client goes away mid-answer
    client.close()

    def ended() -> list[dict[str, Any]]:
        return [e for e in _history(live, sid) if e["type"] == "turn_end"]

    ends = _wait_for(ended)
    assert ends[0]["data"]["status"] == "cancelled"
    # the tool call got an error result, so the session can go on
    assert _history(live, sid)[-2]["data"]["role"] == "tool"
    with live.client() as again:
        reply = again.post(
            f"/v1/sessions/{sid}/messages",
            json={"message": "still there?"},
            headers=live.headers("alice"),
        )
    assert reply.status_code == 200 and reply.json()["text"] == "You said: still there?"
    with live.client() as metrics:
        text = metrics.get("/metrics").text
    assert 'chatsession_turns_total{outcome="cancelled"}' in text


def test_store_unavailable_is_503(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with live_server(dead) as live, live.client() as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        key = {"Authorization": "Bearer csk_0123456789ab_whatever"}
        reply = client.get("/v1/sessions", headers=key)
        assert reply.status_code == 503 and reply.json()["error"]["type"] == "store_unavailable"
        assert reply.headers["retry-after"] == "1"
        # the admin key does not need the store, the session list does
        admin = client.post("/sessions", json={"user_id": "x"}, headers=live.headers("admin"))
        assert admin.status_code == 503


def test_seed_003_aliases(live: LiveServer) -> None:
    headers = live.headers("alice")
    with live.client() as client:
        made = client.post(
            "/sessions", json={"user_id": "alice", "window_id": "desktop"}, headers=headers
        )
        assert made.status_code == 200, made.text
        sid = made.json()["session_id"]
        assert made.json()["window_id"] == "desktop"
        reply = client.post(
            "/chat",
            json={"user_id": "alice", "session_id": sid, "message": "你好"},
            headers=headers,
        )
        assert reply.status_code == 200 and reply.json()["response"] == "You said: 你好"
        assert reply.json()["session_id"] == sid
        by_window = client.post(
            "/chat",
            json={"user_id": "alice", "window_id": "mobile", "message": "hi"},
            headers=headers,
        ).json()
        again = client.post(
            "/chat",
            json={"user_id": "alice", "window_id": "mobile", "message": "again"},
            headers=headers,
        ).json()
        assert by_window["session_id"] == again["session_id"] != sid
        fresh = client.post(
            "/chat", json={"user_id": "alice", "message": "new"}, headers=headers
        ).json()
        assert fresh["session_id"] not in (sid, by_window["session_id"])
        streamed = client.post(
            "/chat",
            json={"user_id": "alice", "session_id": sid, "message": "s", "stream": True},
            headers=headers,
        )
        assert streamed.headers["x-session-id"] == sid
        assert sse_events(streamed.text)[-1]["event"] == "stop"
        listed = client.get("/users/alice/sessions", headers=headers)
        assert listed.status_code == 200
        assert {sid, by_window["session_id"], fresh["session_id"]} <= {
            s["session_id"] for s in listed.json()
        }
        # another user's id: 403 (whether or not that user exists)
        for body in ({"user_id": "bob"}, {"user_id": "nobody"}):
            assert client.post("/sessions", json=body, headers=headers).status_code == 403
        assert client.get("/users/bob/sessions", headers=headers).status_code == 403
        assert client.get("/users/nobody/sessions", headers=headers).status_code == 403
        chat_as_bob = client.post("/chat", json={"user_id": "bob", "message": "x"}, headers=headers)
        assert chat_as_bob.status_code == 403
        # an admin key may act for any user (a trusted backend)
        as_admin = client.get("/users/alice/sessions", headers=live.headers("admin"))
        assert as_admin.status_code == 200 and len(as_admin.json()) == len(listed.json())


def test_concurrent_turns_on_one_session_never_interleave(live: LiveServer) -> None:
    sid = _session(live)
    codes: list[int] = []

    def send(n: int) -> None:
        with live.client() as client:
            for _ in range(20):
                reply = client.post(
                    f"/v1/sessions/{sid}/messages",
                    json={"message": f"m{n}"},
                    headers=live.headers("alice"),
                )
                if reply.status_code != 409:
                    codes.append(reply.status_code)
                    return
                time.sleep(float(reply.headers["retry-after"]) / 10)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [200] * 6
    events = _history(live, sid)
    open_turn = None
    for event in events:
        if event["type"] == "turn_start":
            assert open_turn is None
            open_turn = event["turn_id"]
        elif event["turn_id"] is not None:
            assert event["turn_id"] == open_turn
        if event["type"] == "turn_end":
            open_turn = None
    assert [e["type"] for e in events].count("turn_end") == 6


def test_cors_origins_and_turn_timeout() -> None:
    with live_server(cors_origins="https://app.example", timeout=0.5) as live:
        live.user("alice")
        with live.client() as client:
            preflight = client.options(
                "/v1/sessions",
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            other = client.get("/healthz", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers
            sid = _session(live)
            slow = client.post(
                f"/v1/sessions/{sid}/messages",
                json={"message": "please wait"},
                headers=live.headers("alice"),
            )
            assert slow.status_code == 504 and slow.json()["error"]["type"] == "turn_timeout"
        ends = [e for e in _history(live, sid) if e["type"] == "turn_end"]
        assert ends[0]["data"]["status"] == "timeout"
