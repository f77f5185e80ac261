"""The store contract for leases, fencing, retried appends and snapshots, on every backend."""

from __future__ import annotations

import asyncio
import json

import pytest

from chatsession import (
    InvalidArgumentError,
    Lease,
    LeaseLostError,
    NewEvent,
    SessionBusyError,
    SessionNotFoundError,
    SessionRecord,
    Store,
    UnsupportedValueError,
    open_store,
)
from chatsession.store.base import new_event_id


def ev(n: int, event_id: str | None = None) -> NewEvent:
    return NewEvent("message", json.dumps({"n": n}), 1.0, event_id=event_id)


async def rows(store: Store, session_id: str) -> list[int]:
    return [json.loads(r.data)["n"] async for batch in store.read(session_id) for r in batch]


# --------------------------------------------------------------------------
# leases


async def test_a_free_lease_is_taken_and_another_owner_is_told_who_holds_it(
    store: Store,
) -> None:
    await store.create(SessionRecord(id="s"))
    lease = await store.acquire_lease("s", "worker-a", 30)
    assert isinstance(lease, Lease)
    assert (lease.session_id, lease.owner) == ("s", "worker-a") and lease.token >= 1
    with pytest.raises(SessionBusyError) as busy:
        await store.acquire_lease("s", "worker-b", 30)
    assert busy.value.holder == "worker-a"
    assert busy.value.retry_after is not None and 0 < busy.value.retry_after <= 30
    again = await store.acquire_lease("s", "worker-a", 60)  # the holder asks again: renewed
    assert again.token == lease.token and again.expires_at > lease.expires_at


async def test_an_expired_lease_goes_to_the_next_owner_with_a_greater_token(store: Store) -> None:
    await store.create(SessionRecord(id="s"))
    first = await store.acquire_lease("s", "a", 0.3)
    await asyncio.sleep(0.45)
    second = await store.acquire_lease("s", "b", 30)
    assert second.token > first.token
    await store.release_lease(second)
    third = await store.acquire_lease("s", "a", 30)
    assert third.token > second.token  # released and taken again: a new holder


async def test_renewal_keeps_the_token_and_fails_once_another_owner_took_over(
    store: Store,
) -> None:
    await store.create(SessionRecord(id="s"))
    lease = await store.acquire_lease("s", "a", 0.3)
    renewed = await store.renew_lease(lease, 30)
    assert renewed.token == lease.token and renewed.expires_at > lease.expires_at
    late = await store.acquire_lease("s", "a", 0.2)
    await asyncio.sleep(0.35)
    assert (await store.renew_lease(late, 30)).token == late.token  # expired, not taken: renewable
    await store.release_lease(late)
    with pytest.raises(LeaseLostError):
        await store.renew_lease(late, 30)  # released
    taken = await store.acquire_lease("s", "b", 0.2)
    await asyncio.sleep(0.35)
    other = await store.acquire_lease("s", "c", 30)
    with pytest.raises(LeaseLostError):
        await store.renew_lease(taken, 30)  # expired and taken
    assert other.token > taken.token


async def test_only_the_current_holder_releases(store: Store) -> None:
    await store.create(SessionRecord(id="s"))
    old = await store.acquire_lease("s", "a", 0.2)
    await asyncio.sleep(0.3)
    current = await store.acquire_lease("s", "b", 30)
    await store.release_lease(old)  # stale: changes nothing
    with pytest.raises(SessionBusyError):
        await store.acquire_lease("s", "c", 30)
    await store.release_lease(current)
    await store.release_lease(current)  # idempotent
    assert (await store.acquire_lease("s", "c", 30)).token > current.token


async def test_two_store_objects_racing_for_a_lease_give_it_to_one(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(4)] if not store_url.startswith("memory") else []
    if not stores:  # one memory store: its objects do not share sessions
        stores = [open_store(store_url)] * 4
    try:
        await stores[0].create(SessionRecord(id="s"))
        results = await asyncio.gather(
            *(s.acquire_lease("s", f"w{i}", 30) for i, s in enumerate(stores)),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, Lease)]
        lost = [r for r in results if isinstance(r, SessionBusyError)]
        assert len(won) == 1 and len(lost) == 3, results
    finally:
        for s in set(stores):
            await s.aclose()


async def test_lease_calls_check_their_arguments_and_the_session(store: Store) -> None:
    with pytest.raises(SessionNotFoundError):
        await store.acquire_lease("missing", "a", 30)
    await store.create(SessionRecord(id="s"))
    for owner, ttl in (
        ("", 30),
        ("a\nb", 30),
        ("x" * 201, 30),
        (5, 30),
        ("a", 0),
        ("a", -1),
        ("a", float("nan")),
        ("a", float("inf")),
        ("a", True),
        ("a", "30"),
    ):
        with pytest.raises(InvalidArgumentError):
            await store.acquire_lease("s", owner, ttl)  # type: ignore[arg-type]
    for bad in (None, ("s", "a", 1, 0.0), Lease("s", "a", 0, 0.0), Lease("s", "a", True, 0.0)):
        with pytest.raises(InvalidArgumentError):
            await store.release_lease(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# fencing


async def test_appends_under_a_lease_are_refused_once_it_expired_or_was_taken(
    store: Store,
) -> None:
    await store.create(SessionRecord(id="s"))
    lease = await store.acquire_lease("s", "a", 0.3)
    assert await store.append("s", [ev(1)], 0, lease=lease) == 1
    await asyncio.sleep(0.45)
    with pytest.raises(LeaseLostError):  # expired (a paused writer): nothing written
        await store.append("s", [ev(2)], 1, lease=lease)
    taken = await store.acquire_lease("s", "b", 30)
    with pytest.raises(LeaseLostError):  # and taken over
        await store.append("s", [ev(2)], 1, lease=lease)
    assert await store.append("s", [ev(2)], 1, lease=taken) == 2
    assert await rows(store, "s") == [1, 2]
    assert (await store.get("s")).head == 2


async def test_an_append_without_a_lease_waits_for_no_one_but_the_live_holder(
    store: Store,
) -> None:
    await store.create(SessionRecord(id="s"))
    assert await store.append("s", [ev(1)], 0) == 1  # no lease anywhere: free to write
    lease = await store.acquire_lease("s", "a", 30)
    with pytest.raises(SessionBusyError) as busy:
        await store.append("s", [ev(2)], 1)
    assert busy.value.holder == "a"
    await store.release_lease(lease)
    assert await store.append("s", [ev(2)], 1) == 2
    assert await rows(store, "s") == [1, 2]


async def test_a_conflict_is_reported_before_the_lease_is_looked_at(store: Store) -> None:
    await store.create(SessionRecord(id="s"))
    lease = await store.acquire_lease("s", "a", 30)
    await store.append("s", [ev(1)], 0, lease=lease)
    with pytest.raises(Exception) as raised:
        await store.append("s", [ev(9)], 0, lease=lease)
    assert type(raised.value).__name__ == "ConflictError"


# --------------------------------------------------------------------------
# retried appends


async def test_an_append_sent_again_is_applied_once(store: Store) -> None:
    await store.create(SessionRecord(id="s"))
    batch = [ev(1, new_event_id()), ev(2, new_event_id())]
    assert await store.append("s", batch, 0) == 2
    assert await store.append("s", batch, 0) == 2  # the reply was lost: sent again
    assert await rows(store, "s") == [1, 2]
    assert await store.append("s", [ev(3, new_event_id())], 2) == 3
    assert await store.append("s", batch, 0) == 2  # still recognised later on
    with pytest.raises(Exception) as raised:
        await store.append("s", [ev(9, new_event_id())], 0)
    assert type(raised.value).__name__ == "ConflictError"
    with pytest.raises(Exception) as raised:
        await store.append("s", [ev(9)], 0)  # no id: not recognised
    assert type(raised.value).__name__ == "ConflictError"
    ids = [r.event_id async for b in store.read("s") for r in b]
    assert ids == [batch[0].event_id, batch[1].event_id, ids[2]] and ids[2] is not None


async def test_event_ids_are_checked(store: Store) -> None:
    await store.create(SessionRecord(id="s"))
    for bad in ("", "x" * 65, "a b", "ünï", "a/b", 7):
        with pytest.raises(UnsupportedValueError):
            await store.append("s", [ev(1, bad)], 0)  # type: ignore[arg-type]
    assert (await store.get("s")).head == 0


async def test_a_fork_does_not_take_its_parents_appends_for_its_own(store: Store) -> None:
    await store.create(SessionRecord(id="p"))
    batch = [ev(1, new_event_id())]
    await store.append("p", batch, 0)
    await store.fork("p", 1, SessionRecord(id="f"))
    with pytest.raises(Exception) as raised:
        await store.append("f", batch, 0)  # seq 1 is inherited, not an append to "f"
    assert type(raised.value).__name__ == "ConflictError"


# --------------------------------------------------------------------------
# snapshots


async def test_the_latest_snapshot_is_kept(store: Store) -> None:
    await store.create(SessionRecord(id="s"))
    assert await store.get_snapshot("s") is None
    await store.append("s", [ev(1), ev(2), ev(3)], 0)
    await store.put_snapshot("s", 2, b"at two")
    assert await store.get_snapshot("s") == (2, b"at two")
    await store.put_snapshot("s", 1, b"older")  # a lower seq never replaces a higher one
    assert await store.get_snapshot("s") == (2, b"at two")
    blob = bytes(range(256)) * 40
    await store.put_snapshot("s", 3, blob)
    assert await store.get_snapshot("s") == (3, blob)
    await store.put_snapshot("s", 3, b"again")  # the same seq: replaced
    assert await store.get_snapshot("s") == (3, b"again")


async def test_snapshots_are_checked_and_belong_to_one_session(store: Store) -> None:
    with pytest.raises(SessionNotFoundError):
        await store.put_snapshot("missing", 0, b"x")
    with pytest.raises(SessionNotFoundError):
        await store.get_snapshot("missing")
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(1)], 0)
    for seq, data in ((2, b"x"), (-1, b"x"), (True, b"x"), (1.0, b"x")):
        with pytest.raises(InvalidArgumentError):
            await store.put_snapshot("s", seq, data)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedValueError):
        await store.put_snapshot("s", 1, "text")  # type: ignore[arg-type]
    await store.put_snapshot("s", 1, b"parent's")
    await store.fork("s", 1, SessionRecord(id="f"))
    assert await store.get_snapshot("f") is None
    await store.put_snapshot("f", 1, b"fork's")
    assert await store.get_snapshot("s") == (1, b"parent's")
    await store.delete("s")
    with pytest.raises(SessionNotFoundError):
        await store.get_snapshot("s")
    assert await store.get_snapshot("f") == (1, b"fork's")


# --------------------------------------------------------------------------
# more of the contract: ids read back, leases across store objects and time,
# snapshots of a session kept only for its forks


async def test_event_ids_read_back_exactly_also_through_a_fork(store: Store) -> None:
    await store.create(SessionRecord(id="p"))
    ids = [new_event_id(), None, "custom_id-7", new_event_id()]
    await store.append("p", [ev(1, ids[0]), ev(2, ids[1])], 0)
    await store.append("p", [ev(3, ids[2])], 2)
    await store.fork("p", 3, SessionRecord(id="f"))
    await store.append("f", [ev(4, ids[3])], 3)
    assert [r.event_id async for b in store.read("p") for r in b] == ids[:3]
    assert [r.event_id async for b in store.read("f") for r in b] == ids
    assert [r.event_id async for b in store.read("f", after_seq=1, batch_size=1) for r in b] == ids[
        1:
    ]


async def test_a_lease_outlives_the_store_object_that_took_it(durable_url: str) -> None:
    first = open_store(durable_url)
    await first.create(SessionRecord(id="s"))
    lease = await first.acquire_lease("s", "a", 30)
    await first.aclose()
    async with open_store(durable_url) as second:
        with pytest.raises(SessionBusyError) as busy:
            await second.acquire_lease("s", "b", 30)
        assert busy.value.holder == "a"
        with pytest.raises(SessionBusyError):
            await second.append("s", [ev(1)], 0)
        assert await second.append("s", [ev(1)], 0, lease=lease) == 1
        assert (await second.renew_lease(lease, 30)).token == lease.token
        await second.release_lease(lease)
        assert (await second.acquire_lease("s", "b", 30)).token > lease.token


async def test_an_expired_lease_lets_anyone_write_and_a_retry_is_still_recognised(
    store: Store,
) -> None:
    await store.create(SessionRecord(id="s"))
    lease = await store.acquire_lease("s", "a", 0.3)
    batch = [ev(1, new_event_id()), ev(2, new_event_id())]
    assert await store.append("s", batch, 0, lease=lease) == 2
    await asyncio.sleep(0.45)
    assert await store.append("s", [ev(3)], 2) == 3  # no live lease: free to write
    # the holder's reply was lost and it sends the batch again, its lease long gone:
    # the batch is recognised as applied (not refused, not written twice)
    assert await store.append("s", batch, 0, lease=lease) == 2
    with pytest.raises(LeaseLostError):
        await store.append("s", [ev(4)], 3, lease=lease)
    assert await rows(store, "s") == [1, 2, 3]


async def test_a_lease_of_another_session_fences_nothing(store: Store) -> None:
    await store.create(SessionRecord(id="a"))
    await store.create(SessionRecord(id="b"))
    lease_a = await store.acquire_lease("a", "w", 30)
    await store.acquire_lease("b", "w", 30)  # the same token number, most likely
    with pytest.raises(InvalidArgumentError, match="'a'"):
        await store.append("b", [ev(1)], 0, lease=lease_a)
    assert (await store.get("b")).head == 0


async def test_leases_of_an_expired_or_deleted_session_are_not_found(store: Store) -> None:
    await store.create(SessionRecord(id="gone"))
    lease = await store.acquire_lease("gone", "a", 30)
    await store.delete("gone")
    with pytest.raises(SessionNotFoundError):
        await store.renew_lease(lease, 30)
    with pytest.raises(SessionNotFoundError):
        await store.append("gone", [ev(1)], 0, lease=lease)
    await store.release_lease(lease)  # idempotent, also for a session gone
    await store.create(SessionRecord(id="old", expires_at=1.0))
    with pytest.raises(SessionNotFoundError):
        await store.acquire_lease("old", "a", 30)


async def test_a_parent_kept_for_its_forks_has_no_snapshot_and_the_fork_reads_on(
    store: Store,
) -> None:
    await store.create(SessionRecord(id="p"))
    await store.append("p", [ev(1), ev(2)], 0)
    await store.put_snapshot("p", 2, b"parent at two")
    await store.fork("p", 2, SessionRecord(id="f"))
    await store.append("f", [ev(3)], 2)
    await store.put_snapshot("f", 3, b"fork at three")
    await store.delete("p")  # kept, invisibly, for the fork
    for call in (store.get_snapshot("p"), store.put_snapshot("p", 1, b"x")):
        with pytest.raises(SessionNotFoundError):
            await call
    with pytest.raises(SessionNotFoundError):
        await store.acquire_lease("p", "a", 30)
    assert await store.get_snapshot("f") == (3, b"fork at three")
    assert await rows(store, "f") == [1, 2, 3]
    await store.delete("f")  # the last fork goes: so does the parent
    with pytest.raises(SessionNotFoundError):
        await store.get_snapshot("f")
    await store.create(SessionRecord(id="p"))  # the id is free again, with no snapshot
    assert await store.get_snapshot("p") is None


async def test_a_snapshot_is_kept_exactly_across_store_objects(durable_url: str) -> None:
    data = bytes(range(256)) * 4096 + b"\x00\n\r end"
    async with open_store(durable_url) as first:
        await first.create(SessionRecord(id="s"))
        await first.append("s", [ev(1)], 0)
        await first.put_snapshot("s", 1, data)
    async with open_store(durable_url) as second:
        assert await second.get_snapshot("s") == (1, data)
        await second.put_snapshot("s", 0, b"older")
        assert await second.get_snapshot("s") == (1, data)
