"""What only the JSONL folder backend does: layout, torn writes, URLs."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chatsession import (
    ConflictError,
    CorruptDataError,
    InvalidURLError,
    NewEvent,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    SessionRecord,
    StoreRepairWarning,
    StoreUnavailableError,
    open_store,
)
from chatsession.store.base import count_events, now
from chatsession.store.jsonl import JSONLStore
from chatsession.store.jsonl import store as jsonl_store
from chatsession.store.jsonl.headers import write_header
from chatsession.store.jsonl.lines import line as _line


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
    assert isinstance(header["create_id"], str) and header["create_id"]
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
        b'{"seq":4,"type":"message","ts":1.5,"turn_id":"t4","v":1,"batch":3,"data":{}}\n{"seq":5,',
    ],
    ids=["torn-line", "unfinished-append", "unfinished-append-torn-line"],
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


@pytest.mark.parametrize(
    "last",
    [
        b'{"seq":4,"ty\n',
        b'{"seq":9,"type":"message","ts":1.5,"turn_id":"t4","v":1,"data":{}}\n',
    ],
    ids=["garbled-last-line", "wrong-seq-last-line"],
)
async def test_a_damaged_complete_last_line_is_not_a_torn_write(
    tmp_path: Path, last: bytes
) -> None:
    # a kill -9 during one write() cannot leave a complete line: this is damage
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1), ev(2), ev(3)], 0)
    log = tmp_path / "root" / "s" / "context.jsonl"
    with log.open("ab") as f:
        f.write(last)
    damaged = log.read_bytes()
    async with open_store(url) as store:
        with pytest.raises(CorruptDataError, match=r"context.jsonl, line 4: .*backup") as info:
            await store.get("s")
        assert "not a write cut off by a crash" in str(info.value)
        with pytest.raises(CorruptDataError, match=r"line 4"):
            await store.append("s", [ev(4)], 3)
        with pytest.raises(CorruptDataError, match=r"line 4"):
            await seq_list(url)
    assert log.read_bytes() == damaged  # nothing moved aside, nothing cut off
    assert not (tmp_path / "root" / "s" / "context.jsonl.corrupt").exists()


async def test_a_session_recreated_by_another_store_object_loses_nothing(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    a, b = open_store(url), open_store(url)
    await a.create(SessionRecord(id="s"))
    assert await a.append("s", [ev(1), ev(2), ev(3)], 0) == 3  # a caches the file's size
    old_size = (tmp_path / "root" / "s" / "context.jsonl").stat().st_size
    await b.delete("s")
    await b.create(SessionRecord(id="s"))
    # one long event: a's old offset falls inside its (complete) line
    long = NewEvent("message", json.dumps({"content": "x" * (2 * old_size)}), 1.5, "b1")
    assert await b.append("s", [long], 0) == 1
    assert [r.seq async for batch in a.read("s") for r in batch] == [1]
    with pytest.raises(ConflictError) as info:
        await a.append("s", [ev(2)], 3)
    assert info.value.actual == 1
    assert await a.append("s", [ev(2)], 1) == 2
    rows = [r async for batch in b.read("s") for r in batch]
    assert [r.seq for r in rows] == [1, 2] and rows[0].data == long.data
    assert not (tmp_path / "root" / "s" / "context.jsonl.corrupt").exists()

    # a new file of exactly the size a remembers, with another head
    size = (tmp_path / "root" / "s" / "context.jsonl").stat().st_size
    await b.delete("s")
    await b.create(SessionRecord(id="s"))
    pad = size - len(_line(1, NewEvent("message", '{"c":""}', 1.5, "b1"), 1))
    same_size = NewEvent("message", json.dumps({"c": "y" * pad}, separators=(",", ":")), 1.5, "b1")
    assert await b.append("s", [same_size], 0) == 1
    assert (tmp_path / "root" / "s" / "context.jsonl").stat().st_size == size
    assert (await a.get("s")).head == 1
    with pytest.raises(ConflictError):
        await a.append("s", [ev(3)], 2)
    assert await seq_list(url) == [1]
    await a.aclose()
    await b.aclose()


async def test_headers_without_create_id_still_work(tmp_path: Path) -> None:
    # sessions written before create_id existed
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1)], 0)
    path = tmp_path / "root" / "s" / "session.json"
    header = json.loads(path.read_text())
    del header["create_id"]
    path.write_text(json.dumps(header))
    async with open_store(url) as store:
        assert await store.append("s", [ev(2)], 1) == 2
        assert (await store.get("s")).head == 2
    assert await seq_list(url) == [1, 2]


async def test_a_store_folder_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "not-a-folder"
    root.write_text("a regular file")
    store = open_store(f"file://{root}")
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "get": lambda: store.get("s"),  # was "not found": a new session would be made
        "list_sessions": lambda: store.list_sessions(),  # was an empty listing
        "create": lambda: store.create(SessionRecord(id="s")),
        "update": lambda: store.update(SessionRecord(id="s"), 1),
        "delete": lambda: store.delete("s"),
        "append": lambda: store.append("s", [ev(1)], 0),
        "read": lambda: seq_list(f"file://{root}"),
        "fork": lambda: store.fork("s", 0, SessionRecord(id="f")),
        "put_blob": lambda: store.put_blob("s", b"x"),
        "get_blob": lambda: store.get_blob("s", "ab" * 32),
        "purge_expired": lambda: store.purge_expired(),
    }
    for name, call in calls.items():
        with pytest.raises(StoreUnavailableError, match="is a file, not a folder") as info:
            await call()
        assert not isinstance(info.value, SessionNotFoundError), name
    assert root.read_text() == "a regular file"
    await store.aclose()


async def test_an_unreadable_header_is_unavailable_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"file://{tmp_path}/root"
    store = open_store(url)
    await store.create(SessionRecord(id="s"))
    real = Path.read_bytes

    def failing(self: Path) -> bytes:
        if self.name == "session.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", failing)
    for call in (store.get("s"), store.list_sessions(), seq_list(url)):
        with pytest.raises(StoreUnavailableError, match="I/O error"):
            await call
    monkeypatch.undo()
    assert (await store.get("s")).head == 0
    await store.aclose()


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC),  # errno given as the only argument
        OSError(errno.EROFS, os.strerror(errno.EROFS)),
        OSError(errno.EIO, os.strerror(errno.EIO)),
    ],
    ids=["ENOSPC", "EROFS", "EIO"],
)
async def test_a_failed_write_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    url = f"file://{tmp_path}/root"
    store = open_store(url)
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(1), ev(2)], 0)
    log = tmp_path / "root" / "s" / "context.jsonl"
    intact = log.read_bytes()
    real = os.write

    def failing(fd: int, data: bytes) -> int:
        if data.startswith(b'{"seq"'):  # the log: write part of it, then fail
            real(fd, data[: len(data) // 2])
            raise error
        return real(fd, data)

    monkeypatch.setattr(os, "write", failing)
    advice = {errno.ENOSPC: "disk is full", errno.EROFS: "read-only", errno.EIO: "I/O error"}
    code = error.errno or error.args[0]
    with pytest.raises(StoreUnavailableError, match=advice[code]) as info:
        await store.append("s", [ev(3), ev(4)], 2)
    assert "Nothing was appended" in str(info.value)
    monkeypatch.undo()
    assert log.read_bytes() == intact
    assert (await store.get("s")).head == 2
    assert await store.append("s", [ev(3)], 2) == 3
    assert await seq_list(url) == [1, 2, 3]
    assert not (tmp_path / "root" / "s" / "context.jsonl.corrupt").exists()
    await store.aclose()


async def test_a_failed_fsync_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"file://{tmp_path}/root?fsync=1"
    store = open_store(url)
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(1)], 0)
    log = tmp_path / "root" / "s" / "context.jsonl"
    intact = log.read_bytes()

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StoreUnavailableError, match="Nothing was appended"):
        await store.append("s", [ev(2)], 1)
    monkeypatch.undo()
    assert log.read_bytes() == intact
    assert await store.append("s", [ev(2)], 1) == 2
    await store.aclose()


@pytest.mark.parametrize(
    "bad", [{"after_seq": -1}, {"upto_seq": -1}, {"batch_size": 0}], ids=lambda kw: str(kw)
)
async def test_bad_read_arguments_are_refused_before_any_io(
    tmp_path: Path, bad: dict[str, int]
) -> None:
    root = tmp_path / "not-a-folder"
    root.write_text("a regular file")  # any I/O would raise StoreUnavailableError
    async with open_store(f"file://{root}") as store:
        for session_id in ("s", "nobody"):
            with pytest.raises(ValueError, match=next(iter(bad))):
                [r async for batch in store.read(session_id, **bad) for r in batch]


async def test_read_streams_batch_by_batch(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    store = open_store(url)
    await store.create(SessionRecord(id="s"))
    await store.append("s", [ev(n) for n in range(1, 51)], 0)
    log = tmp_path / "root" / "s" / "context.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[39] = b"x" * (len(lines[39]) - 1) + b"\n"  # same size: the store's cache stays valid
    log.write_bytes(b"".join(lines))
    seen: list[int] = []
    with pytest.raises(CorruptDataError, match="line 40"):
        async for batch in store.read("s", batch_size=10):
            seen.extend(r.seq for r in batch)
    assert seen == list(range(1, 31))  # the batches before the damage were yielded
    await store.aclose()


async def test_read_memory_is_bounded_by_the_batch_not_the_history(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        for start in range(0, 4000, 500):
            big = [
                NewEvent("message", json.dumps({"n": n, "pad": "x" * 1000}), 1.5)
                for n in range(start, start + 500)
            ]
            await store.append("s", big, start)
    size = (tmp_path / "root" / "s" / "context.jsonl").stat().st_size
    async with open_store(url) as store:  # a fresh object: it walks the whole file once
        tracemalloc.start()
        try:
            count = 0
            async for batch in store.read("s", batch_size=20):
                count += len(batch)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == 4000
    assert peak < size // 8, (peak, size)


async def test_a_session_deleted_during_a_read_is_not_found(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    reader, other = open_store(url), open_store(url)
    await reader.create(SessionRecord(id="s"))
    await reader.append("s", [ev(n) for n in range(1, 7)], 0)
    batches = reader.read("s", batch_size=2)
    assert [r.seq for r in await anext(batches)] == [1, 2]
    await other.delete("s")
    with pytest.raises(SessionNotFoundError):
        await anext(batches)

    # a fork whose deleted parent goes with it: not reported as a missing ancestor
    await other.create(SessionRecord(id="p"))
    await other.append("p", [ev(n) for n in range(1, 5)], 0)
    await other.fork("p", 4, SessionRecord(id="f"))
    await other.append("f", [ev(5), ev(6)], 4)
    await other.delete("p")  # kept, invisibly, for its fork
    batches = reader.read("f", batch_size=2)
    assert [r.seq for r in await anext(batches)] == [1, 2]
    await other.delete("f")  # removes p as well
    assert not (tmp_path / "root" / "p").exists()
    with pytest.raises(SessionNotFoundError):
        async for _ in batches:
            pass
    await reader.aclose()
    await other.aclose()


# -- separators and damage (issue 9) -----------------------------------------------

#: Characters str.splitlines() breaks lines on, besides \n and \r.
SPLITLINES_BREAKS = ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"]


async def test_lines_are_split_on_newline_only(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    text = "a" + "b".join(SPLITLINES_BREAKS) + "z"
    payloads = [
        json.dumps({"content": text, text: text}, ensure_ascii=False, separators=(",", ":")),
        json.dumps([text], ensure_ascii=False, separators=(",", ":")),
    ]
    title = "title" + "".join(SPLITLINES_BREAKS)
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s", title=title, metadata={text: text}))
        await store.append("s", [NewEvent("message", p, 1.5, "t\u2028") for p in payloads], 0)
        await store.append("s", [NewEvent("message", payloads[0], 2.5)], 2)
    log = (tmp_path / "root" / "s" / "context.jsonl").read_bytes()
    # written raw, as JSON allows (json.dumps escapes only the C0 controls among them)
    assert "\u2028".encode() in log and "\u2029".encode() in log and "\x85".encode() in log
    assert log.count(b"\n") == 3
    async with open_store(url) as store:  # a fresh object walks the whole file
        record = await store.get("s")
        assert (record.head, record.title, record.metadata) == (3, title, {text: text})
        rows = [r async for batch in store.read("s", batch_size=1) for r in batch]
    assert [(r.seq, r.data) for r in rows] == [(1, payloads[0]), (2, payloads[1]), (3, payloads[0])]
    assert rows[0].turn_id == "t\u2028"


def _event_line(seq: int, **fields: object) -> str:
    line = {"seq": seq, "type": "message", "ts": 1.5, "turn_id": "t", "v": 1, "data": {}}
    line.update(fields)
    return json.dumps(line, separators=(",", ":"))


DEEP = "[" * 5000 + "]" * 5000

#: Complete lines that are valid JSON (or nearly) but not an event of this log.
DAMAGED_LINES: dict[str, str] = {
    "a list": "[1, 2]",
    "a string": '"message"',
    "null": "null",
    "seq missing": '{"type":"message","ts":1.5,"turn_id":"t","v":1,"data":{}}',
    "type missing": '{"seq":2,"ts":1.5,"turn_id":"t","v":1,"data":{}}',
    "ts missing": '{"seq":2,"type":"message","turn_id":"t","v":1,"data":{}}',
    "data missing": '{"seq":2,"type":"message","ts":1.5,"turn_id":"t","v":1}',
    "seq a string": _event_line("2"),  # type: ignore[arg-type]
    "seq a float": _event_line(2.0),  # type: ignore[arg-type]
    "type a number": _event_line(2, type=5),
    "type null": _event_line(2, type=None),
    "ts a string": _event_line(2, ts="noon"),
    "ts a list": _event_line(2, ts=[1]),
    "ts NaN": _event_line(2).replace('"ts":1.5', '"ts":NaN'),
    "turn_id a number": _event_line(2, turn_id=7),
    "v a string": _event_line(2, v="1"),
    "batch a string": _event_line(2, batch="2"),
    "deeply nested data": _event_line(2).replace('"data":{}', f'"data":{DEEP}'),
    "deeply nested line": DEEP,
    "seq jumps": _event_line(7),
    "seq repeats": _event_line(1),
    "not UTF-8": '{"seq":2,"type":"\udcff"}',
}


@pytest.mark.parametrize("name", list(DAMAGED_LINES))
async def test_a_damaged_line_is_corrupt_data_naming_session_file_and_line(
    tmp_path: Path, name: str
) -> None:
    url = f"file://{tmp_path}/root"
    pad = "x" * 20_000  # room to damage a line in place, at the same size
    async with open_store(url) as warm:
        await warm.create(SessionRecord(id="s"))
        await warm.append("s", [NewEvent("message", json.dumps({"p": pad}), 1.5, "t")] * 3, 0)
        assert (await warm.get("s")).head == 3  # warm knows the file: it will not walk it again
        log = tmp_path / "root" / "s" / "context.jsonl"
        lines = log.read_bytes().split(b"\n")
        damaged = DAMAGED_LINES[name].encode("utf-8", "surrogateescape")
        assert len(damaged) < len(lines[1])
        lines[1] = damaged + b" " * (len(lines[1]) - len(damaged))
        with log.open("r+b") as f:  # in place: same file, same size
            f.write(b"\n".join(lines))

        def check(exc: CorruptDataError) -> None:
            message = str(exc)
            assert "'s'" in message and str(log) in message and "line 2" in message, message
            assert "backup" in message, message

        with pytest.raises(CorruptDataError) as info:  # the read path parses each line
            [r async for batch in warm.read("s") for r in batch]
        check(info.value)
    async with open_store(url) as cold:  # the walk of a fresh object checks every line
        for call in (cold.get("s"), cold.append("s", [ev(4)], 3)):
            with pytest.raises(CorruptDataError) as info:
                await call
            check(info.value)
        with pytest.raises(CorruptDataError) as info:
            [r async for batch in cold.read("s") for r in batch]
        check(info.value)


DAMAGED_HEADERS: dict[str, str] = {
    "a list": '["s"]',
    "a string": '"s"',
    "not JSON": "{ not json",
    "empty": "",
    "another session's": '{"id":"t","created_at":1.0}',
    "id missing": '{"created_at":1.0}',
    "created_at missing": '{"id":"s"}',
    "created_at a string": '{"id":"s","created_at":"yesterday"}',
    "created_at NaN": '{"id":"s","created_at":NaN}',
    "expires_at a string": '{"id":"s","created_at":1.0,"expires_at":"never"}',
    "deleted a string": '{"id":"s","created_at":1.0,"deleted":"no"}',
    "children a string": '{"id":"s","created_at":1.0,"children":"f"}',
    "children of numbers": '{"id":"s","created_at":1.0,"children":[1]}',
    "create_id a number": '{"id":"s","created_at":1.0,"create_id":5}',
    "parent a string": '{"id":"s","created_at":1.0,"parent":"p"}',
    "parent seq a string": '{"id":"s","created_at":1.0,"parent":{"session_id":"p","seq":"1"}}',
    "user_id a number": '{"id":"s","created_at":1.0,"user_id":5}',
    "state unknown": '{"id":"s","created_at":1.0,"state":"deleted"}',
    "metadata a list": '{"id":"s","created_at":1.0,"metadata":[]}',
    "version a string": '{"id":"s","created_at":1.0,"version":"1"}',
    "an unknown field": '{"id":"s","created_at":1.0,"colour":"red"}',
    "deeply nested": '{"id":"s","created_at":1.0,"metadata":{"k":' + DEEP + "}}",
}


@pytest.mark.parametrize("name", list(DAMAGED_HEADERS))
async def test_a_damaged_header_is_corrupt_data_and_skipped_by_listings(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1)], 0)
        await store.create(SessionRecord(id="ok", expires_at=now() + 100))
    header = tmp_path / "root" / "s" / "session.json"
    header.write_text(DAMAGED_HEADERS[name])
    async with open_store(url) as store:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "get": lambda: store.get("s"),
            "append": lambda: store.append("s", [ev(2)], 1),
            "read": lambda: seq_list(url),
            "update": lambda: store.update(SessionRecord(id="s"), 1),
            "fork": lambda: store.fork("s", 0, SessionRecord(id="f")),
            "put_blob": lambda: store.put_blob("s", b"x"),
            "get_blob": lambda: store.get_blob("s", "ab" * 32),
            "delete": lambda: store.delete("s"),
        }
        for call_name, call in calls.items():
            with pytest.raises(CorruptDataError) as info:
                await call()
            message = str(info.value)
            assert "'s'" in message and str(header) in message, (call_name, message)
        with caplog.at_level(logging.WARNING, logger="chatsession.store"):
            assert [r.id for r in (await store.list_sessions()).records] == ["ok"]
            assert await store.purge_expired(before=now() + 1000) == 1
        assert any("'s'" in r.getMessage() for r in caplog.records)


async def test_a_damaged_log_does_not_break_the_listing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        for sid in ("a", "b", "c"):
            await store.create(SessionRecord(id=sid))
            await store.append(sid, [ev(1)], 0)
    with (tmp_path / "root" / "b" / "context.jsonl").open("a") as f:
        f.write("garbage\n")
    async with open_store(url) as store:
        with caplog.at_level(logging.WARNING, logger="chatsession.store"):
            listed = (await store.list_sessions()).records
        assert sorted(r.id for r in listed) == ["a", "c"]
        assert any("'b'" in r.getMessage() and "line 2" in r.getMessage() for r in caplog.records)
        with pytest.raises(CorruptDataError, match="line 2"):
            await store.get("b")


async def test_a_missing_fork_parent_is_corrupt_data(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(1), ev(2)], 0)
        await store.fork("p", 1, SessionRecord(id="f"))
    shutil.rmtree(tmp_path / "root" / "p")
    async with open_store(url) as store:
        with pytest.raises(CorruptDataError, match=r"'f'.*'p' is missing"):
            await seq_list(url, "f")
        with pytest.raises(CorruptDataError, match="'p' is missing"):
            await store.get_blob("f", "ab" * 32)


async def test_what_the_store_creates_is_its_owners_only(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1)], 0)
        blob = await store.put_blob("s", b"secret output")
        await store.get("s")
    root = tmp_path / "root"
    for path in (root, root / "s", root / "s" / "offload"):
        assert path.stat().st_mode & 0o777 == 0o700, path
    for path in (
        root / "s" / "session.json",
        root / "s" / "context.jsonl",
        root / "s" / "offload" / blob,
        root / "s" / ".lock",
        root / ".chatsession.lock",
    ):
        if path.exists():  # lock files may be removed on release
            assert path.stat().st_mode & 0o777 == 0o600, path


# -- issue 10: event ids, leases and snapshots in the folder ------------------------------


async def test_event_ids_leases_and_snapshots_are_plain_files(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    folder = tmp_path / "root" / "s"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        lease = await store.acquire_lease("s", "worker-1", 30)
        batch = [ev(1)._replace(event_id="first-id"), ev(2)]
        assert await store.append("s", batch, 0, lease=lease) == 2
        await store.put_snapshot("s", 2, b"\x00state\n")
    lines = [json.loads(x) for x in (folder / "context.jsonl").read_text().splitlines()]
    assert [x.get("id") for x in lines] == ["first-id", None]
    assert list(lines[0]) == ["seq", "type", "ts", "turn_id", "v", "batch", "id", "data"]
    kept = json.loads((folder / "lease.json").read_text())
    assert kept == {"owner": "worker-1", "token": lease.token, "expires_at": lease.expires_at}
    assert (
        folder / "snapshot.bin"
    ).read_bytes() == b"chatsession-snapshot seq=2 size=7\n\x00state\n"
    async with open_store(url) as store:  # a new store object knows nothing cached
        assert await store.append("s", batch, 0, lease=lease) == 2  # a retry, recognised
        await store.release_lease(lease)
    assert json.loads((folder / "lease.json").read_text())["owner"] is None
    assert len((folder / "context.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "content",
    ['{"owner": "a", "token": "1", "expires_at": 5.0}', "not json", '{"owner": 7, "token": 1}'],
    ids=["token-text", "not-json", "bad-owner"],
)
async def test_a_damaged_lease_file_is_corrupt_data_naming_it(tmp_path: Path, content: str) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.acquire_lease("s", "a", 30)
    lease_file = tmp_path / "root" / "s" / "lease.json"
    lease_file.write_text(content)
    async with open_store(url) as store:
        for call in (
            lambda: store.acquire_lease("s", "b", 30),
            lambda: store.append("s", [ev(1)], 0),
        ):
            with pytest.raises(CorruptDataError) as info:
                await call()
            assert "'s'" in str(info.value) and str(lease_file) in str(info.value)
        lease_file.unlink()  # the advice: remove it when nobody writes
        assert (await store.acquire_lease("s", "b", 30)).token >= 1


@pytest.mark.parametrize(
    "content",
    [
        b"garbage",
        b"chatsession-snapshot seq=1 size=99\nshort",
        b"chatsession-snapshot seq=9 size=1\nx",
    ],
    ids=["no-header", "cut-short", "past-the-head"],
)
async def test_a_damaged_snapshot_file_counts_as_none(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", [ev(1), ev(2)], 0)
        await store.put_snapshot("s", 2, b"good")
        (tmp_path / "root" / "s" / "snapshot.bin").write_bytes(content)
        with caplog.at_level(logging.WARNING, logger="chatsession.store"):
            assert await store.get_snapshot("s") is None
        assert any("snapshot.bin" in r.getMessage() for r in caplog.records)
        await store.put_snapshot("s", 1, b"rebuilt")
        assert await store.get_snapshot("s") == (1, b"rebuilt")


async def test_a_session_kept_for_its_forks_loses_its_lease_and_snapshot_files(
    tmp_path: Path,
) -> None:
    url = f"file://{tmp_path}/root"
    async with open_store(url) as store:
        await store.create(SessionRecord(id="p"))
        await store.append("p", [ev(1)], 0)
        await store.acquire_lease("p", "a", 30)
        await store.put_snapshot("p", 1, b"x")
        await store.fork("p", 1, SessionRecord(id="f"))
        await store.delete("p")
        assert (tmp_path / "root" / "p" / "context.jsonl").exists()  # its fork reads it
        assert not (tmp_path / "root" / "p" / "lease.json").exists()
        assert not (tmp_path / "root" / "p" / "snapshot.bin").exists()


def test_options_are_strict(tmp_path: Path) -> None:
    for url in (
        f"file://{tmp_path}?fsync=1&fsync=0",
        f"file://{tmp_path}?fsync",
        f"file://{tmp_path}?fsync=2",
    ):
        with pytest.raises(InvalidURLError, match=r"fsync|query"):
            open_store(url)
    assert open_store(f"file://{tmp_path}?fsync=on").fsync  # type: ignore[attr-defined]
    assert not open_store(f"file://{tmp_path}", fsync=False).fsync  # type: ignore[attr-defined]


# -- issue 11: figures in session.json, limits, stats, purges ---------------------------


def _usage(total: int) -> NewEvent:
    return NewEvent("usage", json.dumps({"total_tokens": total}), 2.0)


def _header(root: Path, session_id: str) -> dict[str, object]:
    return json.loads((root / session_id / "session.json").read_text())  # type: ignore[no-any-return]


async def test_appends_keep_the_figures_in_the_header_and_a_fork_starts_at_zero(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    first, second = [ev(1), _usage(12)], [ev(3), ev(4), _usage(30)]
    async with open_store(f"file://{root}") as store:
        created = await store.create(SessionRecord(id="s", user_id="ann"))
        assert _header(root, "s")["counts"] == {"messages": 0, "tokens": 0, "bytes": 0, "head": 0}
        await store.append("s", first, 0)
        await store.append("s", second, 2)
        whole = count_events(first + second)
        assert _header(root, "s")["counts"] == {**whole._asdict(), "head": 5}
        assert (await store.get("s")).updated_at > created.updated_at
        await store.fork("s", 2, SessionRecord(id="f", user_id="ann"))
        assert _header(root, "f")["counts"] == {"messages": 0, "tokens": 0, "bytes": 0, "head": 2}
        assert _header(root, "s")["children"] == ["f"] and _header(root, "s")["counts"]
        await store.append("f", [ev(9)], 2)
        assert _header(root, "f")["counts"] == {**count_events([ev(9)])._asdict(), "head": 3}
        stats = await store.stats()
        assert (stats.messages, stats.tokens, stats.bytes) == tuple(
            count_events(first + second + [ev(9)])
        )
        record = await store.get("s")  # an update keeps the figures
        await store.update(record.model_copy(update={"title": "t"}), record.version)
        assert _header(root, "s")["counts"] == {**whole._asdict(), "head": 5}


async def test_a_header_without_figures_is_counted_from_its_log_by_the_next_append(
    tmp_path: Path,
) -> None:
    """Sessions written before the store kept figures: 0 in stats until their next append."""
    root = tmp_path / "root"
    url = f"file://{root}"
    old = [ev(1), _usage(7), ev(3)]
    async with open_store(url) as store:
        await store.create(SessionRecord(id="s"))
        await store.append("s", old, 0)
        await store.fork("s", 1, SessionRecord(id="f"))
        await store.append("f", [ev(2), _usage(5)], 1)
    for sid in ("s", "f"):
        header = _header(root, sid)
        if sid == "s":
            del header["counts"]  # written before the store kept figures
        else:
            header["counts"] = {"messages": -1, "tokens": "2"}  # edited by hand: not trusted
        (root / sid / "session.json").write_text(json.dumps(header))
    async with open_store(url) as store:
        stats = await store.stats()
        assert (stats.sessions, stats.messages, stats.tokens) == (2, 0, 0)
        await store.append("s", [ev(4)], 3)
        await store.append("f", [_usage(1)], 3)
        stats = await store.stats()
        expected = count_events([*old, ev(4), ev(2), _usage(5), _usage(1)])
        assert (stats.messages, stats.tokens, stats.bytes) == tuple(expected)
        assert _header(root, "f")["counts"] == {  # its own events only
            **count_events([ev(2), _usage(5), _usage(1)])._asdict(),
            "head": 4,
        }


async def test_an_append_whose_header_write_fails_stands_and_the_next_counts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    async with open_store(f"file://{root}") as store:
        await store.create(SessionRecord(id="s"))
        real = write_header

        def failing(folder: object, header: dict[str, object]) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(jsonl_store, "write_header", failing)
        with caplog.at_level(logging.WARNING, logger="chatsession.store.jsonl"):
            assert await store.append("s", [ev(1), _usage(4)], 0) == 2
        assert any("figures could not be written" in r.getMessage() for r in caplog.records)
        monkeypatch.setattr(jsonl_store, "write_header", real)
        assert (await store.stats()).messages == 0  # lagging, not wrong for long
        await store.append("s", [ev(3)], 2)
        stats = await store.stats()
        assert (stats.messages, stats.tokens) == (2, 4)
        assert _header(root, "s")["counts"]["head"] == 3  # type: ignore[index]


async def test_stats_read_headers_only_never_a_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    async with open_store(f"file://{root}") as store:
        for n in range(5):
            await store.create(SessionRecord(id=f"s{n}", user_id=f"u{n % 2}", agent_id="a"))
            await store.append(f"s{n}", [ev(1), _usage(n)], 0)
        opened: list[str] = []
        real_open, real_fileio = os.open, io.FileIO

        def spy_open(path: object, *args: object, **kwargs: object) -> int:
            opened.append(str(path))
            return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

        def spy_fileio(path: object, *args: object, **kwargs: object) -> io.FileIO:
            opened.append(str(path))
            return real_fileio(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(io, "FileIO", spy_fileio)
        stats = await store.stats()
        monkeypatch.undo()
        assert (stats.sessions, stats.messages, stats.tokens) == (5, 5, 10)
        assert stats.by_user == {"u0": 3, "u1": 2} and stats.by_agent == {"a": 5}
        assert not [p for p in opened if p.endswith("context.jsonl")], opened
        opened.clear()
        monkeypatch.setattr(io, "FileIO", spy_fileio)
        [e async for b in store.read("s0") for e in b]
        monkeypatch.undo()
        assert any(p.endswith("context.jsonl") for p in opened)  # the spy does see a read


async def test_a_fork_and_an_append_racing_on_one_parent_lose_neither_child_nor_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork writes its parent's header (``children``) under the parent's lock, which
    appends hold to write the figures into that same header: neither write is lost."""
    root = tmp_path / "root"
    url = f"file://{root}"
    async with open_store(url) as writer, open_store(url) as forker:
        await writer.create(SessionRecord(id="p"))
        real = write_header

        def slow(folder: Any, header: dict[str, Any]) -> None:
            if header["id"] == "f":  # the fork's own header: an append gets in meanwhile ...
                time.sleep(0.1)
            elif header["id"] == "p" and not header["children"]:  # ... and writes p's after
                time.sleep(0.2)
            real(folder, header)

        monkeypatch.setattr(jsonl_store, "write_header", slow)

        async def append_soon() -> int:
            await asyncio.sleep(0.03)
            return await writer.append("p", [ev(1)], 0)

        await asyncio.gather(forker.fork("p", 0, SessionRecord(id="f")), append_soon())
        header = _header(root, "p")
        assert header["children"] == ["f"]
        assert header["counts"] == {**count_events([ev(1)])._asdict(), "head": 1}
        await writer.delete("p")  # the fork is known as a child: the parent's log stays
        assert (root / "p" / "context.jsonl").exists()
        assert (await forker.get("f")).parent is not None


async def test_a_create_with_a_limit_counts_under_the_store_lock(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/root"
    stores = [open_store(url) for _ in range(8)]
    try:
        results = await asyncio.gather(
            *(
                s.create(SessionRecord(id=f"s{n}", user_id="ann"), max_per_user=4)
                for n, s in enumerate(stores)
            ),
            return_exceptions=True,
        )
        assert sum(isinstance(r, SessionRecord) for r in results) == 4, results
        assert sum(isinstance(r, SessionLimitError) for r in results) == 4, results
        taken = next(r.id for r in results if isinstance(r, SessionRecord))  # the race's pick
        with pytest.raises(SessionExistsError):  # a taken id is that, whatever the count
            await stores[0].create(SessionRecord(id=taken, user_id="ann"), max_per_user=9)
    finally:
        for s in stores:
            await s.aclose()


async def test_purges_in_several_threads_delete_and_count_each_session_once(
    tmp_path: Path,
) -> None:
    url = f"file://{tmp_path}/root"
    stores = [open_store(url) for _ in range(4)]
    try:
        expires = now() + 0.5
        for n in range(250):  # more than one batch
            await stores[0].create(SessionRecord(id=f"s{n}", expires_at=expires))
        await stores[0].append("s0", [ev(1)], 0)
        await stores[0].fork("s0", 1, SessionRecord(id="kept"))
        await asyncio.sleep(max(0.0, expires - now() + 0.05))
        purged = await asyncio.gather(*(s.purge_expired() for s in stores))
        assert sum(purged) == 250, purged
        assert sorted(p.name for p in (tmp_path / "root").iterdir() if p.is_dir()) == [
            "kept",
            "s0",  # kept (invisibly) for its fork
        ]
        assert [e.seq async for b in stores[1].read("kept") for e in b] == [1]
        assert await stores[2].purge_expired() == 0
    finally:
        for s in stores:
            await s.aclose()
