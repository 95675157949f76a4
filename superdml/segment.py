"""SLIC superpixels over rasters of any size, tile by tile, without seams.

Method
------
SLIC is local: a pixel is only ever compared with centers a grid step ``S`` away. The
raster is covered by one global grid of ``S x S`` cells; cell ``(i, j)`` seeds one center
and, whatever tile computes it, that center's superpixel gets the id
``i * n_cell_cols + j + 1``: unique over the raster, stable across reruns and tile
sizes, with no coordination between tiles. Every pixel is compared with the centers of
the 3 x 3 cells around its own cell (the gSLIC search), with scikit-image's distance
``sum((band / m - center_band / m)**2) + (pixel distance / S)**2`` on bands scaled to
[0, 1] per band.

1. **Centers** (per tile, independent): SLIC runs on the tile's core grown by a halo of
   ``HALO_CELLS`` cells, all tiles starting from the same global grid. The tile keeps
   the centers of the cells in its core: each cell's center is owned by exactly one tile.
2. **Assignment** (per tile, a stencil over its neighbours' centers): the owned centers
   of the neighbouring tiles are put back on the global grid and every pixel of the core
   grown by ``MARGIN_CELLS`` cells is assigned to its nearest center. The assignment is
   a function of the pixel and one global set of centers, so a superpixel crossing a
   tile edge gets the same id on both sides: there is no seam to hide.
3. **Connectivity**: within that window each id's largest 4-connected component stays,
   other fragments join the adjacent superpixel sharing the longest border. A
   superpixel spans at most 3 x 3 cells, so the margin holds every superpixel (and
   every neighbour of its fragments) that reaches the core: each tile decides exactly
   as its neighbours do. Pixels are written by the tile whose core holds them; a
   superpixel's table row by the tile whose core holds its centroid.

The SLIC steps of both phases run on the numpy functions below or on the torch backend
(:mod:`superdml.slic`, CPU or CUDA), which keeps their contract. Both phases write one
small file per tile into a work folder, so an interrupted run
resumes where it stopped and gives identical output; the final ``segments.tif`` and
``superpixels.parquet`` are assembled tile by tile and renamed into place when complete.
Peak memory is that of one tile, whatever the raster size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.windows import Window
from scipy import ndimage
from skimage.measure import label as connected_components

from superdml import __version__
from superdml._private import read_ahead
from superdml._private.atomic import atomic_write, write_json
from superdml._private.ownership import claim_output
from superdml.cluster import map_tasks
from superdml.config import SegmentConfig, config_hash, config_to_dict, dump_config
from superdml.errors import InputError
from superdml.provenance import combine, file_fingerprint, sha256_file
from superdml.raster import (
    RasterInfo,
    Tile,
    band_ranges,
    check_bands,
    geotiff_profile,
    open_raster,
    raster_info,
    read_window,
    tile_grid,
)

logger = logging.getLogger(__name__)

HALO_CELLS = 3
MARGIN_CELLS = 8
SEGMENTS_NAME = "segments.tif"
TABLE_NAME = "superpixels.parquet"
MANIFEST_NAME = "manifest.json"
ROW_GROUP_SIZE = 65536


# ------------------------------------------------------------------ pure functions


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
    return (pixels.astype(np.float32) - lo_) / span


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
    labels : (H, W) int64 ndarray
        Superpixel ids, 0 = nodata.
    max_rounds : int
        Bound on the merge rounds (chains of fragments are a few long).

    Returns
    -------
    (H, W) int64 ndarray
    """
    comp = connected_components(labels, background=0, connectivity=1)
    n = int(comp.max())
    if n == 0:
        return labels
    comp_label = np.zeros(n + 1, dtype=np.int64)
    comp_label[comp.ravel()] = labels.ravel()
    size = np.bincount(comp.ravel(), minlength=n + 1)
    ids = np.arange(1, n + 1)
    order = np.lexsort((ids, -size[1:], comp_label[1:]))
    sorted_comps = ids[order]
    sorted_labels = comp_label[sorted_comps]
    first = np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]
    resolved = np.full(n + 1, -1, dtype=np.int64)
    resolved[sorted_comps[first]] = comp_label[sorted_comps[first]]
    if (resolved[1:] >= 0).all():
        return labels
    # borders (fragment, neighbour): the only ones a merge looks at; few pixels have one
    fragment = resolved < 0
    fragment[0] = False
    a_parts, b_parts = [], []
    for x, y in ((comp[:, :-1], comp[:, 1:]), (comp[:-1, :], comp[1:, :])):
        fx, fy = fragment[x], fragment[y]
        edge = (fx | fy) & (x != y) & (x > 0) & (y > 0)
        x, y, fx, fy = x[edge], y[edge], fx[edge], fy[edge]
        a_parts += [x[fx], y[fy]]
        b_parts += [y[fx], x[fy]]
    a, b = np.concatenate(a_parts).astype(np.int64), np.concatenate(b_parts).astype(np.int64)
    pair_key, pair_count = np.unique(a * (n + 1) + b, return_counts=True)
    pa_, pb_ = np.divmod(pair_key, n + 1)
    for _ in range(max_rounds):
        open_ = (resolved[pa_] < 0) & (resolved[pb_] >= 0)
        if not open_.any():
            break
        frag, target, count = pa_[open_], resolved[pb_[open_]], pair_count[open_]
        width = int(target.max()) + 1
        key, inverse = np.unique(frag * width + target, return_inverse=True)
        total = np.bincount(inverse, weights=count)
        kf, kt = np.divmod(key, width)
        best = np.lexsort((kt, -total, kf))
        kf, kt = kf[best], kt[best]
        first = np.r_[True, kf[1:] != kf[:-1]]
        resolved[kf[first]] = kt[first]
    resolved = np.where(resolved >= 0, resolved, comp_label)
    resolved[0] = 0
    return resolved[comp]


def superpixel_stats(
    labels: np.ndarray,
    pixels: np.ndarray,
    row0: int,
    col0: int,
) -> dict[str, np.ndarray]:
    """Per-superpixel area, centroid, bounding box and band means of a window.

    Parameters
    ----------
    labels : (H, W) int64 ndarray
        Superpixel ids, 0 = nodata; those of one window span less than ``2**31``.
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
    h, w = labels.shape
    valid = labels > 0
    # ids of a window span a few grid rows: shifted to 1..n they index bincount directly
    lo = int(labels[valid].min()) if valid.any() else 1
    local = np.where(valid, labels - (lo - 1), 0).astype(np.int32).ravel()
    area = np.bincount(local)[1:]
    present = np.flatnonzero(area)
    area = area[present]

    def mean_of(weights: np.ndarray) -> np.ndarray:
        return np.bincount(local, weights=weights.ravel())[1:][present] / area

    rows = np.broadcast_to(np.arange(h, dtype=np.float64)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w, dtype=np.float64)[None, :], (h, w))
    objects = ndimage.find_objects(local.reshape(h, w))
    boxes = [objects[k] for k in present]
    bounds = np.array([(r.start, r.stop, c.start, c.stop) for r, c in boxes], dtype=np.int64)
    bounds = bounds.reshape(-1, 4)
    return {
        "segment_id": present + lo,
        "row": mean_of(rows) + row0,
        "col": mean_of(cols) + col0,
        "row_start": bounds[:, 0] + row0,
        "row_stop": bounds[:, 1] + row0,
        "col_start": bounds[:, 2] + col0,
        "col_stop": bounds[:, 3] + col0,
        "area_px": area.astype(np.int64),
        # one band at a time: a float64 copy of all bands would double the tile's memory
        "mean": np.stack([mean_of(band) for band in pixels], axis=1),
    }


# ------------------------------------------------------------------------ tile jobs


@dataclass(frozen=True)
class _Grid:
    """The global cell grid and tiling of one raster run (small, picklable)."""

    source: str
    name: str
    bands: tuple[int, ...]
    nodata: float | None
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    step: int
    compactness: float
    max_iter: int
    tile_size: int
    height: int
    width: int
    transform: tuple[float, ...]
    work: str
    backend: str = "numpy"
    device: str = "cpu"

    @property
    def cell_rows(self) -> int:
        return math.ceil(self.height / self.step)

    @property
    def cell_cols(self) -> int:
        return math.ceil(self.width / self.step)

    @property
    def tile_cells(self) -> int:
        return self.tile_size // self.step

    def centers_path(self, ti: int, tj: int) -> Path:
        return Path(self.work) / f"centers_t{ti:04d}_{tj:04d}.npz"

    def labels_path(self, tile: Tile) -> Path:
        return Path(self.work) / f"labels_{tile.key}.npy"

    def table_path(self, tile: Tile) -> Path:
        return Path(self.work) / f"table_{tile.key}.parquet"

    def read_features(
        self, src: rasterio.DatasetReader, cell_r0: int, cell_c0: int, ny: int, nx: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read cells ``[cell_r0, cell_r0 + ny) x [cell_c0, cell_c0 + nx)``."""
        pixels, valid = read_window(
            src,
            list(self.bands),
            cell_r0 * self.step,
            cell_c0 * self.step,
            ny * self.step,
            nx * self.step,
            self.nodata,
        )
        features = scale_bands(pixels, list(self.lo), list(self.hi))
        features /= np.float32(self.compactness)
        features[:, ~valid] = 0
        return pixels, features, valid


def _kernels(
    grid: _Grid,
) -> tuple[Callable[..., tuple[np.ndarray, np.ndarray]], Callable[..., np.ndarray]]:
    """Return the grid's backend: its ``slic_centers`` and ``assign_pixels``."""
    if grid.backend == "numpy":
        return slic_centers, assign_pixels
    from superdml import slic

    return (
        functools.partial(slic.slic_centers, device=grid.device),
        functools.partial(slic.assign_pixels, device=grid.device),
    )


def _tile_cells(grid: _Grid, tile: Tile) -> tuple[int, int, int, int]:
    """Cell range ``(r0, c0, r1, c1)`` of a tile's core."""
    tc = grid.tile_cells
    return (
        tile.ti * tc,
        tile.tj * tc,
        min((tile.ti + 1) * tc, grid.cell_rows),
        min((tile.tj + 1) * tc, grid.cell_cols),
    )


def _grown_cells(grid: _Grid, tile: Tile, cells: int) -> tuple[int, int, int, int]:
    """Cell range ``(r0, c0, r1, c1)`` of a tile's core grown by `cells`, within the raster."""
    r0, c0, r1, c1 = _tile_cells(grid, tile)
    return (
        max(r0 - cells, 0),
        max(c0 - cells, 0),
        min(r1 + cells, grid.cell_rows),
        min(c1 + cells, grid.cell_cols),
    )


def _reads_ahead(grid: _Grid) -> bool:
    """Whether tile tasks read the next tile while computing: on a GPU, not on the CPU."""
    return grid.device != "cpu"


def _read_cells(grid: _Grid, tile: Tile, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a tile's core grown by `cells` cells: pixels, features and valid mask.

    With :func:`_reads_ahead`, the window comes from the read-ahead when one was started
    for it, and the next tile's window (row-major, as the tasks are submitted) starts
    reading on the reader thread before this tile computes.
    """

    def read(t: Tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wr0, wc0, wr1, wc1 = _grown_cells(grid, t, cells)
        with open_raster(grid.source) as src:
            return grid.read_features(src, wr0, wc0, wr1 - wr0, wc1 - wc0)

    if not _reads_ahead(grid):
        return read(tile)
    pending = read_ahead.claim((grid.work, cells, tile.key))
    tiles = tile_grid(grid.height, grid.width, grid.tile_size)
    following = tiles.index(tile) + 1
    if following < len(tiles):
        after = tiles[following]
        read_ahead.start((grid.work, cells, after.key), functools.partial(read, after))
    return pending.result() if pending is not None else read(tile)


def _centers_task(grid: _Grid, tile: Tile) -> str:
    """Phase 1: SLIC on the tile plus halo; save the centers of the core's cells."""
    out = grid.centers_path(tile.ti, tile.tj)
    if out.exists():
        return str(out)
    r0, c0, r1, c1 = _tile_cells(grid, tile)
    wr0, wc0, _, _ = _grown_cells(grid, tile, HALO_CELLS)
    _, features, valid = _read_cells(grid, tile, HALO_CELLS)
    centers, active = _kernels(grid)[0](features, valid, grid.step, grid.max_iter)
    core = (slice(r0 - wr0, r1 - wr0), slice(c0 - wc0, c1 - wc0))
    centers = centers[core].astype(np.float64)
    centers[..., 0] += wr0 * grid.step
    centers[..., 1] += wc0 * grid.step
    with atomic_write(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, centers=centers, active=active[core])
    return str(out)


def _gather_centers(
    grid: _Grid, r0: int, c0: int, r1: int, c1: int
) -> tuple[np.ndarray, np.ndarray]:
    """Owned centers of cells ``[r0, r1) x [c0, c1)`` from the tiles that own them."""
    n_bands = len(grid.bands)
    centers = np.zeros((r1 - r0, c1 - c0, 2 + n_bands), dtype=np.float64)
    active = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    tc = grid.tile_cells
    for ti in range(max(r0, 0) // tc, (min(r1, grid.cell_rows) - 1) // tc + 1):
        for tj in range(max(c0, 0) // tc, (min(c1, grid.cell_cols) - 1) // tc + 1):
            with np.load(grid.centers_path(ti, tj)) as owned:
                tr0, tc0 = ti * tc, tj * tc
                oc, oa = owned["centers"], owned["active"]
                ar0, ac0 = max(r0, tr0), max(c0, tc0)
                ar1, ac1 = min(r1, tr0 + oc.shape[0]), min(c1, tc0 + oc.shape[1])
                dst = (slice(ar0 - r0, ar1 - r0), slice(ac0 - c0, ac1 - c0))
                src = (slice(ar0 - tr0, ar1 - tr0), slice(ac0 - tc0, ac1 - tc0))
                centers[dst] = oc[src]
                active[dst] = oa[src]
    return centers, active


def _assign_task(grid: _Grid, tile: Tile) -> int:
    """Phase 2: final labels of the core and the table rows of the superpixels it owns."""
    labels_out, table_out = grid.labels_path(tile), grid.table_path(tile)
    if labels_out.exists() and table_out.exists():
        return pq.ParquetFile(table_out).metadata.num_rows
    wr0, wc0, wr1, wc1 = _grown_cells(grid, tile, MARGIN_CELLS)
    pixels, features, valid = _read_cells(grid, tile, MARGIN_CELLS)
    centers, active = _gather_centers(grid, wr0 - 1, wc0 - 1, wr1 + 1, wc1 + 1)
    row0, col0 = wr0 * grid.step, wc0 * grid.step
    centers[..., 0] -= row0
    centers[..., 1] -= col0
    assign = _kernels(grid)[1]
    index = assign(features, valid, centers.astype(np.float32), active, grid.step)
    gi = np.arange(wr0 - 1, wr1 + 1)[:, None]
    gj = np.arange(wc0 - 1, wc1 + 1)[None, :]
    ids = np.append((gi * grid.cell_cols + gj + 1).ravel(), 0)  # index -1 (none): id 0
    labels = ids[index]
    del features, index  # the tile's largest arrays; free them before the stats
    labels = enforce_connectivity(labels)
    core = (
        slice(tile.row - row0, tile.row - row0 + tile.height),
        slice(tile.col - col0, tile.col - col0 + tile.width),
    )
    with atomic_write(labels_out) as tmp, open(tmp, "wb") as f:
        np.save(f, labels[core].astype(np.uint32))
    stats = superpixel_stats(labels, pixels, row0, col0)
    own = (
        (stats["row"] >= tile.row)
        & (stats["row"] < tile.row + tile.height)
        & (stats["col"] >= tile.col)
        & (stats["col"] < tile.col + tile.width)
    )
    table = _stats_table(grid, {k: v[own] for k, v in stats.items()})
    with atomic_write(table_out) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table.num_rows


def table_schema(bands: list[int] | tuple[int, ...]) -> pa.Schema:
    """Arrow schema of ``superpixels.parquet`` for the given 1-based bands."""
    fields = [
        pa.field("segment_id", pa.uint32(), nullable=False),
        pa.field("raster", pa.string(), nullable=False),
        pa.field("row", pa.float64()),
        pa.field("col", pa.float64()),
        pa.field("x", pa.float64()),
        pa.field("y", pa.float64()),
        pa.field("row_start", pa.int64()),
        pa.field("row_stop", pa.int64()),
        pa.field("col_start", pa.int64()),
        pa.field("col_stop", pa.int64()),
        pa.field("area_px", pa.int64()),
    ]
    fields += [pa.field(f"mean_b{b}", pa.float64()) for b in bands]
    return pa.schema(fields)


def _stats_table(grid: _Grid, stats: dict[str, np.ndarray]) -> pa.Table:
    a, b, c, d, e, f = grid.transform
    col_center, row_center = stats["col"] + 0.5, stats["row"] + 0.5
    columns = {
        "segment_id": stats["segment_id"].astype(np.uint32),
        "raster": np.full(stats["segment_id"].size, grid.name, dtype=object),
        "row": stats["row"],
        "col": stats["col"],
        "x": a * col_center + b * row_center + c,
        "y": d * col_center + e * row_center + f,
    }
    for key in ("row_start", "row_stop", "col_start", "col_stop", "area_px"):
        columns[key] = stats[key].astype(np.int64)
    for j, band in enumerate(grid.bands):
        columns[f"mean_b{band}"] = stats["mean"][:, j]
    return pa.table(columns, schema=table_schema(grid.bands))


# ----------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class SegmentResult:
    """What ``segment_raster`` wrote.

    Attributes
    ----------
    raster : str
        Name of the run's subfolder (the raster's stem, made unique).
    out_dir : Path
        The raster's subfolder.
    segments_path, table_path : Path
        ``segments.tif`` and ``superpixels.parquet``.
    n_superpixels, n_tiles : int
    skipped : bool
        True when the outputs were already complete for this source and config.
    seconds : float
    """

    raster: str
    out_dir: Path
    segments_path: Path
    table_path: Path
    n_superpixels: int
    n_tiles: int
    skipped: bool
    seconds: float


def run_dir(out_dir: str | Path, source: str | Path) -> Path:
    """Return the subfolder of `out_dir` for `source`: its stem, ``-2``, ``-3``... on clashes.

    A folder already used for the same source is reused (resume, rerun).
    """
    out_dir, source = Path(out_dir), Path(source).resolve()
    stem = source.stem
    for n in range(1, 10_000):
        candidate = out_dir / (stem if n == 1 else f"{stem}-{n}")
        marker = candidate / "source.json"
        if not candidate.exists():
            return candidate
        if marker.exists() and json.loads(marker.read_text()).get("source") == str(source):
            return candidate
        if not marker.exists() and not any(candidate.iterdir()):
            return candidate
    raise InputError(f"{out_dir}: too many rasters named {stem!r}")


def segment_raster(
    path: str | Path,
    out_dir: str | Path,
    config: SegmentConfig | None = None,
    client: object | None = None,
) -> SegmentResult:
    """Segment one raster into SLIC superpixels, tile by tile (see the module docstring).

    Parameters
    ----------
    path : path
        Any raster rasterio opens: GeoTIFF, VRT mosaic, PNG, JPEG...
    out_dir : path
        Run folder; the outputs go to ``out_dir/<stem>/``.
    config : SegmentConfig, optional
    client : distributed.Client, optional
        Runs the tile tasks on this cluster; in this process when None.

    Returns
    -------
    SegmentResult

    Raises
    ------
    InputError, MissingInputError
        Before any work, for a missing or unreadable raster, bands it lacks, or a
        raster without any valid pixel.
    """
    start = time.perf_counter()
    config = config or SegmentConfig()
    from superdml.slic import resolve_backend  # torch: imported only when segmenting

    backend, device = resolve_backend(config.backend, config.device)
    info = raster_info(path)
    bands = check_bands(path, info.count, config.bands)
    step = config.region_size
    tile_size = math.ceil(config.tile_size / step) * step
    n_cells = math.ceil(info.height / step) * math.ceil(info.width / step)
    if n_cells >= 2**32 - 1:
        raise InputError(f"{path}: {n_cells} grid cells do not fit uint32 ids: raise region_size")
    source_fp = file_fingerprint(info.path)
    with claim_output(out_dir, "segment"):
        folder = run_dir(out_dir, info.path)
        folder.mkdir(exist_ok=True)
        segments_path, table_path = folder / SEGMENTS_NAME, folder / TABLE_NAME
        manifest_path = folder / MANIFEST_NAME
        digest = config_hash(config)
        tiles = tile_grid(info.height, info.width, tile_size)
        if manifest_path.exists() and segments_path.exists() and table_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if (
                manifest.get("config_hash") == digest
                and manifest["source"]["path"] == info.path
                and manifest.get("source_fingerprint") == source_fp
            ):
                logger.info("%s: up to date, skipped", folder)
                return SegmentResult(
                    folder.name, folder, segments_path, table_path,
                    manifest["n_superpixels"], len(tiles), True, time.perf_counter() - start,
                )  # fmt: skip
        manifest_path.unlink(missing_ok=True)  # the run's commit mark: gone until redone
        write_json(folder / "source.json", {"source": info.path})
        lo, hi = band_ranges(path, bands, config.nodata)
        work = folder / f".work-{combine(digest, source_fp)[:16]}"
        for stale in folder.glob(".work-" + "[0-9a-f]" * 16):  # ours: other inputs' runs
            if stale != work:
                shutil.rmtree(stale)
        work.mkdir(exist_ok=True)
        grid = _Grid(
            source=info.path, name=folder.name, bands=tuple(bands), nodata=config.nodata,
            lo=tuple(lo), hi=tuple(hi), step=step, compactness=config.compactness,
            max_iter=config.max_iter, tile_size=tile_size, height=info.height, width=info.width,
            transform=info.transform, work=str(work), backend=backend, device=device,
        )  # fmt: skip
        logger.info(
            "%s: %d tiles of %d px, region size %d, %s backend on %s",
            info.path, len(tiles), tile_size, step, backend, device,
        )  # fmt: skip
        calls = [(grid, tile) for tile in tiles]
        map_tasks(_centers_task, calls, client, desc=f"{folder.name}: centers")
        counts = map_tasks(_assign_task, calls, client, desc=f"{folder.name}: labels")
        meta = {
            "superdml_version": __version__,
            "source": info.to_dict(),
            "source_fingerprint": source_fp,
            "bands": bands,
            "band_lo": lo,
            "band_hi": hi,
            "config": config_to_dict(config),
            "config_hash": digest,
            "tile_size": tile_size,
        }
        _write_segments(grid, info, tiles, segments_path)
        _write_table(grid, tiles, table_path, meta)
        dump_config(config, folder / "segment.yaml")
        table_sha = sha256_file(table_path)
        write_json(
            manifest_path,
            {
                **meta,
                "table_sha256": table_sha,
                "fingerprint": combine(source_fp, digest, table_sha),
                "n_superpixels": int(sum(counts)),
                "n_tiles": len(tiles),
            },
        )
        shutil.rmtree(work)
    return SegmentResult(
        folder.name, folder, segments_path, table_path, int(sum(counts)), len(tiles), False,
        time.perf_counter() - start,
    )  # fmt: skip


def _write_segments(grid: _Grid, info: RasterInfo, tiles: list[Tile], path: Path) -> None:
    profile = geotiff_profile(info, "uint32", nodata=0)
    with atomic_write(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for tile in tiles:
            window = Window(tile.col, tile.row, tile.width, tile.height)
            dst.write(np.load(grid.labels_path(tile)), 1, window=window)
        dst.update_tags(superdml_source=info.path, superdml_region_size=str(grid.step))


def _write_table(grid: _Grid, tiles: list[Tile], path: Path, meta: dict[str, object]) -> None:
    schema = table_schema(grid.bands).with_metadata({"superdml": json.dumps(meta)})
    with atomic_write(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for tile in tiles:
                part = pq.read_table(grid.table_path(tile)).cast(schema)
                writer.write_table(part, row_group_size=ROW_GROUP_SIZE)


@dataclass(frozen=True)
class SegmentRun:
    """A finished segment run of one raster, as later stages read it.

    Attributes
    ----------
    folder : Path
        The raster's subfolder holding ``segments.tif`` and ``superpixels.parquet``.
    name : str
        The raster's name in tables and crop file names.
    source : RasterInfo
        The source raster as recorded at segment time.
    bands : list of int
        1-based bands segmented on.
    band_lo, band_hi : list of float
        Per-band value ranges (see :func:`superdml.raster.band_ranges`).
    fingerprint : str
        Content fingerprint of the run (source, config, superpixel table): what later
        stages record and compare (:mod:`superdml.provenance`).
    """

    folder: Path
    name: str
    source: RasterInfo
    bands: list[int]
    band_lo: list[float]
    band_hi: list[float]
    fingerprint: str

    @property
    def segments_path(self) -> Path:
        """Path of ``segments.tif``."""
        return self.folder / SEGMENTS_NAME

    @property
    def table_path(self) -> Path:
        """Path of ``superpixels.parquet``."""
        return self.folder / TABLE_NAME

    def superpixels_in(
        self, row: int, col: int, height: int, width: int, columns: list[str] | None = None
    ) -> pa.Table:
        """Return the table rows of the superpixels whose centroid lies in a window.

        Row groups follow the tiles, so the filter reads only the groups it needs.
        """
        filters = [
            ("row", ">=", float(row)), ("row", "<", float(row + height)),
            ("col", ">=", float(col)), ("col", "<", float(col + width)),
        ]  # fmt: skip
        return pq.read_table(self.table_path, columns=columns, filters=filters)

    def check_source(self) -> None:
        """Raise :class:`InputError` unless the source raster opens with the segments' size."""
        with open_raster(self.source.path) as src:
            if (src.height, src.width) != (self.source.height, self.source.width):
                raise InputError(
                    f"{self.source.path}: {src.width}x{src.height} px, the segments in "
                    f"{self.folder} are {self.source.width}x{self.source.height}: pass --raster "
                    "with the source, or segment it again"
                )

    def with_source(self, raster: str | Path) -> SegmentRun:
        """Return this run reading from `raster` instead (a moved source); grids must match."""
        info = raster_info(raster)
        if (info.height, info.width) != (self.source.height, self.source.width) or not np.allclose(
            info.transform, self.source.transform
        ):
            raise InputError(
                f"{raster}: grid {info.width}x{info.height} does not match the segments in "
                f"{self.folder} ({self.source.width}x{self.source.height}, same transform "
                "expected)"
            )
        return dataclasses.replace(self, source=info)


def load_segment_runs(path: str | Path) -> list[SegmentRun]:
    """Read a segment run folder (all its rasters) or one raster's subfolder.

    Raises
    ------
    MissingInputError, InputError
        When `path` does not exist or holds no finished segment run.
    """
    from superdml.errors import require_dir

    path = Path(path)
    require_dir(path, "segment folder")
    folders = (
        [path]
        if (path / MANIFEST_NAME).exists()
        else sorted(p.parent for p in path.glob(f"*/{MANIFEST_NAME}"))
    )
    if not folders:
        raise InputError(
            f"{path}: not a segment folder (no {MANIFEST_NAME}): run `superdml segment` first"
        )
    runs = []
    for folder in folders:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        source = RasterInfo(
            **{**manifest["source"], "transform": tuple(manifest["source"]["transform"])}
        )
        runs.append(
            SegmentRun(
                folder,
                folder.name,
                source,
                list(manifest["bands"]),
                list(manifest["band_lo"]),
                list(manifest["band_hi"]),
                str(manifest.get("fingerprint", "")),
            )  # fmt: skip
        )
    return runs
