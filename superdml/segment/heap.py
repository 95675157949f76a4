"""Keep glibc's heap from growing with the number of tiles when tiles run on threads.

glibc gives each thread its own heap arena, serves an allocation below its mmap
threshold from it, and raises that threshold (up to 32 MiB) each time a large block is
freed. With two task threads, tile arrays of tens of MiB and GDAL's blocks come and go
in several arenas that fragment, and the peak resident set grew with the raster (16000²
against 8000²: 1.19x, where one thread gave 1.01x). One arena and a fixed 4 MiB
threshold (every large array its own mapping, returned to the system when freed) keep it
flat (1.05x), as with one thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameters (malloc.h)
M_ARENA_MAX = -8
THRESHOLD_BYTES = 4 * 2**20


@functools.cache
def map_large_allocations() -> bool:
    """Use one heap arena and a 4 MiB mmap threshold in this process; False without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(M_ARENA_MAX, 1))
