"""A child process that holds a session's lock through SessionManager.

Usage::

    python lock_worker.py URL SESSION_ID USER_ID TTL

Opens a manager on URL, enters ``manager.lock(SESSION_ID, USER_ID,
owner="lock-worker", ttl=TTL)``, prints ``LOCKED <token>``, and holds it (renewed
in the background) until a line ``release`` arrives on stdin; then leaves the
block and prints ``RELEASED``. Killed while holding it, it frees the session
only when the lease runs out.
"""

from __future__ import annotations

import asyncio
import sys

from chatsession import SessionManager


async def main(url: str, session_id: str, user_id: str, ttl: float) -> None:
    async with SessionManager(url) as manager:
        async with manager.lock(session_id, user_id, owner="lock-worker", ttl=ttl) as lock:
            print(f"LOCKED {lock.token}", flush=True)
            line = await asyncio.to_thread(sys.stdin.readline)
            assert line.strip() == "release", line
        print("RELEASED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
