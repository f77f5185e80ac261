"""Every /v1 session route with another user's key answers 404, exactly like an unknown id."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.conftest import LiveServer

#: (method, path, body) of every route that names a session; {sid} is the session.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/v1/sessions/{sid}", None),
    ("PATCH", "/v1/sessions/{sid}", {"metadata": {"x": 1}}),
    ("DELETE", "/v1/sessions/{sid}", None),
    ("POST", "/v1/sessions/{sid}/archive", None),
    ("POST", "/v1/sessions/{sid}/restore", None),
    ("POST", "/v1/sessions/{sid}/messages", {"message": "hi"}),
    ("POST", "/v1/sessions/{sid}/messages", {"message": "hi", "stream": True}),
    ("GET", "/v1/sessions/{sid}/history", None),
    ("GET", "/v1/sessions/{sid}/events", None),
    ("POST", "/v1/sessions/{sid}/fork", {}),
    ("POST", "/v1/sessions/{sid}/rewind", {"to": 1}),
    ("POST", "/v1/sessions/{sid}/checkpoints", {"name": "c"}),
    ("GET", "/v1/sessions/{sid}/checkpoints", None),
    ("GET", "/v1/sessions/{sid}/checkpoints/c1", None),
    ("DELETE", "/v1/sessions/{sid}/checkpoints/c1", None),
    ("POST", "/v1/sessions/{sid}/clear", {}),
    ("GET", "/v1/sessions/{sid}/usage", None),
    ("GET", "/v1/sessions/{sid}/context", None),
    ("POST", "/chat", {"user_id": "bob", "session_id": "{sid}", "message": "hi"}),
]


@pytest.fixture(scope="module")
def alices(live: LiveServer) -> str:
    """A session of alice's with a turn and a checkpoint."""
    headers = live.headers("alice")
    with live.client() as client:
        sid: str = client.post("/v1/sessions", json={}, headers=headers).json()["session_id"]
        client.post(f"/v1/sessions/{sid}/messages", json={"message": "secret"}, headers=headers)
        client.post(f"/v1/sessions/{sid}/checkpoints", json={"name": "c1"}, headers=headers)
    return sid


def _call(live: LiveServer, who: str, method: str, path: str, body: Any, sid: str) -> Any:
    if isinstance(body, dict):
        body = {k: v.format(sid=sid) if isinstance(v, str) else v for k, v in body.items()}
    with live.client() as client:
        return client.request(method, path.format(sid=sid), json=body, headers=live.headers(who))


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_another_users_session_is_not_found(
    live: LiveServer, alices: str, method: str, path: str, body: Any
) -> None:
    theirs = _call(live, "bob", method, path, body, alices)
    unknown = _call(live, "bob", method, path, body, "sess_does_not_exist")
    assert theirs.status_code == 404, theirs.text
    assert unknown.status_code == 404
    # the same answer, but for the id it names
    assert theirs.json()["error"]["type"] == unknown.json()["error"]["type"] == "not_found"
    assert theirs.text.replace(alices, "ID") == unknown.text.replace("sess_does_not_exist", "ID")
    # and alice's session is untouched
    with live.client() as client:
        mine = client.get(f"/v1/sessions/{alices}", headers=live.headers("alice"))
        assert mine.status_code == 200 and mine.json()["metadata"] == {}
        history = client.get(f"/v1/sessions/{alices}/history", headers=live.headers("alice"))
        assert [e["type"] for e in history.json()["events"]].count("turn_start") == 1


def test_every_session_route_is_in_the_table(live: LiveServer) -> None:
    with live.client() as client:
        schema = client.get("/openapi.json").json()
    covered = {(m, p.replace("{sid}", "{session_id}")) for m, p, _ in ROUTES}
    covered = {
        (m, p.replace("/checkpoints/c1", "/checkpoints/{checkpoint_id}")) for m, p in covered
    }
    for path, operations in schema["paths"].items():
        if "{session_id}" not in path or path.startswith("/v1/admin"):
            continue
        for method in operations:
            assert (method.upper(), path) in covered, (method, path)


def test_listing_shows_only_mine(live: LiveServer, alices: str) -> None:
    with live.client() as client:
        bobs = client.get("/v1/sessions", params={"limit": 1000}, headers=live.headers("bob"))
        assert alices not in bobs.text
        seed = client.get("/users/alice/sessions", headers=live.headers("bob"))
        assert seed.status_code == 403
