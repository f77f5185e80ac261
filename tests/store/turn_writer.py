"""A child process appending turns (2 events per append) round-robin over sessions.

Usage: python turn_writer.py URL SESSIONS WRITER TURNS

Sessions are named s0..s{SESSIONS-1}. Each acknowledged event is printed as
``ACK SESSION SEQ PAYLOAD``; conflicts are retried after re-reading the head.
"""

from __future__ import annotations

import asyncio
import json
import sys

from chatsession import ConflictError, NewEvent, open_store


async def main() -> None:
    url, sessions, writer, turns = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    async with open_store(url) as store:
        heads: dict[str, int] = {}
        for turn in range(turns):
            sid = f"s{turn % sessions}"
            payloads = [f"{writer}-{turn}-u", f"{writer}-{turn}-a"]
            events = [
                NewEvent("message", json.dumps({"p": p}), 1.0, f"{writer}-{turn}") for p in payloads
            ]
            head = heads.get(sid, 0)
            while True:
                try:
                    head = await store.append(sid, events, head)
                    break
                except ConflictError as exc:
                    head = exc.actual if exc.actual is not None else (await store.get(sid)).head
            heads[sid] = head
            for offset, payload in enumerate(payloads):
                print(f"ACK {sid} {head - 1 + offset} {payload}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
