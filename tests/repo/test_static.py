"""The project's checkers pass: ruff's lint and format, mypy, the import contracts.

The layers are import contracts in ``pyproject.toml`` (import-linter); the sizes of
modules and functions are checked in ``test_layout.py``.
"""

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
        ["lint-imports"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "import-contracts"],
)
def test_static_check_passes(command):
    tool = shutil.which(command[0])
    assert tool, f"{command[0]} is missing: pip install -e '.[dev]'"
    result = subprocess.run([tool, *command[1:]], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
