"""Atomic file writes: write to ``name.sdml-tmp-<pid>``, fsync, then ``os.replace``.

Temporaries carry our tag and the writing process's id, so a later run can tell its
own leftovers (a dead process's) from anything else: a user's ``photos.tmp-2023`` is
never ours. A folder is replaced by renaming the old one aside first
(``.<name>.sdml-old-<pid>``), so an interrupted replace leaves one complete copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_TAG = ".sdml-tmp-"
OLD_TAG = ".sdml-old-"
_TAGGED = re.compile(r"\.sdml-(tmp|old)-(\d+)(?:\.|$)")


def temp_path(path: str | os.PathLike[str], keep_suffix: bool = False) -> Path:
    """Return the temporary sibling name used while `path` is being written.

    ``name.ext.sdml-tmp-<pid>``, or ``name.sdml-tmp-<pid>.ext`` with `keep_suffix` for
    writers that insist on an extension (GeoPackage).
    """
    path = Path(path)
    if keep_suffix:
        return path.with_name(f"{path.stem}{TEMP_TAG}{os.getpid()}{path.suffix}")
    return path.with_name(f"{path.name}{TEMP_TAG}{os.getpid()}")


def aside_path(path: str | os.PathLike[str]) -> Path:
    """Return where an old copy of `path` waits while a new one replaces it."""
    path = Path(path)
    return path.with_name(f".{path.name}{OLD_TAG}{os.getpid()}")


def _fsync(path: Path) -> None:
    if path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(new: Path, final: Path) -> None:
    """Move `new` onto `final`; an existing folder goes aside first, then is deleted."""
    if final.is_dir() and new.is_dir():
        old = aside_path(final)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old)
    else:
        os.replace(new, final)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success move it onto `path`, on failure remove it.

    Works for files and folders: whatever the body creates at the yielded path
    replaces `path` only when the body finishes without an exception.
    """
    final = Path(path)
    tmp = temp_path(final, keep_suffix)
    remove(tmp)
    try:
        yield tmp
        _fsync(tmp)
        replace(tmp, final)
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path) -> None:
    """Delete a file or folder of ours if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_temporary(name: str) -> bool:
    """Whether `name` is one of our temporaries or aside copies (any process's)."""
    return _TAGGED.search(name) is not None


def remove_stale_temporaries(folder: str | os.PathLike[str], recursive: bool = True) -> None:
    """Delete our tagged temporaries in `folder` whose process is gone.

    Only names with our tag and the id of a process that no longer runs are removed
    (an old copy waiting aside whose replacement never arrived is put back instead);
    anything else, a user's ``*.tmp-*`` included, is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    entries = folder.rglob("*") if recursive else folder.iterdir()
    for entry in sorted(entries, key=lambda p: len(p.parts), reverse=True):
        match = _TAGGED.search(entry.name)
        if match is None or _alive(int(match.group(2))) or not os.path.lexists(entry):
            continue
        if match.group(1) == "old":
            original = entry.with_name(entry.name[1 : match.start()])
            if not original.exists():
                os.replace(entry, original)
                continue
        remove(entry)
