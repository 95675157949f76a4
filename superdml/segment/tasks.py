"""The tile tasks of :func:`superdml.segment.stage.segment_raster`: the grid, both phases' tasks.

A :class:`Grid` describes one run (global cell grid, tiling, band scaling, backend, work
folder) and is all a task needs besides its :class:`~superdml.raster.io.Tile`: tasks carry
no arrays and run on any dask worker. :func:`centers_task` (phase 1) saves the centers
of the cells a tile owns; :func:`assign_task` (phase 2) gathers its neighbours' centers,
assigns the pixels of the tile's core grown by a margin, enforces connectivity and saves
the core's labels and the table rows of the superpixels whose centroid it holds. Both
skip a tile whose files exist, which is how an interrupted run resumes. The work folder
may be a prefix in a bucket (workers that share no disk): each work file is then one
object, written once. The method and its guarantees are in
:mod:`superdml.segment.stage`'s docstring.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio

from superdml.core import storage
from superdml.core.cluster import default_workers
from superdml.raster.io import Tile, open_raster, read_window, tile_grid
from superdml.segment import read_ahead
from superdml.segment.slic_numpy import (
    assign_pixels,
    enforce_connectivity,
    scale_bands,
    slic_centers,
    superpixel_stats,
)

HALO_CELLS = 3
MARGIN_CELLS = 8


@dataclass(frozen=True)
class Grid:
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
    sweep_threads: int | None = None  # threads of one CPU SLIC sweep; None: one

    @property
    def cell_rows(self) -> int:
        """Rows of grid cells over the raster."""
        return math.ceil(self.height / self.step)

    @property
    def cell_cols(self) -> int:
        """Columns of grid cells over the raster."""
        return math.ceil(self.width / self.step)

    @property
    def tile_cells(self) -> int:
        """Grid cells along a tile's side."""
        return self.tile_size // self.step

    def centers_path(self, ti: int, tj: int) -> Path | str:
        """Work file of the centers tile (ti, tj) owns."""
        return storage.join(self.work, f"centers_t{ti:04d}_{tj:04d}.npz")

    def labels_path(self, tile: Tile) -> Path | str:
        """Work file of a tile's superpixel ids."""
        return storage.join(self.work, f"labels_{tile.key}.npy")

    def table_path(self, tile: Tile) -> Path | str:
        """Work file of a tile's superpixel table rows."""
        return storage.join(self.work, f"table_{tile.key}.parquet")

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
    grid: Grid,
) -> tuple[Callable[..., tuple[np.ndarray, np.ndarray]], Callable[..., np.ndarray]]:
    """Return the grid's backend: its ``slic_centers`` and ``assign_pixels``.

    The torch backend on the CPU is :mod:`~superdml.segment.slic_numba`'s kernels on numpy
    arrays (no torch import); on a GPU, :mod:`~superdml.segment.slic_torch`.
    """
    if grid.backend == "numpy":
        return slic_centers, assign_pixels
    if grid.device == "cpu":
        from superdml.segment import slic_numba

        threads = grid.sweep_threads or 1
        return (
            functools.partial(slic_numba.slic_centers, threads=threads),
            functools.partial(slic_numba.assign_pixels, threads=threads),
        )
    from superdml.segment import slic_torch as slic

    return (
        functools.partial(slic.slic_centers, device=grid.device, threads=grid.sweep_threads),
        functools.partial(slic.assign_pixels, device=grid.device, threads=grid.sweep_threads),
    )


def _tile_cells(grid: Grid, tile: Tile) -> tuple[int, int, int, int]:
    """Cell range ``(r0, c0, r1, c1)`` of a tile's core."""
    tc = grid.tile_cells
    return (
        tile.ti * tc,
        tile.tj * tc,
        min((tile.ti + 1) * tc, grid.cell_rows),
        min((tile.tj + 1) * tc, grid.cell_cols),
    )


def _grown_cells(grid: Grid, tile: Tile, cells: int) -> tuple[int, int, int, int]:
    """Cell range ``(r0, c0, r1, c1)`` of a tile's core grown by `cells`, within the raster."""
    r0, c0, r1, c1 = _tile_cells(grid, tile)
    return (
        max(r0 - cells, 0),
        max(c0 - cells, 0),
        min(r1 + cells, grid.cell_rows),
        min(c1 + cells, grid.cell_cols),
    )


def reads_ahead(grid: Grid) -> bool:
    """Whether tile tasks read the next tile while computing: on a GPU, not on the CPU."""
    return reads_ahead_on(grid.device)


def reads_ahead_on(device: str) -> bool:
    """Whether tile tasks on `device` read ahead (see :func:`reads_ahead`)."""
    return device != "cpu"


def in_process_threads(device: str, n_tiles: int) -> tuple[int, int | None]:
    """Task threads and threads per CPU SLIC sweep of an in-process run (no dask client).

    On the CPU two tiles are in flight, each on its own threads: one tile's reads,
    connectivity and stats (GDAL and compiled kernels, which release the GIL) overlap
    with the other's sweeps, and the cores are shared between the two tiles rather than
    within each sweep (no barrier waiting for a descheduled thread on a busy machine).
    A raster of one tile has all the cores for its sweeps. Where tasks read ahead
    (a GPU) one task thread, fed by the reader thread.

    Returns
    -------
    task_threads : int
    sweep_threads : int or None
        None where no CPU sweep runs.
    """
    if reads_ahead_on(device):
        return 1, None
    tasks = max(1, min(2, n_tiles))
    return tasks, max(1, default_workers() // tasks)


def _read_cells(grid: Grid, tile: Tile, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a tile's core grown by `cells` cells: pixels, features and valid mask.

    With :func:`reads_ahead`, the window comes from the read-ahead when one was started
    for it, and the next tile's window (row-major, as the tasks are submitted) starts
    reading on the reader thread before this tile computes.
    """

    def read(t: Tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wr0, wc0, wr1, wc1 = _grown_cells(grid, t, cells)
        with open_raster(grid.source) as src:
            return grid.read_features(src, wr0, wc0, wr1 - wr0, wc1 - wc0)

    if not reads_ahead(grid):
        return read(tile)
    pending = read_ahead.claim((grid.work, cells, tile.key))
    tiles = tile_grid(grid.height, grid.width, grid.tile_size)
    following = tiles.index(tile) + 1
    if following < len(tiles):
        after = tiles[following]
        read_ahead.start((grid.work, cells, after.key), functools.partial(read, after))
    return pending.result() if pending is not None else read(tile)


def load_array(loc: Path | str) -> Any:
    """``np.load`` of a work file, local or in a bucket (read whole: a tile's arrays)."""
    return np.load(io.BytesIO(storage.read_bytes(loc)) if storage.is_uri(loc) else loc)


@contextlib.contextmanager
def _write_part(loc: Path | str) -> Iterator[Path]:
    """Write a tile's work file once (create-only); a twin task that got there first wins.

    Both tasks of a tile compute the same bytes, so the first one's file is kept.
    """
    with contextlib.suppress(FileExistsError), storage.write_once(loc, create_only=True) as tmp:
        yield tmp


def centers_task(grid: Grid, tile: Tile) -> str:
    """Phase 1: SLIC on the tile plus halo; save the centers of the core's cells."""
    out = grid.centers_path(tile.ti, tile.tj)
    if storage.exists(out):
        return str(out)
    r0, c0, r1, c1 = _tile_cells(grid, tile)
    wr0, wc0, _, _ = _grown_cells(grid, tile, HALO_CELLS)
    _, features, valid = _read_cells(grid, tile, HALO_CELLS)
    centers, active = _kernels(grid)[0](features, valid, grid.step, grid.max_iter)
    core = (slice(r0 - wr0, r1 - wr0), slice(c0 - wc0, c1 - wc0))
    centers = centers[core].astype(np.float64)
    centers[..., 0] += wr0 * grid.step
    centers[..., 1] += wc0 * grid.step
    with _write_part(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, centers=centers, active=active[core])
    return str(out)


def _gather_centers(
    grid: Grid, r0: int, c0: int, r1: int, c1: int
) -> tuple[np.ndarray, np.ndarray]:
    """Owned centers of cells ``[r0, r1) x [c0, c1)`` from the tiles that own them."""
    n_bands = len(grid.bands)
    centers = np.zeros((r1 - r0, c1 - c0, 2 + n_bands), dtype=np.float64)
    active = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    tc = grid.tile_cells
    for ti in range(max(r0, 0) // tc, (min(r1, grid.cell_rows) - 1) // tc + 1):
        for tj in range(max(c0, 0) // tc, (min(c1, grid.cell_cols) - 1) // tc + 1):
            with load_array(grid.centers_path(ti, tj)) as owned:
                tr0, tc0 = ti * tc, tj * tc
                oc, oa = owned["centers"], owned["active"]
                ar0, ac0 = max(r0, tr0), max(c0, tc0)
                ar1, ac1 = min(r1, tr0 + oc.shape[0]), min(c1, tc0 + oc.shape[1])
                dst = (slice(ar0 - r0, ar1 - r0), slice(ac0 - c0, ac1 - c0))
                src = (slice(ar0 - tr0, ar1 - tr0), slice(ac0 - tc0, ac1 - tc0))
                centers[dst] = oc[src]
                active[dst] = oa[src]
    return centers, active


def assign_task(grid: Grid, tile: Tile) -> int:
    """Phase 2: final labels of the core and the table rows of the superpixels it owns."""
    labels_out, table_out = grid.labels_path(tile), grid.table_path(tile)
    if storage.exists(labels_out) and storage.exists(table_out):
        path, filesystem = storage.arrow_source(table_out)
        return pq.read_metadata(path, filesystem=filesystem).num_rows
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
    inside = (gi >= 0) & (gi < grid.cell_rows) & (gj >= 0) & (gj < grid.cell_cols)
    ids = np.where(inside, gi * grid.cell_cols + gj + 1, 0).astype(np.uint32)
    labels = np.append(ids.ravel(), np.uint32(0))[index]  # index -1 (no center): id 0
    del features, index  # the tile's largest arrays; free them before the stats
    labels = enforce_connectivity(labels)
    core = (
        slice(tile.row - row0, tile.row - row0 + tile.height),
        slice(tile.col - col0, tile.col - col0 + tile.width),
    )
    with _write_part(labels_out) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(labels[core]))
    stats = superpixel_stats(labels, pixels, row0, col0)
    own = (
        (stats["row"] >= tile.row)
        & (stats["row"] < tile.row + tile.height)
        & (stats["col"] >= tile.col)
        & (stats["col"] < tile.col + tile.width)
    )
    table = stats_table(grid, {k: v[own] for k, v in stats.items()})
    with _write_part(table_out) as tmp:
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


def stats_table(grid: Grid, stats: dict[str, np.ndarray]) -> pa.Table:
    """Return a tile's superpixel table rows from its region statistics."""
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
