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

The SLIC steps of both phases run on the numpy functions of
:mod:`superdml.segment.slic_numpy` or on the torch backend (:mod:`superdml.segment.slic_torch`,
CPU or CUDA, its kernels in :mod:`superdml.segment.slic_numba`), which keeps their contract;
the tile tasks are in :mod:`superdml.segment.tasks`. Both phases write one
small file per tile into a work folder, so an interrupted run
resumes where it stopped and gives identical output; the final ``segments.tif`` (written
as each tile's labels are done, while the next tiles compute) and ``superpixels.parquet``
are assembled tile by tile and put in place when complete.
Peak memory is that of the tiles in flight (two at a time in process), whatever the
raster size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import rasterio
from rasterio.windows import Window

from superdml import __version__
from superdml.config.schema import SegmentConfig, config_hash, config_to_dict, dump_config
from superdml.core import storage
from superdml.core.cluster import map_tasks, resolve_client
from superdml.core.errors import InputError
from superdml.core.ownership import claim_output
from superdml.core.provenance import combine, sha256_file
from superdml.raster.io import (
    RasterInfo,
    Tile,
    band_ranges,
    check_bands,
    geotiff_profile,
    raster_info,
    tile_grid,
)
from superdml.raster.stac import raster_fingerprint
from superdml.segment.backend import resolve_backend
from superdml.segment.heap import map_large_allocations
from superdml.segment.run import (
    MANIFEST_NAME,
    SEGMENTS_NAME,
    TABLE_NAME,
    run_dir,
)
from superdml.segment.tasks import (
    Grid,
    assign_task,
    centers_task,
    in_process_threads,
    load_array,
    table_schema,
)

logger = logging.getLogger(__name__)

ROW_GROUP_SIZE = 65536


@dataclass(frozen=True)
class SegmentResult:
    """What ``segment_raster`` wrote.

    Attributes
    ----------
    raster : str
        Name of the run's subfolder (the raster's stem, made unique).
    out_dir : Path or str
        The raster's subfolder (a key prefix for an output URI).
    segments_path, table_path : Path or str
        ``segments.tif`` and ``superpixels.parquet``.
    n_superpixels, n_tiles : int
    skipped : bool
        True when the outputs were already complete for this source and config.
    seconds : float
    """

    raster: str
    out_dir: Path | str
    segments_path: Path | str
    table_path: Path | str
    n_superpixels: int
    n_tiles: int
    skipped: bool
    seconds: float


def segment_raster(
    path: str | Path,
    out_dir: str | Path,
    config: SegmentConfig | None = None,
    client: object | None = None,
) -> SegmentResult:
    """Segment one raster into SLIC superpixels, tile by tile (see the module docstring).

    Parameters
    ----------
    path : path or URI
        Any raster rasterio opens: GeoTIFF, VRT mosaic, PNG, JPEG... (``s3://``,
        ``gs://``, ``az://``, ``https://`` too).
    out_dir : path or URI
        Run folder; the outputs go to ``out_dir/<stem>/``. In a bucket, every tile's
        work files are objects written once under it, so workers need no shared disk,
        and the two final files are assembled on local scratch space and uploaded.
    config : SegmentConfig, optional
    client : distributed.Client or OnDemandCluster, optional
        Runs the tile tasks on this cluster; in this process when None, or when an
        :class:`~superdml.core.cluster.OnDemandCluster` finds a cluster does not pay for
        this raster's tiles (:func:`~superdml.core.cluster.cluster_pays`).

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
    backend, device = resolve_backend(config.backend, config.device)
    info = raster_info(path)
    bands = check_bands(path, info.count, config.bands)
    step = config.region_size
    tile_size = math.ceil(config.tile_size / step) * step
    n_cells = math.ceil(info.height / step) * math.ceil(info.width / step)
    if n_cells >= 2**32 - 1:
        raise InputError(f"{path}: {n_cells} grid cells do not fit uint32 ids: raise region_size")
    source_fp = raster_fingerprint(info.path)
    digest = config_hash(config)
    tiles = tile_grid(info.height, info.width, tile_size)
    with claim_output(out_dir, "segment"):
        folder = run_dir(out_dir, info.path)
        name = storage.name(folder)
        storage.makedirs(folder)
        manifest = _up_to_date(folder, info.path, digest, source_fp)
        if manifest is not None:
            logger.info("%s: up to date, skipped", folder)
            return SegmentResult(
                name, folder, storage.join(folder, SEGMENTS_NAME),
                storage.join(folder, TABLE_NAME), manifest["n_superpixels"], len(tiles), True,
                time.perf_counter() - start,
            )  # fmt: skip
        storage.delete(storage.join(folder, MANIFEST_NAME))  # the commit mark: gone until redone
        storage.write_json(storage.join(folder, "source.json"), {"source": info.path})
        lo, hi = band_ranges(path, bands, config.nodata)
        work_name = f".work-{combine(digest, source_fp)[:16]}"
        work = storage.join(folder, work_name)
        for stale in storage.listdir(folder):  # ours: other inputs' runs
            if re.fullmatch(r"\.work-[0-9a-f]{16}", stale) and stale != work_name:
                storage.delete_tree(storage.join(folder, stale))
        storage.makedirs(work)
        client = resolve_client(client, len(tiles))
        threads, sweep_threads = in_process_threads(device, len(tiles))
        grid = Grid(
            source=info.path, name=name, bands=tuple(bands), nodata=config.nodata,
            lo=tuple(lo), hi=tuple(hi), step=step, compactness=config.compactness,
            max_iter=config.max_iter, tile_size=tile_size, height=info.height, width=info.width,
            transform=info.transform, work=str(work), backend=backend, device=device,
            sweep_threads=None if client is not None else sweep_threads,
        )  # fmt: skip
        logger.info(
            "%s: %d tiles of %d px, region size %d, %s backend on %s, %s",
            info.path, len(tiles), tile_size, step, backend, device,
            "in this process" if client is None else "on a dask cluster",
        )  # fmt: skip
        segments = storage.join(folder, SEGMENTS_NAME)
        with _segments_file(grid, info, tiles, segments) as write_tile:
            n_superpixels = _run_tiles(grid, tiles, client, threads, write_tile)
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
        _write_outputs(grid, tiles, config, meta, n_superpixels)
        storage.delete_tree(work)
    return SegmentResult(
        name, folder, storage.join(folder, SEGMENTS_NAME), storage.join(folder, TABLE_NAME),
        n_superpixels, len(tiles), False, time.perf_counter() - start,
    )  # fmt: skip


def _up_to_date(folder: Path | str, source: str, digest: str, source_fp: str) -> dict | None:
    """Return the manifest of a complete run of `folder` for this source and config, else None."""
    manifest_path = storage.join(folder, MANIFEST_NAME)
    outputs = (manifest_path, storage.join(folder, SEGMENTS_NAME), storage.join(folder, TABLE_NAME))
    if not all(storage.exists(p) for p in outputs):
        return None
    manifest = json.loads(storage.read_text(manifest_path))
    if (
        manifest.get("config_hash") == digest
        and manifest["source"]["path"] == source
        and manifest.get("source_fingerprint") == source_fp
    ):
        return manifest
    return None


def _run_tiles(
    grid: Grid,
    tiles: list[Tile],
    client: object | None,
    threads: int,
    on_labels: Callable[[int, int], None],
) -> int:
    """Run both phases' tile tasks (in process on `threads` threads when no client).

    ``on_labels(i, count)`` is called in this thread as tile ``i``'s labels are done.

    Returns
    -------
    int
        Superpixels of the raster.
    """
    if client is None and threads > 1:
        map_large_allocations()  # two threads of tile arrays: memory flat with raster size
    calls = [(grid, tile) for tile in tiles]
    map_tasks(centers_task, calls, client, desc=f"{grid.name}: centers", threads=threads)
    counts = map_tasks(
        assign_task, calls, client, desc=f"{grid.name}: labels", threads=threads,
        on_result=on_labels,
    )  # fmt: skip
    return int(sum(counts))


@contextlib.contextmanager
def _segments_file(
    grid: Grid, info: RasterInfo, tiles: list[Tile], path: Path | str
) -> Iterator[Callable[[int, int], None]]:
    """Write ``segments.tif`` tile by tile as the tiles' labels are done; yield the writer.

    ``write(i, count)`` writes tile ``i``'s labels (its work file) into the raster, in
    this thread, while the tile tasks compute the next tiles: GDAL compresses each block
    as it is written, so no compression is left for the end. The file is put in place
    (renamed, or uploaded to a bucket) when the block ends without an error.
    """
    profile = geotiff_profile(info, "uint32", nodata=0)
    with storage.write_once(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:

        def write(i: int, _count: int) -> None:
            tile = tiles[i]
            window = Window(tile.col, tile.row, tile.width, tile.height)
            dst.write(load_array(grid.labels_path(tile)), 1, window=window)

        yield write
        dst.update_tags(superdml_source=info.path, superdml_region_size=str(grid.step))


def _write_outputs(
    grid: Grid,
    tiles: list[Tile],
    config: SegmentConfig,
    meta: dict[str, object],
    n_superpixels: int,
) -> None:
    """Assemble the table from the tiles' files; then the manifest.

    The table is written on local scratch space when the run is in a bucket, and uploaded
    whole (:func:`superdml.core.storage.write_once`).
    """
    folder = storage.parent(grid.work)
    table_sha = _write_table(grid, tiles, storage.join(folder, TABLE_NAME), meta)
    dump_config(config, storage.join(folder, "segment.yaml"))
    storage.write_json(
        storage.join(folder, MANIFEST_NAME),
        {
            **meta,
            "table_sha256": table_sha,
            "fingerprint": combine(
                str(meta["source_fingerprint"]), str(meta["config_hash"]), table_sha
            ),  # fmt: skip
            "n_superpixels": n_superpixels,
            "n_tiles": len(tiles),
        },
    )


def _write_table(grid: Grid, tiles: list[Tile], path: Path | str, meta: dict[str, object]) -> str:
    """Write the superpixel table from the tiles' parts; return its SHA-256."""
    schema = table_schema(grid.bands).with_metadata({"superdml": json.dumps(meta)})
    with storage.write_once(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for tile in tiles:
                part_path, filesystem = storage.arrow_source(grid.table_path(tile))
                part = pq.read_table(part_path, filesystem=filesystem).cast(schema)
                writer.write_table(part, row_group_size=ROW_GROUP_SIZE)
        return sha256_file(tmp)
