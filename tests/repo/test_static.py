"""The checks of the README's Development section pass: ruff's lint and format, mypy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        pytest.param(["mypy", "superdml"], marks=pytest.mark.slow),  # 25 s without its cache
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(command):
    tool = shutil.which(command[0])
    assert tool, f"{command[0]} is missing: pip install -e '.[dev]'"
    result = subprocess.run([tool, *command[1:]], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
