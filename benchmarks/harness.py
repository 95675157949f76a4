"""Run one benchmark case in a fresh subprocess and measure its peak memory.

``run_case(script, function, spec)`` runs ``python harness.py SCRIPT FUNCTION SPEC OUT``:
the child imports `script` by path, calls ``function(spec)`` and writes its result (a
JSON object) to OUT. The parent waits with ``os.wait4``, whose rusage covers the child
and every descendant it waited for (dask workers included), and adds
``peak_rss_mb``: the kernel's peak resident set of the largest of those processes.
Each case gets a fresh interpreter, so one case's caches and allocator state never
flatter or burden another.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MiB = 2**20


def run_case(script: Path, function: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``function(spec)`` of `script` in a subprocess; return its result + ``peak_rss_mb``.

    Raises
    ------
    RuntimeError
        When the case exits with an error (its traceback is on stderr).
    """
    with tempfile.TemporaryDirectory(prefix="superdml-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, str(script), function, str(spec_path), str(out_path)]
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{Path(script).name} {function} failed with exit code {code}")
        result = json.loads(out_path.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss * 1024 / MiB  # ru_maxrss is in KiB on Linux
    return result


def _child(script: str, function: str, spec_path: str, out_path: str) -> None:
    module_spec = importlib.util.spec_from_file_location(Path(script).stem, script)
    assert module_spec is not None and module_spec.loader is not None  # a path we wrote
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(Path(script).parent))
    module_spec.loader.exec_module(module)
    result = getattr(module, function)(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(*sys.argv[1:5])
