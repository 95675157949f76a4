"""SLIC superpixels of one window as pure functions of numpy arrays.

The per-window steps of the tiled SLIC of :mod:`superdml.segment.stage`, on a window aligned
to its global grid of ``step x step`` cells:

- :func:`scale_bands` scales the raw bands to [0, 1] (the caller divides by the
  compactness);
- :func:`cell_means` seeds one center per cell, :func:`assign_pixels` assigns each pixel
  to the nearest center of its 3 x 3 cells and :func:`update_centers` moves the centers
  to their pixels' means; :func:`slic_centers` iterates both. This is the numpy backend
  and the reference of the torch one (:mod:`superdml.segment.slic_torch`), which keeps its contract;
- :func:`enforce_connectivity` leaves each id one 4-connected region;
- :func:`superpixel_stats` gives each id's table row (area, centroid, box, band means).

The last two run their pixel-level passes as compiled kernels
(:mod:`superdml.segment.regions_numba`) that release the GIL; their results are those of
the numpy formulation (same components, same integer counts, same float64 sums).
"""

from __future__ import annotations

import numpy as np

from superdml.segment.regions_numba import (
    fragment_borders,
    label_runs,
    merge_fragments,
    paint_runs,
    region_sums,
)


def scale_bands(pixels: np.ndarray, lo: list[float], hi: list[float]) -> np.ndarray:
    """Scale each band linearly so that `lo` maps to 0 and `hi` to 1 (not clipped).

    Parameters
    ----------
    pixels : (C, H, W) ndarray, any dtype
    lo, hi : list of float, length C

    Returns
    -------
    (C, H, W) float32 ndarray
    """
    lo_ = np.asarray(lo, dtype=np.float32)[:, None, None]
    span = (np.asarray(hi, dtype=np.float32) - np.asarray(lo, dtype=np.float32))[:, None, None]
    scaled = pixels.astype(np.float32)  # the one new array: the rest runs in place
    scaled -= lo_
    scaled /= span
    return scaled


def cell_means(features: np.ndarray, valid: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Return initial SLIC centers: the mean position and features of each cell's pixels.

    Parameters
    ----------
    features : (C, H, W) float32 ndarray
        H and W are multiples of `step`.
    valid : (H, W) bool ndarray
    step : int

    Returns
    -------
    centers : (H // step, W // step, 2 + C) float32 ndarray
        Row, column (window pixel coordinates) and features of each cell's center.
    active : (H // step, W // step) bool ndarray
        False for cells without a valid pixel.
    """
    c, h, w = features.shape
    ny, nx = h // step, w // step
    weight = valid.reshape(ny, step, nx, step).astype(np.float32)
    count = weight.sum(axis=(1, 3))
    active = count > 0
    safe = np.where(active, count, 1.0)
    rows = np.arange(h, dtype=np.float32).reshape(ny, step, 1, 1)
    cols = np.arange(w, dtype=np.float32).reshape(1, 1, nx, step)
    centers = np.empty((ny, nx, 2 + c), dtype=np.float32)
    centers[..., 0] = (weight * rows).sum(axis=(1, 3)) / safe
    centers[..., 1] = (weight * cols).sum(axis=(1, 3)) / safe
    blocks = features.reshape(c, ny, step, nx, step)
    for band in range(c):
        centers[..., 2 + band] = (blocks[band] * weight).sum(axis=(1, 3)) / safe
    return centers, active


def assign_pixels(
    features: np.ndarray,
    valid: np.ndarray,
    centers: np.ndarray,
    active: np.ndarray,
    step: int,
) -> np.ndarray:
    """One SLIC assignment step: each pixel to the nearest of its 3 x 3 cells' centers.

    Parameters
    ----------
    features : (C, H, W) float32 ndarray
        Band values already divided by the compactness; H, W multiples of `step`.
    valid : (H, W) bool ndarray
    centers : (H // step + 2, W // step + 2, 2 + C) float32 ndarray
        Centers of the window's cells plus a one-cell ring around them (window pixel
        coordinates); ring cells hold neighbouring centers or are inactive.
    active : (H // step + 2, W // step + 2) bool ndarray
    step : int

    Returns
    -------
    (H, W) int64 ndarray
        Flat index into ``centers[:, :, 0]`` of each pixel's center; -1 for invalid
        pixels and pixels with no active center nearby.
    """
    c, h, w = features.shape
    ny, nx = h // step, w // step
    blocks = features.reshape(c, ny, step, nx, step)
    rows = np.arange(h, dtype=np.float32).reshape(ny, step, 1, 1)
    cols = np.arange(w, dtype=np.float32).reshape(1, 1, nx, step)
    inv_s2 = np.float32(1.0 / step**2)
    best_d = np.full((ny, step, nx, step), np.inf, dtype=np.float32)
    best_k = np.full((ny, step, nx, step), -1, dtype=np.int64)
    tmp = np.empty_like(best_d)
    dist = np.empty_like(best_d)
    ext_cols = nx + 2
    base = (np.arange(ny)[:, None] + 1) * ext_cols + np.arange(nx)[None, :] + 1
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sub = centers[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
            on = active[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
            if not on.any():
                continue
            d_row = (rows - sub[:, None, :, None, 0]) ** 2
            d_col = (cols - sub[:, None, :, None, 1]) ** 2
            np.add(d_row, d_col, out=dist)
            dist *= inv_s2
            for band in range(c):
                np.subtract(blocks[band], sub[:, None, :, None, 2 + band], out=tmp)
                np.square(tmp, out=tmp)
                dist += tmp
            dist[~np.broadcast_to(on[:, None, :, None], dist.shape)] = np.inf
            better = dist < best_d
            np.copyto(best_d, dist, where=better)
            k = (base + dy * ext_cols + dx)[:, None, :, None]
            np.copyto(best_k, np.broadcast_to(k, best_k.shape), where=better)
    labels = best_k.reshape(h, w)
    labels[~valid] = -1
    return labels


def update_centers(
    features: np.ndarray,
    valid: np.ndarray,
    assignment: np.ndarray,
    centers: np.ndarray,
) -> np.ndarray:
    """SLIC update step: each center moves to the mean of the pixels assigned to it.

    Parameters
    ----------
    features : (C, H, W) float32 ndarray
    valid : (H, W) bool ndarray
    assignment : (H, W) int64 ndarray
        Flat center index per pixel from :func:`assign_pixels`.
    centers : (Ny, Nx, 2 + C) float32 ndarray
        Current centers; those left without pixels keep their place.

    Returns
    -------
    (Ny, Nx, 2 + C) float32 ndarray
    """
    c, h, w = features.shape
    n = centers.shape[0] * centers.shape[1]
    keep = valid & (assignment >= 0)
    idx = assignment[keep]
    count = np.bincount(idx, minlength=n).astype(np.float64)
    rr, cc = np.nonzero(keep)
    sums = [np.bincount(idx, weights=rr, minlength=n), np.bincount(idx, weights=cc, minlength=n)]
    sums += [np.bincount(idx, weights=features[band][keep], minlength=n) for band in range(c)]
    flat = centers.reshape(n, 2 + c).copy()
    moved = count > 0
    for j, s in enumerate(sums):
        flat[moved, j] = s[moved] / count[moved]
    return flat.reshape(centers.shape)


def slic_centers(
    features: np.ndarray, valid: np.ndarray, step: int, max_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """Run SLIC on a window aligned to the global grid and return its cells' centers.

    Parameters
    ----------
    features : (C, H, W) float32 ndarray
        Band values divided by the compactness; H, W multiples of `step`.
    valid : (H, W) bool ndarray
    step : int
    max_iter : int

    Returns
    -------
    centers : (H // step, W // step, 2 + C) float32 ndarray
    active : (H // step, W // step) bool ndarray
    """
    centers, active = cell_means(features, valid, step)
    for _ in range(max_iter):
        ext_c = np.pad(centers, ((1, 1), (1, 1), (0, 0)))
        ext_a = np.pad(active, 1)
        assignment = assign_pixels(features, valid, ext_c, ext_a, step)
        updated = update_centers(features, valid, assignment, ext_c)
        centers = updated[1:-1, 1:-1]
    return centers, active


def enforce_connectivity(labels: np.ndarray, max_rounds: int = 64) -> np.ndarray:
    """Keep each id's largest 4-connected component; merge the other fragments.

    Round by round, each fragment touching an already resolved component takes that
    component's id, choosing the one it shares the most pixel edges with (ties: the
    smaller id); main components are resolved from the start. Among components of
    equal size the first in raster order is the main one. Every decision depends only
    on the fragment's neighbourhood, so any window holding it decides the same. A
    fragment cut off from every main component (by nodata) keeps its id.

    Parameters
    ----------
    labels : (H, W) integer ndarray
        Superpixel ids, 0 = nodata.
    max_rounds : int
        Bound on the merge rounds (chains of fragments are a few long).

    Returns
    -------
    (H, W) ndarray of the dtype of `labels`
    """
    row_first, start, stop, comp, comp_label, size = label_runs(labels)
    n = comp_label.size - 1
    if n == 0:  # all nodata: a tile's window inside a raster's nodata area
        return labels
    ids = np.arange(1, n + 1)
    order = np.lexsort((ids, -size[1:], comp_label[1:]))
    sorted_comps = ids[order]
    sorted_labels = comp_label[sorted_comps]
    main = sorted_comps[np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]]
    owner = np.full(n + 1, -1, dtype=np.int64)  # the main component each one joins
    owner[main] = main
    if main.size == n:
        return labels
    # pixel edges (fragment, neighbour): the only borders a merge looks at
    fragment = owner < 0
    fragment[0] = False
    first, neighbour, edges = fragment_borders(row_first, start, stop, comp, fragment)
    owner = merge_fragments(first, neighbour, edges, owner, comp_label, max_rounds)
    final = np.where(owner >= 0, comp_label[owner], comp_label)
    final[0] = 0
    return paint_runs(labels.shape, row_first, start, stop, final.astype(labels.dtype)[comp])


def superpixel_stats(
    labels: np.ndarray,
    pixels: np.ndarray,
    row0: int,
    col0: int,
) -> dict[str, np.ndarray]:
    """Per-superpixel area, centroid, bounding box and band means of a window.

    Parameters
    ----------
    labels : (H, W) integer ndarray
        Superpixel ids, 0 = nodata; those of one window span a few grid rows.
    pixels : (C, H, W) ndarray
        Raw band values.
    row0, col0 : int
        Global pixel offset of the window.

    Returns
    -------
    dict of (N,) ndarrays
        ``segment_id``, ``row``, ``col`` (mean global pixel indices), ``row_start``,
        ``row_stop``, ``col_start``, ``col_stop`` (half-open global bounding box),
        ``area_px`` and ``mean`` ((N, C) float64).
    """
    lo, area, position, box, sums = region_sums(labels, pixels)
    present = np.flatnonzero(area)
    area = area[present]
    return {
        "segment_id": present + lo,
        "row": position[present, 0] / area + row0,
        "col": position[present, 1] / area + col0,
        "row_start": box[present, 0] + row0,
        "row_stop": box[present, 1] + row0,
        "col_start": box[present, 2] + col0,
        "col_stop": box[present, 3] + col0,
        "area_px": area,
        "mean": sums[present] / area[:, None],
    }
