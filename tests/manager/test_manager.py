"""SessionManager on every backend: sessions, ownership, states and TTL, limits,
checkpoints, templates, windows, metadata merges, stats and cleanup."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from chatsession import (
    Agent,
    InvalidArgumentError,
    ScriptedLLM,
    SessionArchivedError,
    SessionLimitError,
    SessionManager,
    SessionNotFoundError,
    SessionState,
    SessionTemplate,
    UsageError,
)
from chatsession.log import LifecycleEntry

from .conftest import FakeClock


def agent(**kwargs: Any) -> Agent:
    return Agent(ScriptedLLM(), **kwargs)


async def test_the_seed_flow_create_get_update_refresh_list_count_delete(
    manager: SessionManager, clock: FakeClock
) -> None:
    made = await manager.create_session(
        "user_123", "assistant", metadata={"language": "zh-CN", "tier": "premium"}
    )
    assert made.session_id.startswith("sess_") and made.user_id == "user_123"
    assert made.state == SessionState.ACTIVE and made.metadata == {
        "language": "zh-CN",
        "tier": "premium",
    }
    assert made.expires_at == pytest.approx(clock.now + 3600) and made.ttl == 3600

    got = await manager.get_session(made.session_id, "user_123")
    assert got == made
    assert await manager.session_exists(made.session_id, "user_123")

    updated = await manager.update_session_metadata(
        made.session_id, "user_123", {"message_count": 5, "tier": None}
    )
    assert updated.metadata == {"language": "zh-CN", "message_count": 5}

    clock.advance(1000)
    refreshed = await manager.refresh_session(made.session_id, "user_123")
    assert refreshed.expires_at == pytest.approx(clock.now + 3600)

    other = await manager.create_session("user_123", "coder", window_id="mobile")
    await manager.create_session("someone_else", "assistant")
    listed = await manager.get_sessions_by_user("user_123")
    assert [s.session_id for s in listed] == [other.session_id, made.session_id]
    assert [
        s.session_id for s in await manager.get_sessions_by_user("user_123", agent_id="coder")
    ] == [other.session_id]
    assert await manager.get_active_session_count("user_123") == 2

    await manager.delete_session(made.session_id, "user_123")
    assert not await manager.session_exists(made.session_id, "user_123")
    assert await manager.delete_user_sessions("user_123") == 1
    assert await manager.delete_agent_sessions("assistant") == 1  # the administrator: all users
    assert (await manager.get_sessions_by_user(None)).sessions == []


async def test_pages_of_a_users_sessions_return_each_once(manager: SessionManager) -> None:
    made = [(await manager.create_session("ann", "a")).session_id for _ in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        page = await manager.get_sessions_by_user("ann", limit=3, cursor=cursor)
        seen += [s.session_id for s in page.sessions]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == list(reversed(made))


# --------------------------------------------------------------------------
# ownership: another user's session is a missing one, for every call


async def _calls(manager: SessionManager, sid: str, user: str) -> dict[str, Any]:
    """Every public call that names a session, made as ``user``."""
    return {
        "get_session": lambda: manager.get_session(sid, user),
        "get_session_state": lambda: manager.get_session_state(sid, user),
        "update_session_metadata": lambda: manager.update_session_metadata(sid, user, {"k": 1}),
        "refresh_session": lambda: manager.refresh_session(sid, user),
        "set_session_state": lambda: manager.set_session_state(sid, user, "archived"),
        "archive_session": lambda: manager.archive_session(sid, user),
        "restore_session": lambda: manager.restore_session(sid, user),
        "expire_session": lambda: manager.expire_session(sid, user),
        "delete_session": lambda: manager.delete_session(sid, user),
        "chat": lambda: manager.chat(sid, user, agent()),
        "save_checkpoint": lambda: manager.save_checkpoint(sid, user, {"x": 1}),
        "get_latest_checkpoint": lambda: manager.get_latest_checkpoint(sid, user),
        "get_checkpoint": lambda: manager.get_checkpoint(sid, user, "c"),
        "list_checkpoints": lambda: manager.list_checkpoints(sid, user),
        "delete_checkpoint": lambda: manager.delete_checkpoint(sid, user, "c"),
        "clear_checkpoints": lambda: manager.clear_checkpoints(sid, user),
        "lock": lambda: _enter(manager.lock(sid, user)),
    }


async def _enter(lock: Any) -> None:
    async with lock:
        pass


SESSION_METHODS = {
    name
    for name, fn in inspect.getmembers(SessionManager, inspect.isfunction)
    if not name.startswith("_") and "session_id" in inspect.signature(fn).parameters
} - {"create_session", "session_exists"}  # a new session's id; a yes/no answer (below)


async def test_another_users_session_is_answered_exactly_as_a_missing_one(
    manager: SessionManager,
) -> None:
    mine = await manager.create_session("ann", "a", metadata={"secret": "s"})
    await manager.save_checkpoint(mine.session_id, "ann", {"at": 1}, name="c")
    before = await manager.get_session(mine.session_id, "ann")
    theirs = await _calls(manager, mine.session_id, "mallory")
    missing = await _calls(manager, "no-such-session", "mallory")
    assert set(theirs) == SESSION_METHODS  # every such method is in the table
    for name in theirs:
        with pytest.raises(SessionNotFoundError) as other:
            await theirs[name]()
        with pytest.raises(SessionNotFoundError) as absent:
            await missing[name]()
        shown = str(other.value).replace(mine.session_id, "ID")
        assert shown == str(absent.value).replace("no-such-session", "ID"), name
        assert type(other.value) is type(absent.value)
    assert not await manager.session_exists(mine.session_id, "mallory")
    assert not await manager.session_exists("no-such-session", "mallory")
    after = await manager.get_session(mine.session_id, "ann")
    assert after == before  # nothing changed
    assert [c.checkpoint_id for c in await manager.list_checkpoints(mine.session_id, "ann")] == [
        "c"
    ]
    assert mine.session_id not in [
        s.session_id for s in await manager.get_sessions_by_user("mallory")
    ]
    # the administrator sees it
    assert (await manager.get_session(mine.session_id, None)).user_id == "ann"


# --------------------------------------------------------------------------
# states and TTL


async def test_expired_sessions_vanish_from_every_call_at_once(
    manager: SessionManager, clock: FakeClock
) -> None:
    short = await manager.create_session("ann", "a", ttl=60)
    long = await manager.create_session("ann", "a", ttl=7200)
    clock.advance(61)
    with pytest.raises(SessionNotFoundError):
        await manager.get_session(short.session_id, "ann")
    assert not await manager.session_exists(short.session_id, None)
    assert [s.session_id for s in await manager.get_sessions_by_user("ann")] == [long.session_id]
    assert await manager.get_active_session_count("ann") == 1
    assert await manager.cleanup_expired() == 1
    assert await manager.cleanup_expired() == 0
    assert await manager.get_session(long.session_id, "ann")


async def test_each_turn_slides_the_ttl(manager: SessionManager, clock: FakeClock) -> None:
    made = await manager.create_session("ann", "a", ttl=100)
    async with await manager.chat(made.session_id, "ann", agent()) as chat:
        for _ in range(3):
            clock.advance(60)
            await chat.query("still here")
    clock.advance(60)  # 240 s after creation, 60 s after the last turn
    got = await manager.get_session(made.session_id, "ann")
    assert got.expires_at == pytest.approx(clock.now - 60 + 100)


async def test_idle_is_derived_from_the_last_activity(store_url: str) -> None:
    async with SessionManager(store_url, idle_after=0.4) as manager:
        made = await manager.create_session("ann", "a")
        assert made.state == SessionState.ACTIVE
        await asyncio.sleep(0.5)
        assert (await manager.get_session(made.session_id, "ann")).state == SessionState.IDLE
        idle = await manager.get_sessions_by_user("ann", state="idle")
        assert [s.session_id for s in idle] == [made.session_id]
        assert (await manager.get_sessions_by_user("ann", state=SessionState.ACTIVE)).sessions == []
        async with await manager.chat(made.session_id, "ann", agent()) as chat:
            await chat.query("hello again")
        assert (await manager.get_session(made.session_id, "ann")).state == SessionState.ACTIVE
        stats = await manager.stats()
        assert stats.by_state["active"] == 1
        with pytest.raises(InvalidArgumentError, match="IDLE cannot be set"):
            await manager.set_session_state(made.session_id, "ann", SessionState.IDLE)


async def test_an_archived_session_refuses_turns_until_restored(manager: SessionManager) -> None:
    made = await manager.create_session("ann", "a")
    sid = made.session_id
    async with await manager.chat(sid, "ann", agent()) as chat:
        assert await chat.query("first") == "You said: first"
        head = chat.conversation.head
        archived = await manager.archive_session(sid, "ann", reason="done")
        assert archived.state == SessionState.ARCHIVED
        with pytest.raises(SessionArchivedError, match="archived"):
            await chat.query("refused")
        with pytest.raises(SessionArchivedError):
            await manager.save_checkpoint(sid, "ann", {"x": 1})
        # read-only, still readable and forkable
        assert [m.text for m in chat.messages] == ["first", "You said: first"]
        fork = await chat.fork_session()
        assert await fork.query("in the fork") == "You said: in the fork"
        await fork.close()
        assert (await manager.get_sessions_by_user("ann", state="archived")).sessions[
            0
        ].session_id == sid
        assert await manager.get_active_session_count("ann") == 1  # the fork
        restored = await manager.restore_session(sid, "ann")
        assert restored.state == SessionState.ACTIVE
        assert await chat.query("again") == "You said: again"
        events = await chat.read_events()
    lifecycle = [e.data.state for e in events if isinstance(e, LifecycleEntry)]
    assert lifecycle == ["archived", "active"]
    by = [e.data.by for e in events if isinstance(e, LifecycleEntry)]
    assert by == ["ann", "ann"]
    assert all(e.type != "turn_start" or e.seq <= head or e.seq > head + 1 for e in events)


async def test_expire_now_is_recorded_then_the_session_is_gone(manager: SessionManager) -> None:
    made = await manager.create_session("ann", "a")
    assert await manager.set_session_state(made.session_id, "ann", "expired") is None
    with pytest.raises(SessionNotFoundError):
        await manager.get_session(made.session_id, "ann")


# --------------------------------------------------------------------------
# limits


async def test_the_limit_refuses_with_the_limit_and_the_count(store_url: str) -> None:
    async with SessionManager(store_url, max_sessions_per_user=2) as manager:
        first = await manager.create_session("ann", "a")
        await manager.create_session("ann", "a")
        with pytest.raises(SessionLimitError) as caught:
            await manager.create_session("ann", "a")
        assert (caught.value.limit, caught.value.count) == (2, 2)
        await manager.create_session("bob", "a")  # per user
        await manager.archive_session(first.session_id, "ann")
        await manager.create_session("ann", "a")
        with pytest.raises(SessionLimitError):
            await manager.restore_session(first.session_id, "ann")


async def test_five_concurrent_creates_at_a_limit_of_three_leave_three(store_url: str) -> None:
    async with SessionManager(store_url, max_sessions_per_user=3) as manager:
        results = await asyncio.gather(
            *(manager.create_session("ann", "a") for _ in range(5)), return_exceptions=True
        )
        assert sum(isinstance(r, SessionLimitError) for r in results) == 2, results
        assert await manager.get_active_session_count("ann") == 3


async def test_the_archive_policy_archives_the_oldest_idle_session(store_url: str) -> None:
    async with SessionManager(
        store_url, max_sessions_per_user=2, limit_policy="archive_oldest_idle", idle_after=0.3
    ) as manager:
        oldest = await manager.create_session("ann", "a")
        await asyncio.sleep(0.05)
        newer = await manager.create_session("ann", "a")
        with pytest.raises(SessionLimitError):  # nothing is idle yet
            await manager.create_session("ann", "a")
        await asyncio.sleep(0.4)
        async with await manager.chat(newer.session_id, "ann", agent()) as chat:
            await chat.query("keeps it active")
        third = await manager.create_session("ann", "a")
        states = {s.session_id: s.state for s in await manager.get_sessions_by_user("ann")}
        assert states[oldest.session_id] == SessionState.ARCHIVED
        assert states[newer.session_id] == SessionState.ACTIVE
        assert states[third.session_id] == SessionState.ACTIVE


# --------------------------------------------------------------------------
# checkpoints, as seed 002 uses them


async def test_checkpoints_save_order_ids_rewind_and_fork(manager: SessionManager) -> None:
    made = await manager.create_session("user_123", "chatbot")
    sid = made.session_id
    assert await manager.get_latest_checkpoint(sid, "user_123") is None
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    first = await manager.save_checkpoint(sid, "user_123", {"turn": 1, "history": history})
    async with await manager.chat(sid, "user_123", agent()) as chat:
        await chat.query("I'm in Beijing")
        # ids sort before the first: only save order may decide "latest"
        second = await manager.save_checkpoint(sid, "user_123", {"turn": 2}, name="aaa")
        third = await manager.save_checkpoint(sid, "user_123", {"turn": 3}, name="AAA")
        latest = await manager.get_latest_checkpoint(sid, "user_123")
        assert (
            latest is not None and latest.checkpoint_id == third and latest["data"] == {"turn": 3}
        )
        listed = await manager.list_checkpoints(sid, "user_123")
        assert [c.checkpoint_id for c in listed] == [first, second, third]
        assert [c.seq for c in listed] == sorted(c.seq for c in listed)
        assert all(c.created_at > 0 for c in listed)
        got = await manager.get_checkpoint(sid, "user_123", first)
        assert got is not None and got.data["history"] == history
        assert await manager.get_checkpoint(sid, "user_123", "nope") is None

        # the session layer understands the ids
        await chat.rewind(first)
        assert chat.messages == []
        fork = await chat.fork_session(second)
        assert [m.text for m in fork.messages] == ["I'm in Beijing", "You said: I'm in Beijing"]
        await fork.close()

        assert await manager.delete_checkpoint(sid, "user_123", second)
        assert not await manager.delete_checkpoint(sid, "user_123", second)
        latest = await manager.get_latest_checkpoint(sid, "user_123")
        assert latest is not None and latest.checkpoint_id == third
        assert await manager.clear_checkpoints(sid, "user_123") == 2
        assert await manager.list_checkpoints(sid, "user_123") == []
        assert await manager.get_latest_checkpoint(sid, "user_123") is None


async def test_unstorable_checkpoint_data_is_refused(manager: SessionManager) -> None:
    made = await manager.create_session("ann", "a")
    with pytest.raises(InvalidArgumentError):
        await manager.save_checkpoint(made.session_id, "ann", {"nan": float("nan")})
    with pytest.raises(InvalidArgumentError):
        await manager.save_checkpoint(made.session_id, "ann", {1, 2})
    assert await manager.list_checkpoints(made.session_id, "ann") == []


# --------------------------------------------------------------------------
# templates and windows


async def test_a_template_sets_prompt_settings_metadata_and_ttl(
    store_url: str, clock: FakeClock
) -> None:
    support = SessionTemplate(
        system_prompt="You are support.",
        max_steps=3,
        metadata={"tier": "free", "lang": "en"},
        ttl=120,
        title="Support chat",
    )
    async with SessionManager(store_url, templates={"support": support}, clock=clock) as manager:
        made = await manager.create_session(
            "ann", "bot", template="support", metadata={"lang": "fr"}
        )
        assert made.template == "support" and made.title == "Support chat"
        assert made.metadata == {"tier": "free", "lang": "fr"}
        assert made.expires_at == pytest.approx(clock.now + 120)
        model = ScriptedLLM()
        async with await manager.chat(
            made.session_id, "ann", Agent(model, system_prompt="x")
        ) as chat:
            await chat.query("hi")
        sent = model.requests[-1].messages
        assert sent[0].role == "system" and sent[0].text == "You are support."
        with pytest.raises(InvalidArgumentError, match="no template named"):
            await manager.create_session("ann", "bot", template="missing")
        with pytest.raises(InvalidArgumentError, match=r"chatsession\."):
            await manager.create_session("ann", "bot", metadata={"chatsession.ttl": 1})


async def test_windows_each_have_their_own_conversation(manager: SessionManager) -> None:
    desktop, mobile = await asyncio.gather(
        manager.open_window("alice", "desktop", "assistant"),
        manager.open_window("alice", "mobile", "assistant"),
    )
    assert desktop.session_id != mobile.session_id
    racing = await asyncio.gather(
        *(manager.open_window("alice", "tablet", "assistant") for _ in range(4))
    )
    assert len({s.session_id for s in racing}) == 1
    again = await manager.open_window("alice", "desktop", "assistant")
    assert again.session_id == desktop.session_id
    async with await manager.chat(desktop.session_id, "alice", agent()) as chat:
        await chat.query("weather in Beijing?")
    async with await manager.chat(mobile.session_id, "alice", agent()) as chat:
        assert chat.messages == []  # independent context
    await manager.archive_session(desktop.session_id, "alice")
    fresh = await manager.open_window("alice", "desktop", "assistant")
    assert fresh.session_id != desktop.session_id and fresh.state == SessionState.ACTIVE


# --------------------------------------------------------------------------
# metadata merges, arguments


async def test_concurrent_metadata_updates_never_lose_a_key(manager: SessionManager) -> None:
    made = await manager.create_session("ann", "a")
    await asyncio.gather(
        *(manager.update_session_metadata(made.session_id, "ann", {f"k{n}": n}) for n in range(20))
    )
    got = await manager.get_session(made.session_id, "ann")
    assert got.metadata == {f"k{n}": n for n in range(20)}


async def test_bad_arguments_are_typed_errors() -> None:
    with pytest.raises(InvalidArgumentError):
        SessionManager("memory://", ttl=-1)
    with pytest.raises(InvalidArgumentError):
        SessionManager("memory://", max_sessions_per_user=0)
    with pytest.raises(InvalidArgumentError):
        SessionManager("memory://", limit_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        SessionManager("memory://", templates={"t": {"ttl": 1}})  # type: ignore[dict-item]
    async with SessionManager("memory://") as manager:
        with pytest.raises(InvalidArgumentError):
            await manager.create_session("ann", "a", ttl=float("inf"))
        with pytest.raises(InvalidArgumentError):
            await manager.create_session("ann", "a", metadata=["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await manager.get_sessions_by_user("ann", state="expired")
        with pytest.raises(InvalidArgumentError):
            await manager.get_sessions_by_user("ann", state="sleeping")
        made = await manager.create_session("ann", "a")
        with pytest.raises(UsageError, match="store"):
            await manager.chat(made.session_id, "ann", agent(), store="memory://")
        with pytest.raises(InvalidArgumentError):
            manager.lock(made.session_id, "ann", timeout=-1)


# --------------------------------------------------------------------------
# stats and cleanup


async def test_stats_and_background_cleanup(store_url: str, clock: FakeClock) -> None:
    async with SessionManager(store_url, clock=clock, cleanup_interval=0.05) as manager:
        a = await manager.create_session("ann", "helper")
        await manager.create_session("bob", "helper", ttl=10)
        await manager.create_session("bob", "coder")
        async with await manager.chat(a.session_id, "ann", agent()) as chat:
            await chat.query("one two three")
        stats = await manager.stats()
        assert stats.sessions == 3 and stats.by_user == {"bob": 2, "ann": 1}
        assert stats.by_agent == {"helper": 2, "coder": 1}
        assert stats.messages == 2 and stats.tokens > 0 and stats.bytes > 0
        clock.advance(11)
        for _ in range(100):  # the background task removes the expired one
            if (await manager.get_active_session_count("bob")) == 1 and (
                await manager.stats()
            ).sessions == 2:
                break
            await asyncio.sleep(0.05)
        assert (await manager.stats()).sessions == 2
        assert await manager.cleanup_expired() == 0
        await manager.stop()
