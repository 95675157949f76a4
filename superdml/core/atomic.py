"""Atomic file writes: write to ``name.sdml-tmp-<pid>``, fsync, then ``os.replace``.

Temporaries carry our tag and the writing process's id, so a later run can tell its
own leftovers (a dead process's) from anything else: a user's ``photos.tmp-2023`` is
never ours. A folder is replaced by renaming the old one aside first
(``.<name>.sdml-old-<pid>``), so an interrupted replace leaves one complete copy.

Many small files (crops) are written as one batch (:func:`atomic_files`): threads write
and fsync each to its temporary while the caller makes the next (one journal commit
serves many concurrent fsyncs: about 4 ms an fsync one after the other on the
development disk, a tenth of that in a batch; creating a file waits on the disk too),
and all are renamed at the end. Each file is still durable before its name appears.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

TEMP_TAG = ".sdml-tmp-"
OLD_TAG = ".sdml-old-"
WRITE_THREADS = 8  # writing a batch's files: they wait on the disk, not on a core
IN_FLIGHT = 64  # a batch's files handed to its threads and not written yet (bounds memory)
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
    """Fsync a file (a folder written by :func:`atomic_write` is left as it is)."""
    if not path.is_dir():
        _fsync_path(path)


def _fsync_path(path: Path) -> None:
    """Fsync a file or a folder (its entries: the names renamed into it)."""
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


class AtomicFiles:
    """The files of one :func:`atomic_files` batch, handed to its writing threads so far."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._slots = threading.BoundedSemaphore(IN_FLIGHT)
        self._pending: dict[Path, Path] = {}  # final name -> temporary, in write order
        self._jobs: list[Future[None]] = []
        self._folders: set[Path] = set()

    def write(self, path: str | os.PathLike[str], data: bytes) -> None:
        """Write `data` to `path`'s temporary and fsync it, in the background; not visible yet.

        Its folder is made if missing. Waits while ``IN_FLIGHT`` files are not written yet.

        Raises
        ------
        ValueError
            When `path` was already written in this batch.
        """
        final = Path(path)
        if final in self._pending:
            raise ValueError(f"{final}: written twice in one batch")
        if final.parent not in self._folders:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(final.parent)
        tmp = self._pending[final] = temp_path(final)
        self._slots.acquire()
        try:
            self._jobs.append(self._pool.submit(self._write_durable, tmp, data))
        except BaseException:
            self._slots.release()
            raise

    def _write_durable(self, tmp: Path, data: bytes) -> None:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._slots.release()

    def commit(self) -> None:
        """Wait until every temporary is durable, rename each onto its name, sync the folders.

        Raises the first failure of a write (nothing is renamed then).
        """
        for job in self._jobs:
            job.result()
        for final, tmp in self._pending.items():
            os.replace(tmp, final)
        for sync in [self._pool.submit(_fsync_path, folder) for folder in self._folders]:
            sync.result()

    def discard(self) -> None:
        """Stop writing, remove the temporaries (files already renamed are complete, and stay)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for tmp in self._pending.values():
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_files() -> Iterator[AtomicFiles]:
    """Yield a batch to :meth:`~AtomicFiles.write` files into; commit them all on success.

    Files are written and fsynced by ``WRITE_THREADS`` threads while the caller makes
    the next ones. When the body finishes, every file is durable, then renamed onto its
    name, then the folders holding them are fsynced: on return each file is complete
    and durable under its name, and none was visible before its data was durable. On
    an exception the temporaries are removed; a crash leaves only our tagged
    temporaries, which :func:`remove_stale_temporaries` clears. Other files are never
    touched, but a file already at one of the names is replaced (as :func:`atomic_write`
    does).
    """
    with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="atomic-files") as pool:
        batch = AtomicFiles(pool)
        try:
            yield batch
            batch.commit()
        except BaseException:
            batch.discard()
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
