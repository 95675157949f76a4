"""Export throughput: label raster megapixels per second of ``superdml.label.export.export``.

A part of ``benchmarks/run.py``, run in fresh processes. ``measure``: ``export`` of the
label row's predictions to COG label and score rasters, without polygons; the figure is
the raster's megapixels over the median of :data:`CALLS` whole calls after the first
(reading segments and predictions, the lookups, the overviews, both COGs, the QGIS
style, the summary: one call at 2048^2 takes about 0.1 s, and one call alone moves by
15% on a shared machine); the first call, which also starts numba and GDAL, is reported
as ``first_call_seconds``.
``write_only``, the baseline: the same two rasters, already in memory, written as COGs
by GDAL alone (``MEM`` datasets copied by the COG driver, which computes the overviews)
with the same creation options, so the ratio is how ``export``, which also reads the
segments and predictions and computes every pixel, compares with writing finished
arrays the usual way. The target is >= 50 MP/s. ``polygons``: the superpixel polygons
(GeoPackage, the CLI's default), which ``measure`` leaves out, in superpixels per
second: a figure of their own.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Calls after the first whose median is the figure, for export and its baseline alike.
CALLS = 5


def _seconds(call: Callable[[], object]) -> tuple[float, float]:
    """Return the first call's seconds and the median of the next :data:`CALLS`."""
    seconds = []
    for _ in range(1 + CALLS):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds[0], statistics.median(seconds[1:])


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Return ``throughput`` in megapixels of label raster per second, after the first call.

    Also ``first_call_seconds``: the first call of the process, which also starts numba
    (about 0.3 s, once per process) and GDAL's drivers.
    """
    from superdml.label.export import export

    first, median = _seconds(lambda: export(spec["labels"], spec["segments"], "cog", "none"))
    return {"throughput": spec["megapixels"] / median, "first_call_seconds": first}


def write_only(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the rasters ``measure`` wrote again, from memory, as GDAL alone would.

    The two arrays, already in memory, go into GDAL ``MEM`` datasets (tags, color table
    and nodata included) and GDAL's COG driver writes them with the same creation
    options, computing the overviews itself (MODE for labels, AVERAGE for scores): the
    usual way to make a COG from an array. Returns their megapixels per second.
    """
    import rasterio

    rasters = []
    for name, resampling in (("labels", "MODE"), ("scores", "AVERAGE")):
        with rasterio.open(Path(spec["labels"]) / f"{name}.tif") as src:
            colormap = src.colormap(1) if name == "labels" else None
            rasters.append((name, resampling, src.read(1), src.profile, src.tags(), colormap))
    _, median = _seconds(lambda: _write_cogs(rasters))  # as for ``measure``
    return {"throughput": spec["megapixels"] / median}


def _write_cogs(rasters: list[tuple[Any, ...]]) -> None:
    import rasterio
    import rasterio.shutil

    from superdml.label.export import COG_OPTIONS

    with tempfile.TemporaryDirectory(prefix="superdml-bench-") as tmp:
        for name, resampling, data, profile, tags, colormap in rasters:
            profile = {k: v for k, v in profile.items() if k not in ("blockxsize", "blockysize")}
            with rasterio.open(name, "w", **{**profile, "driver": "MEM"}) as mem:
                mem.write(data, 1)
                mem.update_tags(**tags)
                if colormap:
                    mem.write_colormap(1, colormap)
                rasterio.shutil.copy(
                    mem, Path(tmp) / f"{name}.tif", driver="COG", RESAMPLING=resampling,
                    **COG_OPTIONS,
                )  # fmt: skip


def polygons(spec: dict[str, Any]) -> dict[str, Any]:
    """Return ``throughput`` in superpixels per second of ``superpixels.gpkg``."""
    from superdml.label.export import write_polygons
    from superdml.label.predictions import load_label_run
    from superdml.segment.run import load_segment_runs

    label_run = load_label_run(spec["labels"])
    run = load_segment_runs(spec["segments"])[0]
    with tempfile.TemporaryDirectory(prefix="superdml-bench-") as tmp:
        start = time.perf_counter()
        write_polygons(label_run, run, Path(tmp) / "superpixels.gpkg", "gpkg")
        seconds = time.perf_counter() - start
    return {"throughput": spec["superpixels"] / seconds}
