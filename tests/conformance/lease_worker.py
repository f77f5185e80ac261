"""A child process that takes a session's write lease and writes under it.

Usage::

    python lease_worker.py race URL SESSION_ID OWNER
    python lease_worker.py hold URL SESSION_ID OWNER TTL
    python lease_worker.py take URL SESSION_ID OWNER COUNT

``race``: opens the store, reads the session, prints ``READY``, waits for a
line ``go UNIX_TIME`` on stdin and at that instant asks for the lease once
(ttl 30 s): prints ``WON <token>`` or ``BUSY <holder>``.

``hold``: takes the lease for TTL seconds and prints ``LEASED <token>``, then
waits for a line on stdin (its parent may stop and continue it meanwhile),
re-reads the head and appends one event under the lease: prints
``ACK <seq>``, ``LOST`` (``LeaseLostError``) or ``ERROR <type> <message>``.

``take``: takes the lease as soon as it is free (waiting out a live one),
prints ``LEASED <token>``, appends COUNT single events under it, printing
``ACK <seq>`` for each, then ``DONE``.

Every event's payload is ``{"owner": OWNER, "n": i}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from chatsession import LeaseLostError, NewEvent, SessionBusyError, open_store


def event(owner: str, n: int) -> NewEvent:
    return NewEvent("message", json.dumps({"owner": owner, "n": n}), time.time())


async def race(url: str, session_id: str, owner: str) -> None:
    async with open_store(url) as store:
        await store.get(session_id)  # connected and warm before the start
        print("READY", flush=True)
        word, at = (await asyncio.to_thread(sys.stdin.readline)).split()
        assert word == "go", word
        await asyncio.sleep(max(0.0, float(at) - time.time()))
        try:
            lease = await store.acquire_lease(session_id, owner, 30)
        except SessionBusyError as exc:
            print(f"BUSY {exc.holder}", flush=True)
        else:
            print(f"WON {lease.token}", flush=True)


async def hold(url: str, session_id: str, owner: str, ttl: float) -> None:
    async with open_store(url) as store:
        lease = await store.acquire_lease(session_id, owner, ttl)
        print(f"LEASED {lease.token}", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        head = (await store.get(session_id)).head
        try:
            seq = await store.append(session_id, [event(owner, 0)], head, lease=lease)
        except LeaseLostError:
            print("LOST", flush=True)
        except Exception as exc:
            print(f"ERROR {type(exc).__name__} {exc}", flush=True)
        else:
            print(f"ACK {seq}", flush=True)


async def take(url: str, session_id: str, owner: str, count: int) -> None:
    async with open_store(url) as store:
        deadline = time.monotonic() + 60
        while True:
            try:
                lease = await store.acquire_lease(session_id, owner, 30)
                break
            except SessionBusyError as exc:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(min(0.2, exc.retry_after or 0.05))
        print(f"LEASED {lease.token}", flush=True)
        head = (await store.get(session_id)).head
        for n in range(count):
            head = await store.append(session_id, [event(owner, n)], head, lease=lease)
            print(f"ACK {head}", flush=True)
        await store.release_lease(lease)
        print("DONE", flush=True)


def main() -> None:
    mode, url, session_id, owner, *rest = sys.argv[1:]
    if mode == "race":
        asyncio.run(race(url, session_id, owner))
    elif mode == "hold":
        asyncio.run(hold(url, session_id, owner, float(rest[0])))
    elif mode == "take":
        asyncio.run(take(url, session_id, owner, int(rest[0])))
    else:
        raise SystemExit(f"unknown mode {mode!r}: race, hold or take")


if __name__ == "__main__":
    main()
