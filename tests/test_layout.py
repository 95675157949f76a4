"""The package's layers hold: import contracts, and what training imports at run time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "superdml"


def test_import_contracts_hold():
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "import-linter is missing: pip install -e '.[dev]'"
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_drawer_sorted_by_visibility():
    assert not (PACKAGE / "_private").exists()
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == [
        "cli", "config", "core", "crops", "label", "learn", "raster", "search", "segment", "serve",
    ]  # fmt: skip


@pytest.mark.parametrize("package", ["superdml.learn.train", "superdml.learn.checkpoint"])
def test_training_imports_no_segmentation_or_raster_io(package):
    code = (
        f"import sys, {package}; "
        "print(sorted(m for m in sys.modules if m.startswith(('superdml.segment', "
        "'superdml.raster.io', 'superdml.crops.cut', 'superdml.crops.stage', 'rasterio'))))"
    )
    out = subprocess.run(
        ["python", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
