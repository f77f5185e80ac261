"""SyncChatSession: the blocking twin of ChatSession, the same surface, blocking."""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from chatsession import Agent, ChatSession, Reply, ScriptedLLM, SyncChatSession, tool
from chatsession.agent.events import StopEvent, TextEvent
from chatsession.blocking import SessionOptions, SyncTurnStream
from chatsession.errors import SessionNotFoundError, UsageError
from chatsession.log import MessageEntry, TurnEndEntry, decode
from chatsession.store import open_store

#: names the twin has that ChatSession has not (the async session underneath)
SYNC_ONLY = {"session"}
#: async-only protocol methods and their blocking twins
DUNDER_TWINS = {"__aenter__": "__enter__", "__aexit__": "__exit__"}
#: ChatSession options that only describe a new session (resume and import take the others)
NEW_SESSION_ONLY = {"store", "user_id", "agent_id", "window_id", "title", "must_exist"}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/sessions.db"


def stored_log(url: str, session_id: str) -> list[Any]:
    async def read() -> list[Any]:
        async with open_store(url) as store:
            rows = [r async for batch in store.read(session_id) for r in batch]
        return decode(rows)

    return asyncio.run(read())


def statuses(events: Sequence[object]) -> list[str]:
    return [e.data.status for e in events if isinstance(e, TurnEndEntry)]


def public_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def instance_attributes(tmp_path: Path) -> set[str]:
    """The public attributes a ChatSession sets on itself (not in its class)."""
    session = ChatSession(Agent(ScriptedLLM()), "probe", store=f"sqlite:///{tmp_path}/probe.db")
    names = {name for name in vars(session) if not name.startswith("_")}
    asyncio.run(session.close())
    return names


def shape(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """A callable's parameters: name, kind and default (annotations differ by design)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


# --------------------------------------------------------------------------
# the surface


def test_the_twin_has_every_public_method_and_property_of_chat_session(tmp_path: Path) -> None:
    attributes = instance_attributes(tmp_path)
    expected = public_names(ChatSession) | attributes
    missing = sorted(expected - public_names(SyncChatSession))
    assert not missing, f"SyncChatSession lacks {missing}"
    extra = sorted(public_names(SyncChatSession) - expected - SYNC_ONLY)
    assert not extra, f"SyncChatSession has {extra}, which ChatSession has not"

    for name in sorted(attributes):  # ChatSession's plain attributes: properties here
        assert isinstance(inspect.getattr_static(SyncChatSession, name), property), name

    for name in sorted(public_names(ChatSession)):
        original = inspect.getattr_static(ChatSession, name)
        twin = inspect.getattr_static(SyncChatSession, name)
        if isinstance(original, property):
            assert isinstance(twin, property), f"{name} is a property of ChatSession"
            assert (twin.fset is None) == (original.fset is None), f"{name}: setter differs"
            continue
        assert type(twin) is type(original), f"{name}: {type(twin)} vs {type(original)}"
        sync_fn, async_fn = getattr(SyncChatSession, name), getattr(ChatSession, name)
        assert shape(sync_fn) == shape(async_fn), f"{name}: the parameters differ"
        if inspect.iscoroutinefunction(async_fn) or inspect.isasyncgenfunction(async_fn):
            assert not inspect.iscoroutinefunction(sync_fn), f"{name} must block"
            assert not inspect.isasyncgenfunction(sync_fn), f"{name} must be a plain iterator"

    assert shape(SyncChatSession.__init__) == shape(ChatSession.__init__)
    for async_name, sync_name in DUNDER_TWINS.items():
        assert hasattr(ChatSession, async_name) and hasattr(SyncChatSession, sync_name)


def test_the_options_of_resume_and_import_are_typed_and_complete() -> None:
    # ChatSession.resume and import_session pass **options to the constructor: the
    # twin types them, and every option of an existing session is there
    constructor = inspect.signature(ChatSession.__init__).parameters.values()
    options = {p.name for p in constructor if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(SessionOptions.__annotations__) == options - NEW_SESSION_ONLY
    for method in (SyncChatSession.resume, SyncChatSession.import_session):
        hints = get_type_hints(method, include_extras=True)
        assert "SessionOptions" in str(hints["options"]), method  # Unpack[SessionOptions]


def test_nothing_private_in_the_twins_signatures() -> None:
    for name in ["__init__", *sorted(public_names(SyncChatSession))]:
        member = inspect.getattr_static(SyncChatSession, name)
        if isinstance(member, property):
            continue
        fn = getattr(SyncChatSession, name)
        private = [p for p in inspect.signature(fn).parameters if p.startswith("_")]
        assert not private, f"{name} takes {private}"


# --------------------------------------------------------------------------
# the streaming primitive


def test_stream_is_a_plain_context_manager_over_the_async_one(url: str) -> None:
    llm = ScriptedLLM(["w " * 100], chunk_delay=0.001)
    with SyncChatSession(Agent(llm), "s", store=url) as session:
        with session.stream("hello") as events:
            assert isinstance(events, SyncTurnStream)
            kinds = [type(event).__name__ for event in events]
        assert kinds[0] == "TextEvent" and kinds[-1] == "StopEvent"
        assert session.messages[0].text == "hello"
        # leaving early ends the turn as interrupted; the next turn runs at once
        with session.stream("again") as events:
            first = next(iter(events))
            assert isinstance(first, TextEvent)
        assert session.query("third") == "You said: third"
        # query_stream is built on it
        stops = [e for e in session.query_stream("fourth") if isinstance(e, StopEvent)]
        assert [s.text for s in stops] == ["You said: fourth"]
    log = stored_log(url, "s")
    assert statuses(log) == ["completed", "interrupted", "completed", "completed"]
    partial = [e.data for e in log if isinstance(e, MessageEntry) and e.data.partial]
    assert len(partial) == 1 and partial[0].text.startswith("You")  # the echo of "again"


def test_a_stream_used_outside_its_with_block_is_refused(url: str) -> None:
    with SyncChatSession(Agent(ScriptedLLM()), "s", store=url) as session:
        events = session.stream("hi")
        with pytest.raises(UsageError, match=r"inside `with session\.stream"):
            next(iter(events))
        assert session.query("hi") == "You said: hi"  # nothing was taken


@pytest.mark.parametrize("how", ["stream", "query_stream"])
def test_ctrl_c_stops_a_blocking_turn_and_records_it_interrupted(url: str, how: str) -> None:
    llm = ScriptedLLM([" ".join(f"w{i}" for i in range(400))], chunk_delay=0.02)  # ~8 s
    seen: list[object] = []
    with SyncChatSession(Agent(llm), "s", store=url) as session:
        ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        try:
            with pytest.raises(KeyboardInterrupt):
                if how == "stream":
                    with session.stream("talk") as events:
                        ctrl_c.start()
                        for event in events:
                            seen.append(event)
                else:
                    ctrl_c.start()
                    for event in session.query_stream("talk"):
                        seen.append(event)
        finally:
            ctrl_c.cancel()
        assert 0 < len(seen) < 400 and not isinstance(seen[-1], StopEvent)
        assert session.query("next") == "You said: next"  # the session goes on
    log = stored_log(url, "s")
    assert statuses(log) == ["interrupted", "completed"]
    (cut,) = [e.data for e in log if isinstance(e, MessageEntry) and e.data.partial]
    assert cut.text.startswith("w0 w1")


# --------------------------------------------------------------------------
# loops, threads and closing


def test_inside_a_running_loop_only_close_is_allowed(url: str) -> None:
    session = SyncChatSession(Agent(ScriptedLLM()), "s", store=url)

    async def inside() -> None:
        calls: list[Callable[[], object]] = [
            session.open,
            lambda: session.query("x"),
            lambda: session.stream("x"),
            lambda: next(iter(session.query_stream("x"))),
            session.get_usage,
            lambda: session.compact(),
        ]
        for call in calls:
            with pytest.raises(UsageError, match="running event loop"):
                call()
        session.close()  # allowed

    asyncio.run(inside())
    with pytest.raises(UsageError, match="closed"):
        session.query("after")


def test_closing_twice_leaves_the_forks_loop_running(url: str) -> None:
    with SyncChatSession(Agent(ScriptedLLM()), "s", store=url) as session:
        session.query("one")
        fork = session.fork_session()
        session.close()  # and again when the with block ends
    session.close()
    assert fork.query("in the fork") == "You said: in the fork"
    assert fork.message_count == 4
    fork.close()
    with pytest.raises(UsageError, match="closed"):
        fork.query("after")


def test_failures_while_opening_leave_no_thread_behind(url: str, tmp_path: Path) -> None:
    agent = Agent(ScriptedLLM())
    before = threading.active_count()
    for _ in range(3):
        with pytest.raises(SessionNotFoundError):
            SyncChatSession.resume(agent, "missing", store=url)
        with (
            pytest.raises(SessionNotFoundError),
            SyncChatSession(agent, "missing", store=url, must_exist=True),
        ):
            pass
        with pytest.raises(UsageError, match="consistency"):
            SyncChatSession(agent, "s", store=url, consistency="bogus")  # type: ignore[arg-type]
        with pytest.raises(Exception, match="export"):
            SyncChatSession.import_session(io.StringIO("not an export\n"), agent, store=url)
    assert threading.active_count() == before


# --------------------------------------------------------------------------
# every method, blocking


def test_every_method_works_blocking(url: str, tmp_path: Path) -> None:
    big = "output line\n" * 500

    @tool
    def dump() -> str:
        """Prints a lot."""
        return big

    llm = ScriptedLLM([Reply.call("dump"), "dumped"])
    agent = Agent(llm, tools=[dump])
    with SyncChatSession(agent, "s", store=url, offload_threshold=100, title="T") as session:
        assert session.agent is agent and session.session_id == "s"
        assert session.record is not None and session.record.title == "T"
        assert session.store.url.endswith("sessions.db") and session.consistency_warnings == []
        session.timeout = 30
        session.busy_timeout = 2
        assert (session.timeout, session.busy_timeout) == (30, 2)
        assert session.session.timeout == 30  # the same session underneath
        assert session.query("dump it") == "dumped"
        (blob_id,) = [e.data.blob_id for e in session.read_events() if e.type == "offload"]
        assert session.read_blob(blob_id).decode() == big
        session.state = {"k": 1}
        session.save_state()
        session.set_metadata(color="blue")
        seq = session.checkpoint("cp", {"note": "x"})
        assert session.conversation.checkpoints["cp"][0] == seq
        session.query("after the checkpoint")
        assert session.rewind("cp") == seq
        session.clear_history()
        assert session.messages == [] and session.message_count == 6
        assert len(session.read_history()) == 6
        assert session.get_usage().calls == 3 and session.get_context_info().current_tokens >= 0
        for n in range(4):
            session.query(f"message {n}")
        assert session.compact(keep_messages=2) is True
        session.open_for_reading()
        path = tmp_path / "s.json"
        session.export(path)
    imported = SyncChatSession.import_session(
        path, Agent(ScriptedLLM(), tools=[dump]), store=url, session_id="copy", timeout=5
    )
    try:
        assert imported.session_id == "copy" and imported.timeout == 5
        assert imported.state == {"k": 1} and imported.message_count == 14
    finally:
        imported.close()


def test_events_and_send_as_plain_iterators(url: str) -> None:
    with SyncChatSession(Agent(ScriptedLLM()), "s", store=url, message_source=["a", "b"]) as s:
        answers = [e.text for e in s.events() if isinstance(e, StopEvent)]
        assert answers == ["You said: a", "You said: b"]
    with SyncChatSession(Agent(ScriptedLLM()), "t", store=url) as session:
        session.send("queued")
        events = session.events()
        stop = next(e for e in events if isinstance(e, StopEvent))
        assert stop.text == "You said: queued"
        threading.Timer(0.2, session.close).start()  # close() from another thread ends it
        assert list(events) == []
