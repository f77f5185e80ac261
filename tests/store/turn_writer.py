"""A child process appending turns (2 events per append) round-robin over sessions.

Usage: python turn_writer.py URL SESSIONS WRITER TURNS [--barrier]

Sessions are named s0..s{SESSIONS-1}. Each acknowledged event is printed as
``ACK SESSION SEQ PAYLOAD``; conflicts are retried after re-reading the head.

With ``--barrier`` the writer first opens the store (connection and schema
check done), prints ``READY`` and waits for a line on stdin (the parent's
go signal, sent to every writer at once, so that they really overlap), and
at the end prints ``CONFLICTS N``: how many appends lost a race. Without
it the output is only ``ACK`` lines, as before.
"""

from __future__ import annotations

import asyncio
import json
import sys

from chatsession import ConflictError, NewEvent, open_store


async def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--barrier"]
    barrier = len(args) != len(sys.argv) - 1
    url, sessions, writer, turns = args[0], int(args[1]), args[2], int(args[3])
    conflicts = 0
    async with open_store(url) as store:
        heads: dict[str, int] = {}
        if barrier:
            await store.get("s0")  # connect and check the schema before the start
            print("READY", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
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
                    conflicts += 1
                    head = exc.actual if exc.actual is not None else (await store.get(sid)).head
            heads[sid] = head
            for offset, payload in enumerate(payloads):
                print(f"ACK {sid} {head - 1 + offset} {payload}", flush=True)
    if barrier:
        print(f"CONFLICTS {conflicts}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
