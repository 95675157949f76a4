"""Export throughput: label raster megapixels per second of ``superdml.export.export``.

A part of ``benchmarks/run.py``, run in a fresh process: the label and score rasters
(COG) of the label row's predictions, without polygons. No baseline: nothing else
writes these rasters; the target is >= 50 MP/s.
"""

from __future__ import annotations

import time
from typing import Any


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Return ``throughput`` in megapixels of label raster per second."""
    from superdml.export import export

    start = time.perf_counter()
    export(spec["labels"], spec["segments"], "cog", "none")
    return {"throughput": spec["megapixels"] / (time.perf_counter() - start)}
