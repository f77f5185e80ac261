"""The /v1 REST API against a real uvicorn on loopback (memory store)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.conftest import LiveServer, sse_events


def _new_session(live: LiveServer, who: str = "alice", **body: Any) -> dict[str, Any]:
    with live.client() as client:
        reply = client.post("/v1/sessions", json=body, headers=live.headers(who))
    assert reply.status_code == 201, reply.text
    session: dict[str, Any] = reply.json()
    return session


def test_create_get_list_patch_delete(live: LiveServer) -> None:
    headers = live.headers("alice")
    made = _new_session(live, agent_id="helper", window_id="w1", metadata={"lang": "en"})
    assert made["user_id"] == "alice" and made["agent_id"] == "helper"
    sid = made["session_id"]
    with live.client() as client:
        got = client.get(f"/v1/sessions/{sid}", headers=headers).json()
        assert got["metadata"] == {"lang": "en"} and got["state"] == "active"
        patched = client.patch(
            f"/v1/sessions/{sid}", json={"metadata": {"lang": None, "x": 1}}, headers=headers
        )
        assert patched.status_code == 200 and patched.json()["metadata"] == {"x": 1}
        listed = client.get("/v1/sessions", params={"window_id": "w1"}, headers=headers).json()
        assert [s["session_id"] for s in listed["sessions"]] == [sid]
        assert client.delete(f"/v1/sessions/{sid}", headers=headers).status_code == 204
        assert client.get(f"/v1/sessions/{sid}", headers=headers).status_code == 404


def test_list_pages_with_a_cursor_and_filters(live: LiveServer) -> None:
    made = [_new_session(live, agent_id="pager")["session_id"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    with live.client() as client:
        while True:
            params: dict[str, Any] = {"agent_id": "pager", "limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/v1/sessions", params=params, headers=live.headers("alice")).json()
            assert len(page["sessions"]) <= 2
            seen += [s["session_id"] for s in page["sessions"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(made)
        archived = client.post(f"/v1/sessions/{made[0]}/archive", headers=live.headers("alice"))
        assert archived.json()["state"] == "archived"
        only = client.get(
            "/v1/sessions",
            params={"agent_id": "pager", "state": "archived"},
            headers=live.headers("alice"),
        ).json()
        assert [s["session_id"] for s in only["sessions"]] == [made[0]]


def test_json_reply_history_and_usage(live: LiveServer) -> None:
    sid = _new_session(live)["session_id"]
    headers = live.headers("alice")
    with live.client() as client:
        reply = client.post(
            f"/v1/sessions/{sid}/messages", json={"message": "hello there"}, headers=headers
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["text"] == "You said: hello there"
        assert body["stop_reason"] == "end_turn" and body["usage"]
        history = client.get(f"/v1/sessions/{sid}/history", headers=headers).json()
        types = [e["type"] for e in history["events"]]
        assert types[0] == "turn_start" and types[-1] == "turn_end"
        assert history["head"] == body["seq"] == len(types)
        assert history["events"][1]["data"] == {"role": "user", "content": "hello there"}
        page = client.get(
            f"/v1/sessions/{sid}/history", params={"after_seq": 1, "limit": 2}, headers=headers
        ).json()
        assert [e["seq"] for e in page["events"]] == [2, 3]
        assert page["next_after_seq"] == 3
        usage = client.get(f"/v1/sessions/{sid}/usage", headers=headers).json()
        assert usage["calls"] == 1 and usage["total_tokens"] > 0
        context = client.get(f"/v1/sessions/{sid}/context", headers=headers).json()
        assert context["messages"] == 2 and context["budget_tokens"] == 8192


def test_streamed_reply_events(live: LiveServer) -> None:
    sid = _new_session(live)["session_id"]
    with live.client() as client:
        reply = client.post(
            f"/v1/sessions/{sid}/messages",
            json={"message": "please add two numbers", "stream": True},
            headers=live.headers("alice"),
        )
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = sse_events(reply.text)
        names = [e["event"] for e in events]
        assert names[0] == "tool_call" or "text" in names
        assert "tool_call" in names and "tool_result" in names and "usage" in names
        assert names[-1] == "stop"
        call = next(e for e in events if e["event"] == "tool_call")
        assert call["data"]["name"] == "add"
        result = next(e for e in events if e["event"] == "tool_result")
        assert result["data"]["content"] == "5" and result["data"]["is_error"] is False
        text = "".join(e["data"]["text"] for e in events if e["event"] == "text")
        stop = events[-1]
        assert stop["data"]["reason"] == "end_turn"
        assert text.endswith(stop["data"]["text"])
        # ids: stored events carry a seq (events stored by one write share it), text
        # deltas <seq>-<n> (distinct); seqs never go back
        ids = [e["id"] for e in events]
        texts = [i for e, i in zip(events, ids, strict=True) if e["event"] == "text"]
        assert len(set(texts)) == len(texts)
        seqs = [int(i.split("-")[0]) for i in ids]
        assert seqs == sorted(seqs)
        assert all("-" in e["id"] for e in events if e["event"] == "text")
        head = client.get(f"/v1/sessions/{sid}/history", headers=live.headers("alice")).json()
        assert stop["id"] == str(head["head"]) == str(stop["data"]["seq"])


def test_fork_rewind_checkpoints_clear(live: LiveServer) -> None:
    sid = _new_session(live)["session_id"]
    headers = live.headers("alice")
    with live.client() as client:
        client.post(f"/v1/sessions/{sid}/messages", json={"message": "one"}, headers=headers)
        made = client.post(
            f"/v1/sessions/{sid}/checkpoints",
            json={"name": "after-one", "data": {"k": 1}},
            headers=headers,
        )
        assert made.status_code == 201 and made.json()["checkpoint_id"] == "after-one"
        client.post(f"/v1/sessions/{sid}/messages", json={"message": "two"}, headers=headers)
        listed = client.get(f"/v1/sessions/{sid}/checkpoints", headers=headers).json()
        assert [c["checkpoint_id"] for c in listed["checkpoints"]] == ["after-one"]
        one = client.get(f"/v1/sessions/{sid}/checkpoints/after-one", headers=headers).json()
        assert one["data"] == {"k": 1}
        fork = client.post(f"/v1/sessions/{sid}/fork", json={"at": "after-one"}, headers=headers)
        assert fork.status_code == 201, fork.text
        forked = fork.json()
        assert forked["parent"]["session_id"] == sid and forked["user_id"] == "alice"
        ctx = client.get(f"/v1/sessions/{forked['session_id']}/context", headers=headers).json()
        assert ctx["messages"] == 2
        rewound = client.post(
            f"/v1/sessions/{sid}/rewind", json={"to": "after-one"}, headers=headers
        )
        assert rewound.status_code == 200 and rewound.json()["seq"] == one["seq"]
        assert client.get(f"/v1/sessions/{sid}/context", headers=headers).json()["messages"] == 2
        cleared = client.post(f"/v1/sessions/{sid}/clear", json={}, headers=headers)
        assert cleared.status_code == 200
        assert client.get(f"/v1/sessions/{sid}/context", headers=headers).json()["messages"] == 0
        bad = client.post(f"/v1/sessions/{sid}/rewind", json={"to": "nope"}, headers=headers)
        assert bad.status_code == 422
        gone = client.delete(f"/v1/sessions/{sid}/checkpoints/after-one", headers=headers)
        assert gone.status_code == 204
        missing = client.get(f"/v1/sessions/{sid}/checkpoints/after-one", headers=headers)
        assert missing.status_code == 404


def test_archive_refuses_turns_then_restore(live: LiveServer) -> None:
    sid = _new_session(live)["session_id"]
    headers = live.headers("alice")
    with live.client() as client:
        assert client.post(f"/v1/sessions/{sid}/archive", headers=headers).status_code == 200
        refused = client.post(
            f"/v1/sessions/{sid}/messages", json={"message": "x"}, headers=headers
        )
        assert refused.status_code == 409
        assert refused.json()["error"]["type"] == "session_archived"
        restored = client.post(f"/v1/sessions/{sid}/restore", headers=headers)
        assert restored.json()["state"] == "active"
        ok = client.post(f"/v1/sessions/{sid}/messages", json={"message": "x"}, headers=headers)
        assert ok.status_code == 200


def test_windows_are_per_user(live: LiveServer) -> None:
    with live.client() as client:
        first = client.get("/v1/windows/desktop", headers=live.headers("alice")).json()
        again = client.put("/v1/windows/desktop", json={}, headers=live.headers("alice")).json()
        assert first["session_id"] == again["session_id"] and first["window_id"] == "desktop"
        bobs = client.get("/v1/windows/desktop", headers=live.headers("bob")).json()
        assert bobs["session_id"] != first["session_id"] and bobs["user_id"] == "bob"


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("post", "/v1/sessions/{sid}/messages", {}, "message"),
        ("post", "/v1/sessions/{sid}/messages", {"message": ""}, "message"),
        ("post", "/v1/sessions/{sid}/messages", {"message": "x", "stream": "maybe"}, "stream"),
        ("post", "/v1/sessions", {"ttl": -1}, "ttl"),
        ("post", "/v1/sessions", {"surprise": 1}, "surprise"),
        ("get", "/v1/sessions?limit=0", None, "limit"),
        ("get", "/v1/sessions?state=sleepy", None, "state"),
        ("get", "/v1/sessions/bad%20id", None, "session_id"),
        ("post", "/v1/sessions/{sid}/rewind", {}, "to"),
    ],
)
def test_validation_names_the_field(
    live: LiveServer, method: str, path: str, body: Any, field: str
) -> None:
    sid = _new_session(live)["session_id"]
    with live.client() as client:
        reply = client.request(
            method.upper(), path.format(sid=sid), json=body, headers=live.headers("alice")
        )
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["field"] == field and error["type"] == "validation_error"


def test_request_too_large(live: LiveServer) -> None:
    sid = _new_session(live)["session_id"]
    huge = "x" * (1024 * 1024 + 10)
    with live.client() as client:
        reply = client.post(
            f"/v1/sessions/{sid}/messages", json={"message": huge}, headers=live.headers("alice")
        )
        assert reply.status_code == 413
        assert reply.json()["error"]["type"] == "request_too_large"

        def chunks() -> Any:
            for _ in range(300):
                yield b"x" * 4096

        chunked = client.post(
            f"/v1/sessions/{sid}/messages", content=chunks(), headers=live.headers("alice")
        )
        assert chunked.status_code == 413


def test_auth_required_and_checked(live: LiveServer) -> None:
    with live.client() as client:
        assert client.get("/v1/sessions").status_code == 401
        bad = client.get("/v1/sessions", headers={"Authorization": "Bearer csk_0123456789ab_nope"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        other = client.get("/v1/sessions", headers={"X-API-Key": live.keys["alice"]})
        assert other.status_code == 200
        assert client.get("/v1/admin/keys", headers=live.headers("alice")).status_code == 403
        assert client.get("/v1/sessions", headers=live.headers("admin")).status_code == 403


def test_admin_keys_and_revocation(live: LiveServer) -> None:
    with live.client() as client:
        made = client.post(
            "/v1/admin/keys",
            json={"user_id": "carol", "name": "phone"},
            headers=live.headers("admin"),
        ).json()
        key = made["key"]
        assert key.startswith("csk_") and made["hint"].endswith("...")
        assert (
            client.get("/v1/sessions", headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
        )
        listed = client.get("/v1/admin/keys", headers=live.headers("admin")).text
        assert key not in listed and key[20:] not in listed
        assert "hash" not in listed
        users = client.get("/v1/admin/users", headers=live.headers("admin")).json()["users"]
        assert {"alice", "bob", "carol"} <= {u["user_id"] for u in users}
        revoked = client.delete(f"/v1/admin/keys/{made['key_id']}", headers=live.headers("admin"))
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        # the worker that revoked it stops at once
        assert (
            client.get("/v1/sessions", headers={"Authorization": f"Bearer {key}"}).status_code
            == 401
        )
        everyone = client.get(
            "/v1/admin/sessions", params={"limit": 1000}, headers=live.headers("admin")
        )
        assert all(
            not s["session_id"].startswith("_chatsession") for s in everyone.json()["sessions"]
        )


def test_health_ready_metrics(live: LiveServer) -> None:
    with live.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        sid = _new_session(live)["session_id"]
        client.post(
            f"/v1/sessions/{sid}/messages", json={"message": "m"}, headers=live.headers("alice")
        )
        text = client.get("/metrics").text
        assert 'chatsession_turns_total{outcome="completed"}' in text
        assert "chatsession_turn_seconds_bucket" in text
        assert "chatsession_active_streams" in text
        assert "chatsession_errors_total" in text


def test_openapi_lists_the_routes(live: LiveServer) -> None:
    with live.client() as client:
        schema = client.get("/openapi.json").json()
    paths = set(schema["paths"])
    for path in (
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/messages",
        "/v1/sessions/{session_id}/history",
        "/v1/sessions/{session_id}/fork",
        "/v1/sessions/{session_id}/rewind",
        "/v1/sessions/{session_id}/checkpoints",
        "/v1/sessions/{session_id}/checkpoints/{checkpoint_id}",
        "/v1/sessions/{session_id}/clear",
        "/v1/sessions/{session_id}/usage",
        "/v1/sessions/{session_id}/context",
        "/v1/windows/{window_id}",
        "/v1/admin/keys",
        "/sessions",
        "/chat",
        "/users/{user_id}/sessions",
    ):
        assert path in paths, path
