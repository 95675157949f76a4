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

The SLIC steps of both phases run on the numpy functions of :mod:`superdml.superpixels`
or on the torch backend (:mod:`superdml.slic`, CPU or CUDA), which keeps their contract;
the tile tasks are in :mod:`superdml._private.segment_tasks`. Both phases write one
small file per tile into a work folder, so an interrupted run
resumes where it stopped and gives identical output; the final ``segments.tif`` and
``superpixels.parquet`` are assembled tile by tile and renamed into place when complete.
Peak memory is that of the tiles in flight (two at a time in process), whatever the
raster size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.windows import Window

from superdml import __version__
from superdml._private.atomic import atomic_write, write_json
from superdml._private.heap import map_large_allocations
from superdml._private.ownership import claim_output
from superdml._private.segment_tasks import (
    Grid,
    assign_task,
    centers_task,
    in_process_threads,
    table_schema,
)
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
    tile_grid,
)

logger = logging.getLogger(__name__)

SEGMENTS_NAME = "segments.tif"
TABLE_NAME = "superpixels.parquet"
MANIFEST_NAME = "manifest.json"
ROW_GROUP_SIZE = 65536


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
        threads, sweep_threads = in_process_threads(device, len(tiles))
        if client is None and threads > 1:
            map_large_allocations()  # two threads of tile arrays: memory flat with raster size
        grid = Grid(
            source=info.path, name=folder.name, bands=tuple(bands), nodata=config.nodata,
            lo=tuple(lo), hi=tuple(hi), step=step, compactness=config.compactness,
            max_iter=config.max_iter, tile_size=tile_size, height=info.height, width=info.width,
            transform=info.transform, work=str(work), backend=backend, device=device,
            sweep_threads=None if client is not None else sweep_threads,
        )  # fmt: skip
        logger.info(
            "%s: %d tiles of %d px, region size %d, %s backend on %s",
            info.path, len(tiles), tile_size, step, backend, device,
        )  # fmt: skip
        calls = [(grid, tile) for tile in tiles]
        map_tasks(centers_task, calls, client, desc=f"{folder.name}: centers", threads=threads)
        counts = map_tasks(
            assign_task, calls, client, desc=f"{folder.name}: labels", threads=threads
        )
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


def _write_segments(grid: Grid, info: RasterInfo, tiles: list[Tile], path: Path) -> None:
    profile = geotiff_profile(info, "uint32", nodata=0)
    with atomic_write(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for tile in tiles:
            window = Window(tile.col, tile.row, tile.width, tile.height)
            dst.write(np.load(grid.labels_path(tile)), 1, window=window)
        dst.update_tags(superdml_source=info.path, superdml_region_size=str(grid.step))


def _write_table(grid: Grid, tiles: list[Tile], path: Path, meta: dict[str, object]) -> None:
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
