"""The storage benchmark runs end to end on small sizes and writes valid rows."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "store_bench.py"


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_store_bench_writes_rows(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    temporary_before = set(Path(tempfile.gettempdir()).glob("chatsession-bench-*"))
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--backend",
            backend,
            "--sizes",
            "10,41",
            "--appends",
            "5",
            "--warmup",
            "2",
            "--samples",
            "2",
            "--repeat",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows
    assert all(set(r) == {"backend", "n", "metric", "value", "unit"} for r in rows)
    assert {r["backend"] for r in rows} == {backend}
    assert {r["n"] for r in rows} == {10, 41}
    assert all(isinstance(r["value"], int | float) and r["value"] >= 0 for r in rows)
    by = {(r["metric"], r["n"]): r["value"] for r in rows}
    for n in (10, 41):
        for metric in ("append_p50", "append_p99", "open", "load", "load_cold", "fork"):
            assert by[(metric, n)] > 0, (metric, n)
        assert by[("append_p99", n)] >= by[("append_p50", n)]
        # N messages filled (an odd N too), then 2 warm-up and 5 timed turns
        assert by[("messages", n)] == n + 2 * (2 + 5)
        assert by[("json_bytes", n)] > 200 * by[("messages", n)]
    assert "| append_p50 | ms |" in result.stdout
    # two whole runs, one row per (N, metric): the median of the runs
    assert f"[{backend} n=41 run 2/2] 2 + 5 appends of one turn" in result.stderr
    assert len(by) == len(rows)
    if backend == "sqlite":
        for n in (10, 41):
            assert by[("footprint", n)] >= 4096
            assert by[("size_ratio", n)] == pytest.approx(
                by[("footprint", n)] / by[("json_bytes", n)]
            )
            assert 0 <= by[("fork_bytes", n)] <= by[("fork_bytes_max", n)]
        # the targets at N=10,000 are not measured; those at every N are
        assert "- n/a: append p50 <= 0.3 ms at N=10,000" in result.stdout
        assert "- PASS: fork <= 1 ms at every N" in result.stdout or "- FAIL: fork <= 1 ms" in (
            result.stdout
        )
        # the temporary SQLite files are removed
        assert set(Path(tempfile.gettempdir()).glob("chatsession-bench-*")) <= temporary_before


def test_manager_bench_writes_rows(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    script = BENCH.with_name("manager_bench.py")
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--backend",
            "sqlite",
            "--sessions",
            "300",
            "--users",
            "10",
            "--checkpoint",
            "100",
            "--lists",
            "5",
            "--page",
            "5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["metric"], r["n"]): r["value"] for r in rows}
    for n in (100, 300):
        for metric in ("create_rate", "list_p50", "list_p99", "stats_ms", "stats_peak_bytes"):
            assert by[(metric, n)] > 0, (metric, n)
    assert by[("cleanup_rate", 300)] > 0 and by[("rss_mb", 300)] > 0
    assert "get_sessions_by_user p50 <= 5 ms" in result.stdout


def test_server_bench_writes_rows(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    script = BENCH.with_name("server_bench.py")
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--backend",
            "sqlite",
            "--workers",
            "1",
            "--clients",
            "4",
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--stream-every",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(r) == {"backend", "workers", "metric", "value", "unit"} for r in rows)
    by = {r["metric"]: r["value"] for r in rows}
    for metric in ("turns_per_s", "turn_p50", "turn_p99", "first_byte_p50", "floor_rps"):
        assert by[metric] > 0, metric
    assert by["acked_turns"] > 0
    assert by["lost_turns"] == by["duplicate_turns"] == by["errors"] == 0
    assert by["vs_floor"] == pytest.approx(by["turns_per_s"] / by["floor_rps"], rel=1e-2)
    assert "- PASS: no lost turns (1 worker)" in result.stdout
    assert "first byte p50 <= 10 ms (1 worker)" in result.stdout
