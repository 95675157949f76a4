"""The package is laid out by job and its modules and functions stay small (import
contracts: `test_static.py`)."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "superdml"
MODULE_LINES = 500
FUNCTION_LINES = 80
REASON = "# long:"  # a module or function over the limit says why, in a comment holding this


def test_no_drawer_sorted_by_visibility():
    assert not (PACKAGE / "_private").exists()
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == [
        "cli", "config", "core", "crops", "label", "learn", "raster", "search", "segment", "serve",
    ]  # fmt: skip


def _code_lines(node: ast.AST, lines: list[str]) -> int:
    """Lines of a function or module, its docstring left out."""
    body = node.body  # type: ignore[attr-defined]
    first = body[0]
    skip = 0
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        skip = first.end_lineno - first.lineno + 1
    start = getattr(node, "lineno", 1)
    end = getattr(node, "end_lineno", len(lines))
    return end - start + 1 - skip


def _oversized() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        if _code_lines(tree, lines) > MODULE_LINES and REASON not in source:
            found.append(f"{name}: {_code_lines(tree, lines)} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = _code_lines(node, lines)
                text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                if n > FUNCTION_LINES and REASON not in text:
                    found.append(f"{name}: {node.name}() {n} lines")
    return found


def test_modules_and_functions_stay_small_or_say_why():
    assert _oversized() == []


def test_training_imports_no_segmentation_or_raster_io():
    # one fresh process (each pays torch's import): what each module pulled in, in turn
    code = (
        "import importlib, json, sys\n"
        "found = {}\n"
        "for name in ('superdml.learn.checkpoint', 'superdml.learn.train'):\n"
        "    importlib.import_module(name)\n"
        "    found[name] = sorted(m for m in sys.modules if m.startswith(('superdml.segment',"
        " 'superdml.raster.io', 'superdml.crops.cut', 'superdml.crops.stage', 'rasterio')))\n"
        "print(json.dumps(found))\n"
    )
    out = subprocess.run(
        ["python", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == {"superdml.learn.checkpoint": [], "superdml.learn.train": []}


PACKAGES = [
    "cli",
    "config",
    "core",
    "crops",
    "label",
    "learn",
    "raster",
    "search",
    "segment",
    "serve",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_a_package_exports_what_its_modules_declare(name):
    # the lazy export lists copy each module's names: they must not drift from them
    package = importlib.import_module(f"superdml.{name}")
    unresolved = [n for n in package.__all__ if not _resolves(package, n)]
    assert unresolved == []
    modules = list(pkgutil.iter_modules(package.__path__))
    submodules = {m.name for m in modules}
    declared = {
        f"{m.name}.{n}"
        for m in modules
        if not m.ispkg
        for n in getattr(importlib.import_module(f"superdml.{name}.{m.name}"), "__all__", [])
        if n not in submodules
    }
    assert sorted(d for d in declared if d.split(".")[1] not in package.__all__) == []


def _resolves(package, name):
    try:
        getattr(package, name)
    except (AttributeError, ImportError):
        return False
    return True
