"""A child process that appends to a store and reports every acknowledged append.

Usage: python writer.py URL SESSION_ID WRITER_NAME COUNT [TASKS] [--barrier]

Runs TASKS asyncio tasks (default 1), each appending COUNT single events with
a retry on ConflictError. After each acknowledged append it prints
``ACK <seq> <payload id>`` and flushes, so a parent that kills this process
knows exactly what was acknowledged. At the end it prints ``CONFLICTS <n>``,
how many appends lost a race and were retried.

With ``--barrier`` it first opens the store and reads the session from every
task (so start-up and connecting are done), prints ``READY``, and waits for a
line ``go`` on stdin before appending; ``go UNIX_TIME`` also waits until that
time, so a parent can start every writer (and itself) at the same instant.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from chatsession import ConflictError, NewEvent, open_store


async def task(store, session_id: str, name: str, count: int) -> int:  # type: ignore[no-untyped-def]
    conflicts = 0
    for i in range(count):
        payload = f"{name}-{i}"
        event = NewEvent("message", json.dumps({"role": "user", "content": payload}), 1.0, name)
        head = (await store.get(session_id)).head
        while True:
            try:
                seq = await store.append(session_id, [event], head)
                break
            except ConflictError as exc:
                conflicts += 1
                head = exc.actual if exc.actual is not None else (await store.get(session_id)).head
        print(f"ACK {seq} {payload}", flush=True)
    return conflicts


async def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--barrier"]
    barrier = len(args) != len(sys.argv) - 1
    url, session_id, name, count = args[0], args[1], args[2], int(args[3])
    tasks = int(args[4]) if len(args) > 4 else 1
    store = open_store(url)
    try:
        if barrier:
            # one read per task, at once, so connection pools are filled before READY
            await asyncio.gather(*(store.get(session_id) for _ in range(tasks)))
            print("READY", flush=True)
            line = await asyncio.to_thread(sys.stdin.readline)
            word, *at = line.split()
            if word != "go":
                raise SystemExit(f"expected 'go [UNIX_TIME]' on stdin, got {line!r}")
            if at:
                await asyncio.sleep(max(0.0, float(at[0]) - time.time()))
        counts = await asyncio.gather(
            *(task(store, session_id, f"{name}.{t}", count) for t in range(tasks))
        )
        print(f"CONFLICTS {sum(counts)}", flush=True)
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main())
