"""The SLIC sweep as one compiled CPU kernel (numba): assignment and center sums in one pass.

Eager torch (and numpy) evaluate the nine candidate distances as whole-window passes and
the center update as scatters over materialized value stacks; ``torch.compile`` fuses the
distances but its CPU scatter is an atomic loop. Here each thread walks its band of cell
rows once: per cell it loads the 3 x 3 neighbouring centers, finds each pixel's nearest
(a loop over the cell's columns that LLVM vectorizes) and adds the pixel to its
thread's partial sums. Same arithmetic as :func:`superdml.segment.assign_pixels`
(float32 distance in the same order, offsets in the same order, strict ``<``), so the
labels are those of the numpy path for the same centers.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def slic_sweep(
    features: np.ndarray,
    valid: np.ndarray,
    centers: np.ndarray,
    active: np.ndarray,
    step: int,
    labels: np.ndarray,
    partial: np.ndarray,
) -> None:
    """Assign every pixel to its nearest center and sum the pixels of each center.

    Parameters
    ----------
    features : (C, H, W) float32 ndarray
        Band values divided by the compactness; H, W multiples of `step`.
    valid : (H, W) bool ndarray
    centers : (H // step + 2, W // step + 2, 2 + C) float32 ndarray
        Centers of the window's cells plus a one-cell ring (window pixel coordinates).
    active : (H // step + 2, W // step + 2) bool ndarray
    step : int
    labels : (H, W) int64 ndarray
        Output: flat index into ``centers[:, :, 0]``, -1 for invalid pixels and pixels
        with no active center nearby.
    partial : (T, N, 3 + C) float64 ndarray
        Output, zeroed by the caller: for each of T bands of cell rows (one per thread),
        count, row, column and band sums of the pixels assigned to each of the
        ``N = (H // step + 2) * (W // step + 2)`` centers; ``N == 0`` skips the sums.
    """
    c, h, w = features.shape
    ny, nx = h // step, w // step
    ext_cols = nx + 2
    inv_s2 = np.float32(1.0 / step**2)
    n_bands = partial.shape[0]
    accumulate = partial.shape[1] > 0
    for t in numba.prange(n_bands):
        dist = np.empty(step, dtype=np.float32)
        best_d = np.empty(step, dtype=np.float32)
        best_k = np.empty(step, dtype=np.int64)
        nb = np.empty((9, 2 + c), dtype=np.float32)
        nb_k = np.empty(9, dtype=np.int64)
        acc = np.empty((9, 3 + c), dtype=np.float64)
        for i in range(t * ny // n_bands, (t + 1) * ny // n_bands):
            for j in range(nx):
                n_on = 0
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        if active[i + 1 + dy, j + 1 + dx]:
                            nb[n_on] = centers[i + 1 + dy, j + 1 + dx]
                            nb_k[n_on] = (i + 1 + dy) * ext_cols + j + 1 + dx
                            n_on += 1
                acc[:] = 0.0
                c0 = j * step
                for rr in range(step):
                    r = i * step + rr
                    fr = np.float32(r)
                    for cc in range(step):
                        best_d[cc] = np.inf
                        best_k[cc] = -1
                    for k in range(n_on):
                        d_row = (fr - nb[k, 0]) * (fr - nb[k, 0])
                        for cc in range(step):
                            d_col = np.float32(c0 + cc) - nb[k, 1]
                            dist[cc] = (d_row + d_col * d_col) * inv_s2
                        for b in range(c):
                            for cc in range(step):
                                diff = features[b, r, c0 + cc] - nb[k, 2 + b]
                                dist[cc] += diff * diff
                        for cc in range(step):
                            if dist[cc] < best_d[cc]:
                                best_d[cc] = dist[cc]
                                best_k[cc] = k
                    for cc in range(step):
                        col = c0 + cc
                        k = best_k[cc]
                        if not valid[r, col] or k < 0:
                            labels[r, col] = -1
                            continue
                        labels[r, col] = nb_k[k]
                        if accumulate:
                            acc[k, 0] += 1.0
                            acc[k, 1] += r
                            acc[k, 2] += col
                            for b in range(c):
                                acc[k, 3 + b] += features[b, r, col]
                if accumulate:
                    for k in range(n_on):
                        partial[t, nb_k[k]] += acc[k]
