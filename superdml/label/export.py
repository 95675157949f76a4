"""GIS exports of predictions: label and score rasters, polygons, QGIS style, summary.

Rasters are computed window by window (whole output blocks) from ``segments.tif`` and
the raster's predictions, with their overview levels (mode for labels, mean for scores:
:mod:`superdml.raster.overviews`), into memory-mapped staging arrays; GDAL then writes each
raster once from them, a COG with those overviews or a tiled GeoTIFF
(:class:`~superdml.raster.staged.StagedRaster`). Windows run on a thread per
core (:func:`export_threads`, kept for the process); the two files are written at the
same time, GDAL compressing on all cores.
Polygons: :mod:`superdml.label.polygons`. Only current predictions parts are read
(:meth:`LabelRun.parts`): a tile without one is nodata in every file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.windows import Window

from superdml.core import storage
from superdml.core.cluster import default_workers
from superdml.core.errors import InputError, input_error
from superdml.core.ownership import claim_output
from superdml.core.progress import progress
from superdml.label.polygons import VectorFormat, write_polygons
from superdml.label.predictions import IdTable, LabelRun, RasterParts, load_label_run, lookup
from superdml.raster.class_names import UNKNOWN
from superdml.raster.classes import UNKNOWN_COLOR, ClassScheme
from superdml.raster.io import BLOCK_SIZE, iter_blocks, open_raster
from superdml.raster.overviews import downsample_mean, downsample_mode, overview_factors
from superdml.raster.staged import StagedRaster
from superdml.segment.run import SegmentRun, load_segment_runs

logger = logging.getLogger(__name__)

RasterFormat = Literal["cog", "gtiff"]

#: Creation options of the COG rasters. zstd at level 1 without a predictor: these rasters
#: are runs of one value per superpixel, which a predictor breaks up; on the benchmark's
#: rasters it compresses 4x faster than deflate level 6 for 10% more bytes
#: (``benchmarks/README.md``). ``NUM_THREADS``: compressed on all cores.
COG_OPTIONS: dict[str, Any] = {
    "COMPRESS": "ZSTD", "LEVEL": 1, "NUM_THREADS": "ALL_CPUS", "BLOCKSIZE": BLOCK_SIZE,
    "BIGTIFF": "IF_SAFER",
}  # fmt: skip
#: Creation options of ``--raster-format gtiff``: the same compression and blocks, tiled.
GTIFF_OPTIONS: dict[str, Any] = {
    "COMPRESS": "ZSTD", "ZSTD_LEVEL": 1, "NUM_THREADS": "ALL_CPUS", "TILED": "YES",
    "BLOCKXSIZE": BLOCK_SIZE, "BLOCKYSIZE": BLOCK_SIZE, "BIGTIFF": "IF_SAFER",
}  # fmt: skip
#: GDAL settings of the raster writes: decode ``segments.tif`` on all cores.
GDAL_CONFIG: dict[str, str] = {"GDAL_NUM_THREADS": "ALL_CPUS"}
#: Side of the windows the rasters are written in, in pixels: whole output blocks.
WINDOW = 2 * BLOCK_SIZE


@dataclass(frozen=True)
class ExportResult:
    """Files written by :func:`export`, per raster name."""

    outputs: dict[str, dict[str, Path | str]]
    seconds: float


def qgis_style(scheme: ClassScheme) -> str:
    """Return a QGIS ``.qml`` paletted style: the scheme's codes, names and colors.

    ``unknown`` is an entry of its own (gray) on the scheme's unknown code.
    """
    rows = [*((e.code, e.name, e.color) for e in scheme.entries)]
    rows.append((scheme.unknown, UNKNOWN, UNKNOWN_COLOR))
    entries = "\n".join(
        f'        <paletteEntry value="{code}" color="#{r:02x}{g:02x}{b:02x}" alpha="255" '
        f'label="{escape(name, {chr(34): "&quot;"})}"/>'
        for code, name, (r, g, b) in rows
    )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28" styleCategories="Symbology">\n'
        "  <pipe>\n"
        '    <rasterrenderer type="paletted" band="1" opacity="1" nodataColor="">\n'
        "      <colorPalette>\n"
        f"{entries}\n"
        "      </colorPalette>\n"
        "    </rasterrenderer>\n"
        "  </pipe>\n"
        "</qgis>\n"
    )


def label_tags(scheme: ClassScheme) -> dict[str, str]:
    """Return the tags of ``labels.tif``: class names by code, and the special codes.

    ``class_names`` is a JSON object code -> name (what ``superdml crops --label-raster``
    reads back), without ``unknown``.
    """
    return {
        "class_names": json.dumps({str(e.code): e.name for e in scheme.entries}),
        "unknown_code": str(scheme.unknown),
        "nodata_code": str(scheme.nodata),
    }


def color_table(scheme: ClassScheme) -> dict[int, tuple[int, int, int, int]]:
    """Return the GDAL color table of ``labels.tif``: nodata transparent, unknown gray."""
    table = {scheme.nodata: (0, 0, 0, 0), scheme.unknown: (*UNKNOWN_COLOR, 255)}
    table.update({e.code: (*e.color, 255) for e in scheme.entries})
    return table


def write_label_rasters(
    label_run: LabelRun,
    run: SegmentRun,
    predictions: pa.Table,
    labels_path: Path | str,
    scores_path: Path | str,
    cog: bool,
) -> None:
    """Write ``labels.tif`` and ``scores.tif`` for one raster, window by window.

    Each window of ``segments.tif`` (whole blocks, a multiple of the largest overview
    factor) is mapped through the raster's predictions (one :class:`IdTable` each for
    codes and scores) into a :class:`StagedRaster`, and its overview levels computed
    from it (:func:`downsample_mode` for labels, :func:`downsample_mean` for scores).
    Windows run on a thread per core (:func:`export_threads`); GDAL then writes each
    raster once, the two at the same time.

    Parameters
    ----------
    label_run, run
    predictions : pyarrow.Table
        ``segment_id``, ``label_code`` and ``score`` of the raster's superpixels.
    labels_path, scores_path : Path or str
        Files, or objects of a bucket (staged and written on local scratch space, then
        uploaded whole).
    cog : bool
        COGs with overviews, else tiled GeoTIFFs without.
    """
    scheme = label_run.scheme
    info = run.source
    factors = overview_factors(info.height, info.width, BLOCK_SIZE) if cog else []
    step = factors[-1] if factors else 1
    size = -(-WINDOW // step) * step
    windows = list(iter_blocks(info.height, info.width, size))
    ids = predictions.column("segment_id").to_numpy()
    pixels = info.height * info.width
    codes = predictions.column("label_code").to_numpy().astype(scheme.dtype)
    scores = predictions.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    code_of = IdTable(ids, codes, scheme.nodata, pixels)
    score_of = IdTable(ids, scores, np.float32(np.nan), pixels)
    folder = storage.scratch_dir() if storage.is_uri(labels_path) else Path(labels_path).parent
    cores = default_workers()
    with (
        rasterio.Env(**GDAL_CONFIG),
        StagedRaster(folder, info, scheme.dtype, scheme.nodata, factors) as labels,
        StagedRaster(folder, info, "float32", float("nan"), factors) as score_raster,
        ExitStack() as stack,
    ):
        readers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(cores):
            readers.put(stack.enter_context(open_raster(run.segments_path)))

        def fill(window: tuple[int, int, int, int]) -> None:
            row, col, height, width = window
            segments = readers.get()
            try:
                ids = segments.read(1, window=Window(col, row, width, height))
            finally:
                readers.put(segments)
            for staged, table in ((labels, code_of), (score_raster, score_of)):
                table.take(ids, out=staged.window(0, row, col, height, width))
                for level in range(1, len(staged.levels)):
                    below = staged.window(level - 1, row, col, height, width)
                    out = staged.window(level, row, col, height, width)
                    if staged is labels:
                        downsample_mode(below, scheme.nodata, out)
                    else:
                        downsample_mean(below, out)

        pool = export_threads(cores)
        filled = [pool.submit(fill, window) for window in windows]
        with _awaited(filled):
            for task in progress(
                as_completed(filled), total=len(windows), desc=f"{run.name}: rasters",
                unit="window",
            ):  # fmt: skip
                task.result()
        options = COG_OPTIONS if cog else GTIFF_OPTIONS
        tags = label_tags(scheme)
        # both files at once: each write is mostly serial (GDAL compresses on all cores,
        # but reads, lays out and writes on one)
        written = [
            pool.submit(labels.write, labels_path, cog, options, color_table(scheme), tags, tags),
            pool.submit(
                score_raster.write, scores_path, cog, options,
                band_tags={"description": "kNN vote share of the predicted class"},
            ),
        ]  # fmt: skip
        with _awaited(written):
            for write in written:
                write.result()


@functools.cache
def export_threads(cores: int) -> ThreadPoolExecutor:
    """Return the process's export threads: `cores` of them, kept across calls and rasters.

    A thread's first GDAL write of a CRS pays PROJ's database start-up (about 15 ms, its
    own SQLite queries); threads kept for the process pay it once, not per raster. A
    forked child starts new ones.
    """
    return ThreadPoolExecutor(cores, thread_name_prefix="superdml-export")


os.register_at_fork(after_in_child=export_threads.cache_clear)


@contextmanager
def _awaited(tasks: list[Future[Any]]) -> Iterator[None]:
    """Wait for every task on leaving, even on an error (they write into staged arrays)."""
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        wait(tasks)


def read_predictions(parts: RasterParts) -> pa.Table:
    """``segment_id``, ``label_code`` and ``score`` of a raster's current predictions."""
    return parts.read(["segment_id", "label_code", "score"])


def summarize(label_run: LabelRun, run: SegmentRun, preds: pa.Table) -> dict[str, Any]:
    """Count, area (in map units squared) and mean score per class of one raster.

    Parameters
    ----------
    label_run, run
    preds : pyarrow.Table
        :func:`read_predictions` of the raster.

    Returns
    -------
    dict
        ``raster``, ``superpixels``, ``classes`` (by class name, each with its ``code``;
        ``unknown`` only when some superpixel is unknown) and ``codes`` (the same
        entries by code, as a string, each with its ``name``).
    """
    scheme = label_run.scheme
    with storage.open_input(run.table_path) as stream:
        areas = pq.ParquetFile(stream).read(columns=["segment_id", "area_px"])
    area = lookup(
        preds.column("segment_id").to_numpy(),
        areas.column("segment_id").to_numpy(),
        areas.column("area_px").to_numpy(),
        0,
    )
    a, b, _, d, e, _ = run.source.transform
    pixel_area = abs(a * e - b * d)
    codes = preds.column("label_code").to_numpy()
    scores = preds.column("score").to_numpy(zero_copy_only=False)
    classes = {}
    for name, code in [*scheme.codes.items(), (UNKNOWN, scheme.unknown)]:
        sel = codes == code
        if (sel.any() or name != UNKNOWN) and name in [*label_run.class_names, UNKNOWN]:
            classes[name] = {
                "code": code,
                "superpixels": int(sel.sum()),
                "area_px": int(area[sel].sum()),
                "area": float(area[sel].sum() * pixel_area),
                "mean_score": float(scores[sel].mean()) if sel.any() else None,
            }
    by_code = {
        str(c["code"]): {"name": n, **{k: v for k, v in c.items() if k != "code"}}
        for n, c in classes.items()
    }
    return {
        "raster": run.name,
        "superpixels": int(preds.num_rows),
        "classes": classes,
        "codes": by_code,
    }


def check_complete(
    label_run: LabelRun, parts: list[RasterParts], allow_incomplete: bool
) -> dict[str, dict[str, int]]:
    """Refuse a label run with tiles that have no current predictions part, unless allowed.

    Parameters
    ----------
    label_run : LabelRun
    parts : list of RasterParts
        ``label_run.parts(run)`` of each raster to export.
    allow_incomplete : bool
        Log a warning instead of refusing (those tiles are then exported as nodata).

    Returns
    -------
    dict of str to dict
        By raster name, for incomplete rasters only: ``{"missing_tiles": m, "tiles": n}``.

    Raises
    ------
    InputError
        When a raster has missing parts and `allow_incomplete` is false.
    """
    incomplete = {
        p.raster: {"missing_tiles": len(p.missing), "tiles": len(p.tiles)}
        for p in parts
        if p.missing
    }
    for name, counts in incomplete.items():
        problem = (
            f"{counts['missing_tiles']} of {counts['tiles']} tiles of {name!r} have no "
            "predictions (interrupted label run?)"
        )
        if not allow_incomplete:
            raise input_error(
                label_run.out_dir,
                f"{problem}: rerun superdml label, or pass --allow-incomplete",
            )
        logger.warning("%s: %s: exported with those tiles unlabeled", label_run.out_dir, problem)
    return incomplete


def export(
    out: str | Path,
    segment_dir: str | Path,
    raster_format: RasterFormat = "cog",
    vector: VectorFormat = "gpkg",
    allow_incomplete: bool = False,
) -> ExportResult:
    """Export a label run as GIS files.

    Writes per raster, in the label run's class scheme: ``labels.tif`` (the scheme's
    codes, its unknown code for ``unknown``, its nodata code where unlabeled; class
    names in the tags and the scheme's colors as the color table), ``scores.tif``
    (float32, NaN where unlabeled), ``labels.qml`` (QGIS style), ``superpixels.gpkg`` or
    ``superpixels.parquet`` (GeoParquet) polygons with ``label`` and ``label_code``, and
    ``summary.json``. With one raster the files go to `out`, with several to
    ``out/<raster>/``.

    A label run with tiles that have no current predictions part (an interrupted
    ``superdml label``, or parts made from other segments or inputs: see
    :meth:`LabelRun.parts`) is refused, before anything is written, unless
    `allow_incomplete`: then those tiles are nodata in every file, their superpixels are
    not counted in ``summary.json``, and it says
    ``"incomplete": {"missing_tiles": m, "tiles": n}``.

    Parameters
    ----------
    out : path or URI
        The ``superdml label`` output folder (or prefix).
    segment_dir : path or URI
        The segment run (or one raster's subfolder) that was labeled.
    raster_format : {"cog", "gtiff"}
    vector : {"gpkg", "parquet", "none"}
    allow_incomplete : bool
        Export a label run with missing predictions parts (a warning, not an error).

    Returns
    -------
    ExportResult

    Raises
    ------
    InputError
        Before anything is written: `out` is not a label run, a raster was not labeled
        there, or (without `allow_incomplete`) tiles have no predictions.
    """
    start = time.perf_counter()
    if raster_format not in ("cog", "gtiff"):
        raise InputError(f"--raster-format {raster_format!r}: expected cog or gtiff")
    if vector not in ("gpkg", "parquet", "none"):
        raise InputError(f"--vector {vector!r}: expected gpkg, parquet or none")
    label_run = load_label_run(out)
    runs = load_segment_runs(segment_dir)
    label_run.check_segments(runs, segment_dir)
    parts = [label_run.parts(run) for run in runs]
    incomplete = check_complete(label_run, parts, allow_incomplete)
    with claim_output(out, "export", accept=("label",)):
        outputs = {
            run.name: _export_run(
                label_run, run, p, len(runs), raster_format, vector, incomplete.get(run.name)
            )
            for run, p in zip(runs, parts, strict=True)
        }
    return ExportResult(outputs, time.perf_counter() - start)


def export_files(
    out: str | Path, raster: str, n_rasters: int, vector: VectorFormat
) -> dict[str, Path | str]:
    """Return the files :func:`export` writes for one raster of `n_rasters`, by kind.

    ``labels``, ``scores``, ``style``, ``summary`` and (unless `vector` is ``none``)
    ``polygons``: in `out` for one raster, in ``out/<raster>/`` for several.
    """
    folder = storage.location(out) if n_rasters == 1 else storage.join(out, raster)
    files = {
        "labels": storage.join(folder, "labels.tif"),
        "scores": storage.join(folder, "scores.tif"),
        "style": storage.join(folder, "labels.qml"),
        "summary": storage.join(folder, "summary.json"),
    }
    if vector != "none":
        files["polygons"] = storage.join(folder, f"superpixels.{vector}")
    return files


def _export_run(
    label_run: LabelRun, run: SegmentRun, parts: RasterParts, n_runs: int,
    raster_format: RasterFormat, vector: VectorFormat, incomplete: dict[str, int] | None,
) -> dict[str, Path | str]:  # fmt: skip
    """Write one raster's export files from its current `parts`; return them by kind.

    `incomplete` (missing tiles of a run exported with ``allow_incomplete``) goes into
    ``summary.json``.
    """
    files = export_files(label_run.out_dir, run.name, n_runs, vector)
    storage.makedirs(storage.parent(files["labels"]))
    preds = read_predictions(parts)
    write_label_rasters(
        label_run, run, preds, files["labels"], files["scores"], raster_format == "cog"
    )
    storage.write_text(files["style"], qgis_style(label_run.scheme))
    if "polygons" in files:
        write_polygons(label_run, run, files["polygons"], vector, parts)
    summary = summarize(label_run, run, preds)
    if incomplete is not None:
        summary["incomplete"] = incomplete
    storage.write_json(files["summary"], summary)
    return files
