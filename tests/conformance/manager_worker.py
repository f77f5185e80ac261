"""A child process for the store's multi-user calls, started at one instant with its siblings.

Usage::

    python manager_worker.py create URL USER_ID LIMIT SESSION_ID
    python manager_worker.py purge URL

Each opens the store, makes one call so it is connected, prints ``READY``,
waits for a line ``go UNIX_TIME`` on stdin and at that instant:

``create``: ``create(SessionRecord(id=SESSION_ID, user_id=USER_ID),
max_per_user=LIMIT)``: prints ``CREATED`` or ``LIMIT <count>``.

``purge``: ``purge_expired()``: prints ``PURGED <n>``.
"""

from __future__ import annotations

import asyncio
import sys
import time

from chatsession import SessionLimitError, SessionRecord, open_store


async def wait_for_go() -> None:
    print("READY", flush=True)
    word, at = (await asyncio.to_thread(sys.stdin.readline)).split()
    assert word == "go", word
    await asyncio.sleep(max(0.0, float(at) - time.time()))


async def main(argv: list[str]) -> None:
    command, url = argv[0], argv[1]
    async with open_store(url) as store:
        await store.list_sessions(limit=1)  # connected and warm before the start
        if command == "create":
            user_id, limit, session_id = argv[2], int(argv[3]), argv[4]
            await wait_for_go()
            try:
                await store.create(
                    SessionRecord(id=session_id, user_id=user_id), max_per_user=limit
                )
            except SessionLimitError as exc:
                print(f"LIMIT {exc.count}", flush=True)
            else:
                print("CREATED", flush=True)
        elif command == "purge":
            await wait_for_go()
            print(f"PURGED {await store.purge_expired()}", flush=True)
        else:
            raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
