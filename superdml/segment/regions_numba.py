"""Compiled (numba) passes over a label image: components, fragment borders, region sums.

The pixel-level work of :func:`superdml.segment.slic_numpy.enforce_connectivity` and
:func:`superdml.segment.slic_numpy.superpixel_stats`, each one sequential pass over the window
instead of several whole-window numpy passes and their int64 temporaries. They release
the GIL, so tile tasks running on threads compute them side by side. Everything here is
exact (integer counts, float64 sums in raster order, as ``np.bincount`` adds them), so
results equal those of the numpy formulation.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def label_components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label the 4-connected components of equal, positive ids.

    Components are numbered 1, 2... in the raster order of their first pixel, as
    ``skimage.measure.label(labels, background=0, connectivity=1)`` numbers them.

    Parameters
    ----------
    labels : (H, W) integer ndarray
        Ids, 0 (or less) = background.

    Returns
    -------
    comp : (H, W) int32 ndarray
        Component of each pixel, 0 for background.
    comp_label : (N + 1,) int64 ndarray
        Id of each component (entry 0: 0).
    size : (N + 1,) int64 ndarray
        Pixels of each component (entry 0: 0).
    """
    h, w = labels.shape
    comp = np.zeros((h, w), dtype=np.int32)
    stack = np.empty(h * w, dtype=np.int32)
    comp_label = [np.int64(0)]
    size = [np.int64(0)]
    n = 0
    for r0 in range(h):
        for c0 in range(w):
            value = labels[r0, c0]
            if value <= 0 or comp[r0, c0] != 0:
                continue
            n += 1
            comp[r0, c0] = n
            stack[0] = r0 * w + c0
            top, count = 1, 0
            while top > 0:
                top -= 1
                p = stack[top]
                r, c = p // w, p % w
                count += 1
                if r > 0 and comp[r - 1, c] == 0 and labels[r - 1, c] == value:
                    comp[r - 1, c] = n
                    stack[top] = p - w
                    top += 1
                if r < h - 1 and comp[r + 1, c] == 0 and labels[r + 1, c] == value:
                    comp[r + 1, c] = n
                    stack[top] = p + w
                    top += 1
                if c > 0 and comp[r, c - 1] == 0 and labels[r, c - 1] == value:
                    comp[r, c - 1] = n
                    stack[top] = p - 1
                    top += 1
                if c < w - 1 and comp[r, c + 1] == 0 and labels[r, c + 1] == value:
                    comp[r, c + 1] = n
                    stack[top] = p + 1
                    top += 1
            comp_label.append(np.int64(value))
            size.append(np.int64(count))
    return comp, np.array(comp_label), np.array(size)


@numba.njit(cache=True, nogil=True)
def fragment_borders(comp: np.ndarray, fragment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel edges between a fragment and another component, one entry per edge.

    Parameters
    ----------
    comp : (H, W) int32 ndarray
        Components from :func:`label_components`, 0 = background.
    fragment : (N + 1,) bool ndarray
        Which components are fragments (entry 0 False).

    Returns
    -------
    frag, neighbour : (E,) int64 ndarray
        For each 4-neighbour pixel edge between two different non-background components,
        one of them a fragment: the fragment and the other component (an edge between
        two fragments appears once for each).
    """
    h, w = comp.shape
    frag = []
    neighbour = []
    for r in range(h):
        for c in range(w):
            x = comp[r, c]
            if x == 0:
                continue
            for y in (comp[r, c + 1] if c < w - 1 else 0, comp[r + 1, c] if r < h - 1 else 0):
                if y == 0 or y == x:
                    continue
                if fragment[x]:
                    frag.append(np.int64(x))
                    neighbour.append(np.int64(y))
                if fragment[y]:
                    frag.append(np.int64(y))
                    neighbour.append(np.int64(x))
    return np.array(frag, dtype=np.int64), np.array(neighbour, dtype=np.int64)


@numba.njit(cache=True, nogil=True)
def region_sums(
    labels: np.ndarray, pixels: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Area, position sums, bounding box and band sums of every id of a window.

    Parameters
    ----------
    labels : (H, W) integer ndarray
        Ids, 0 = nodata; those of one window span a small range.
    pixels : (C, H, W) ndarray
        Band values, any real dtype.

    Returns
    -------
    lo : int
        Smallest id present (1 when none is); entry ``k`` below is id ``lo + k``.
    area : (N,) int64 ndarray
        Pixels of each id of ``lo .. max id`` (0 for ids not present).
    position : (N, 2) float64 ndarray
        Sums of the row and column indices of its pixels.
    box : (N, 4) int64 ndarray
        First row, last row + 1, first column, last column + 1.
    bands : (N, C) float64 ndarray
        Sums of each band's values over its pixels.
    """
    c_, h, w = pixels.shape
    lo, hi = np.int64(2**62), np.int64(0)
    for r in range(h):
        for c in range(w):
            value = np.int64(labels[r, c])
            if value > 0:
                lo = min(lo, value)
                hi = max(hi, value)
    if hi == 0:
        lo = np.int64(1)
    n = hi - lo + 1
    area = np.zeros(n, dtype=np.int64)
    position = np.zeros((n, 2), dtype=np.float64)
    box = np.empty((n, 4), dtype=np.int64)
    box[:, 0], box[:, 1], box[:, 2], box[:, 3] = h, 0, w, 0
    bands = np.zeros((n, c_), dtype=np.float64)
    for r in range(h):
        for c in range(w):
            value = np.int64(labels[r, c])
            if value <= 0:
                continue
            k = value - lo
            area[k] += 1
            position[k, 0] += r
            position[k, 1] += c
            box[k, 0] = min(box[k, 0], r)
            box[k, 1] = max(box[k, 1], r + 1)
            box[k, 2] = min(box[k, 2], c)
            box[k, 3] = max(box[k, 3], c + 1)
            for b in range(c_):
                bands[k, b] += pixels[b, r, c]
    return int(lo), area, position, box, bands
