"""The OpenAPI schema fuzzed with schemathesis against a real uvicorn on loopback.

Every operation of ``/openapi.json`` gets generated requests (valid and
invalid ones: schemathesis's positive and negative modes), sent over HTTP
with a valid API key (an admin key of a user, so the admin routes are
reached too). Two checks on every answer: no server error (5xx; the store
is up, so even 503 would be wrong) and the answer conforms to the schema
(status documented, body valid against the declared model).

Generated session ids rarely name a session, so about half of the cases on
``/v1/sessions/{session_id}/...`` are pointed at a real session (made for the
case, with a turn and a checkpoint, whose id replaces a generated
``checkpoint_id``): the routes then run their real code, not only the 404.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from chatsession.server import ServerSettings, create_app
from tests.server.conftest import LiveServer, live_server

#: Examples per operation (positive and negative together).
EXAMPLES = 15


def _served_schema() -> dict[str, Any]:
    """The schema ``create_app`` serves at ``/openapi.json`` (the same app; checked below).

    Loaded at import (schemathesis makes one test per operation at collection
    time); ``from_fixture`` would load it from the running server, but it fails
    on pytest 9 (``'Function' object has no attribute '_nodeid'``).
    """
    app = create_app(ServerSettings(store_url="memory://", model="scripted"))
    served: dict[str, Any] = app.openapi()
    return served


SCHEMA = _served_schema()
schema = schemathesis.openapi.from_dict(SCHEMA)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server on a SQLite file with user ``fuzz`` holding an admin key."""
    folder: Path = tmp_path_factory.mktemp("fuzz")
    with live_server(f"sqlite:///{folder}/fuzz.db") as running:
        with running.client() as client:
            reply = client.post(
                "/v1/admin/keys",
                json={"user_id": "fuzz", "admin": True},
                headers=running.headers("admin"),
            )
            assert reply.status_code == 201, reply.text
            running.keys["fuzz"] = reply.json()["key"]
        yield running


def _real_session(live: LiveServer) -> tuple[str, str]:
    """A new session of ``fuzz`` with one turn and a checkpoint: (session id, checkpoint id)."""
    headers = live.headers("fuzz")
    with live.client() as client:
        created = client.post("/v1/sessions", json={"title": "fuzz"}, headers=headers)
        assert created.status_code == 201, created.text
        sid: str = created.json()["session_id"]
        turn = client.post(f"/v1/sessions/{sid}/messages", json={"message": "hi"}, headers=headers)
        assert turn.status_code == 200, turn.text
        saved = client.post(f"/v1/sessions/{sid}/checkpoints", json={"name": "cp"}, headers=headers)
        assert saved.status_code == 201, saved.text
        checkpoint: str = saved.json()["checkpoint_id"]
    return sid, checkpoint


def _pick(value: Any) -> bool:
    """A deterministic coin on a generated value (so a failing case replays the same)."""
    return hashlib.sha256(repr(value).encode()).digest()[0] % 2 == 0


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_operation_conforms(case: Any, fuzz_server: LiveServer) -> None:
    params = case.path_parameters or {}
    if "session_id" in params and _pick(params["session_id"]):
        sid, checkpoint = _real_session(fuzz_server)
        params["session_id"] = sid
        if "checkpoint_id" in params:
            params["checkpoint_id"] = checkpoint
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers=fuzz_server.headers("fuzz"),
        checks=[not_a_server_error, response_schema_conformance],
        # an event stream is read for this long, then cut (schemathesis keeps what came)
        timeout=1.5 if case.operation.path.endswith("/events") else 10,
    )


def test_the_fuzzed_schema_is_the_served_one(fuzz_server: LiveServer) -> None:
    with httpx.Client(base_url=fuzz_server.url, timeout=10) as client:
        assert client.get("/openapi.json").json() == SCHEMA


def test_the_fuzzed_server_is_still_healthy(fuzz_server: LiveServer) -> None:
    """After the fuzzing the server answers, and the key table is intact."""
    with httpx.Client(base_url=fuzz_server.url, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
        mine = client.get("/v1/sessions", headers=fuzz_server.headers("fuzz"))
        assert mine.status_code == 200, mine.text
