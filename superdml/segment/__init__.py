"""The segment stage: seam-free tiled SLIC (numpy, torch, numba kernels), the segment-run format.

Names load on first use (:mod:`lazy_loader`, as scikit-image does), so importing one
module of the package does not import its siblings.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "run": [
            "MANIFEST_NAME",
            "SEGMENTS_NAME",
            "SegmentRun",
            "TABLE_NAME",
            "load_segment_runs",
            "run_dir",
        ],
        "stage": [
            "ROW_GROUP_SIZE",
            "SegmentResult",
            "segment_raster",
        ],
    },
)
