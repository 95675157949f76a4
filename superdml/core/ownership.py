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

An output in a bucket (a URI, :mod:`superdml.core.storage`) follows the same rules on a
key prefix: the marker is an object, a prefix holding any object without it is
refused, and the lock is an object created only if absent (S3's ``If-None-Match: *``):
a second writer's create fails and it stops at once. The lock names the host, process
and start time of its holder, and is deleted when the run ends; a lock left by a
killed run on this host (its process is gone) is taken over, one left from another
host is named in the refusal so that a person can delete it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from superdml.core import storage
from superdml.core.atomic import (
    _alive,
    aside_path,
    is_temporary,
    remove,
    remove_stale_temporaries,
)
from superdml.core.errors import InputError, OutputLockedError, SuperDMLError, input_error

MARKER = ".superdml-stage"
LOCK = ".superdml.lock"
_OURS = (MARKER, LOCK)


def owner(folder: str | os.PathLike[str]) -> str | None:
    """Return the stage named by `folder`'s marker, None when it has none."""
    marker = storage.join(folder, MARKER)
    if not storage.isfile(marker):
        return None
    try:
        return str(json.loads(storage.read_text(marker))["stage"])
    except (ValueError, KeyError, TypeError):
        return None


def mark_output(folder: str | os.PathLike[str], stage: str) -> None:
    """Write the marker that says `stage` made `folder`."""
    storage.write_json(storage.join(folder, MARKER), {"stage": stage})


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
    if storage.is_uri(folder):
        _check_prefix(str(storage.location(folder)), stage, tuple(accept))
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise input_error(folder, f"is a file, expected an output folder for superdml {stage}")
    if not folder.is_dir():
        return
    made_by = owner(folder)
    if made_by is None and any(entry.name not in _OURS for entry in folder.iterdir()):
        raise input_error(
            folder,
            f"is not empty and was not made by superdml {stage}: choose another output "
            "folder, or empty it (superdml never writes into folders of yours)",
        )
    _refuse_another_stage(folder, made_by, stage, tuple(accept), "folder")


def _refuse_another_stage(
    location: Path | str, made_by: str | None, stage: str, accept: tuple[str, ...], kind: str
) -> None:
    """Refuse an output folder or prefix (`kind`) that another stage made."""
    if made_by is not None and made_by != stage and made_by not in accept:
        raise input_error(
            location, f"is the output of superdml {made_by}, not {stage}: choose another {kind}"
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
    accept = tuple(accept)
    if storage.is_uri(folder):
        with _claim_prefix(str(storage.location(folder)), stage, accept) as prefix:
            yield prefix  # type: ignore[misc]
        return
    folder = Path(folder)
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


# ----------------------------------------------------------------- in a bucket


def _check_prefix(prefix: str, stage: str, accept: tuple[str, ...]) -> None:
    """:func:`check_output` for a key prefix."""
    if storage.isfile(prefix):
        raise input_error(prefix, f"is an object, expected an output prefix for superdml {stage}")
    made_by = owner(prefix)
    foreign = []
    if made_by is None:
        foreign = [k for k in storage.list_files(prefix) if k not in _OURS]
    if foreign:
        raise input_error(
            prefix,
            f"holds {foreign[0]} and was not made by superdml {stage}: choose another "
            "output prefix, or empty it (superdml never writes into prefixes of yours)",
        )
    _refuse_another_stage(prefix, made_by, stage, accept, "prefix")


def _lock_record() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "token": uuid.uuid4().hex}  # fmt: skip


def _take_prefix_lock(prefix: str) -> dict[str, object]:
    """Create the lock object of `prefix` only if absent; return what it holds.

    A lock of a process of this host that no longer runs (a killed run) is deleted and
    taken once more.

    Raises
    ------
    OutputLockedError
    """
    lock = storage.join(prefix, LOCK)
    for _ in range(2):
        record = _lock_record()
        try:
            storage.write_text(lock, json.dumps(record) + "\n", create_only=True)
            return record
        except FileExistsError:
            pass
        try:
            holder = json.loads(storage.read_text(lock))
        except (ValueError, SuperDMLError):  # gone meanwhile, or not ours: try once more
            holder = {}
        pid = int(holder.get("pid", 0))
        if holder.get("host") == record["host"] and pid > 0 and not _alive(pid):
            storage.delete(lock)  # a killed run's: nobody holds it
            continue
        break
    who = f"pid {holder.get('pid', 'unknown')} on {holder.get('host', 'an unknown host')}"
    raise OutputLockedError(
        f"{prefix}: in use by another superdml run ({who}): wait for it to finish, or "
        f"choose another output prefix (delete {lock} only if no run uses it)"
    )


@contextlib.contextmanager
def _claim_prefix(prefix: str, stage: str, accept: tuple[str, ...]) -> Iterator[str]:
    """:func:`claim_output` for a key prefix (see the module docstring)."""
    _check_prefix(prefix, stage, accept)
    remove_stale_temporaries(storage.scratch_dir(), recursive=False)  # dead uploads' files
    created = not storage.exists(prefix)
    record = _take_prefix_lock(prefix)
    lock = storage.join(prefix, LOCK)
    try:
        _check_prefix(prefix, stage, accept)  # again, now that no other run can change it
        if owner(prefix) is None:
            mark_output(prefix, stage)
        yield prefix
    except BaseException:
        if created and all(k in _OURS for k in storage.list_files(prefix)):
            storage.delete(storage.join(prefix, MARKER))  # failed before writing: nothing left
        raise
    finally:
        with contextlib.suppress(ValueError, SuperDMLError):
            if json.loads(storage.read_text(lock)).get("token") == record["token"]:
                storage.delete(lock)


def foreign_files(folder: str | os.PathLike[str], patterns: Iterable[str]) -> list[str]:
    """Files under `folder` (relative, ``/``-separated) that match none of `patterns`.

    Our marker, lock and tagged temporaries count as matching. `folder` may be a URI's
    prefix (:mod:`superdml.core.storage`).
    """
    patterns = tuple(patterns)
    found = []
    for rel in storage.list_files(folder):
        name = rel.rpartition("/")[2]
        if name in _OURS or is_temporary(name):
            continue
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

    Paths are compared resolved, URIs key by key (a longer name is another prefix).

    Raises
    ------
    InputError
        Naming the output and the input it overlaps.
    """
    out_key = _as_prefix(out)
    for item in inputs:
        key = _as_prefix(item)
        if out_key.startswith(key) or key.startswith(out_key):
            kind = "prefix" if storage.is_uri(out) else "folder"
            raise input_error(
                out,
                f"overlaps the input {item}: writing there could destroy it; "
                f"choose another output {kind}",
            )


def _as_prefix(loc: str | os.PathLike[str]) -> str:
    """`loc` resolved (:func:`superdml.core.storage.resolve`), ending in one ``/``."""
    return storage.resolve(loc).rstrip("/") + "/"
