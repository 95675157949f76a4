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
    # long: passes that count and collect the runs, join overlapping runs of adjacent
    # rows (union-find) and number the components: a split would pass the arrays around
    h, w = labels.shape
    none = np.empty(0, dtype=np.int32)
    n = 0
    for r in range(h):  # count the runs first: no growing arrays in the hot loop
        n += _row_runs(labels[r], none, none, 0)
    start = np.empty(n, dtype=np.int32)
    stop = np.empty(n, dtype=np.int32)
    row_first = np.empty(h + 1, dtype=np.int64)
    n = 0
    for r in range(h):
        row_first[r] = n
        n += _row_runs(labels[r], start, stop, n)
    row_first[h] = n
    parent = np.arange(n)  # a run's parent is an earlier run (or itself, a root)
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
    for q in range(n):  # in order: the parent's entry already names its root
        parent[q] = parent[parent[q]]
    comp = np.empty(n, dtype=np.int32)
    number = np.zeros(n, dtype=np.int32)
    comp_label = np.zeros(n + 1, dtype=np.int64)
    size = np.zeros(n + 1, dtype=np.int64)
    m = 0
    for r in range(h):
        for q in range(row_first[r], row_first[r + 1]):
            root = parent[q]
            if number[root] == 0:
                m += 1
                number[root] = m
                comp_label[m] = labels[r, start[q]]
            comp[q] = number[root]
            size[comp[q]] += stop[q] - start[q]
    return row_first, start, stop, comp, comp_label[: m + 1], size[: m + 1]


@numba.njit(cache=True, nogil=True)
def _row_runs(row: np.ndarray, start: np.ndarray, stop: np.ndarray, n: int) -> int:
    """Count the runs of positive ids of `row`; store them at `n` when `start` has room."""
    first, found = 0, 0
    for c in range(1, row.size + 1):
        if c == row.size or row[c] != row[c - 1]:
            if row[first] > 0:
                if start.size > 0:
                    start[n + found], stop[n + found] = first, c
                found += 1
            first = c
    return found


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
    """Pixel edges between each fragment and the components it touches, per pair of runs.

    Parameters
    ----------
    row_first, start, stop, comp : ndarray
        Runs and their components from :func:`label_runs`.
    fragment : (N + 1,) bool ndarray
        Which components are fragments (entry 0 False).

    Returns
    -------
    first : (N + 2,) int64 ndarray
        Fragment ``x``'s borders are entries ``first[x]:first[x + 1]``, in raster order.
    neighbour, edges : (E,) int64 ndarray
        For each pair of touching runs of two components, one of them a fragment: the
        other component and the 4-neighbour pixel edges between the two runs (a pair of
        two fragments is listed under each).
    """
    first = np.zeros(fragment.size + 1, dtype=np.int64)
    _walk_borders(row_first, start, stop, comp, fragment, first, first, first, False)
    first = np.cumsum(first)
    neighbour = np.empty(first[-1], dtype=np.int64)
    edges = np.empty(first[-1], dtype=np.int64)
    cursor = first[:-1].copy()
    _walk_borders(row_first, start, stop, comp, fragment, cursor, neighbour, edges, True)
    return first, neighbour, edges


@numba.njit(cache=True, nogil=True)
def _walk_borders(
    row_first: np.ndarray,
    start: np.ndarray,
    stop: np.ndarray,
    comp: np.ndarray,
    fragment: np.ndarray,
    cursor: np.ndarray,
    neighbour: np.ndarray,
    edges: np.ndarray,
    fill: bool,
) -> None:
    """Visit every pair of touching runs of two components, in raster order.

    Without `fill`, count each fragment's borders into ``cursor[x + 1]``; with it, write
    them at ``cursor[x]`` (advanced) into `neighbour` and `edges`.
    """
    h = row_first.size - 1
    for r in range(h):
        below, below_end = row_first[r + 1], row_first[min(r + 2, h)]
        for q in range(row_first[r], row_first[r + 1]):
            x = comp[q]
            if q + 1 < row_first[r + 1] and start[q + 1] == stop[q]:  # the next run, touching
                _border(fragment, cursor, neighbour, edges, fill, x, comp[q + 1], 1)
            while below < below_end and stop[below] <= start[q]:
                below += 1
            k = below
            while k < below_end and start[k] < stop[q]:
                if comp[k] != x:
                    overlap = min(stop[k], stop[q]) - max(start[k], start[q])
                    _border(fragment, cursor, neighbour, edges, fill, x, comp[k], overlap)
                k += 1


@numba.njit(cache=True, nogil=True)
def _border(
    fragment: np.ndarray,
    cursor: np.ndarray,
    neighbour: np.ndarray,
    edges: np.ndarray,
    fill: bool,
    x: int,
    y: int,
    n: int,
) -> None:
    for a, b in ((x, y), (y, x)):
        if not fragment[a]:
            continue
        if fill:
            neighbour[cursor[a]] = b
            edges[cursor[a]] = n
            cursor[a] += 1
        else:
            cursor[a + 1] += 1


@numba.njit(cache=True, nogil=True)
def merge_fragments(
    first: np.ndarray,
    neighbour: np.ndarray,
    edges: np.ndarray,
    owner: np.ndarray,
    comp_label: np.ndarray,
    max_rounds: int,
) -> np.ndarray:
    """Merge fragments, round by round, into the component they share most edges with.

    In each round, every fragment touching components already resolved (at the start of
    the round) joins the id it shares the most pixel edges with (summed over the
    components resolved to that id; ties: the smaller id). Rounds stop when none joins,
    or after `max_rounds`.

    Parameters
    ----------
    first, neighbour, edges : ndarray
        Borders of each fragment, from :func:`fragment_borders`.
    owner : (N + 1,) int64 ndarray
        The main component each component is resolved to: itself for main components,
        -1 for fragments (and entry 0). Each id has one main component.
    comp_label : (N + 1,) int64 ndarray
        Id of each component.
    max_rounds : int

    Returns
    -------
    (N + 1,) int64 ndarray
        `owner` with the merged fragments resolved; -1 for fragments cut off from every
        main component.
    """
    owner = owner.copy()
    pending = np.flatnonzero(first[1:] > first[:-1])  # fragments with borders
    total = np.zeros(owner.size, dtype=np.int64)  # edges per main component, reset after use
    touched = np.empty(max(1, neighbour.size), dtype=np.int64)
    joins = np.empty(pending.size, dtype=np.int64)
    targets = np.empty(pending.size, dtype=np.int64)
    for _ in range(max_rounds):
        n_joins, n_left = 0, 0
        for x in pending:
            n_touched = 0
            for i in range(first[x], first[x + 1]):
                main = owner[neighbour[i]]
                if main < 0:
                    continue
                if total[main] == 0:
                    touched[n_touched] = main
                    n_touched += 1
                total[main] += edges[i]
            best = -1
            for j in range(n_touched):
                main = touched[j]
                if (
                    best < 0
                    or total[main] > total[best]
                    or (total[main] == total[best] and comp_label[main] < comp_label[best])
                ):
                    best = main
            for j in range(n_touched):
                total[touched[j]] = 0
            if best >= 0:
                joins[n_joins], targets[n_joins] = x, best
                n_joins += 1
            else:
                pending[n_left] = x
                n_left += 1
        if n_joins == 0:
            break
        owner[joins[:n_joins]] = targets[:n_joins]  # after the round: decided on its start
        pending = pending[:n_left]
    return owner


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
