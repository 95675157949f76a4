"""GIS exports of predictions: label and score rasters, polygons, QGIS style, summary.

Rasters are written in windows of whole output blocks from ``segments.tif`` and the
predictions parts of the tiles around the window (a lookup table from segment id to
class, each part read once), never the whole raster in memory. With
``raster_format="cog"`` the tiled GeoTIFF is then copied by GDAL's COG driver
(overviews by mode for labels, average for scores). GDAL's compression, decoding and
overviews, which bound the rasters' speed, run on all cores.
Polygons are traced per tile over the superpixels that tile owns, so each superpixel
is traced once, whole.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import rasterio.features
import rasterio.shutil
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from superdml._private.atomic import atomic_write, temp_path, write_json
from superdml._private.ownership import claim_output
from superdml._private.progress import progress
from superdml.classes import UNKNOWN, UNKNOWN_COLOR, ClassScheme
from superdml.errors import InputError, input_error
from superdml.predictions import LabelRun, load_label_run, lookup
from superdml.raster import (
    BLOCK_SIZE,
    RasterInfo,
    Tile,
    geotiff_profile,
    iter_blocks,
    open_raster,
    read_window,
)
from superdml.segment import SegmentRun, load_segment_runs

logger = logging.getLogger(__name__)

RasterFormat = Literal["cog", "gtiff"]
VectorFormat = Literal["gpkg", "parquet", "none"]

#: Compression of the label and score rasters. zstd at level 1 without a predictor: these
#: rasters are runs of one value per superpixel, which a predictor breaks up; on the
#: benchmark's rasters it compresses 4x faster than deflate level 6 for 10% more bytes
#: (``benchmarks/README.md``). ``NUM_THREADS``: compressed on all cores.
COMPRESSION: dict[str, Any] = {
    "compress": "zstd", "zstd_level": 1, "predictor": 1, "num_threads": "all_cpus",
}  # fmt: skip
#: Creation options of the COG copy (the same compression).
COG_OPTIONS: dict[str, Any] = {
    "COMPRESS": "ZSTD", "LEVEL": 1, "NUM_THREADS": "ALL_CPUS", "BLOCKSIZE": BLOCK_SIZE,
    "BIGTIFF": "IF_SAFER",
}  # fmt: skip
#: GDAL settings of the raster writes: decode, compress and resample overviews on all
#: cores; the COG driver's temporary overview file uncompressed (a third of the raster's
#: pixels; compressing it with its default, LZW, doubled the COG copy of the scores).
GDAL_CONFIG: dict[str, str] = {"GDAL_NUM_THREADS": "ALL_CPUS", "COG_TMP_COMPRESSION": "NONE"}
#: Columns of ``superpixels.gpkg`` / ``.parquet`` (geometry as WKB).
POLYGON_SCHEMA = pa.schema(
    [
        ("segment_id", pa.uint32()),
        ("label", pa.string()),
        ("label_code", pa.uint16()),
        ("score", pa.float32()),
        ("margin", pa.float32()),
        ("geometry", pa.binary()),
    ]
)
#: Side of the windows the rasters are written in, in pixels: whole output blocks.
WINDOW = 2 * BLOCK_SIZE


@dataclass(frozen=True)
class ExportResult:
    """Files written by :func:`export`, per raster name."""

    outputs: dict[str, dict[str, Path]]
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


class _PartCache:
    """The predictions parts of one raster as arrays, each read once, kept while needed.

    Windows go row-major, so a part is dropped once the windows have passed its tile row
    and the row below: what is held is about three rows of tiles.
    """

    def __init__(self, label_run: LabelRun, raster: str, tiles: list[Tile], dtype: str) -> None:
        self.label_run, self.raster, self.dtype = label_run, raster, np.dtype(dtype)
        self.by_index = {(t.ti, t.tj): t for t in tiles}
        self.rows = 1 + max(t.ti for t in tiles)
        self.cols = 1 + max(t.tj for t in tiles)
        self.parts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def around(
        self, row: int, col: int, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment ids, label codes and scores of the tiles a window touches and their neighbours.

        Parameters
        ----------
        row, col, height, width : int
            The window, inside the raster.

        Returns
        -------
        ids : (N,) uint32 ndarray
        codes : (N,) ndarray of the scheme's dtype
        scores : (N,) float32 ndarray
        """
        size = self.label_run.tile_size
        ti0, ti1 = max(row // size - 1, 0), min((row + height - 1) // size + 1, self.rows - 1)
        tj0, tj1 = max(col // size - 1, 0), min((col + width - 1) // size + 1, self.cols - 1)
        for key in [k for k in self.parts if k[0] < ti0]:
            del self.parts[key]
        keys = [(ti, tj) for ti in range(ti0, ti1 + 1) for tj in range(tj0, tj1 + 1)]
        for key in keys:
            if key not in self.parts:
                self.parts[key] = self._read(self.by_index[key])
        ids, codes, scores = zip(*(self.parts[k] for k in keys), strict=True)
        return np.concatenate(ids), np.concatenate(codes), np.concatenate(scores)

    def _read(self, tile: Tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        path = self.label_run.part_path(self.raster, tile)
        if not path.exists():  # an incomplete run's missing part: its superpixels unlabeled
            return np.empty(0, np.uint32), np.empty(0, self.dtype), np.empty(0, np.float32)
        table = pq.ParquetFile(path).read(columns=["segment_id", "label_code", "score"])
        return (
            table.column("segment_id").to_numpy().astype(np.uint32, copy=False),
            table.column("label_code").to_numpy().astype(self.dtype),
            table.column("score").to_numpy(zero_copy_only=False).astype(np.float32, copy=False),
        )


def raster_profile(info: RasterInfo, dtype: str, nodata: float) -> dict[str, Any]:
    """Profile of a label or score raster: :func:`geotiff_profile` with :data:`COMPRESSION`."""
    profile = {
        k: v for k, v in geotiff_profile(info, dtype, nodata=nodata).items() if k != "zlevel"
    }
    return {**profile, **COMPRESSION}


def finish_raster(stage: Path, final: Path, cog: bool, resampling: str) -> None:
    """Move a written raster into place: as is, or copied as a COG (overviews by `resampling`)."""
    with atomic_write(final) as out:
        if cog:
            rasterio.shutil.copy(
                stage, out, driver="COG", RESAMPLING=resampling, OVERVIEW_RESAMPLING=resampling,
                **COG_OPTIONS,
            )  # fmt: skip
        else:
            os.replace(stage, out)


def write_label_rasters(
    label_run: LabelRun, run: SegmentRun, labels_path: Path, scores_path: Path, cog: bool
) -> None:
    """Write ``labels.tif`` and ``scores.tif`` for one raster, window by window.

    Windows are whole blocks of the outputs (and of ``segments.tif``); each maps its
    segment ids through the predictions of the tiles around it (:class:`_PartCache`).
    GDAL runs with :data:`GDAL_CONFIG`.
    """
    scheme = label_run.scheme
    tiles = label_run.tiles(run.source.height, run.source.width)
    parts = _PartCache(label_run, run.name, tiles, scheme.dtype)
    windows = list(iter_blocks(run.source.height, run.source.width, WINDOW))
    tmp_labels = temp_path(labels_path.with_name(f"{labels_path.stem}-stage.tif"))
    tmp_scores = temp_path(scores_path.with_name(f"{scores_path.stem}-stage.tif"))
    try:
        with rasterio.Env(**GDAL_CONFIG):
            with (
                rasterio.open(
                    tmp_labels, "w", **raster_profile(run.source, scheme.dtype, scheme.nodata)
                ) as dst_l,
                rasterio.open(
                    tmp_scores, "w", **raster_profile(run.source, "float32", float("nan"))
                ) as dst_s,
                open_raster(run.segments_path) as seg,
            ):
                for row, col, height, width in progress(
                    windows, total=len(windows), desc=f"{run.name}: rasters", unit="window"
                ):
                    window = Window(col, row, width, height)
                    segments = seg.read(1, window=window)
                    ids, codes, scores = parts.around(row, col, height, width)
                    dst_l.write(lookup(segments, ids, codes, scheme.nodata), 1, window=window)
                    dst_s.write(lookup(segments, ids, scores, np.nan), 1, window=window)
                dst_l.write_colormap(1, color_table(scheme))
                tags = label_tags(scheme)
                dst_l.update_tags(1, **tags)
                dst_l.update_tags(**tags)
                dst_s.update_tags(1, description="kNN vote share of the predicted class")
            finish_raster(tmp_labels, labels_path, cog, "MODE")
            finish_raster(tmp_scores, scores_path, cog, "AVERAGE")
    finally:
        for tmp in (tmp_labels, tmp_scores):
            tmp.unlink(missing_ok=True)


def _owned_polygons(label_run: LabelRun, run: SegmentRun, tile: Tile) -> pa.Table:
    """Polygons of the superpixels owned by one tile, with their predictions.

    Returns
    -------
    pyarrow.Table
        :data:`POLYGON_SCHEMA`, geometry as WKB; no rows for a tile without predictions.
    """
    import shapely

    path = label_run.part_path(run.name, tile)
    if not path.exists():
        return POLYGON_SCHEMA.empty_table()
    preds = pq.ParquetFile(path).read(columns=POLYGON_SCHEMA.names[:-1])
    if preds.num_rows == 0:
        return POLYGON_SCHEMA.empty_table()
    ids = preds.column("segment_id").to_numpy()
    boxes = run.superpixels_in(
        tile.row, tile.col, tile.height, tile.width,
        ["segment_id", "row_start", "row_stop", "col_start", "col_stop"],
    )  # fmt: skip
    r0, c0 = (int(boxes.column(c).to_numpy().min()) for c in ("row_start", "col_start"))
    r1, c1 = (int(boxes.column(c).to_numpy().max()) for c in ("row_stop", "col_stop"))
    with open_raster(run.segments_path) as seg:
        segments, _ = read_window(seg, [1], r0, c0, r1 - r0, c1 - c0)
    # shapes() takes int32 at most: trace each owned pixel's row in `ids` (-1: not owned)
    index = lookup(segments[0], ids, np.arange(ids.size, dtype=np.int32), -1)
    affine = window_transform(Window(c0, r0, c1 - c0, r1 - r0), run.source.affine)
    shapes = rasterio.features.shapes(index, mask=index >= 0, transform=affine, connectivity=4)
    # GeoJSON rings -> one coordinate array; shapely assembles every polygon in one call
    rings: list[list[tuple[float, float]]] = []
    polygon_of: list[int] = []
    values: list[float] = []
    for n, (geom, value) in enumerate(shapes):
        rings.extend(geom["coordinates"])
        polygon_of.extend([n] * len(geom["coordinates"]))
        values.append(value)
    lengths = np.fromiter(map(len, rings), np.intp, len(rings))
    flat = chain.from_iterable(chain.from_iterable(rings))
    coords = np.fromiter(flat, np.float64, 2 * int(lengths.sum())).reshape(-1, 2)
    ring_index = np.repeat(np.arange(len(rings)), lengths)
    polygons = shapely.polygons(shapely.linearrings(coords, indices=ring_index), indices=polygon_of)
    rows = np.asarray(values).astype(np.intp)
    # a superpixel traced in several parts (touching only at corners) becomes a MultiPolygon
    order = np.argsort(rows, kind="stable")
    traced, starts = np.unique(rows[order], return_index=True)
    if traced.size != ids.size:
        raise RuntimeError(f"{path}: superpixels without pixels in {run.segments_path}")
    parts = np.split(polygons[order], starts[1:])
    merged = [p[0] if len(p) == 1 else shapely.union_all(p) for p in parts]
    geometry = pa.array(shapely.to_wkb(np.array(merged, object)), pa.binary())
    return preds.append_column("geometry", geometry).cast(POLYGON_SCHEMA)


def write_polygons(label_run: LabelRun, run: SegmentRun, path: Path, fmt: VectorFormat) -> None:
    """Write superpixel polygons with label, score and margin as GeoPackage or GeoParquet."""
    tiles = label_run.tiles(run.source.height, run.source.width)
    crs = rasterio.crs.CRS.from_wkt(run.source.crs) if run.source.crs else None
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": ["Polygon", "MultiPolygon"],
                "crs": crs.to_dict(projjson=True) if crs else None,
            }
        },
    }
    with atomic_write(path, keep_suffix=True) as tmp:
        writer = (
            pq.ParquetWriter(
                tmp, POLYGON_SCHEMA.with_metadata({"geo": json.dumps(geo)}), compression="zstd"
            )
            if fmt == "parquet"
            else None
        )
        first = True
        for tile in progress(tiles, total=len(tiles), desc=f"{run.name}: polygons", unit="tile"):
            table = _owned_polygons(label_run, run, tile)
            if table.num_rows == 0:
                continue
            if writer is not None:
                writer.write_table(table)
            else:
                _append_gpkg(tmp, table, crs, append=not first)
            first = False
        if writer is not None:
            writer.close()
        elif first:
            _append_gpkg(tmp, POLYGON_SCHEMA.empty_table(), crs, append=False)


def _append_gpkg(path: Path, table: pa.Table, crs: Any, append: bool) -> None:
    from pyogrio.raw import write

    columns = [c for c in table.column_names if c != "geometry"]
    write(
        str(path),
        geometry=np.asarray(table.column("geometry").to_pylist(), dtype=object),
        field_data=[table.column(c).to_numpy(zero_copy_only=False) for c in columns],
        fields=columns,
        crs=crs.to_wkt() if crs else None,
        geometry_type="MultiPolygon",
        driver="GPKG",
        layer="superpixels",
        append=append,
        promote_to_multi=True,
    )


def summarize(label_run: LabelRun, run: SegmentRun) -> dict[str, Any]:
    """Count, area (in map units squared) and mean score per class of one raster.

    Returns
    -------
    dict
        ``raster``, ``superpixels``, ``classes`` (by class name, each with its ``code``;
        ``unknown`` only when some superpixel is unknown) and ``codes`` (the same
        entries by code, as a string, each with its ``name``).
    """
    scheme = label_run.scheme
    tiles = label_run.tiles(run.source.height, run.source.width)
    preds = label_run.read_parts(run.name, tiles, ["segment_id", "label_code", "score"])
    areas = pq.ParquetFile(run.table_path).read(columns=["segment_id", "area_px"])
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
    label_run: LabelRun, runs: list[SegmentRun], allow_incomplete: bool
) -> dict[str, dict[str, int]]:
    """Refuse a label run with tiles that have no predictions part, unless allowed.

    Parameters
    ----------
    label_run : LabelRun
    runs : list of SegmentRun
        The rasters to export.
    allow_incomplete : bool
        Log a warning instead of refusing.

    Returns
    -------
    dict of str to dict
        By raster name, for incomplete rasters only: ``{"missing_tiles": m, "tiles": n}``.

    Raises
    ------
    InputError
        When a raster has missing parts and `allow_incomplete` is false.
    """
    incomplete = {}
    for run in runs:
        height, width = run.source.height, run.source.width
        missing = len(label_run.missing_tiles(run.name, height, width))
        if missing:
            incomplete[run.name] = {
                "missing_tiles": missing,
                "tiles": len(label_run.tiles(height, width)),
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

    A label run with tiles that have no predictions part (an interrupted ``superdml
    label``) is refused, before anything is written, unless `allow_incomplete`: then
    those tiles are unlabeled and ``summary.json`` says
    ``"incomplete": {"missing_tiles": m, "tiles": n}``.

    Parameters
    ----------
    out : path
        The ``superdml label`` output folder.
    segment_dir : path
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
    incomplete = check_complete(label_run, runs, allow_incomplete)
    with claim_output(out, "export", accept=("label",)):
        outputs = {
            run.name: _export_run(
                label_run, run, len(runs), raster_format, vector, incomplete.get(run.name)
            )
            for run in runs
        }
    return ExportResult(outputs, time.perf_counter() - start)


def _export_run(
    label_run: LabelRun, run: SegmentRun, n_runs: int, raster_format: RasterFormat,
    vector: VectorFormat, incomplete: dict[str, int] | None,
) -> dict[str, Path]:  # fmt: skip
    """Write one raster's export files; return them by kind.

    `incomplete` (missing tiles of a run exported with ``allow_incomplete``) goes into
    ``summary.json``.
    """
    out = label_run.out_dir
    folder = Path(out) if n_runs == 1 else Path(out) / run.name
    folder.mkdir(parents=True, exist_ok=True)
    files = {"labels": folder / "labels.tif", "scores": folder / "scores.tif"}
    write_label_rasters(label_run, run, files["labels"], files["scores"], raster_format == "cog")
    files["style"] = folder / "labels.qml"
    with atomic_write(files["style"]) as tmp:
        tmp.write_text(qgis_style(label_run.scheme))
    if vector != "none":
        suffix = "gpkg" if vector == "gpkg" else "parquet"
        files["polygons"] = folder / f"superpixels.{suffix}"
        write_polygons(label_run, run, files["polygons"], vector)
    files["summary"] = folder / "summary.json"
    summary = summarize(label_run, run)
    if incomplete is not None:
        summary["incomplete"] = incomplete
    write_json(files["summary"], summary)
    return files
