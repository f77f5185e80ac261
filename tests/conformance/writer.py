"""A child process that appends to a store and reports every acknowledged append.

Usage: python writer.py URL SESSION_ID WRITER_NAME COUNT [TASKS]

Runs TASKS asyncio tasks (default 1), each appending COUNT single events with
a retry on ConflictError. After each acknowledged append it prints
``ACK <seq> <payload id>`` and flushes, so a parent that kills this process
knows exactly what was acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import sys

from chatsession import ConflictError, NewEvent, open_store


async def task(store, session_id: str, name: str, count: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(count):
        payload = f"{name}-{i}"
        event = NewEvent("message", json.dumps({"role": "user", "content": payload}), 1.0, name)
        head = (await store.get(session_id)).head
        while True:
            try:
                seq = await store.append(session_id, [event], head)
                break
            except ConflictError as exc:
                head = exc.actual if exc.actual is not None else (await store.get(session_id)).head
        print(f"ACK {seq} {payload}", flush=True)


async def main() -> None:
    url, session_id, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tasks = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    store = open_store(url)
    try:
        await asyncio.gather(*(task(store, session_id, f"{name}.{t}", count) for t in range(tasks)))
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main())
