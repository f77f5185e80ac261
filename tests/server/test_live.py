"""Live streams any window can join: ``GET /v1/sessions/{id}/events`` on a real uvicorn.

A second window joins mid-answer, a window reconnects with ``Last-Event-ID``,
a watcher on another worker (SQLite, Redis, PostgreSQL) sees a turn run
elsewhere, another user's key is 404, the stream ends at shutdown, and a
slow watcher never holds up the turn.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from chatsession import Agent, ScriptedLLM
from chatsession.server import streaming
from chatsession.server.live import LiveHub, parse_event_id, watch
from chatsession.store import open_store
from tests.conformance.conftest import cleanup, make_url
from tests.server.conftest import ADMIN_KEY, LiveServer, live_server, serve_process

WORDS = 40
QUESTION = "tell me " + " ".join(f"w{i}" for i in range(WORDS))


def slow_agent(delay: float = 0.03) -> Agent:
    """Echoes the message word by word, ``delay`` seconds apart (about 1.3 s a turn)."""
    return Agent(ScriptedLLM(chunk_delay=delay))


class Reader:
    """Reads a text/event-stream response event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.iter_lines()
        self.comments: list[str] = []

    def next(self) -> dict[str, Any] | None:
        """The next event (None at the end of the stream)."""
        current: dict[str, Any] = {}
        data: list[str] = []
        for line in self.lines:
            if not line:
                if data or current:
                    current["data"] = json.loads("\n".join(data)) if data else None
                    return current
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name in ("event", "id"):
                current[name] = value
        return None

    def until(self, check: Any) -> list[dict[str, Any]]:
        """Events up to and including the first one ``check`` accepts."""
        out: list[dict[str, Any]] = []
        while True:
            event = self.next()
            assert event is not None, f"the stream ended early after {out}"
            out.append(event)
            if check(event):
                return out


def open_events(
    client: httpx.Client, sid: str, headers: dict[str, str], **params: Any
) -> httpx.Response:
    request = client.build_request(
        "GET", f"/v1/sessions/{sid}/events", params=params, headers=headers
    )
    response = client.send(request, stream=True)
    return response


def new_session(live: LiveServer, who: str = "alice") -> str:
    with live.client() as client:
        reply = client.post("/v1/sessions", json={}, headers=live.headers(who))
    assert reply.status_code == 201, reply.text
    sid: str = reply.json()["session_id"]
    return sid


def run_turn_in_thread(
    live: LiveServer, sid: str, who: str = "alice"
) -> tuple[threading.Thread, list[Any]]:
    """POST a streamed turn in a thread; the result list gets the parsed events."""
    out: list[Any] = []

    def run() -> None:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            request = client.build_request(
                "POST",
                f"/v1/sessions/{sid}/messages",
                json={"message": QUESTION, "stream": True},
                headers=live.headers(who),
            )
            response = client.send(request, stream=True)
            reader = Reader(response)
            while (event := reader.next()) is not None:
                out.append(event)
            response.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def stored_answer(live: LiveServer, sid: str) -> str:
    with live.client() as client:
        events = client.get(
            f"/v1/sessions/{sid}/history", params={"limit": 1000}, headers=live.headers("alice")
        ).json()["events"]
    answers = [
        e["data"]["content"]
        for e in events
        if e["type"] == "message" and e["data"]["role"] == "assistant"
    ]
    assert answers
    return str(answers[-1])


def text_of(events: list[dict[str, Any]]) -> str:
    text = ""
    for event in events:
        if event.get("event") == "text":
            if event["data"].get("replace"):
                text = ""
            text += event["data"]["text"]
    return text


def active_streams(live: LiveServer) -> float:
    with live.client() as client:
        body = client.get("/metrics").text
    for line in body.splitlines():
        if line.startswith("chatsession_active_streams "):
            return float(line.split()[1])
    raise AssertionError("no active streams gauge")


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ids_increase(events: list[dict[str, Any]]) -> None:
    """Ids never repeat and never go back (``<seq>`` < ``<seq>-<n>`` < ``<seq+1>``)."""
    keys = []
    for event in events:
        seq, n = parse_event_id(event["id"])
        keys.append((seq, n or 0))
    assert keys == sorted(keys), keys
    deltas = [k for k in keys if k[1]]
    assert len(deltas) == len(set(deltas)), "a delta came twice"


@pytest.fixture(scope="module")
def slow() -> Iterator[LiveServer]:
    """A memory server whose answers take a while."""
    with live_server(agent=slow_agent()) as running:
        running.user("alice")
        running.user("bob")
        yield running


def test_second_window_joins_mid_answer(slow: LiveServer) -> None:
    sid = new_session(slow)
    headers = slow.headers("alice")
    # a first turn, so the replay has history before the answer in progress
    with slow.client() as client:
        assert client.post(
            f"/v1/sessions/{sid}/messages", json={"message": "hello"}, headers=headers
        ).is_success
    thread, first = run_turn_in_thread(slow, sid)
    wait_for(lambda: sum(e.get("event") == "text" for e in first) >= 5)
    with httpx.Client(base_url=slow.url, timeout=60) as client:
        response = open_events(client, sid, headers)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = Reader(response)
        seen = reader.until(
            lambda e: e["event"] == "stop" and e["data"]["text"].startswith("You said: tell")
        )
        assert active_streams(slow) >= 1
        response.close()
    thread.join(30)
    answer = stored_answer(slow, sid)
    assert answer.startswith("You said: tell me w0") and answer.endswith(f"w{WORDS - 1}")
    # the replay (both turns), then the answer in progress: nothing lost, nothing twice
    users = [e["data"]["content"] for e in seen if e["event"] == "message"]
    assert users == ["hello", QUESTION]
    last_turn = seen[max(i for i, e in enumerate(seen) if e["event"] == "message") :]
    assert text_of(last_turn) == answer
    assert any("-" in e["id"] for e in last_turn if e["event"] == "text"), "no live delta"
    ids_increase(seen)
    # the first window's own stream and the watch end alike
    assert [e["event"] for e in first][-2:] == ["usage", "stop"]
    assert seen[-1]["data"]["text"] == first[-1]["data"]["text"] == answer
    wait_for(lambda: active_streams(slow) == 0)


@pytest.mark.parametrize("how", ["header", "query"])
def test_reconnect_mid_answer_loses_and_repeats_nothing(slow: LiveServer, how: str) -> None:
    sid = new_session(slow)
    headers = slow.headers("alice")
    with httpx.Client(base_url=slow.url, timeout=60) as client:
        response = open_events(client, sid, headers)
        reader = Reader(response)
        thread, _ = run_turn_in_thread(slow, sid)
        part1 = reader.until(lambda e: e["event"] == "text" and e["id"].endswith("-7"))
        response.close()  # a reload
        last = part1[-1]["id"]
        time.sleep(0.2)  # deltas go on meanwhile
        if how == "header":
            response = open_events(client, sid, {**headers, "Last-Event-ID": last})
        else:
            response = open_events(client, sid, headers, after=last)
        assert response.status_code == 200
        part2 = Reader(response).until(lambda e: e["event"] == "stop")
        response.close()
    thread.join(30)
    answer = stored_answer(slow, sid)
    assert not any(e["data"].get("replace") for e in part2 if e["event"] == "text")
    assert text_of(part1) + text_of(part2) == answer
    ids_increase(part1 + part2)


def test_resume_after_the_answer_was_stored(slow: LiveServer) -> None:
    """A delta id whose message is stored by now: only the text after it is sent."""
    sid = new_session(slow)
    headers = slow.headers("alice")
    with httpx.Client(base_url=slow.url, timeout=60) as client:
        response = open_events(client, sid, headers)
        reader = Reader(response)
        thread, _ = run_turn_in_thread(slow, sid)
        part1 = reader.until(lambda e: e["event"] == "text" and e["id"].endswith("-3"))
        response.close()
        thread.join(30)
        response = open_events(client, sid, {**headers, "Last-Event-ID": part1[-1]["id"]})
        part2 = Reader(response).until(lambda e: e["event"] == "stop")
        response.close()
    assert text_of(part1) + text_of(part2) == stored_answer(slow, sid)
    assert all("-" not in e["id"] for e in part2)  # all of it from the log


def test_another_users_session_and_bad_ids(slow: LiveServer) -> None:
    sid = new_session(slow)
    with slow.client() as client:
        theirs = client.get(f"/v1/sessions/{sid}/events", headers=slow.headers("bob"))
        unknown = client.get("/v1/sessions/sess_nope/events", headers=slow.headers("bob"))
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.text.replace(sid, "ID") == unknown.text.replace("sess_nope", "ID")
        assert client.get(f"/v1/sessions/{sid}/events").status_code == 401
        bad = client.get(
            f"/v1/sessions/{sid}/events", params={"after": "x"}, headers=slow.headers("alice")
        )
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "after"
        bad = client.get(
            f"/v1/sessions/{sid}/events",
            headers={**slow.headers("alice"), "Last-Event-ID": "1-x"},
        )
        assert bad.status_code == 422


def test_heartbeat_and_close_frees_the_stream(
    slow: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "PING_SECONDS", 0.2)
    sid = new_session(slow)
    with httpx.Client(base_url=slow.url, timeout=10) as client:
        response = open_events(client, sid, slow.headers("alice"))
        lines = response.iter_lines()
        assert next(lines).startswith(":")  # a quiet session: pings only
        assert active_streams(slow) == 1
        response.close()
    wait_for(lambda: active_streams(slow) == 0)
    wait_for(lambda: slow.server.config.app.state.chatsession.live.watchers() == 0)


def test_a_slow_watcher_does_not_hold_up_the_turn(slow: LiveServer) -> None:
    sid = new_session(slow)
    headers = slow.headers("alice")
    with httpx.Client(base_url=slow.url, timeout=60) as client:
        response = open_events(client, sid, headers)  # opened, never read during the turn
        started = time.monotonic()
        reply = client.post(
            f"/v1/sessions/{sid}/messages", json={"message": QUESTION}, headers=headers
        )
        assert reply.status_code == 200
        assert time.monotonic() - started < 10
        seen = Reader(response).until(lambda e: e["event"] in ("stop", "reconnect"))
        response.close()
    if seen[-1]["event"] == "stop":
        assert text_of(seen) == reply.json()["text"]


async def test_overflow_tells_the_watcher_to_reconnect() -> None:
    store = open_store("memory://")
    hub = LiveHub(store, "memory://", queue_size=3)
    await hub.start()
    try:
        from chatsession import SessionManager

        manager = SessionManager(store)
        session = await manager.create_session("u", None)
        sid = session.session_id
        events = watch(hub, sid)
        task = asyncio.ensure_future(anext(events))  # subscribed, replaying the empty log
        await asyncio.sleep(0.05)
        feed = hub.feed(sid)
        started = time.monotonic()
        for n in range(1, 50):
            feed.delta(0, n, f"d{n} ")  # never waits on the watcher
        assert time.monotonic() - started < 0.5
        first = await asyncio.wait_for(task, 5)
        rest = [first] + [e async for e in events]
        assert rest[-1].event == "reconnect"  # told at once; the queue was dropped
        assert rest[-1].data["last_event_id"] == rest[-1].id
        assert hub.watchers() == 0
        # reconnecting with that id resumes from the worker's buffer, after it
        resumed = watch(hub, sid, *parse_event_id(rest[-1].id))
        again = [await anext(resumed) for _ in range(49)]
        _seq, n = parse_event_id(rest[-1].id)
        assert again[0].id == f"0-{(n or 0) + 1}"
        assert "".join(e.data["text"] for e in again).endswith("d49 ")
        await resumed.aclose()
        await manager.aclose()
    finally:
        await hub.aclose()


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    url, namespace = make_url(request.param, tmp_path)
    yield request.param, url
    asyncio.run(cleanup(request.param, namespace))


def test_a_watcher_on_another_worker_sees_the_turn(shared_url: tuple[str, str]) -> None:
    backend, url = shared_url
    with (
        live_server(url, agent=slow_agent()) as worker_a,
        live_server(url, agent=slow_agent()) as worker_b,
    ):
        key = worker_a.user("alice")
        worker_b.keys["alice"] = key
        sid = new_session(worker_a)
        headers = worker_a.headers("alice")
        with httpx.Client(base_url=worker_b.url, timeout=60) as client:
            response = open_events(client, sid, headers)
            assert response.status_code == 200
            reader = Reader(response)
            time.sleep(0.3)  # B listens (and the first poll ran)
            thread, _ = run_turn_in_thread(worker_a, sid)
            seen = reader.until(lambda e: e["event"] == "stop")
            response.close()
        thread.join(30)
        answer = stored_answer(worker_a, sid)
        assert text_of(seen) == answer
        assert [e["data"]["content"] for e in seen if e["event"] == "message"] == [QUESTION]
        deltas = [e for e in seen if e["event"] == "text" and "-" in e["id"]]
        if backend == "sqlite":
            assert not deltas  # stored events only across workers
        else:
            assert len(deltas) >= WORDS // 2, "no live deltas from the other worker"
        ids_increase(seen)
        wait_for(lambda: active_streams(worker_b) == 0)


def test_the_stream_ends_at_shutdown(tmp_path: Path) -> None:
    env = {"CHATSESSION_ADMIN_KEY": ADMIN_KEY, "CHATSESSION_SHUTDOWN_GRACE": "2"}
    with serve_process(
        tmp_path, "--store", f"sqlite:///{tmp_path}/s.db", "--model", "scripted", env=env
    ) as running:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=running.url, timeout=30) as client:
            key = client.post("/v1/admin/keys", json={"user_id": "alice"}, headers=admin)
            headers = {"Authorization": f"Bearer {key.json()['key']}"}
            sid = client.post("/v1/sessions", json={}, headers=headers).json()["session_id"]
            response = open_events(client, sid, headers)
            assert response.status_code == 200
            started = time.monotonic()
            running.process.send_signal(signal.SIGTERM)
            reader = Reader(response)
            assert reader.next() is None  # the stream ended
            response.close()
        # uvicorn ends by raising the signal again once it shut down cleanly
        assert running.process.wait(20) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in running.log.read_text()
        assert time.monotonic() - started < 10
