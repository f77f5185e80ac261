"""Write a conversation to the default store, reopen it in a new process, print it.

Run: python examples/quickstart.py [--store URL]

With no --store, the embedded SQLite default in the user data directory is used
(CHATSESSION_STORE_URL or CHATSESSION_DATA_DIR override it).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import uuid

from chatsession import default_store_url, open_store
from chatsession.log import (
    Message,
    MessageEntry,
    TurnEndEntry,
    TurnStartEntry,
    decode,
    encode,
    fold,
)
from chatsession.store import SessionRecord


async def write(url: str) -> str:
    """Create a session holding one turn and return its id."""
    session_id = "quickstart-" + uuid.uuid4().hex[:8]
    async with open_store(url) as store:
        await store.create(SessionRecord(id=session_id, user_id="alice", title="Quickstart"))
        turn = uuid.uuid4().hex
        events = [
            TurnStartEntry(turn_id=turn),
            MessageEntry(turn_id=turn, data=Message(role="user", content="My name is Alice.")),
            MessageEntry(turn_id=turn, data=Message(role="assistant", content="Hello, Alice!")),
            TurnEndEntry(turn_id=turn),
        ]
        head = await store.append(session_id, [encode(e) for e in events], expected_seq=0)
        print(f"wrote session {session_id} ({head} events) to {store.url}")
    return session_id


async def show(url: str, session_id: str) -> None:
    """Reopen the store (this runs in a fresh process) and print the conversation."""
    async with open_store(url) as store:
        record = await store.get(session_id)
        rows = [row async for batch in store.read(session_id) for row in batch]
        state = fold(decode(rows, session_id))
        print(f"reopened {record.id!r} (title {record.title!r}, owner {record.user_id!r}):")
        for seq, message in state.history:
            print(f"  [{seq}] {message.role}: {message.text}")
        print(f"  turns: {state.turns}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default=None, help="store URL (default: %(default)s)")
    parser.add_argument("--show", metavar="SESSION_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = args.store or default_store_url()
    if url.startswith("memory:"):
        parser.error("memory:// lives in one process only; give a durable store URL")
    if args.show:
        asyncio.run(show(url, args.show))
        return
    session_id = asyncio.run(write(url))
    # a new process proves the conversation survived this one
    subprocess.run([sys.executable, __file__, "--store", url, "--show", session_id], check=True)


if __name__ == "__main__":
    main()
