"""Cutting one tile's crops from its source raster with a crop rule."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from superdml.core.errors import input_error
from superdml.crops.rule import (
    CropRule,
    color_bands,
    extract_crops,
    to_uint8,
)
from superdml.raster.io import (
    check_bands,
    open_raster,
    read_window,
)
from superdml.segment.run import SegmentRun


def color_band_indexes(run: SegmentRun, rule: CropRule) -> list[int]:
    """Return the positions (0-based, into the run's bands) of the crop's color bands.

    Raises
    ------
    InputError
        When the rule asks for bands the raster lacks or that were not segmented, or
        the raster gives crops from another band count than the rule was made with.
    """
    if rule.bands is None:
        index = list(range(min(3, len(run.bands))))
    else:
        check_bands(run.source.path, run.source.count, rule.bands)
        missing = [b for b in rule.bands if b not in run.bands]
        if missing:
            raise input_error(
                run.folder, f"band {missing[0]} was not segmented (segmented: {run.bands})"
            )
        index = [run.bands.index(b) for b in rule.bands]
    if rule.source_bands is not None and len(index) != rule.source_bands:
        raise input_error(
            run.source.path,
            f"gives crops from {len(index)} band(s), the crop rule (and checkpoint) expects "
            f"{rule.source_bands}: pass --bands or retrain",
        )
    return index


def read_crop_window(
    run: SegmentRun, rule: CropRule, row: int, col: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read (3, h, w) uint8 color bands and (h, w) uint32 segments of a global window."""
    index = color_band_indexes(run, rule)
    bands = [run.bands[i] for i in index]
    with open_raster(run.source.path) as src:
        pixels, valid = read_window(src, bands, row, col, height, width)
    with open_raster(run.segments_path) as seg:
        segments, _ = read_window(seg, [1], row, col, height, width)
    lo = [run.band_lo[i] for i in index]
    hi = [run.band_hi[i] for i in index]
    return color_bands(to_uint8(pixels, lo, hi, valid)), segments[0]


def crop_tile(run: SegmentRun, rule: CropRule, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the superpixels in `table` (one tile's), from one window read.

    Returns
    -------
    crops : (N, 3 or 4, S, S) uint8 ndarray
    ids : (N,) uint32 ndarray
    """
    ids = table.column("segment_id").to_numpy()
    rows = np.floor(table.column("row").to_numpy()).astype(np.int64)
    cols = np.floor(table.column("col").to_numpy()).astype(np.int64)
    half = rule.crop_size // 2
    r0, c0 = int(rows.min()) - half, int(cols.min()) - half
    r1, c1 = int(rows.max()) - half + rule.crop_size, int(cols.max()) - half + rule.crop_size
    pixels, segments = read_crop_window(run, rule, r0, c0, r1 - r0, c1 - c0)
    centers = np.stack([rows - r0, cols - c0], axis=1)
    return extract_crops(pixels, segments, ids, centers, rule.crop_size, rule.mask), ids
