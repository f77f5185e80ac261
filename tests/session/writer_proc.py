"""A child process writing to one session through ChatSession (for the lease tests).

Usage: python writer_proc.py URL SESSION NAME MODE [TURNS] [LEASE_TTL] [BARRIER]

Modes:
- ``turns``: run TURNS turns, each message ``NAME-i``; print ``ACK i`` as each returns.
- ``slow``: start one long turn (a slow model), print ``STARTED`` once text
  streams, then keep streaming; a LeaseLostError prints ``LOST`` and exits 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time

from chatsession import Agent, ChatSession, LeaseLostError, ScriptedLLM, TextEvent


async def main() -> int:
    url, session_id, name, mode = sys.argv[1:5]
    turns = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    ttl = float(sys.argv[6]) if len(sys.argv) > 6 else 30.0
    barrier = sys.argv[7] if len(sys.argv) > 7 else ""
    if barrier:
        while not os.path.exists(barrier):
            time.sleep(0.01)
    if mode == "turns":
        agent = Agent(ScriptedLLM())
        async with ChatSession(
            agent, session_id, store=url, busy_timeout=300, lease_ttl=ttl, compaction_threshold=None
        ) as session:
            for i in range(turns):
                await session.query(f"{name}-{i}")
                print(f"ACK {i}", flush=True)
        return 0
    agent = Agent(ScriptedLLM(["word " * 400], chunk_delay=0.02))
    session = ChatSession(agent, session_id, store=url, busy_timeout=60, lease_ttl=ttl)
    try:
        started = False
        async with session.stream(f"{name}-slow") as events:
            async for event in events:
                if isinstance(event, TextEvent) and not started:
                    started = True
                    print("STARTED", flush=True)
    except LeaseLostError:
        print("LOST", flush=True)
        return 3
    finally:
        with contextlib.suppress(LeaseLostError):
            await session.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
