"""Live events cross workers in few messages: a turn's deltas are gathered, not sent one by one."""

from __future__ import annotations

import asyncio
import json

from chatsession.server.live import (
    LINGER,
    PG_PAYLOAD_LIMIT,
    Delta,
    Item,
    Stored,
    _decode,
    _encode_batch,
    _Remote,
)


def _items(payloads: list[str]) -> list[Item]:
    out: list[Item] = []
    for payload in payloads:
        decoded = _decode(payload)
        assert decoded is not None
        assert decoded[:2] == ("w1", "s1")
        out.extend(decoded[2])
    return out


def test_batch_round_trip_keeps_order_and_ids() -> None:
    items: list[Item] = [Stored(2), *(Delta(2, n, f"w{n} ") for n in range(1, 36)), Stored(4)]
    payloads = _encode_batch("w1", "s1", items)
    assert len(payloads) == 1
    assert _items(payloads) == items


def test_old_single_item_payloads_still_decode() -> None:
    delta = json.dumps({"w": "w1", "s": "s1", "h": 3, "n": 2, "t": "x"})
    stored = json.dumps({"w": "w1", "s": "s1", "q": 5})
    assert _items([delta, stored]) == [Delta(3, 2, "x"), Stored(5)]
    assert _decode("not json") is None
    assert _decode(json.dumps({"w": "w1", "s": "s1", "i": [[]]})) is None


def test_postgres_limit_splits_and_gaps_oversized_deltas() -> None:
    items: list[Item] = [Delta(7, n, "é" * 1000) for n in range(1, 21)]
    items.append(Delta(7, 21, "x" * (PG_PAYLOAD_LIMIT + 10)))
    items.append(Stored(9))
    payloads = _encode_batch("w1", "s1", items, PG_PAYLOAD_LIMIT)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= PG_PAYLOAD_LIMIT for p in payloads)
    got = _items(payloads)
    assert got[:20] == items[:20]
    assert got[20] == Delta(7, 21, None)  # too large: crosses as a gap
    assert got[21] == Stored(9)


class _Recording(_Remote):
    def __init__(self) -> None:
        super().__init__("w1")
        self.batches: list[list[tuple[str, str]]] = []

    async def _send(self, batch: list[tuple[str, str]]) -> None:
        self.batches.append(batch)


async def test_a_turns_items_cross_as_one_message_per_session() -> None:
    remote = _Recording()
    await remote.start(lambda _sid, _item: None)
    try:
        sent: list[Item] = [Stored(2)]
        remote.send("s1", Stored(2))
        for n in range(1, 36):
            remote.send("s1", Delta(2, n, f"w{n} "))
            sent.append(Delta(2, n, f"w{n} "))
            await asyncio.sleep(0)  # a turn yields between deltas
        remote.send("s1", Stored(3))
        remote.send("s1", Stored(4))  # consecutive pointers coalesce
        sent.append(Stored(4))
        remote.send("s2", Stored(1))
        await asyncio.sleep(LINGER * 5)
        assert len(remote.batches) == 1
        (batch,) = remote.batches
        assert [sid for sid, _ in batch] == ["s1", "s2"]
        assert _items([batch[0][1]]) == sent
    finally:
        await remote.aclose()


async def test_received_batches_are_delivered_in_order_and_own_ones_skipped() -> None:
    got: list[tuple[str, Item]] = []
    remote = _Recording()
    await remote.start(lambda sid, item: got.append((sid, item)))
    try:
        items: list[Item] = [Stored(2), Delta(2, 1, "a"), Delta(2, 2, "b")]
        for payload in _encode_batch("other", "s1", items):
            remote.received(payload)
        for payload in _encode_batch("w1", "s1", items):
            remote.received(payload)  # its own: not delivered again
        assert got == [("s1", item) for item in items]
    finally:
        await remote.aclose()
