"""The SLIC sweep as one compiled CPU kernel (numba): assignment and center sums in one pass.

Eager torch (and numpy) evaluate the nine candidate distances as whole-window passes and
the center update as scatters over materialized value stacks; ``torch.compile`` fuses the
distances but its CPU scatter is an atomic loop. Here each thread walks its band of cell
rows once: per cell row it gathers each cell's 3 x 3 neighbouring centers, finds each
pixel's nearest with its nine distances in registers (the band count is a constant of
the compiled kernel, so LLVM unrolls the band and candidate loops and vectorizes the
loop over a cell's pixels), and adds each run of pixels of one center to its thread's
partial sums. Same arithmetic as
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
    with_labels: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None]:
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
    with_labels : bool
        Return the labels (the update steps need the sums only).

    Returns
    -------
    labels : (H, W) int64 ndarray or None
        As :func:`slic_sweep`; None unless `with_labels`.
    sums : (Ny + 2, Nx + 2, 3 + C) float64 ndarray or None
        Count, row, column and band sums per center, on the grid of `centers`.
    """
    pool = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at import
    threads = max(1, min(threads, pool))
    c, h, w = features.shape
    labels = np.empty((h, w) if with_labels else (0, 0), dtype=np.int64)
    n = active.size if with_sums else 0
    partial = np.zeros((threads, n, 3 + c), dtype=np.float64)
    args = (tuple(range(c)), features, valid, centers, active, step, labels, partial)
    if threads == 1:
        slic_sweep_serial(*args)
    else:
        with _POOL_LOCK:
            numba.set_num_threads(threads)
            slic_sweep(*args)
    sums = partial.sum(axis=0).reshape(*active.shape, -1) if with_sums else None
    return (labels if with_labels else None), sums


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
        _, sums = sweep(features, valid, ext, ext_active, step, True, threads, False)
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
    labels, _ = sweep(features, valid, centers, active, step, False, threads)
    assert labels is not None  # with_labels
    return labels


@numba.njit(parallel=True, cache=True, nogil=True)
def slic_sweep(
    band_slots: tuple[int, ...],
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
    band_slots : tuple of int
        ``tuple(range(C))``: its length, a constant of the compiled kernel (numba
        compiles one per tuple length), unrolls the band loops so that the pixel loops
        vectorize.
    features : (C, H, W) float32 ndarray
        Band values divided by the compactness; H, W multiples of `step`.
    valid : (H, W) bool ndarray
    centers : (H // step + 2, W // step + 2, 2 + C) float32 ndarray
        Centers of the window's cells plus a one-cell ring (window pixel coordinates).
    active : (H // step + 2, W // step + 2) bool ndarray
    step : int
    labels : (H, W) int64 ndarray
        Output: flat index into ``centers[:, :, 0]``, -1 for invalid pixels and pixels
        with no active center nearby. Not written when it has no rows (``(0, 0)``).
    partial : (T, N, 3 + C) float64 ndarray
        Output, zeroed by the caller: for each of T bands of cell rows (one per thread),
        count, row, column and band sums of the pixels assigned to each of the
        ``N = (H // step + 2) * (W // step + 2)`` centers; ``N == 0`` skips the sums.
    """
    for t in numba.prange(partial.shape[0]):
        _sweep_band(band_slots, features, valid, centers, active, step, labels, partial, t)


@numba.njit(cache=True, nogil=True)
def slic_sweep_serial(
    band_slots: tuple[int, ...],
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
        _sweep_band(band_slots, features, valid, centers, active, step, labels, partial, t)


@numba.njit(cache=True, nogil=True)
def _sweep_band(
    band_slots: tuple[int, ...],
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
    # long: one numba kernel; its loops share scratch arrays that a split into jitted
    # helpers would pass around or reallocate per cell row, in the hot loop
    c = len(band_slots)  # a compile-time constant: the band loops unroll
    h, w = valid.shape
    ny, nx = h // step, w // step
    ext_cols = nx + 2
    inv_s2 = np.float32(1.0 / step**2)
    n_bands = partial.shape[0]
    accumulate = partial.shape[1] > 0
    write_labels = labels.shape[0] > 0
    # the 3 x 3 neighbours' centers of each cell of the cell row, as (cell, value, k):
    # a pixel's nine distances are computed in registers, in k order, and the loop over
    # a cell's pixels vectorizes; an inactive center sits at an infinite row, so it
    # never wins, as numpy's skip
    near = np.empty((nx, 2 + c, 9), dtype=np.float32)
    d_row2 = np.empty(9, dtype=np.float32)
    cols = np.arange(w).astype(np.float32)
    index = np.empty(w, dtype=np.int64)
    nearest = np.empty(step, dtype=np.int32)  # offset k of the nearest, one cell's pixels
    k_offset = np.array([(k // 3) * ext_cols + k % 3 for k in range(9)], dtype=np.int64)
    for i in range(t * ny // n_bands, (t + 1) * ny // n_bands):
        for j in range(nx):
            for k in range(9):
                cy, cx = i + 1 + k // 3 - 1, j + 1 + k % 3 - 1
                for q in range(2 + c):
                    near[j, q, k] = centers[cy, cx, q]
                if not active[cy, cx]:
                    near[j, 0, k] = np.inf
        for rr in range(step):
            r = i * step + rr
            fr = np.float32(r)
            for j in range(nx):
                cell = near[j]
                for k in range(9):
                    d = fr - cell[0, k]
                    d_row2[k] = d * d
                base = i * ext_cols + j  # flat index of offset k's center: + k_offset[k]
                for col in range(j * step, (j + 1) * step):
                    best_d = np.float32(np.inf)
                    best_k = np.int32(-1)  # 32 bits, as the distances: one vector width
                    for k in range(9):
                        d_col = cols[col] - cell[1, k]
                        dist = (d_row2[k] + d_col * d_col) * inv_s2
                        for b in range(c):
                            diff = features[b, r, col] - cell[2 + b, k]
                            dist += diff * diff
                        better = dist < best_d
                        best_d = dist if better else best_d
                        best_k = np.int32(k) if better else best_k
                    nearest[col - j * step] = best_k
                # the indexes apart: the loop above stores only into this cell's small
                # buffer (stores into a row-long array beside the feature rows made it
                # half as fast, depending on where the arrays happened to lie)
                for col in range(j * step, (j + 1) * step):
                    k = nearest[col - j * step]
                    found = valid[r, col] and k >= 0
                    index[col] = base + k_offset[k] if found else -1
            if write_labels:
                labels[r] = index
            if accumulate:
                _add_runs(features, index, r, partial[t], c)


@numba.njit(cache=True, nogil=True)
def _add_runs(features: np.ndarray, index: np.ndarray, r: int, sums: np.ndarray, c: int) -> None:
    """Add the pixels of row `r` to their centers' `sums`, run by run of one center.

    A run's pixels are summed in float64 in column order, then added to its center: the
    same arithmetic, in the same order, whatever the kernel's loop structure.
    """
    w = index.size
    col = 0
    while col < w:
        center = index[col]
        stop = col + 1
        while stop < w and index[stop] == center:
            stop += 1
        if center >= 0:
            n = stop - col
            sums[center, 0] += n
            sums[center, 1] += n * r
            sums[center, 2] += (col + stop - 1) * n // 2
            for b in range(c):
                run = 0.0
                for q in range(col, stop):
                    run += features[b, r, q]
                sums[center, 3 + b] += run
        col = stop
