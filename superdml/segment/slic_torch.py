"""The tiled SLIC's torch backend: the centers and assignment phases on any torch device.

Same contract as the numpy functions of :mod:`superdml.segment.slic_numpy`: same global grid, 3 x 3
cell search, float32 distance evaluated in the same order, offsets tried in the same order
with a strictly smaller distance winning, ``-1`` for pixels without a center. The tile
tasks call either backend on the same windows, so every guarantee of ``segment`` (ids
stable across tile sizes, no seams, resume, flat memory) holds for both.

One SLIC *sweep* assigns every pixel to its nearest center and sums, per center, the
pixels assigned to it (the update step). Two kernels compute it:

- the **reference**: :func:`nearest_centers` and :func:`center_sums`, plain tensor
  operations (nine masked distance passes and an ``index_add_``) that run eagerly on
  any device, and through ``torch.compile`` on CUDA, where it fuses the nine passes;
- on the **CPU**, :func:`superdml.segment.slic_numba.slic_sweep`, the same arithmetic as one
  numba kernel, run on numpy arrays by :mod:`superdml.segment.slic_numba`'s phases (the
  tile tasks call those directly, so a CPU run never imports torch): measured 8 to 10
  times faster than the numpy path per sweep on 2 cores, while ``torch.compile``'s CPU
  code was as fast for the distances but its scatter an atomic loop several times
  slower, after a cold compile of over a minute (``benchmarks/README.md``).

The tests check the CPU kernel against the reference and the reference against numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from superdml.segment import slic_numba

Kernel = Literal["fast", "reference"]

OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def nearest_centers(
    features: torch.Tensor,
    valid: torch.Tensor,
    centers: torch.Tensor,
    active: torch.Tensor,
    step: int,
) -> torch.Tensor:
    """One SLIC assignment step: each pixel to the nearest of its 3 x 3 cells' centers.

    The torch twin of :func:`superdml.segment.slic_numpy.assign_pixels`: offsets are tried in the
    same order and only a strictly smaller distance wins, so ties resolve the same way.

    Parameters
    ----------
    features : (C, H, W) float32 tensor
        Band values divided by the compactness; H, W multiples of `step`.
    valid : (H, W) bool tensor
    centers : (H // step + 2, W // step + 2, 2 + C) float32 tensor
        Centers of the window's cells plus a one-cell ring (window pixel coordinates).
    active : (H // step + 2, W // step + 2) bool tensor
    step : int

    Returns
    -------
    (H, W) int64 tensor
        Flat index into ``centers[:, :, 0]``; -1 for invalid pixels and pixels with no
        active center nearby.
    """
    c, h, w = features.shape
    ny, nx = h // step, w // step
    blocks = features.view(c, ny, step, nx, step)
    rows = torch.arange(h, dtype=features.dtype, device=features.device).view(ny, step, 1, 1)
    cols = torch.arange(w, dtype=features.dtype, device=features.device).view(1, 1, nx, step)
    ext_cols = nx + 2
    base = (torch.arange(ny, device=features.device)[:, None] + 1) * ext_cols
    base = base + torch.arange(nx, device=features.device)[None, :] + 1
    best_d = torch.full((ny, step, nx, step), torch.inf, device=features.device)
    best_k = torch.full((ny, step, nx, step), -1, dtype=torch.int64, device=features.device)
    for dy, dx in OFFSETS:
        sub = centers[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx][:, None, :, None]
        on = active[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx][:, None, :, None]
        # the numpy path's float32 operations, in its order
        dist = ((rows - sub[..., 0]).square() + (cols - sub[..., 1]).square()) * (1.0 / step**2)
        for band in range(c):
            dist = dist + (blocks[band] - sub[..., 2 + band]).square()
        better = on & (dist < best_d)
        best_d = torch.where(better, dist, best_d)
        best_k = torch.where(better, (base + dy * ext_cols + dx)[:, None, :, None], best_k)
    labels = best_k.view(h, w)
    return torch.where(valid, labels, -1)


def center_sums(
    features: torch.Tensor, valid: torch.Tensor, assignment: torch.Tensor, n_centers: int
) -> torch.Tensor:
    """Pixel count, row, column and band sums of the pixels assigned to each center.

    Parameters
    ----------
    features : (C, H, W) float32 tensor
    valid : (H, W) bool tensor
    assignment : (H, W) int64 tensor
        Flat center index per pixel from :func:`nearest_centers`, -1 for none.
    n_centers : int

    Returns
    -------
    (n_centers, 3 + C) float32 tensor
        Count, row sum, column sum, band sums.
    """
    c, h, w = features.shape
    keep = valid & (assignment >= 0)
    weight = keep.to(features.dtype)
    rows = torch.arange(h, dtype=features.dtype, device=features.device)[:, None]
    cols = torch.arange(w, dtype=features.dtype, device=features.device)[None, :]
    values = torch.stack(
        [weight, weight * rows, weight * cols, *(weight * features[b] for b in range(c))], dim=-1
    )
    index = torch.where(keep, assignment, 0).view(-1)
    sums = torch.zeros(n_centers, 3 + c, dtype=features.dtype, device=features.device)
    return sums.index_add_(0, index, values.view(h * w, 3 + c))


def cell_means(
    features: torch.Tensor, valid: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return initial centers: the mean position and features of each cell's valid pixels.

    The torch twin of :func:`superdml.segment.slic_numpy.cell_means`.

    Returns
    -------
    centers : (H // step, W // step, 2 + C) float32 tensor
    active : (H // step, W // step) bool tensor
    """
    c, h, w = features.shape
    ny, nx = h // step, w // step
    weight = valid.to(features.dtype).view(ny, step, nx, step)
    count = weight.sum(dim=(1, 3))
    active = count > 0
    safe = torch.where(active, count, 1.0)
    rows = torch.arange(h, dtype=features.dtype, device=features.device).view(ny, step, 1, 1)
    cols = torch.arange(w, dtype=features.dtype, device=features.device).view(1, 1, nx, step)
    blocks = features.view(c, ny, step, nx, step)
    sums = [(weight * rows).sum(dim=(1, 3)), (weight * cols).sum(dim=(1, 3))]
    sums += [(blocks[b] * weight).sum(dim=(1, 3)) for b in range(c)]
    return torch.stack(sums, dim=-1) / safe[..., None], active


Sweep = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool],
    tuple[torch.Tensor, torch.Tensor | None],
]


def reference_sweep(
    features: torch.Tensor,
    valid: torch.Tensor,
    centers: torch.Tensor,
    active: torch.Tensor,
    step: int,
    with_sums: bool,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sweep with the reference kernel, eager or through ``torch.compile``.

    Parameters
    ----------
    features, valid, centers, active, step
        As :func:`nearest_centers`.
    with_sums : bool
        Also return the center sums (the update step).
    compiled : bool
        Run the kernels through ``torch.compile`` (compiled once per process).

    Returns
    -------
    labels : (H, W) int64 tensor
        As :func:`nearest_centers`.
    sums : (Ny + 2, Nx + 2, 3 + C) float32 tensor or None
        As :func:`center_sums`, on the grid of `centers`.
    """
    assign, sums_of = _reference_kernels(compiled)
    labels = assign(features, valid, centers, active, step)
    if not with_sums:
        return labels, None
    sums = sums_of(features, valid, labels, active.numel())
    return labels, sums.view(*active.shape, -1)


@functools.cache
def _reference_kernels(compiled: bool) -> tuple[Callable[..., torch.Tensor], ...]:
    kernels = (nearest_centers, center_sums)
    if compiled:  # dynamic shapes: edge tiles differ in size
        return tuple(torch.compile(k, dynamic=True) for k in kernels)
    return kernels


def _sweep_for(kernel: Kernel) -> Sweep:
    """Return the sweep of `kernel` off the numba CPU path: eager reference or compiled."""
    if kernel == "reference":
        return reference_sweep
    return functools.partial(reference_sweep, compiled=True)


def _numba_path(device: torch.device, kernel: Kernel) -> bool:
    """Whether the fast kernel on the CPU runs: :mod:`superdml.segment.slic_numba`."""
    return device.type == "cpu" and kernel == "fast"


def slic_centers(
    features: np.ndarray,
    valid: np.ndarray,
    step: int,
    max_iter: int,
    device: str | torch.device = "cpu",
    kernel: Kernel = "fast",
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run SLIC on a window aligned to the global grid and return its cells' centers.

    The torch backend of :func:`~superdml.segment.slic_numpy.slic_centers`: same arguments,
    same result.

    Parameters
    ----------
    features : (C, H, W) float32 ndarray
        Band values divided by the compactness; H, W multiples of `step`.
    valid : (H, W) bool ndarray
    step, max_iter : int
    device : str or torch.device
    kernel : {"fast", "reference"}
        The numba kernel on the CPU (``torch.compile`` on CUDA), or the eager reference.
    threads : int, optional
        Threads of the numba kernel (:func:`cpu_sweep`).

    Returns
    -------
    centers : (H // step, W // step, 2 + C) float32 ndarray
    active : (H // step, W // step) bool ndarray
    """
    device = torch.device(device)
    if _numba_path(device, kernel):
        return slic_numba.slic_centers(
            features, valid, step, max_iter, threads or torch.get_num_threads()
        )
    sweep = _sweep_for(kernel)
    f = torch.from_numpy(features).to(device)
    v = torch.from_numpy(valid).to(device)
    centers, active = cell_means(f, v, step)
    ext_active = torch.nn.functional.pad(active, (1, 1, 1, 1))
    for _ in range(max_iter):
        ext = torch.nn.functional.pad(centers, (0, 0, 1, 1, 1, 1))
        _, sums = sweep(f, v, ext, ext_active, step, True)
        assert sums is not None
        sums = sums[1:-1, 1:-1]
        count = sums[..., :1]
        centers = torch.where(count > 0, (sums[..., 1:] / count.clamp(min=1)).float(), centers)
    return centers.cpu().numpy(), active.cpu().numpy()


def assign_pixels(
    features: np.ndarray,
    valid: np.ndarray,
    centers: np.ndarray,
    active: np.ndarray,
    step: int,
    device: str | torch.device = "cpu",
    kernel: Kernel = "fast",
    threads: int | None = None,
) -> np.ndarray:
    """Assign pixels to centers (:func:`~superdml.segment.slic_numpy.assign_pixels`) with torch.

    Returns
    -------
    (H, W) int64 ndarray
    """
    device = torch.device(device)
    if _numba_path(device, kernel):
        threads = threads or torch.get_num_threads()
        return slic_numba.assign_pixels(features, valid, centers, active, step, threads)
    labels, _ = _sweep_for(kernel)(
        torch.from_numpy(features).to(device),
        torch.from_numpy(valid).to(device),
        torch.from_numpy(centers).to(device),
        torch.from_numpy(active).to(device),
        step,
        False,
    )
    return labels.cpu().numpy()
