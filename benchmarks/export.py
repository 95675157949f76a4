"""Export throughput: label raster megapixels per second of ``superdml.export.export``.

A part of ``benchmarks/run.py``, run in fresh processes. ``measure``: ``export`` of the
label row's predictions to COG label and score rasters, without polygons; the figure is
the raster's megapixels over the whole call (reading segments and predictions, the
lookups, both GeoTIFFs, both COG copies with overviews, the QGIS style, the summary).
``write_only``, the baseline: the same two rasters, already in memory, written by
rasterio in one call each with the same profiles, GDAL settings and COG copies, so the
ratio is how close ``export`` comes to what GDAL's writing alone allows. The target is
>= 50 MP/s. ``polygons``: the superpixel polygons (GeoPackage, the CLI's default),
which ``measure`` leaves out, in superpixels per second: a figure of their own.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Return ``throughput`` in megapixels of label raster per second."""
    from superdml.export import export

    start = time.perf_counter()
    export(spec["labels"], spec["segments"], "cog", "none")
    return {"throughput": spec["megapixels"] / (time.perf_counter() - start)}


def write_only(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the rasters ``measure`` wrote again from memory; their megapixels per second.

    Also returns ``stage_seconds`` (the two tiled GeoTIFFs) and ``cog_seconds`` (their
    COG copies).
    """
    import rasterio

    from superdml.export import GDAL_CONFIG, finish_raster, raster_profile
    from superdml.segment import load_segment_runs

    info = load_segment_runs(spec["segments"])[0].source
    arrays = []
    for name, resampling in (("labels", "MODE"), ("scores", "AVERAGE")):
        with rasterio.open(Path(spec["labels"]) / f"{name}.tif") as src:
            arrays.append((name, resampling, src.read(1), src.nodata))
    with tempfile.TemporaryDirectory(prefix="superdml-bench-") as tmp, rasterio.Env(**GDAL_CONFIG):
        start = time.perf_counter()
        for name, _, data, nodata in arrays:
            profile = raster_profile(info, str(data.dtype), float(nodata))
            with rasterio.open(Path(tmp) / f"{name}-stage.tif", "w", **profile) as dst:
                dst.write(data, 1)
        staged = time.perf_counter()
        for name, resampling, _, _ in arrays:
            stage, final = Path(tmp) / f"{name}-stage.tif", Path(tmp) / f"{name}.tif"
            finish_raster(stage, final, True, resampling)
        end = time.perf_counter()
    return {
        "throughput": spec["megapixels"] / (end - start),
        "stage_seconds": staged - start,
        "cog_seconds": end - staged,
    }


def polygons(spec: dict[str, Any]) -> dict[str, Any]:
    """Return ``throughput`` in superpixels per second of ``superpixels.gpkg``."""
    from superdml.export import write_polygons
    from superdml.predictions import load_label_run
    from superdml.segment import load_segment_runs

    label_run = load_label_run(spec["labels"])
    run = load_segment_runs(spec["segments"])[0]
    with tempfile.TemporaryDirectory(prefix="superdml-bench-") as tmp:
        start = time.perf_counter()
        write_polygons(label_run, run, Path(tmp) / "superpixels.gpkg", "gpkg")
        seconds = time.perf_counter() - start
    return {"throughput": spec["superpixels"] / seconds}
