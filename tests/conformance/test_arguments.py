"""Bad caller values: a typed error from the one tree, raised before any I/O.

Every public store method is called with bad arguments, on a working store of
each backend and on one whose storage cannot be reached (so that any call
reaching its storage first would answer ``StoreUnavailableError``, or hang).
Each must raise :class:`~chatsession.errors.InvalidArgumentError` (or its
subclasses ``InvalidIdError`` and ``UnsupportedValueError``), never a raw
``TypeError``/``ValueError``/``UnicodeEncodeError``, a ``ConflictError`` or a
``StoreUnavailableError``, and must write nothing.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chatsession import InvalidArgumentError, Lease, NewEvent, SessionRecord, Store, open_store
from tests.conformance.conftest import BACKENDS
from tests.conformance.test_contract import unreachable_url

Call = Callable[[Store], Awaitable[object]]


async def _read(store: Store, session_id: str, *args: Any, **kw: Any) -> None:
    async for _ in store.read(session_id, *args, **kw):
        pass


GOOD_EVENT = NewEvent("message", "{}", 1.0)

BAD_CALLS: dict[str, Call] = {
    "create(dict)": lambda s: s.create({"id": "x"}),  # type: ignore[arg-type]
    "create(None)": lambda s: s.create(None),  # type: ignore[arg-type]
    "update(dict)": lambda s: s.update({"id": "ok"}, 1),  # type: ignore[arg-type]
    "update(version='1')": lambda s: s.update(SessionRecord(id="ok"), "1"),  # type: ignore[arg-type]
    "update(version=-1)": lambda s: s.update(SessionRecord(id="ok"), -1),
    "update(version=1.0)": lambda s: s.update(SessionRecord(id="ok"), 1.0),  # type: ignore[arg-type]
    "update(version=True)": lambda s: s.update(SessionRecord(id="ok"), True),
    "update(version=None)": lambda s: s.update(SessionRecord(id="ok"), None),  # type: ignore[arg-type]
    "list(cursor=5)": lambda s: s.list_sessions(cursor=5),  # type: ignore[arg-type]
    "list(cursor=bytes)": lambda s: s.list_sessions(cursor=b"abc"),  # type: ignore[arg-type]
    "list(limit='5')": lambda s: s.list_sessions(limit="5"),  # type: ignore[arg-type]
    "list(user_id=5)": lambda s: s.list_sessions(user_id=5),  # type: ignore[arg-type]
    "list(user_id=surrogate)": lambda s: s.list_sessions(user_id="\ud800"),
    "list(user_id=NUL)": lambda s: s.list_sessions(user_id="a\x00b"),
    "list(agent_id=surrogate)": lambda s: s.list_sessions(agent_id="x\udfff"),
    "list(window_id=list)": lambda s: s.list_sessions(window_id=["w"]),  # type: ignore[arg-type]
    "list(state='gone')": lambda s: s.list_sessions(state="gone"),  # type: ignore[arg-type]
    "append(events=str)": lambda s: s.append("ok", "events", 0),  # type: ignore[arg-type]
    "append(events=NewEvent)": lambda s: s.append("ok", GOOD_EVENT, 0),
    "append(events=[])": lambda s: s.append("ok", [], 0),
    "append(events=[tuple])": lambda s: s.append("ok", [("message", "{}", 1.0)], 0),  # type: ignore[list-item]
    "append(events=[dict])": lambda s: s.append("ok", [{"type": "message"}], 0),  # type: ignore[list-item]
    "append(expected_seq=-1)": lambda s: s.append("ok", [GOOD_EVENT], -1),
    "append(expected_seq='0')": lambda s: s.append("ok", [GOOD_EVENT], "0"),  # type: ignore[arg-type]
    "append(expected_seq=0.0)": lambda s: s.append("ok", [GOOD_EVENT], 0.0),  # type: ignore[arg-type]
    "append(expected_seq=None)": lambda s: s.append("ok", [GOOD_EVENT], None),  # type: ignore[arg-type]
    "append(payload=NaN)": lambda s: s.append("ok", [NewEvent("m", '{"a":NaN}', 1.0)], 0),
    "append(ts=inf)": lambda s: s.append("ok", [NewEvent("m", "{}", math.inf)], 0),
    "read(after_seq=-1)": lambda s: _read(s, "ok", -1),
    "read(after_seq='0')": lambda s: _read(s, "ok", "0"),
    "read(upto_seq=-2)": lambda s: _read(s, "ok", 0, -2),
    "read(upto_seq=1.5)": lambda s: _read(s, "ok", 0, 1.5),
    "read(batch_size=0)": lambda s: _read(s, "ok", batch_size=0),
    "read(batch_size=None)": lambda s: _read(s, "ok", batch_size=None),
    "fork(at_seq=-1)": lambda s: s.fork("ok", -1, SessionRecord(id="f")),
    "fork(at_seq='0')": lambda s: s.fork("ok", "0", SessionRecord(id="f")),  # type: ignore[arg-type]
    "fork(at_seq=0.0)": lambda s: s.fork("ok", 0.0, SessionRecord(id="f")),  # type: ignore[arg-type]
    "fork(at_seq=None)": lambda s: s.fork("ok", None, SessionRecord(id="f")),  # type: ignore[arg-type]
    "fork(at_seq=True)": lambda s: s.fork("ok", True, SessionRecord(id="f")),
    "fork(new_record=dict)": lambda s: s.fork("ok", 0, {"id": "f"}),  # type: ignore[arg-type]
    "fork(new_record=NaN metadata)": lambda s: s.fork(
        "ok", 0, SessionRecord(id="f", metadata={"x": math.nan})
    ),
    "create(inf expires_at)": lambda s: s.create(SessionRecord(id="x", expires_at=math.inf)),
    "create(surrogate user_id)": lambda s: s.create(SessionRecord(id="x", user_id="\ud800")),
    "update(set metadata)": lambda s: s.update(
        SessionRecord(id="ok").model_copy(update={"metadata": {"x": {1}}}), 1
    ),
    "put_blob(str)": lambda s: s.put_blob("ok", "text"),  # type: ignore[arg-type]
    "put_blob(None)": lambda s: s.put_blob("ok", None),  # type: ignore[arg-type]
    "put_blob(list)": lambda s: s.put_blob("ok", [1, 2]),  # type: ignore[arg-type]
    "put_blob(media_type=5)": lambda s: s.put_blob("ok", b"x", 5),  # type: ignore[arg-type]
    "put_blob(media_type=None)": lambda s: s.put_blob("ok", b"x", None),  # type: ignore[arg-type]
    "put_blob(media_type=newline)": lambda s: s.put_blob("ok", b"x", "text/plain\nX: y"),
    "put_blob(media_type=surrogate)": lambda s: s.put_blob("ok", b"x", "\ud800"),
    "put_blob(media_type=long)": lambda s: s.put_blob("ok", b"x", "t" * 256),
    "acquire_lease(owner='')": lambda s: s.acquire_lease("ok", "", 30),
    "acquire_lease(owner=5)": lambda s: s.acquire_lease("ok", 5, 30),  # type: ignore[arg-type]
    "acquire_lease(owner=newline)": lambda s: s.acquire_lease("ok", "a\nb", 30),
    "acquire_lease(ttl=0)": lambda s: s.acquire_lease("ok", "a", 0),
    "acquire_lease(ttl=NaN)": lambda s: s.acquire_lease("ok", "a", math.nan),
    "acquire_lease(ttl='30')": lambda s: s.acquire_lease("ok", "a", "30"),  # type: ignore[arg-type]
    "acquire_lease(ttl=two days)": lambda s: s.acquire_lease("ok", "a", 2 * 86400),
    "renew_lease(None)": lambda s: s.renew_lease(None, 30),  # type: ignore[arg-type]
    "renew_lease(tuple)": lambda s: s.renew_lease(("ok", "a", 1, 0.0), 30),  # type: ignore[arg-type]
    "renew_lease(ttl=-1)": lambda s: s.renew_lease(Lease("ok", "a", 1, 0.0), -1),
    "renew_lease(token=0)": lambda s: s.renew_lease(Lease("ok", "a", 0, 0.0), 30),
    "release_lease(tuple)": lambda s: s.release_lease(("ok", "a", 1, 0.0)),  # type: ignore[arg-type]
    "release_lease(token=True)": lambda s: s.release_lease(Lease("ok", "a", True, 0.0)),
    "append(lease=tuple)": lambda s: s.append("ok", [GOOD_EVENT], 1, lease=("ok", "a", 1, 0.0)),  # type: ignore[arg-type]
    "append(lease of another session)": lambda s: s.append(
        "ok", [GOOD_EVENT], 1, lease=Lease("other", "a", 1, 0.0)
    ),
    "append(event_id=bad)": lambda s: s.append("ok", [GOOD_EVENT._replace(event_id="a b")], 1),
    "put_snapshot(seq=-1)": lambda s: s.put_snapshot("ok", -1, b"x"),
    "put_snapshot(seq=True)": lambda s: s.put_snapshot("ok", True, b"x"),  # type: ignore[arg-type]
    "put_snapshot(seq='1')": lambda s: s.put_snapshot("ok", "1", b"x"),  # type: ignore[arg-type]
    "put_snapshot(str)": lambda s: s.put_snapshot("ok", 0, "x"),  # type: ignore[arg-type]
    "put_snapshot(None)": lambda s: s.put_snapshot("ok", 0, None),  # type: ignore[arg-type]
    "purge_expired(before='now')": lambda s: s.purge_expired("now"),  # type: ignore[arg-type]
    "purge_expired(before=NaN)": lambda s: s.purge_expired(math.nan),
    "purge_expired(before=True)": lambda s: s.purge_expired(True),
}


async def _expect_refusal(store: Store, name: str, call: Call) -> None:
    try:
        await asyncio.wait_for(call(store), 30)
    except InvalidArgumentError:
        return
    except Exception as exc:
        pytest.fail(f"{name} raised {type(exc).__name__} ({exc}), not InvalidArgumentError")
    pytest.fail(f"{name} did not raise")


async def test_bad_arguments_are_refused_with_typed_errors(store: Store) -> None:
    ok = await store.create(SessionRecord(id="ok", title="kept"))
    await store.append("ok", [GOOD_EVENT], 0)
    for name, call in BAD_CALLS.items():
        await _expect_refusal(store, name, call)
    after = await store.get("ok")
    assert (after.head, after.version, after.title) == (1, ok.version, "kept")
    assert [r.id for r in (await store.list_sessions()).records] == ["ok"]
    assert await store.purge_expired() == 0


UNREACHABLE = [b for b in BACKENDS if b != "memory"]


@pytest.mark.parametrize("backend", UNREACHABLE)
async def test_bad_arguments_are_refused_before_any_io(backend: str, tmp_path: Path) -> None:
    store = open_store(unreachable_url(backend, tmp_path))
    try:
        for name, call in BAD_CALLS.items():
            await _expect_refusal(store, name, call)
    finally:
        await store.aclose()
    if backend == "file":
        assert not (tmp_path / "not-yet").exists()
