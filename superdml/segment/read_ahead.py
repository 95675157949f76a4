"""A one-slot read-ahead: read the next tile on a reader thread while this one computes.

Tile tasks on a GPU run back to back in one process; without it the GPU waits for GDAL
at the start of every tile. A task claims the read-ahead of its own window (if one was
started), starts the read of the next window, then computes. A read-ahead nobody claims
(another task ran next: a skipped tile, another worker) is dropped by the next
``start``, so at most one window is held ahead. Reads are plain functions of their key;
errors surface in the task that claims the read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_lock = threading.Lock()
_slot: dict[Hashable, Future[Any]] = {}
_reader: ThreadPoolExecutor | None = None


def claim(key: Hashable) -> Future[Any] | None:
    """Return the read-ahead started for `key`, or None; it leaves the slot."""
    with _lock:
        return _slot.pop(key, None)


def start(key: Hashable, read: Callable[[], Any]) -> None:
    """Run `read` on the reader thread as the read-ahead of `key`, replacing any other."""
    global _reader
    with _lock:
        if _reader is None:
            _reader = ThreadPoolExecutor(1, thread_name_prefix="superdml-read-ahead")
        _slot.clear()
        _slot[key] = _reader.submit(read)
