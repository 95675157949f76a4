"""The environment of a child Python process that a test starts.

A child imports the superdml under test (this checkout, wherever it runs from) and
keeps what ``PYTHONPATH`` already held: packages installed there, as on a machine
whose libraries come by ``pip install --target``, must reach the child too.
"""

from __future__ import annotations

import os
from pathlib import Path

import superdml

#: The folder that holds the superdml under test.
SOURCE_ROOT = Path(superdml.__file__).resolve().parents[1]


def child_env(*paths: str | os.PathLike[str], **variables: str) -> dict[str, str]:
    """Return this process's environment for a child Python, with `variables` set.

    ``PYTHONPATH`` is :data:`SOURCE_ROOT`, then `paths`, then what it held before.
    """
    held = os.environ.get("PYTHONPATH")
    entries = [str(SOURCE_ROOT), *map(str, paths), *([held] if held else [])]
    return {**os.environ, **variables, "PYTHONPATH": os.pathsep.join(entries)}
