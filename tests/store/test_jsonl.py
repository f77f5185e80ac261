"""What only the JSONL folder backend does: layout, torn writes, URLs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from chatsession import (
    CorruptDataError,
    InvalidURLError,
    NewEvent,
    SessionRecord,
    StoreRepairWarning,
    open_store,
)
from chatsession.store.jsonl import JSONLStore


def ev(n: int) -> NewEvent:
    return NewEvent("message", json.dumps({"role": "user", "content": f"m{n}"}), 1.5, f"t{n}")


async def seq_list(url: str, session_id: str = "s") -> list[int]:
    async with open_store(url) as store:
        return [r.seq async for batch in store.read(session_id) for r in batch]


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = open_store(f"file://{tmp_path}/a")
    assert isinstance(absolute, JSONLStore) and absolute.root == tmp_path / "a"
    relative = open_store("file:rel/dir?fsync=1")
    assert isinstance(relative, JSONLStore)
    assert relative.root == tmp_path / "rel" / "dir" and relative.fsync
    for bad in ("file://otherhost/x", "file:///x?sync=1", "file:///x?fsync=maybe"):
        with pytest.raises(InvalidURLError):
            open_store(bad)


async def test_layout_is_plain_json(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s", user_id="alice", title="Hello"))
        await store.append("s", [ev(1), ev(2)], 0)
        await store.append("s", [ev(3)], 2)
        blob = await store.put_blob("s", b"big output")
        await store.fork("s", 2, SessionRecord(id="f"))
    folder = tmp_path / "root" / "s"
    header = json.loads((folder / "session.json").read_text())
    assert header["user_id"] == "alice" and header["title"] == "Hello"
    assert header["children"] == ["f"]
    lines = [json.loads(line) for line in (folder / "context.jsonl").read_text().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3]
    assert lines[0]["data"] == {"role": "user", "content": "m1"}
    assert {"seq", "type", "ts", "turn_id", "v", "data"} <= set(lines[2])
    assert (folder / "offload" / blob).read_bytes() == b"big output"
    fork_header = json.loads((tmp_path / "root" / "f" / "session.json").read_text())
    assert fork_header["parent"] == {"session_id": "s", "seq": 2}
    assert (tmp_path / "root" / "f" / "context.jsonl").read_text() == ""
    if shutil.which("jq"):
        out = subprocess.run(
            ["jq", "-r", ".data.content", str(folder / "context.jsonl")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.split() == ["m1", "m2", "m3"]


@pytest.mark.parametrize(
    "tail",
    [
        b'{"seq":4,"type":"message","ts":1.5,"turn_id":"t4","v":1,"data":{"role":"us',
        b'{"seq":4,"type":"message","ts":1.5,"turn_id":"t4","v":1,"batch":2,"data":{}}\n',
        b'{"seq":4,"ty\n',
    ],
    ids=["torn-line", "unfinished-append", "garbled-last-line"],
)
async def test_torn_tail_is_moved_aside_and_reported(tmp_path: Path, tail: bytes) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1), ev(2), ev(3)], 0)
    log = tmp_path / "root" / "s" / "context.jsonl"
    intact = log.read_bytes()
    with log.open("ab") as f:
        f.write(tail)
    with pytest.warns(StoreRepairWarning, match="moved to"):
        assert await seq_list(url) == [1, 2, 3]
    assert log.read_bytes() == intact
    corrupt = (tmp_path / "root" / "s" / "context.jsonl.corrupt").read_bytes()
    assert tail.rstrip(b"\n") in corrupt
    async with open_store(url) as store:
        assert await store.append("s", [ev(4)], 3) == 4
    assert await seq_list(url) == [1, 2, 3, 4]


async def test_damage_in_the_middle_names_the_line(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(n) for n in range(1, 6)], 0)
    log = tmp_path / "root" / "s" / "context.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[2] = "garbage\n"
    log.write_text("".join(lines))
    with pytest.raises(CorruptDataError, match=r"context.jsonl, line 3"):
        await seq_list(url)


async def test_appends_from_another_store_object_are_seen(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    a, b = open_store(url), open_store(url)
    await a.create(SessionRecord(id="s"))
    assert await a.append("s", [ev(1)], 0) == 1
    assert await b.append("s", [ev(2), ev(3)], 1) == 3  # b has never seen the file
    assert await a.append("s", [ev(4)], 3) == 4  # a's cached head catches up
    assert await seq_list(url) == [1, 2, 3, 4]
    await a.aclose()
    await b.aclose()


async def test_fsync_mode_writes_the_same_files(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root?fsync=1"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1), ev(2)], 0)
    assert await seq_list(url) == [1, 2]
