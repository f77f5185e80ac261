"""SessionManager under attack: hostile and careless callers, edge values, races.

Each test states the behaviour the manager promises (docs/manager.md, issue 11):
every failure a typed error from :mod:`chatsession.errors`, another user's
session answered exactly as a missing one, the reserved ``chatsession.``
metadata kept to the manager, limits that hold under concurrency, and an
archive that never leaves a turn half-written.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from chatsession import (
    Agent,
    ScriptedLLM,
    SessionArchivedError,
    SessionLimitError,
    SessionManager,
    SessionNotFoundError,
    SessionState,
    SessionTemplate,
)
from chatsession.errors import (
    ChatSessionClosedError,
    ChatSessionError,
    InvalidArgumentError,
    SessionExistsError,
    UnsupportedValueError,
    UsageError,
)
from chatsession.log import CheckpointEntry, LifecycleEntry
from chatsession.store import SessionRecord
from chatsession.store.types import MAX_FIELD_LENGTH, MAX_JSON_DEPTH
from chatsession.values import STATE_DEPTH

from .conftest import FakeClock


def agent(**kwargs: Any) -> Agent:
    return Agent(ScriptedLLM(), **kwargs)


def nested(depth: int) -> Any:
    """A value with ``depth`` levels of lists (depth 0: a scalar)."""
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def window_id_of(user_id: str, window_id: str, agent_id: str, generation: int = 0) -> str:
    """The id open_window gives a window's session (as computed in manager.py)."""
    key = hashlib.sha256(f"{user_id}\0{window_id}\0{agent_id}".encode()).hexdigest()[:24]
    return f"win_{key}_{generation}"


async def raises_typed(coro: Any, *kinds: type[BaseException]) -> BaseException:
    """Await ``coro``; it must fail with a chatsession error (of ``kinds`` when given)."""
    try:
        await coro
    except ChatSessionError as exc:
        if kinds:
            assert isinstance(exc, kinds), f"{type(exc).__name__}: {exc}"
        return exc
    except Exception as exc:  # a raw builtin / pydantic error is the defect
        pytest.fail(f"untyped {type(exc).__module__}.{type(exc).__name__}: {exc}")
    pytest.fail("no error raised")


# --------------------------------------------------------------------------
# every failure a typed error


@pytest.mark.parametrize("field", ["agent_id", "window_id", "title"])
@pytest.mark.parametrize("bad", [5, ["a"]])
async def test_non_text_agent_window_title_are_typed_errors(
    manager: SessionManager, field: str, bad: Any
) -> None:
    """create_session(agent_id=5) raised a raw pydantic ValidationError (SessionRecord)."""
    kwargs: dict[str, Any] = {"agent_id": "a"}
    kwargs[field] = bad
    agent_id = kwargs.pop("agent_id")
    await raises_typed(manager.create_session("ann", agent_id, **kwargs), InvalidArgumentError)
    assert (await manager.get_sessions_by_user("ann")).sessions == []


@pytest.mark.parametrize("field", ["agent_id", "window_id", "title"])
async def test_bytes_are_not_silently_turned_into_text(manager: SessionManager, field: str) -> None:
    """b"a" was coerced to "a" by pydantic: what was acknowledged is not what reads back."""
    kwargs: dict[str, Any] = {field: b"abc"}
    agent_id = kwargs.pop("agent_id", "a")
    await raises_typed(manager.create_session("ann", agent_id, **kwargs), InvalidArgumentError)


async def test_open_window_with_a_non_text_or_surrogate_agent_is_a_typed_error(
    manager: SessionManager,
) -> None:
    """open_window hashes agent_id before any check: a lone surrogate raised a raw
    UnicodeEncodeError, an int a raw ValidationError."""
    await raises_typed(manager.open_window("ann", "w", "\ud800"), InvalidArgumentError)
    await raises_typed(manager.open_window("ann", "w", 5), InvalidArgumentError)  # type: ignore[arg-type]
    assert (await manager.get_sessions_by_user("ann")).sessions == []


@pytest.mark.parametrize("ttl", [10**400, -(10**400)])
async def test_an_enormous_integer_ttl_is_a_typed_error(
    manager: SessionManager, store_url: str, ttl: int
) -> None:
    """math.isfinite(10**400) raised a raw OverflowError in _check_ttl."""
    made = await manager.create_session("ann", "a")
    await raises_typed(manager.create_session("ann", "a", ttl=ttl), InvalidArgumentError)
    await raises_typed(
        manager.refresh_session(made.session_id, "ann", ttl=ttl), InvalidArgumentError
    )
    with pytest.raises(InvalidArgumentError):
        manager.lock(made.session_id, "ann", ttl=ttl)
    with pytest.raises(InvalidArgumentError):
        SessionManager(store_url, ttl=ttl)


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), 10**400])
def test_a_bad_template_ttl_is_a_typed_error(ttl: Any) -> None:
    """SessionTemplate(ttl=-1) raised a raw pydantic ValidationError."""
    with pytest.raises(InvalidArgumentError):
        SessionTemplate(ttl=ttl)


@pytest.mark.parametrize("ttl", [True, "5"])
def test_a_template_ttl_is_not_coerced_from_bool_or_text(ttl: Any) -> None:
    """create_session(ttl=True) is refused; the template's ttl silently became 1.0 / 5.0."""
    with pytest.raises(InvalidArgumentError):
        SessionTemplate(ttl=ttl)


@pytest.mark.parametrize("bad", [["x"], {"x": 1}, {"x"}])
async def test_an_unhashable_checkpoint_id_is_a_typed_error(
    manager: SessionManager, bad: Any
) -> None:
    """delete_checkpoint(sid, user, ["x"]) raised a raw TypeError (set membership)."""
    made = await manager.create_session("ann", "a")
    await manager.save_checkpoint(made.session_id, "ann", 1, name="x")
    await raises_typed(manager.delete_checkpoint(made.session_id, "ann", bad), InvalidArgumentError)
    await raises_typed(manager.get_checkpoint(made.session_id, "ann", bad), InvalidArgumentError)
    assert [c.checkpoint_id for c in await manager.list_checkpoints(made.session_id, "ann")] == [
        "x"
    ]


# (chat(sid, user, agent, session_id=...) is Python's own TypeError: a duplicate argument)
@pytest.mark.parametrize("options", [{"must_exist": False}, {"bogus": 1}, {"store": "memory://"}])
async def test_chat_options_it_cannot_take_are_a_usage_error(
    manager: SessionManager, options: dict[str, Any]
) -> None:
    """chat(..., must_exist=False) raised a raw TypeError ("multiple values for keyword")."""
    made = await manager.create_session("ann", "a")
    await raises_typed(manager.chat(made.session_id, "ann", agent(), **options), UsageError)


# --------------------------------------------------------------------------
# the reserved metadata prefix


@pytest.mark.parametrize(
    "key, value", [("chatsession.ttl", "forever"), ("chatsession.template", "admin")]
)
async def test_template_metadata_cannot_set_the_managers_own_keys(
    store_url: str, key: str, value: Any
) -> None:
    """SessionTemplate.metadata is merged under the caller's metadata without the
    reserved-prefix check: a template (or a caller passing a SessionTemplate object)
    could plant chatsession.ttl = "forever" (refresh then raised a raw TypeError) or
    spoof chatsession.template (chat() then applies another template's prompt)."""
    async with SessionManager(store_url, ttl=None) as manager:
        with pytest.raises(InvalidArgumentError, match="chatsession"):
            tpl = SessionTemplate(metadata={key: value})
            await manager.create_session("ann", "a", template=tpl)
        assert (await manager.get_sessions_by_user("ann")).sessions == []


async def test_reserved_keys_cannot_be_set_or_deleted_by_callers(manager: SessionManager) -> None:
    made = await manager.create_session("ann", "a", ttl=120)
    for metadata in (
        {"chatsession.ttl": None},
        {"chatsession.ttl": 10**9},
        {"chatsession.template": "x"},
        {"chatsession.": 1},
    ):
        with pytest.raises(InvalidArgumentError):
            await manager.update_session_metadata(made.session_id, "ann", metadata)
        with pytest.raises(InvalidArgumentError):
            await manager.create_session("ann", "a", metadata=metadata)
    got = await manager.get_session(made.session_id, "ann")
    assert got.ttl == 120 and got.metadata == {}
    # a look-alike is just the caller's key
    done = await manager.update_session_metadata(
        made.session_id, "ann", {"Chatsession.ttl": 1, "chatsession": 2}
    )
    assert done.metadata == {"Chatsession.ttl": 1, "chatsession": 2} and done.ttl == 120


# --------------------------------------------------------------------------
# ownership


async def test_open_window_ids_cannot_be_squatted_or_probed_by_another_user(
    manager: SessionManager,
) -> None:
    """open_window's ids are sha256(user, window, agent): anyone who knows ann's user id
    can compute them. create_session(session_id=...) accepted them for mallory, so
    mallory (a) squats ann's window ids (100 squats make ann's open_window fail with
    SessionBusyError) and (b) learns whether ann opened a window: SessionExistsError
    for ann's session versus success for a missing one. Expected: the manager's own
    id namespace (win_...) is refused for caller-chosen ids (or the ids are keyed with a
    secret), so another user's window session is never revealed or blocked."""
    sid0 = window_id_of("ann", "mobile", "chat", 0)
    squat = manager.create_session("mallory", "x", session_id=sid0)
    await raises_typed(squat, InvalidArgumentError)
    opened = await manager.open_window("ann", "mobile", "chat")
    assert opened.session_id not in [
        s.session_id for s in await manager.get_sessions_by_user("mallory")
    ]
    # probing: the answer for ann's window is the answer for a window nobody opened
    for probe in (opened.session_id, window_id_of("ann", "never-opened", "chat", 0)):
        with pytest.raises(InvalidArgumentError):
            await manager.create_session("mallory", "x", session_id=probe)


async def test_lock_checkpoints_and_states_of_a_foreign_session_are_not_found(
    manager: SessionManager,
) -> None:
    """Regression: these all answer another user's session as a missing one."""
    mine = await manager.create_session("ann", "a")
    sid = mine.session_id
    await manager.save_checkpoint(sid, "ann", {"k": 1}, name="c1")
    mine = await manager.get_session(sid, "ann")
    for session_id in (sid, "missing-session"):
        with pytest.raises(SessionNotFoundError) as caught:
            async with manager.lock(session_id, "mallory"):
                pass
        assert str(caught.value) == str(SessionNotFoundError(session_id))
        for call in (
            manager.get_checkpoint(session_id, "mallory", "c1"),
            manager.delete_checkpoint(session_id, "mallory", "c1"),
            manager.restore_session(session_id, "mallory"),
            manager.archive_session(session_id, "mallory"),
            manager.expire_session(session_id, "mallory"),
            manager.set_session_state(session_id, "mallory", "active"),
            manager.chat(session_id, "mallory", agent()),
        ):
            with pytest.raises(SessionNotFoundError) as caught:
                await call
            assert str(caught.value) == str(SessionNotFoundError(session_id))
    assert await manager.delete_agent_sessions("a", "mallory") == 0
    got = await manager.get_session(sid, "ann")
    assert got.state == SessionState.ACTIVE and got == mine
    assert [c.checkpoint_id for c in await manager.list_checkpoints(sid, "ann")] == ["c1"]


async def test_the_empty_user_id_is_not_a_shared_account(manager: SessionManager) -> None:
    """user_id="" (a missing header, an unset variable) was accepted as a real user:
    every such caller shares one bucket of sessions and sees the others'. None is the
    administrator; "" and whitespace-only ids should be refused."""
    for blank in ("", " ", "\u3000"):
        await raises_typed(manager.create_session(blank, "a"), InvalidArgumentError)
        await raises_typed(manager.get_sessions_by_user(blank), InvalidArgumentError)
        await raises_typed(manager.open_window(blank, "w", "a"), InvalidArgumentError)


# --------------------------------------------------------------------------
# limits


async def test_a_fork_cannot_take_a_user_past_the_limit(store_url: str) -> None:
    """chat().fork_session() makes a new session owned by the same user through
    store.fork, which has no max_per_user: a user at max_sessions_per_user=1 forked
    as many active sessions as they liked."""
    async with SessionManager(store_url, max_sessions_per_user=1) as manager:
        made = await manager.create_session("ann", "a")
        async with await manager.chat(made.session_id, "ann", agent()) as chat:
            await chat.query("hi")
            try:
                fork = await chat.fork_session()
            except SessionLimitError:
                pass
            else:
                await fork.close()
        assert await manager.get_active_session_count("ann") <= 1


async def test_concurrent_restores_never_pass_the_limit(store_url: str) -> None:
    """restore_session counts, then restores, in two steps: two restores at once at
    count = limit - 1 both passed and left limit + 1 active sessions (seen on SQLite)."""
    async with SessionManager(store_url, max_sessions_per_user=2) as manager:
        archived = []
        for _ in range(4):
            made = await manager.create_session("ann", "a")
            await manager.archive_session(made.session_id, "ann")
            archived.append(made.session_id)
        await manager.create_session("ann", "a")  # 1 active, room for 1 more
        results = await asyncio.gather(
            *(manager.restore_session(sid, "ann") for sid in archived), return_exceptions=True
        )
        assert all(
            not isinstance(r, BaseException) or isinstance(r, SessionLimitError) for r in results
        ), results
        assert sum(not isinstance(r, BaseException) for r in results) == 1, results
        assert await manager.get_active_session_count("ann") == 2


async def test_archive_oldest_idle_under_concurrency(store_url: str) -> None:
    """Five creates at once at a limit of 3 with three idle sessions: all pick the same
    oldest idle session; the second archive of it reached store.append on an archived
    session and create_session raised SessionArchivedError (4 of 5 on SQLite) although
    other idle sessions were there to archive. Expected: only successes or
    SessionLimitError, never more than 3 sessions counted, each archive recorded once."""
    # a real clock: idleness compares the manager's clock with the store's updated_at, so
    # a fake clock moved ahead would make the new sessions idle at once too
    async with SessionManager(
        store_url, max_sessions_per_user=3, limit_policy="archive_oldest_idle", idle_after=1.0
    ) as manager:
        old = [(await manager.create_session("ann", "a")).session_id for _ in range(3)]
        await asyncio.sleep(1.1)
        results = await asyncio.gather(
            *(manager.create_session("ann", "a") for _ in range(5)), return_exceptions=True
        )
        bad = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, SessionLimitError) for r in bad), results
        assert len(bad) == 2, results  # three idle sessions made room for three
        assert await manager.get_active_session_count("ann") == 3
        for sid in old:
            async with await manager.chat(sid, None, agent()) as chat:
                events = await chat.read_events()
            states = [e.data.state for e in events if isinstance(e, LifecycleEntry)]
            assert states in ([], ["archived"]), (sid, states)


async def test_an_expired_session_does_not_count_against_the_limit(
    store_url: str, clock: FakeClock
) -> None:
    """With the manager's clock past a session's TTL, the session is invisible to get,
    list and get_active_session_count, yet store.create counts it (by the store's clock):
    SessionLimitError(count=1) while the user has 0 sessions. Expected: an expired
    session never blocks a create (e.g. purge the user's expired sessions with the
    manager's clock and retry on SessionLimitError)."""
    async with SessionManager(store_url, max_sessions_per_user=1, ttl=60, clock=clock) as manager:
        await manager.create_session("ann", "a")
        clock.advance(61)
        assert await manager.get_active_session_count("ann") == 0
        made = await manager.create_session("ann", "a")
        assert (await manager.get_session(made.session_id, "ann")).state == SessionState.ACTIVE


async def test_the_refusing_limit_holds_against_two_managers(durable_url: str) -> None:
    """Regression: two managers on one store, six creates at a limit of 2: exactly 2
    (on the durable backends: each memory:// store is its own)."""
    one = SessionManager(durable_url, max_sessions_per_user=2)
    two = SessionManager(durable_url, max_sessions_per_user=2)
    try:
        results = await asyncio.gather(
            *(m.create_session("ann", "a") for m in (one, two, one, two, one, two)),
            return_exceptions=True,
        )
        assert sum(isinstance(r, SessionLimitError) for r in results) == 4, results
        assert await one.get_active_session_count("ann") == 2
        assert await two.get_active_session_count("ann") == 2
    finally:
        await one.aclose()
        await two.aclose()


# --------------------------------------------------------------------------
# states


async def test_an_archived_session_can_still_be_expired(manager: SessionManager) -> None:
    """expire_session writes its lifecycle event first, and an archived session refuses
    appends: expiring an archived session raised SessionArchivedError. Expected: it is
    gone at once, as for any other session (its TTL passes whatever its state)."""
    made = await manager.create_session("ann", "a")
    await manager.archive_session(made.session_id, "ann")
    await manager.expire_session(made.session_id, "ann", reason="retention")
    assert not await manager.session_exists(made.session_id, None)
    other = await manager.create_session("ann", "a")
    await manager.archive_session(other.session_id, "ann")
    assert await manager.set_session_state(other.session_id, None, "expired") is None
    assert not await manager.session_exists(other.session_id, None)


async def test_archive_during_a_running_turn_never_leaves_it_half_written(
    manager: SessionManager,
) -> None:
    """archive_session writes its lifecycle event under the lease, releases the lease,
    then sets state=archived with a plain update. A turn that takes the lease in that
    gap writes turn_start and the user message, then its end is refused
    (SessionArchivedError): a half-written turn. Expected: the turn finishes before the
    archive, or it is refused with nothing of it written."""
    made = await manager.create_session("ann", "a")
    sid = made.session_id
    chat = await manager.chat(
        sid, "ann", Agent(ScriptedLLM(["one two three four five"], chunk_delay=0.05))
    )
    store = manager.store
    original = store.update
    turn: asyncio.Task[str] | None = None

    async def update(record: SessionRecord, version: int) -> SessionRecord:
        nonlocal turn
        if record.state == SessionState.ARCHIVED and turn is None:
            head = (await store.get(sid)).head
            turn = asyncio.create_task(chat.query("hello"))
            for _ in range(200):  # until the turn has started writing
                if (await store.get(sid)).head > head or turn.done():
                    break
                await asyncio.sleep(0.005)
            version = (await store.get(sid)).version  # as if read after the turn began
        return await original(record, version)

    store.update = update  # type: ignore[method-assign]
    try:
        await manager.archive_session(sid, "ann")
        assert turn is not None
        try:
            await turn
            finished = True
        except SessionArchivedError:
            finished = False
    finally:
        store.update = original  # type: ignore[method-assign]
        await chat.close()
    async with await manager.chat(sid, None, agent()) as reader:
        events = await reader.read_events()
    starts = [e for e in events if e.type == "turn_start"]
    ends = [e for e in events if e.type == "turn_end"]
    assert len(starts) == len(ends), [e.type for e in events]
    if not finished:
        assert starts == [], [e.type for e in events]
    assert (await manager.get_session(sid, "ann")).state == SessionState.ARCHIVED


async def test_a_turn_waits_for_an_archive_in_progress_or_is_refused(
    manager: SessionManager,
) -> None:
    """Regression: a turn already holding the lease delays the archive; the turn is
    whole, the archive is recorded after it, and the next turn is refused."""
    made = await manager.create_session("ann", "a")
    sid = made.session_id
    async with await manager.chat(
        sid, "ann", Agent(ScriptedLLM(["a b c d e f"], chunk_delay=0.03))
    ) as chat:
        turn = asyncio.create_task(chat.query("hello"))
        await asyncio.sleep(0.05)
        await manager.archive_session(sid, "ann")
        assert await turn == "a b c d e f"
        with pytest.raises(SessionArchivedError):
            await chat.query("again")
        events = await chat.read_events()
    types = [e.type for e in events]
    assert types.count("turn_start") == types.count("turn_end") == 1
    assert types.index("lifecycle") > types.index("turn_end")


async def test_expire_then_cleanup_then_nothing_is_left(
    manager: SessionManager, clock: FakeClock
) -> None:
    made = await manager.create_session("ann", "a", ttl=30)
    await manager.save_checkpoint(made.session_id, "ann", {"x": 1}, name="c")
    clock.advance(31)
    assert not await manager.session_exists(made.session_id, None)
    assert await manager.cleanup_expired() == 1
    assert await manager.cleanup_expired() == 0
    with pytest.raises(SessionNotFoundError):
        await manager.store.get(made.session_id)
    stats = await manager.stats()
    assert stats.sessions == 0 and stats.by_state["expired"] == 0


async def test_the_clock_going_backwards_does_not_break_states(
    manager: SessionManager, clock: FakeClock
) -> None:
    """Regression: a clock stepped far back reads as active; nothing raises."""
    made = await manager.create_session("ann", "a", ttl=100)
    clock.advance(-10_000)
    got = await manager.get_session(made.session_id, "ann")
    assert got.state == SessionState.ACTIVE
    assert await manager.get_active_session_count("ann") == 1
    async with await manager.chat(made.session_id, "ann", agent()) as chat:
        await chat.query("hi")
    assert await manager.cleanup_expired() == 0
    assert await manager.session_exists(made.session_id, "ann")


async def test_a_refresh_after_the_clock_stepped_back_never_shortens_the_ttl(
    manager: SessionManager, clock: FakeClock
) -> None:
    """refresh_session "extends the TTL", but it sets expires_at = now + ttl from a clock
    that stepped back (NTP correction), so it moved the expiry earlier (by the step);
    far enough back, the refreshed session is already expired by the store's clock and
    chat() cannot open it. Expected: a refresh with the session's own TTL never moves
    expires_at earlier (max of the old and the new expiry)."""
    made = await manager.create_session("ann", "a", ttl=100)
    clock.advance(-50)
    refreshed = await manager.refresh_session(made.session_id, "ann")
    assert made.expires_at is not None and refreshed.expires_at is not None
    assert refreshed.expires_at >= made.expires_at


# --------------------------------------------------------------------------
# limits of values: metadata and checkpoint data


async def test_metadata_at_the_depth_limit_reads_back_and_past_it_is_refused(
    manager: SessionManager,
) -> None:
    deepest = {"k": nested(STATE_DEPTH - 1)}  # STATE_DEPTH levels of objects and arrays
    made = await manager.create_session("ann", "a", metadata=deepest)
    assert (await manager.get_session(made.session_id, "ann")).metadata == deepest
    too_deep = {"k": nested(MAX_JSON_DEPTH + 5)}
    with pytest.raises(UnsupportedValueError):
        await manager.update_session_metadata(made.session_id, "ann", too_deep)
    with pytest.raises(UnsupportedValueError):
        await manager.create_session("ann", "a", metadata=too_deep)
    assert (await manager.get_session(made.session_id, "ann")).metadata == deepest


async def test_odd_metadata_keys_and_values_read_back_exactly(manager: SessionManager) -> None:
    values = {
        "": "empty key",
        "\u202e": "rtl",
        "a\u200db": "zwj",
        "tab\tkey": "line\nbreak\r\x01",
        "e\u0301": "decomposed",
        "\u00e9": "composed",
        "k" * MAX_FIELD_LENGTH * 4: "v" * 100_000,
        "emoji \U0001f600": ["\U0001f600", 2**63, -(2**63), 1e308, -0.5, True, None],
    }
    made = await manager.create_session("ann", "a", metadata=values)
    assert (await manager.get_session(made.session_id, "ann")).metadata == values
    manager2 = SessionManager(manager.store)
    assert (await manager2.get_session(made.session_id, "ann")).metadata == values


async def test_checkpoint_data_at_the_depth_limit_reads_back(manager: SessionManager) -> None:
    made = await manager.create_session("ann", "a")
    data = nested(STATE_DEPTH)
    cid = await manager.save_checkpoint(made.session_id, "ann", data, name="deep")
    got = await manager.get_checkpoint(made.session_id, "ann", cid)
    assert got is not None and got.data == data
    with pytest.raises(UnsupportedValueError):
        await manager.save_checkpoint(made.session_id, "ann", nested(STATE_DEPTH + 1))
    assert [c.checkpoint_id for c in await manager.list_checkpoints(made.session_id, "ann")] == [
        "deep"
    ]


async def test_odd_checkpoint_names_save_order_and_deletes(manager: SessionManager) -> None:
    made = await manager.create_session("ann", "a")
    sid = made.session_id
    names = ["\u202ename", "n" * MAX_FIELD_LENGTH, "z", "a", "ckpt_fake", "1"]
    for i, name in enumerate(names):
        assert await manager.save_checkpoint(sid, "ann", {"i": i}, name=name) == name
    listed = await manager.list_checkpoints(sid, "ann")
    assert [c.checkpoint_id for c in listed] == names
    latest = await manager.get_latest_checkpoint(sid, "ann")
    assert latest is not None and latest.checkpoint_id == "1" and latest["data"] == {"i": 5}
    await manager.save_checkpoint(sid, "ann", {"i": "again"}, name="z")  # moves the name
    latest = await manager.get_latest_checkpoint(sid, "ann")
    assert latest is not None and latest.checkpoint_id == "z"
    assert await manager.delete_checkpoint(sid, "ann", "a")
    assert not await manager.delete_checkpoint(sid, "ann", "a")
    assert await manager.clear_checkpoints(sid, "ann") == len(names) - 1
    assert await manager.list_checkpoints(sid, "ann") == []
    events = await _events(manager, sid)
    assert sum(isinstance(e, CheckpointEntry) for e in events) > len(names)
    for bad in ("", "   ", "a\x00", "a\x01", "x" * (MAX_FIELD_LENGTH + 1)):
        with pytest.raises(InvalidArgumentError):
            await manager.save_checkpoint(sid, "ann", 1, name=bad)


async def _events(manager: SessionManager, sid: str) -> list[Any]:
    async with await manager.chat(sid, None, agent()) as chat:
        return await chat.read_events()


# --------------------------------------------------------------------------
# concurrency on one store, after close


async def test_stats_and_cleanup_while_others_write(store_url: str, clock: FakeClock) -> None:
    """Regression: stats() and cleanup_expired() run while creates, updates and deletes
    go on; every call succeeds and the final figures match."""
    async with SessionManager(store_url, ttl=100, clock=clock) as manager:
        doomed = [
            (await manager.create_session(f"u{i}", "a", ttl=10)).session_id for i in range(10)
        ]
        clock.advance(11)

        async def writer(i: int) -> None:
            made = await manager.create_session(f"w{i % 3}", "b")
            await manager.update_session_metadata(made.session_id, f"w{i % 3}", {"i": i})

        await asyncio.gather(
            *(writer(i) for i in range(20)),
            manager.cleanup_expired(),
            manager.cleanup_expired(),
            manager.stats(),
            manager.stats(),
        )
        assert not any([await manager.session_exists(s, None) for s in doomed])
        await manager.cleanup_expired()
        stats = await manager.stats()
        assert stats.sessions == 20 and stats.by_agent == {"b": 20}
        assert stats.by_user == {"w0": 7, "w1": 7, "w2": 6} and stats.by_state["expired"] == 0


async def test_every_call_after_aclose_is_a_closed_error(store_url: str) -> None:
    manager = SessionManager(store_url)
    made = await manager.create_session("ann", "a")
    await manager.aclose()
    await manager.aclose()  # idempotent
    sid = made.session_id
    calls = [
        manager.get_session(sid, "ann"),
        manager.session_exists(sid, "ann"),
        manager.create_session("ann", "a"),
        manager.update_session_metadata(sid, "ann", {"a": 1}),
        manager.refresh_session(sid, "ann"),
        manager.archive_session(sid, "ann"),
        manager.restore_session(sid, "ann"),
        manager.delete_session(sid, "ann"),
        manager.delete_user_sessions("ann"),
        manager.delete_agent_sessions("a"),
        manager.get_sessions_by_user("ann"),
        manager.get_active_session_count("ann"),
        manager.open_window("ann", "w"),
        manager.save_checkpoint(sid, "ann", 1),
        manager.list_checkpoints(sid, "ann"),
        manager.chat(sid, "ann", agent()),
        manager.stats(),
        manager.cleanup_expired(),
    ]
    for call in calls:
        with pytest.raises(ChatSessionClosedError):
            await call
    with pytest.raises(ChatSessionClosedError):
        async with manager.lock(sid, "ann"):
            pass
    with pytest.raises(ChatSessionClosedError):
        manager.start()


async def test_a_session_made_by_one_manager_is_seen_the_same_by_another(
    durable_url: str,
) -> None:
    one = SessionManager(durable_url)
    two = SessionManager(durable_url)
    try:
        made = await one.create_session("ann", "a", metadata={"x": [1, "\u00e9"]})
        await two.update_session_metadata(made.session_id, "ann", {"y": 2})
        got = await one.get_session(made.session_id, "ann")
        assert got.metadata == {"x": [1, "\u00e9"], "y": 2}
        with pytest.raises(SessionNotFoundError):
            await two.get_session(made.session_id, "mallory")
        with pytest.raises(SessionExistsError):
            await two.create_session("ann", "a", session_id=made.session_id)
    finally:
        await one.aclose()
        await two.aclose()


async def test_system_sessions_are_reserved_unlisted_and_never_deleted_as_conversations(
    manager: SessionManager,
) -> None:
    """``_chatsession.*`` ids hold chatsession's own records (the server's API keys)."""
    await raises_typed(
        manager.create_session("ann", "a", session_id="_chatsession.apikeys"),
        InvalidArgumentError,
    )
    await manager.store.create(SessionRecord(id="_chatsession.apikeys", agent_id="_chatsession"))
    mine = await manager.create_session(None, "_chatsession")
    listed = [s.session_id for s in await manager.get_sessions_by_user(None)]
    assert listed == [mine.session_id]
    assert await manager.delete_agent_sessions("_chatsession") == 1
    assert (await manager.store.get("_chatsession.apikeys")).id == "_chatsession.apikeys"
