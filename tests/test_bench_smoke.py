"""The storage benchmark runs end to end on small sizes and writes valid rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "store_bench.py"


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_store_bench_writes_rows(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--backend",
            backend,
            "--sizes",
            "10,40",
            "--appends",
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
    assert {r["n"] for r in rows} == {10, 40}
    assert all(set(r) == {"backend", "n", "metric", "value", "unit"} for r in rows)
    metrics = {r["metric"] for r in rows}
    assert {"append_p50", "append_p99", "load", "fork"} <= metrics
    assert all(r["value"] >= 0 for r in rows)
    assert "| append_p50 | ms |" in result.stdout
    if backend == "sqlite":
        assert {"size_ratio", "fork_bytes"} <= metrics
        assert "PASS" in result.stdout or "FAIL" in result.stdout
