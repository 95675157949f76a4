"""Preload of the isolated test workers (:mod:`isolated_workers`): deny the client's files.

``dask worker --preload`` imports this file before the worker starts. It installs an
audit hook that raises :class:`PermissionError` on every Python-level open, listing or
``chdir`` of a path under ``SUPERDML_TEST_DENY`` (the test process's temporary root). C
libraries (GDAL, pyarrow, FAISS) open files without Python's audit events; where the
kernel allows it, the worker also runs in a mount namespace in which that root is an
empty file system (:func:`isolated_workers.isolated_cluster`).
"""

from __future__ import annotations

import os
import sys

_DENY = os.path.realpath(os.environ["SUPERDML_TEST_DENY"])
_EVENTS = {"open", "os.listdir", "os.scandir", "os.chdir", "os.mkdir", "os.remove", "os.rename"}


def _denied(path: object) -> bool:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str | os.PathLike):
        return False  # a file descriptor
    full = os.path.realpath(os.fspath(path))
    return full == _DENY or full.startswith(_DENY + os.sep)


def _hook(event: str, args: tuple) -> None:
    if event in _EVENTS and args and _denied(args[0]):
        raise PermissionError(f"isolated worker: {args[0]} belongs to the client")


sys.addaudithook(_hook)
