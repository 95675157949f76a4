"""Compile superdml's numba kernels into the source tree's cache (a build step of CI).

numba compiles a kernel on its first call and caches it beside the source; in a fresh
clone every process that segments first (each pytest-xdist process, each dask worker a
test starts) compiles the same kernels at once, about 20 s each. `.ci/run` runs this
while the test extras install, so the suite starts with the cache written. Segments a
small 3-band raster (the signatures of RGB rasters) and a 1-band one.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from superdml.config.schema import SegmentConfig
from superdml.segment.stage import segment_raster


def main() -> int:
    """Segment the two rasters in a temporary folder; return 0."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for bands in (3, 1):
            path = Path(tmp) / f"bands{bands}.tif"
            profile = {"driver": "GTiff", "width": 192, "height": 192, "count": bands,
                       "dtype": "uint8", "crs": "EPSG:3857",
                       "transform": from_origin(0, 0, 1, 1)}  # fmt: skip
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(rng.integers(0, 256, (bands, 192, 192), dtype=np.uint8))
            segment_raster(
                path, Path(tmp) / f"seg{bands}", SegmentConfig(region_size=16, tile_size=128)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
