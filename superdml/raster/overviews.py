"""Overviews of label and score rasters: 2x2 mode and 2x2 mean, level by level.

Each level halves the one below it (sizes rounded up: level ``f`` of an ``H x W`` raster
is ``ceil(H / f) x ceil(W / f)``, as GDAL sizes overviews). A block cut by the raster's
last row or column holds only the pixels that are there. Levels computed window by
window equal levels computed on the whole raster as long as each window starts on a
multiple of the largest factor: blocks never straddle two windows.

- :func:`downsample_mode`: the most frequent value of each block, nodata left out; on a
  tie, the value met first in the order top-left, top-right, bottom-left, bottom-right;
  nodata where the whole block is nodata. The class a label overview shows is always a
  class of some pixel below it, never a blend.
- :func:`downsample_mean`: the mean of each block's non-NaN values; NaN where all are NaN.

The kernels are compiled (numba) and release the GIL, so windows computed on threads
run side by side.
"""

from __future__ import annotations

import math

import numba
import numpy as np


def overview_factors(height: int, width: int, block_size: int) -> list[int]:
    """Return the overview factors GDAL's COG driver would make: 2, 4, 8... while needed.

    Levels are added until the smallest fits in one block (``block_size`` on each side);
    a raster that fits in one block has none.

    Examples
    --------
    >>> overview_factors(4096, 4096, 512)
    [2, 4, 8]
    >>> overview_factors(512, 300, 512)
    []
    """
    factors: list[int] = []
    factor = 1
    while max(math.ceil(height / factor), math.ceil(width / factor)) > block_size:
        factor *= 2
        factors.append(factor)
    return factors


def halved_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Return the shape of the level above a ``(H, W)`` level: the halves, rounded up."""
    return (shape[0] + 1) // 2, (shape[1] + 1) // 2


def downsample_mode(src: np.ndarray, nodata: int, out: np.ndarray | None = None) -> np.ndarray:
    """Return the 2x2 mode of an integer raster (the module's rule for ties and nodata).

    Parameters
    ----------
    src : (H, W) integer ndarray
    nodata : int
        The value left out of the counts.
    out : (ceil(H / 2), ceil(W / 2)) ndarray of `src`'s dtype, optional
        Written in place (a view into a larger level is fine).

    Returns
    -------
    (ceil(H / 2), ceil(W / 2)) ndarray of `src`'s dtype
    """
    out = _out(src, out)
    _mode_2x2(src, src.dtype.type(nodata), out)
    return out


def downsample_mean(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Return the 2x2 mean of a float32 raster, NaN left out.

    Parameters
    ----------
    src : (H, W) float32 ndarray
    out : (ceil(H / 2), ceil(W / 2)) float32 ndarray, optional
        Written in place.

    Returns
    -------
    (ceil(H / 2), ceil(W / 2)) float32 ndarray
    """
    out = _out(src, out)
    _mean_2x2(src, out)
    return out


def _out(src: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if src.ndim != 2:
        raise ValueError(f"expected a (H, W) array, got shape {src.shape}")
    shape = halved_shape(src.shape)
    if out is None:
        return np.empty(shape, src.dtype)
    if out.shape != shape or out.dtype != src.dtype:
        raise ValueError(f"out is {out.dtype} {out.shape}, expected {src.dtype} {shape}")
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _block(src: np.ndarray, i: int, j: int) -> tuple:
    """Return the four pixels of block ``(i, j)`` in raster order.

    A block cut by the last row or column repeats that row or column: a repeated pixel
    doubles its own count and weight, which changes neither the mode nor the mean.
    """
    h, w = src.shape
    r0, c0 = 2 * i, 2 * j
    r1, c1 = min(r0 + 1, h - 1), min(c0 + 1, w - 1)
    return src[r0, c0], src[r0, c1], src[r1, c0], src[r1, c1]


@numba.njit(cache=True, nogil=True)
def _mode_2x2(src: np.ndarray, nodata: int, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            a, b, c, d = _block(src, i, j)
            # a value seen twice or more wins, the earliest such first; else the earliest
            # value; a winning nodata gives way to the earliest other value
            if a == b or a == c or a == d:
                out[i, j] = a if a != nodata else (b if b != nodata else (c if c != nodata else d))
            elif b == c or b == d:
                out[i, j] = b if b != nodata else a
            elif c == d:
                out[i, j] = c if c != nodata else a
            else:
                out[i, j] = a if a != nodata else b


@numba.njit(cache=True, nogil=True)
def _mean_2x2(src: np.ndarray, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            a, b, c, d = _block(src, i, j)
            total = a + b + c + d
            if not np.isnan(total):  # no NaN: the same sum, in the same order, as below
                out[i, j] = total * np.float32(0.25)
                continue
            total = np.float32(0.0)
            count = 0
            for value in (a, b, c, d):
                if not np.isnan(value):
                    total += value
                    count += 1
            out[i, j] = total / np.float32(count) if count else np.float32(np.nan)
