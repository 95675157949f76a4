"""The SLIC sweep as one compiled CPU kernel (numba): assignment and center sums in one pass.

Eager torch (and numpy) evaluate the nine candidate distances as whole-window passes and
the center update as scatters over materialized value stacks; ``torch.compile`` fuses the
distances but its CPU scatter is an atomic loop. Here each thread walks its band of cell
rows once: per cell row it spreads the 3 x 3 neighbouring centers over the columns,
finds each pixel's nearest with loops over whole pixel rows that LLVM vectorizes, and
adds the pixel to its thread's partial sums. Same arithmetic as
:func:`superdml.superpixels.assign_pixels` (float32 distance in the same order, offsets in
the same order, strict ``<``; an inactive center is at an infinite row, so it never
wins, as numpy skips it), so the labels are those of the numpy path for the same
centers.
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
        # the 3 x 3 neighbours' centers spread over the columns of one cell row: the
        # pixel loops then run over whole rows (contiguous, vectorized); an inactive
        # center sits at an infinite row, so it never wins, as numpy's skip
        near = np.empty((9, 2 + c, w), dtype=np.float32)
        dist = np.empty(w, dtype=np.float32)
        best_d = np.empty(w, dtype=np.float32)
        best_k = np.empty(w, dtype=np.int64)
        cols = np.arange(w).astype(np.float32)
        for i in range(t * ny // n_bands, (t + 1) * ny // n_bands):
            for k in range(9):
                dy, dx = k // 3 - 1, k % 3 - 1
                for j in range(nx):
                    for q in range(2 + c):
                        value = centers[i + 1 + dy, j + 1 + dx, q]
                        if q == 0 and not active[i + 1 + dy, j + 1 + dx]:
                            value = np.inf
                        near[k, q, j * step : (j + 1) * step] = value
            for rr in range(step):
                r = i * step + rr
                fr = np.float32(r)
                best_d[:] = np.inf
                best_k[:] = -1
                for k in range(9):
                    for col in range(w):
                        d_row = fr - near[k, 0, col]
                        d_col = cols[col] - near[k, 1, col]
                        dist[col] = (d_row * d_row + d_col * d_col) * inv_s2
                    for b in range(c):
                        for col in range(w):
                            diff = features[b, r, col] - near[k, 2 + b, col]
                            dist[col] += diff * diff
                    for col in range(w):
                        if dist[col] < best_d[col]:
                            best_d[col] = dist[col]
                            best_k[col] = k
                for col in range(w):
                    k = best_k[col]
                    if not valid[r, col] or k < 0:
                        labels[r, col] = -1
                        continue
                    index = (i + 1 + k // 3 - 1) * ext_cols + col // step + 1 + k % 3 - 1
                    labels[r, col] = index
                    if accumulate:
                        partial[t, index, 0] += 1.0
                        partial[t, index, 1] += r
                        partial[t, index, 2] += col
                        for b in range(c):
                            partial[t, index, 3 + b] += features[b, r, col]
