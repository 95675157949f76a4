"""Compiled (numba) passes over a label image: components, fragment borders, region sums.

The pixel-level work of :func:`superdml.segment.slic_numpy.enforce_connectivity` and
:func:`superdml.segment.slic_numpy.superpixel_stats`, each one sequential pass over the window
instead of several whole-window numpy passes and their int64 temporaries. Connectivity
works on runs (maximal stretches of one id along a row, a few dozen pixels of a
superpixel): one pass over the pixels finds them, and components, borders and the
relabeled image are computed per run, not per pixel. They release
the GIL, so tile tasks running on threads compute them side by side. Everything here is
exact (integer counts, float64 sums in raster order, as ``np.bincount`` adds them), so
results equal those of the numpy formulation.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def label_runs(
    labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Find the runs of equal, positive ids of each row and their 4-connected components.

    A run is a maximal stretch of one positive id along a row; two runs of one id in
    adjacent rows whose columns overlap are 4-connected. Components are numbered 1,
    2... in the raster order of their first pixel, as
    ``skimage.measure.label(labels, background=0, connectivity=1)`` numbers them: a
    component's first pixel starts its first run, so runs are numbered in raster order.

    Parameters
    ----------
    labels : (H, W) integer ndarray
        Ids, 0 (or less) = background.

    Returns
    -------
    row_first : (H + 1,) int64 ndarray
        Runs of row ``r`` are ``row_first[r]:row_first[r + 1]``, left to right.
    start, stop : (R,) int32 ndarray
        Columns of each run, half-open.
    comp : (R,) int32 ndarray
        Component of each run.
    comp_label : (N + 1,) int64 ndarray
        Id of each component (entry 0: 0).
    size : (N + 1,) int64 ndarray
        Pixels of each component (entry 0: 0).
    """
    # long: one pass collects the runs, one joins overlapping runs of adjacent rows
    # (union-find), one numbers the components: a split would pass the run arrays around
    h, w = labels.shape
    start = np.empty(max(16, h * w // 64), dtype=np.int32)
    stop = np.empty_like(start)
    row_first = np.empty(h + 1, dtype=np.int64)
    n = 0
    for r in range(h):
        row_first[r] = n
        c = 0
        while c < w:
            value = labels[r, c]
            end = c + 1
            while end < w and labels[r, end] == value:
                end += 1
            if value > 0:
                if n == start.size:  # grow: a window of many short runs
                    start = np.concatenate((start, np.empty_like(start)))
                    stop = np.concatenate((stop, np.empty_like(stop)))
                start[n], stop[n] = c, end
                n += 1
            c = end
    row_first[h] = n
    parent = np.arange(n)
    for r in range(1, h):
        above, above_end = row_first[r - 1], row_first[r]
        for q in range(row_first[r], row_first[r + 1]):
            while above < above_end and stop[above] <= start[q]:
                above += 1  # runs above that end before run q starts
            value = labels[r, start[q]]
            k = above
            while k < above_end and start[k] < stop[q]:
                if labels[r - 1, start[k]] == value:
                    a, b = _root(parent, q), _root(parent, k)
                    parent[max(a, b)] = min(a, b)
                k += 1
    comp = np.empty(n, dtype=np.int32)
    number = np.zeros(n, dtype=np.int32)
    comp_label = [np.int64(0)]
    size = [np.int64(0)]
    for r in range(h):
        for q in range(row_first[r], row_first[r + 1]):
            root = _root(parent, q)
            if number[root] == 0:
                number[root] = len(size)
                comp_label.append(np.int64(labels[r, start[q]]))
                size.append(np.int64(0))
            comp[q] = number[root]
            size[comp[q]] += stop[q] - start[q]
    return row_first, start[:n].copy(), stop[:n].copy(), comp, np.array(comp_label), np.array(size)


@numba.njit(cache=True, nogil=True)
def _root(parent: np.ndarray, x: int) -> int:
    """Root of `x` in the union-find forest `parent`, halving the path on the way."""
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def paint_runs(
    shape: tuple[int, int],
    row_first: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    values: np.ndarray,
) -> np.ndarray:
    """Return an (H, W) image of each run's value (:func:`label_runs`), 0 outside them."""
    out = np.zeros(shape, dtype=values.dtype)
    for r in range(shape[0]):
        for q in range(row_first[r], row_first[r + 1]):
            out[r, start[q] : stop[q]] = values[q]
    return out


def label_components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label the 4-connected components of equal, positive ids (see :func:`label_runs`).

    Returns
    -------
    comp : (H, W) int32 ndarray
        Component of each pixel, 0 for background.
    comp_label, size : (N + 1,) int64 ndarray
        As :func:`label_runs`.
    """
    row_first, start, stop, comp, comp_label, size = label_runs(labels)
    return paint_runs(labels.shape, row_first, start, stop, comp), comp_label, size


@numba.njit(cache=True, nogil=True)
def fragment_borders(
    row_first: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    comp: np.ndarray,
    fragment: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel edges between a fragment and another component, counted per pair of runs.

    Parameters
    ----------
    row_first, start, stop, comp : ndarray
        Runs and their components from :func:`label_runs`.
    fragment : (N + 1,) bool ndarray
        Which components are fragments (entry 0 False).

    Returns
    -------
    frag, neighbour, edges : (E,) int64 ndarray
        For each pair of touching runs of two components, one of them a fragment: the
        fragment, the other component and the 4-neighbour pixel edges between the two
        runs (a pair of two fragments appears once for each).
    """
    frag = [np.int64(0)] * 0  # typed empty lists: the appends are in _add_border
    neighbour = [np.int64(0)] * 0
    edges = [np.int64(0)] * 0
    h = row_first.size - 1
    for r in range(h):
        below, below_end = row_first[r + 1], row_first[min(r + 2, h)]
        for q in range(row_first[r], row_first[r + 1]):
            x = comp[q]
            if q + 1 < row_first[r + 1] and start[q + 1] == stop[q]:  # the next run, touching
                _add_border(frag, neighbour, edges, fragment, x, comp[q + 1], 1)
            while below < below_end and stop[below] <= start[q]:
                below += 1
            k = below
            while k < below_end and start[k] < stop[q]:
                if comp[k] != x:
                    overlap = min(stop[k], stop[q]) - max(start[k], start[q])
                    _add_border(frag, neighbour, edges, fragment, x, comp[k], overlap)
                k += 1
    return (
        np.array(frag, dtype=np.int64),
        np.array(neighbour, dtype=np.int64),
        np.array(edges, dtype=np.int64),
    )


@numba.njit(cache=True, nogil=True)
def _add_border(
    frag: list, neighbour: list, edges: list, fragment: np.ndarray, x: int, y: int, n: int
) -> None:
    if fragment[x]:
        frag.append(np.int64(x))
        neighbour.append(np.int64(y))
        edges.append(np.int64(n))
    if fragment[y]:
        frag.append(np.int64(y))
        neighbour.append(np.int64(x))
        edges.append(np.int64(n))


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
