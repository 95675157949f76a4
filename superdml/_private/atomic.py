"""Atomic file writes: write to ``name.tmp-<pid>``, fsync, then ``os.replace``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path(path: str | os.PathLike[str], keep_suffix: bool = False) -> Path:
    """Return the temporary sibling name used while `path` is being written.

    ``name.ext.tmp-<pid>``, or ``name.tmp-<pid>.ext`` with `keep_suffix` for writers that
    insist on an extension (GeoPackage).
    """
    path = Path(path)
    if keep_suffix:
        return path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _fsync(path: Path) -> None:
    if path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success move it onto `path`, on failure remove it.

    Works for files and folders: whatever the body creates at the yielded path
    replaces `path` only when the body finishes without an exception.
    """
    final = Path(path)
    tmp = temp_path(final, keep_suffix)
    _remove(tmp)
    try:
        yield tmp
        _fsync(tmp)
        if final.is_dir() and tmp.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> None:
    """Delete ``*.tmp-<pid>`` leftovers of interrupted runs in `folder` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.glob("*.tmp-*"):
        _remove(leftover)
