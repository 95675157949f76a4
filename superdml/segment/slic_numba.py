"""The SLIC sweep as one compiled CPU kernel (numba): assignment and center sums in one pass.

Eager torch (and numpy) evaluate the nine candidate distances as whole-window passes and
the center update as scatters over materialized value stacks; ``torch.compile`` fuses the
distances but its CPU scatter is an atomic loop. Here each thread walks its band of cell
rows once: per cell row it spreads the 3 x 3 neighbouring centers over the columns,
finds each pixel's nearest with loops over whole pixel rows that LLVM vectorizes, and
adds the pixel to its thread's partial sums. Same arithmetic as
:func:`superdml.segment.slic_numpy.assign_pixels` (float32 distance in the same order, offsets in
the same order, strict ``<``; an inactive center is at an infinite row, so it never
wins, as numpy skips it), so the labels are those of the numpy path for the same
centers.

:func:`slic_centers` and :func:`assign_pixels` run the torch backend's two phases on the
CPU with these kernels, on numpy arrays: the CPU path imports no torch (about 1.5 s of a
command's start-up).
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from superdml.segment.slic_numpy import cell_means

# numba's workqueue threading layer (where neither OpenMP nor TBB is found) aborts on
# concurrent calls, as from a dask worker with several threads; each call uses all threads
_POOL_LOCK = threading.Lock()


def sweep(
    features: np.ndarray,
    valid: np.ndarray,
    centers: np.ndarray,
    active: np.ndarray,
    step: int,
    with_sums: bool,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One SLIC sweep: each pixel's nearest center and, `with_sums`, each center's sums.

    Parameters
    ----------
    features, valid, centers, active, step
        As :func:`slic_sweep`.
    with_sums : bool
        Also return the center sums (the update step).
    threads : int
        Threads of the sweep. With one, the sweep runs on the calling thread and several
        threads (tile tasks) may sweep at once; with more, sweeps take turns on numba's
        pool.

    Returns
    -------
    labels : (H, W) int64 ndarray
        As :func:`slic_sweep`.
    sums : (Ny + 2, Nx + 2, 3 + C) float64 ndarray or None
        Count, row, column and band sums per center, on the grid of `centers`.
    """
    pool = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at import
    threads = max(1, min(threads, pool))
    c, h, w = features.shape
    labels = np.empty((h, w), dtype=np.int64)
    n = active.size if with_sums else 0
    partial = np.zeros((threads, n, 3 + c), dtype=np.float64)
    if threads == 1:
        slic_sweep_serial(features, valid, centers, active, step, labels, partial)
    else:
        with _POOL_LOCK:
            numba.set_num_threads(threads)
            slic_sweep(features, valid, centers, active, step, labels, partial)
    sums = partial.sum(axis=0).reshape(*active.shape, -1) if with_sums else None
    return labels, sums


def slic_centers(
    features: np.ndarray, valid: np.ndarray, step: int, max_iter: int, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Run SLIC on a window aligned to the global grid and return its cells' centers.

    The CPU kernel of the torch backend's
    :func:`~superdml.segment.slic_torch.slic_centers`: same arguments (numpy arrays),
    same result; `threads` as :func:`sweep`.
    """
    centers, active = cell_means(features, valid, step)
    ext_active = np.pad(active, 1)
    ext = np.zeros((centers.shape[0] + 2, centers.shape[1] + 2, centers.shape[2]), np.float32)
    for _ in range(max_iter):
        ext[1:-1, 1:-1] = centers
        _, sums = sweep(features, valid, ext, ext_active, step, True, threads)
        assert sums is not None  # with_sums
        sums = sums[1:-1, 1:-1]
        count = sums[..., :1]
        moved = (sums[..., 1:] / np.maximum(count, 1)).astype(np.float32)
        centers = np.where(count > 0, moved, centers)
    return centers, active


def assign_pixels(
    features: np.ndarray,
    valid: np.ndarray,
    centers: np.ndarray,
    active: np.ndarray,
    step: int,
    threads: int = 1,
) -> np.ndarray:
    """Assign pixels to centers (:func:`~superdml.segment.slic_numpy.assign_pixels`).

    Returns
    -------
    (H, W) int64 ndarray
    """
    return sweep(features, valid, centers, active, step, False, threads)[0]


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
    for t in numba.prange(partial.shape[0]):
        _sweep_band(features, valid, centers, active, step, labels, partial, t)


@numba.njit(cache=True, nogil=True)
def slic_sweep_serial(
    features: np.ndarray,
    valid: np.ndarray,
    centers: np.ndarray,
    active: np.ndarray,
    step: int,
    labels: np.ndarray,
    partial: np.ndarray,
) -> None:
    """:func:`slic_sweep` on the calling thread: no thread pool, so threads may run it at once."""
    for t in range(partial.shape[0]):
        _sweep_band(features, valid, centers, active, step, labels, partial, t)


@numba.njit(cache=True, nogil=True)
def _sweep_band(
    features: np.ndarray,
    valid: np.ndarray,
    centers: np.ndarray,
    active: np.ndarray,
    step: int,
    labels: np.ndarray,
    partial: np.ndarray,
    t: int,
) -> None:
    """Sweep band `t` of the ``partial.shape[0]`` bands of cell rows."""
    # long: one numba kernel; its loops share a dozen scratch arrays that a split into
    # jitted helpers would pass around or reallocate per cell row, in the hot loop
    c, h, w = features.shape
    ny, nx = h // step, w // step
    ext_cols = nx + 2
    inv_s2 = np.float32(1.0 / step**2)
    n_bands = partial.shape[0]
    accumulate = partial.shape[1] > 0
    # the 3 x 3 neighbours' centers spread over the columns of one cell row: the
    # pixel loops then run over whole rows (contiguous, vectorized); an inactive
    # center sits at an infinite row, so it never wins, as numpy's skip
    near = np.empty((9, 2 + c, w), dtype=np.float32)
    dist = np.empty(w, dtype=np.float32)
    best_d = np.empty(w, dtype=np.float32)
    best_k = np.empty(w, dtype=np.int32)
    cols = np.arange(w).astype(np.float32)
    col_cell = np.arange(w) // step
    k_base = np.empty(9, dtype=np.int64)  # flat index of offset k's center, less col_cell
    sums = np.empty(c, dtype=np.float64)  # band sums of the current run of pixels
    for i in range(t * ny // n_bands, (t + 1) * ny // n_bands):
        for k in range(9):
            k_base[k] = (i + k // 3) * ext_cols + k % 3
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
            # runs of pixels of one center are summed locally, then added once
            run, count, col_sum = -1, 0, 0
            for col in range(w + 1):
                index = -1
                if col < w:
                    k = best_k[col]
                    if valid[r, col] and k >= 0:
                        index = k_base[k] + col_cell[col]
                    labels[r, col] = index
                if not accumulate:
                    continue
                if index != run:
                    if run >= 0:
                        partial[t, run, 0] += count
                        partial[t, run, 1] += count * r
                        partial[t, run, 2] += col_sum
                        for b in range(c):
                            partial[t, run, 3 + b] += sums[b]
                    run, count, col_sum = index, 0, 0
                    sums[:] = 0.0
                if index >= 0:
                    count += 1
                    col_sum += col
                    for b in range(c):
                        sums[b] += features[b, r, col]
