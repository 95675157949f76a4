"""Compiled gather: map an array of ids through a dense table, one pass, no temporaries.

The dense path of :class:`superdml.label.predictions.IdTable`. Ids are offset by the table's
first key in unsigned 64-bit arithmetic, so ids below it wrap around past the table's
end and take its last entry, the fill, as ids beyond it do. It releases the GIL, so
windows mapped on threads run side by side.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def gather(ids: np.ndarray, lo: int, table: np.ndarray, out: np.ndarray) -> None:
    """Set ``out[i, j] = table[min(ids[i, j] - lo, len(table) - 1)]``.

    Parameters
    ----------
    ids : (H, W) unsigned integer ndarray
    lo : int
        The id of ``table[0]``.
    table : (N,) ndarray
        Values by ``id - lo``; its last entry is the fill.
    out : (H, W) ndarray of `table`'s dtype
        Written in place (a view into a larger array is fine).
    """
    last = np.uint64(table.shape[0] - 1)
    first = np.uint64(lo)
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            k = np.uint64(ids[i, j]) - first
            out[i, j] = table[k if k < last else last]
