"""The README's set-up command and code blocks work as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_names_the_two_setup_commands_and_ci_uses_them() -> None:
    assert (
        """CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -e '.[local]' && chatsession chat""" in README
    )
    test_command = """CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -e '.[dev]' && python -m pytest"""
    assert test_command in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert """run env CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -e '.[dev]'""" in ci
    assert "run python -m pytest" in ci
    assert "unset CHATSESSION_TEST_BACKENDS" in ci  # CI never narrows the backends


def test_quickstart_writes_and_reopens_in_a_new_process(env_setup: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CHATSESSION_DATA_DIR": str(env_setup)},
    )
    assert result.returncode == 0, result.stderr
    assert "[2] user: My name is Alice." in result.stdout
    assert "[3] assistant: Hello, Alice!" in result.stdout
    assert (env_setup / "sessions.db").exists()


def test_python_blocks_run(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{block}\n{result.stderr}"


def test_python_blocks_typecheck_strictly(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    paths = []
    for n, block in enumerate(blocks):
        path = tmp_path / f"readme_block_{n}.py"
        path.write_text(block)
        paths.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *paths],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
