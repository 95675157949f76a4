"""Output folders owned by a stage: a marker naming it, an advisory lock, no foreign files.

Like git, which refuses to overwrite untracked files and holds ``index.lock`` while it
works, a stage

- writes into a folder it creates, an empty one, or one whose marker
  (``.superdml-stage``) names it; a non-empty folder without the marker, or another
  stage's, is refused with one line before anything is written;
- holds an exclusive ``fcntl`` lock (``.superdml.lock``) on that folder while it runs,
  so a second run into the same folder stops at once, naming the process that holds it;
- removes only its own tagged temporaries of dead processes
  (:func:`~superdml.core.atomic.remove_stale_temporaries`), and replaces a folder
  only when every file in it matches the patterns of what the stage writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from superdml.core.atomic import (
    aside_path,
    is_temporary,
    remove,
    remove_stale_temporaries,
    write_json,
)
from superdml.core.errors import InputError, OutputLockedError, input_error

MARKER = ".superdml-stage"
LOCK = ".superdml.lock"
_OURS = (MARKER, LOCK)


def owner(folder: str | os.PathLike[str]) -> str | None:
    """Return the stage named by `folder`'s marker, None when it has none."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["stage"])
    except (ValueError, KeyError, TypeError):
        return None


def mark_output(folder: str | os.PathLike[str], stage: str) -> None:
    """Write the marker that says `stage` made `folder`."""
    write_json(Path(folder) / MARKER, {"stage": stage})


def check_output(folder: str | os.PathLike[str], stage: str, accept: Iterable[str] = ()) -> None:
    """Refuse an output that is a file, or a non-empty folder `stage` does not own.

    Parameters
    ----------
    folder : path
    stage : str
        The stage about to write there.
    accept : iterable of str
        Other stages whose folders `stage` may write into (``export`` into ``label``'s).

    Raises
    ------
    InputError
        One line naming the folder and what to do.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise input_error(folder, f"is a file, expected an output folder for superdml {stage}")
    if not folder.is_dir():
        return
    made_by = owner(folder)
    if made_by is None:
        if any(entry.name not in _OURS for entry in folder.iterdir()):
            raise input_error(
                folder,
                f"is not empty and was not made by superdml {stage}: choose another output "
                "folder, or empty it (superdml never writes into folders of yours)",
            )
    elif made_by != stage and made_by not in accept:
        raise input_error(
            folder, f"is the output of superdml {made_by}, not {stage}: choose another folder"
        )


def _lock(folder: Path) -> int:
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputLockedError(
            f"{folder}: in use by another superdml run (pid {holder}): wait for it to "
            "finish, or choose another output folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def claim_output(
    folder: str | os.PathLike[str], stage: str, accept: Iterable[str] = ()
) -> Iterator[Path]:
    """Own `folder` for the duration of a run: check, create, mark, lock, tidy.

    Yields the folder. Its marker names `stage` unless it already named one of
    `accept`. Leftover temporaries of dead runs in it (and beside it) are removed; an old
    copy left aside by an interrupted replace is put back. A run that fails before it
    wrote anything removes the folders it created.

    Raises
    ------
    InputError
        See :func:`check_output`.
    OutputLockedError
        When another process holds the folder's lock.
    """
    folder = Path(folder)
    accept = tuple(accept)
    remove_stale_temporaries(folder.parent, recursive=False)
    check_output(folder, stage, accept)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder)
    try:
        check_output(folder, stage, accept)  # again, now that no other run can change it
        if owner(folder) is None:
            mark_output(folder, stage)
        remove_stale_temporaries(folder)
        yield folder
    except BaseException:
        if created and all(entry.name in _OURS for entry in folder.iterdir()):
            for name in _OURS:  # a run that failed before writing leaves no folder behind
                (folder / name).unlink(missing_ok=True)
            for path in created:
                with contextlib.suppress(OSError):  # something else appeared there meanwhile
                    path.rmdir()
        raise
    finally:
        os.close(fd)


def foreign_files(folder: str | os.PathLike[str], patterns: Iterable[str]) -> list[str]:
    """Files under `folder` (relative, ``/``-separated) that match none of `patterns`.

    Our marker, lock and tagged temporaries count as matching.
    """
    folder = Path(folder)
    patterns = tuple(patterns)
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_dir() or path.name in _OURS or is_temporary(path.name):
            continue
        rel = path.relative_to(folder).as_posix()
        if not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
            found.append(rel)
    return found


def remove_files(folder: str | os.PathLike[str], patterns: Iterable[str], what: str) -> None:
    """Delete `folder` if every file in it matches `patterns`, else refuse naming one.

    The folder is renamed aside first, so an interruption never leaves half of it.
    `what` names the writer in the message (``superdml label``).
    """
    folder = Path(folder)
    if not folder.exists():
        return
    foreign = foreign_files(folder, patterns)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise InputError(
            f"{folder}: holds {foreign[0]}{more}, which {what} did not write: "
            "move it away, or choose another output folder"
        )
    old = aside_path(folder)
    os.replace(folder, old)
    remove(old)


def remove_output(folder: str | os.PathLike[str], stage: str, patterns: Iterable[str]) -> None:
    """Delete an output folder of `stage` under its lock, if `stage` wrote all of it.

    Raises
    ------
    InputError
        When the folder is not `stage`'s, or holds a file that matches no pattern.
    OutputLockedError
        When a run holds the folder.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    check_output(folder, stage)
    fd = _lock(folder)
    try:
        remove_files(folder, patterns, f"superdml {stage}")
    finally:
        os.close(fd)


def clear_listed(folder: Path, table: Path, listed: Iterable[str], stage: str, reason: str) -> None:
    """Delete the files `table` lists (paths relative to `folder`) and then `table`.

    Only while nobody has added or moved a file: every visible file under `folder` must
    be one the table lists, where the stage wrote it (people sort crops by moving
    them). Hidden files (our marker, lock, state) stay. Emptied sub-folders go.

    Raises
    ------
    InputError
        ``<folder>: <reason>, and <file> is not where superdml <stage> put it ...``.
    """
    present = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p != table
    }
    strangers = sorted(present - set(listed))
    if strangers:
        raise input_error(
            folder,
            f"{reason}, and {strangers[0]} is not where superdml {stage} put it (moved or "
            "added by people?): choose another output folder",
        )
    for name in sorted(present):
        (folder / name).unlink()
    for sub in sorted({(folder / name).parent for name in present} - {folder}, reverse=True):
        with contextlib.suppress(OSError):  # a sub-folder holding other files stays
            sub.rmdir()
    table.unlink()  # last: until then a rerun finds the table and clears again


def check_apart(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs`.

    Raises
    ------
    InputError
        Naming the output and the input it overlaps.
    """
    out_path = Path(out).resolve()
    for item in inputs:
        path = Path(item).resolve()
        if out_path == path or path.is_relative_to(out_path) or out_path.is_relative_to(path):
            raise input_error(
                out,
                f"overlaps the input {item}: writing there could destroy it; "
                "choose another output folder",
            )
