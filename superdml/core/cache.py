"""Heavy objects (models, indexes) loaded once per process, keyed by their content hash."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["ProcessCache"]

T = TypeVar("T")


class ProcessCache(Generic[T]):
    """A small least-recently-used cache whose misses load under one lock.

    Two threads that miss the same key at once get the same object: the second waits
    for the first load instead of loading a copy (one model per process, one lock
    serialising its forwards).

    Parameters
    ----------
    size : int
        Objects kept; the least recently used one is dropped beyond it.
    """

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """Return the object under `key`, calling `load()` only when it is not cached."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = load()
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)
            return value

    def clear(self) -> None:
        """Drop every cached object."""
        with self._lock:
            self._items.clear()
