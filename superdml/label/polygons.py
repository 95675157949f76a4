"""Superpixel polygons of a label run: GeoPackage or GeoParquet, one tile at a time.

Polygons are traced per tile over the superpixels that tile owns (those of its current
predictions part), so each superpixel is traced once, whole, and memory holds one tile.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import rasterio.crs
import rasterio.features
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from superdml.core import storage
from superdml.core.progress import progress
from superdml.label.predictions import LabelRun, RasterParts, lookup
from superdml.raster.io import open_raster, read_window
from superdml.segment.run import SegmentRun

VectorFormat = Literal["gpkg", "parquet", "none"]

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


def _owned_polygons(run: SegmentRun, parts: RasterParts, i: int) -> pa.Table:
    """Polygons of the superpixels owned by tile `i`, with their current predictions.

    Returns
    -------
    pyarrow.Table
        :data:`POLYGON_SCHEMA`, geometry as WKB; no rows for a tile without a current part.
    """
    import shapely

    tile, path = parts.tiles[i], parts.paths[i]
    if path is None:
        return POLYGON_SCHEMA.empty_table()
    preds = parts.read(POLYGON_SCHEMA.names[:-1], [i])
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
    pieces = np.split(polygons[order], starts[1:])
    merged = [p[0] if len(p) == 1 else shapely.union_all(p) for p in pieces]
    geometry = pa.array(shapely.to_wkb(np.array(merged, object)), pa.binary())
    return preds.append_column("geometry", geometry).cast(POLYGON_SCHEMA)


def write_polygons(
    label_run: LabelRun, run: SegmentRun, path: Path | str, fmt: VectorFormat,
    parts: RasterParts | None = None,
) -> None:  # fmt: skip
    """Write superpixel polygons with label, score and margin as GeoPackage or GeoParquet.

    Parameters
    ----------
    label_run, run
    path : Path or str
        A file, or an object written whole (:func:`superdml.core.storage.write_once`).
    fmt : {"gpkg", "parquet"}
    parts : RasterParts, optional
        ``label_run.parts(run)`` when the caller has it: only current parts are traced.
    """
    parts = parts or label_run.parts(run)
    tiles = parts.tiles
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
    with storage.write_once(path, keep_suffix=True) as tmp:
        writer = (
            pq.ParquetWriter(
                tmp, POLYGON_SCHEMA.with_metadata({"geo": json.dumps(geo)}), compression="zstd"
            )
            if fmt == "parquet"
            else None
        )
        first = True
        for i in progress(range(len(tiles)), len(tiles), f"{run.name}: polygons", "tile"):
            table = _owned_polygons(run, parts, i)
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
