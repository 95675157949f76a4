"""Cutting one tile's crops from its source raster with a crop rule; making the rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from superdml.config.schema import CropsConfig
from superdml.core import storage
from superdml.core.errors import input_error
from superdml.crops.rule import (
    UNIT_RULE,
    CropRule,
    color_bands,
    extract_crops,
    to_uint8,
)
from superdml.raster.bands import band_descriptions, data_bands, resolve_bands
from superdml.raster.io import (
    check_bands,
    open_raster,
    read_window,
)
from superdml.segment.run import SegmentRun

#: Descriptions of true color bands, red first (Sentinel-2 / Landsat 8 names, then words).
TRUE_COLOR = (("b04", "b4", "red"), ("b03", "b3", "green"), ("b02", "b2", "blue"))


def make_rule(runs: list[SegmentRun], config: CropsConfig) -> CropRule:
    """Return the crop rule of `config` for the rasters of `runs`.

    8-bit rasters of at most three (chosen) bands get the 8-bit color rule as before;
    others the lossless rule: the chosen bands (every band but alpha by default) at the
    rasters' dtype, with the 1st..99th percentiles measured at segment time (the widest
    over the rasters) as per-band statistics.

    Raises
    ------
    InputError
        Rasters of different dtypes or band counts, bands out of range, a band
        description a raster lacks, or bands that were not segmented: one line naming
        the raster (or segment folder) and the band.
    """
    first = runs[0].source
    for run in runs[1:]:
        if run.source.dtype != first.dtype:
            raise input_error(
                run.source.path,
                f"is {run.source.dtype}, {first.path} is {first.dtype}: crops of one run "
                "share a dtype; crop them separately",
            )
    chosen = [_chosen_bands(run, config) for run in runs]
    counts = sorted({len(c) for c in chosen})
    if len(counts) > 1:
        raise input_error(
            storage.parent(runs[0].folder),
            f"rasters give crops from different band counts {counts}: crop them separately "
            "or pass --bands",
        )
    bands = chosen[0]
    if first.dtype == "uint8" and len(bands) <= 3:
        explicit = None if config.bands is None else tuple(bands)
        return CropRule(
            config.crop_size, config.mask, explicit, source_bands=len(bands),
            context=config.context,
        )  # fmt: skip
    names = band_descriptions(first.path)
    band_names = tuple(names[b - 1] for b in bands)
    positions = [[run.bands.index(b) for b in c] for run, c in zip(runs, chosen, strict=True)]
    pairs = list(zip(runs, positions, strict=True))
    lo = [min(run.band_lo[p[i]] for run, p in pairs) for i in range(len(bands))]
    hi = [max(run.band_hi[p[i]] for run, p in pairs) for i in range(len(bands))]
    rule = CropRule(
        config.crop_size, config.mask, tuple(bands), UNIT_RULE, len(bands), first.dtype,
        band_names, tuple(lo), tuple(hi), context=config.context,
    )  # fmt: skip
    return dataclasses.replace(rule, preview=_preview(rule, config))


def _chosen_bands(run: SegmentRun, config: CropsConfig) -> list[int]:
    """Return the 1-based bands of `config` in `run`'s raster, checked to be segmented."""
    path = run.source.path
    if config.bands is None:
        bands = data_bands(path)
    else:
        bands = resolve_bands(path, run.source.count, config.bands)
    missing = [b for b in bands if b not in run.bands]
    if missing:
        raise input_error(
            run.folder, f"band {missing[0]} was not segmented (segmented: {run.bands})"
        )
    return bands


def _preview(rule: CropRule, config: CropsConfig) -> tuple[int, ...]:
    """Return the preview's colors as positions in `rule.bands`: `config.preview` or true color."""
    bands = list(rule.bands or ())
    names = [n.lower() for n in rule.band_names or ()]
    if config.preview is not None:
        picks = []
        for band in config.preview:
            if isinstance(band, str) and band.lower() in names:
                picks.append(names.index(band.lower()))
            elif isinstance(band, int) and band in bands:
                picks.append(bands.index(band))
            else:
                raise input_error(
                    "preview", f"band {band!r} is not one of the crop's bands {bands} {names}"
                )
        return tuple(picks)
    found = [next((names.index(n) for n in options if n in names), None) for options in TRUE_COLOR]
    if all(f is not None for f in found):
        return tuple(f for f in found if f is not None)
    return tuple(range(min(3, len(bands))))


def color_band_indexes(run: SegmentRun, rule: CropRule) -> list[int]:
    """Return the positions (0-based, into the run's bands) of the crop's bands.

    Raises
    ------
    InputError
        When the rule asks for bands the raster lacks or that were not segmented, the
        raster is of another dtype than the rule's, or it gives crops from another band
        count than the rule was made with.
    """
    path = run.source.path
    if rule.bands is None:
        index = list(range(min(3, len(run.bands))))
    else:
        for i, band in enumerate(rule.bands):
            if band > run.source.count:
                raise input_error(
                    path,
                    f"has {run.source.count} band(s), the crop rule (and checkpoint) takes "
                    f"{rule.band_label(i)}: label rasters like the training ones",
                )
        check_bands(path, run.source.count, rule.bands)
        missing = [b for b in rule.bands if b not in run.bands]
        if missing:
            raise input_error(
                run.folder, f"band {missing[0]} was not segmented (segmented: {run.bands})"
            )
        index = [run.bands.index(b) for b in rule.bands]
    if rule.lossless and run.source.dtype != rule.dtype:
        raise input_error(
            path,
            f"is {run.source.dtype}, the crop rule (and checkpoint) takes {rule.dtype} "
            f"bands ({rule.band_label(0)} ...): label rasters like the training ones",
        )
    if rule.source_bands is not None and len(index) != rule.source_bands:
        raise input_error(
            path,
            f"gives crops from {len(index)} band(s), the crop rule (and checkpoint) expects "
            f"{rule.source_bands}: pass --bands or retrain",
        )
    return index


def read_crop_window(
    run: SegmentRun, rule: CropRule, row: int, col: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read the crop bands and (h, w) uint32 segments of a global window.

    The bands are (3, h, w) uint8 color bands (8-bit rule) or the rule's bands at the
    raster's dtype, nodata pixels 0 (lossless rule).
    """
    index = color_band_indexes(run, rule)
    bands = [run.bands[i] for i in index]
    with open_raster(run.source.path) as src:
        pixels, valid = read_window(src, bands, row, col, height, width)
    with open_raster(run.segments_path) as seg:
        segments, _ = read_window(seg, [1], row, col, height, width)
    if rule.lossless:
        pixels[:, ~valid] = 0
        return pixels, segments[0]
    lo = [run.band_lo[i] for i in index]
    hi = [run.band_hi[i] for i in index]
    return color_bands(to_uint8(pixels, lo, hi, valid)), segments[0]


def crop_tile(run: SegmentRun, rule: CropRule, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the superpixels in `table` (one tile's), from one window read.

    Returns
    -------
    crops : (N, rule.channels, S, S) ndarray
        uint8 (8-bit rule) or the raster's dtype (lossless rule); the context view's
        bands (:attr:`CropRule.context`) after the crop's.
    ids : (N,) uint32 ndarray
    """
    pixels, segments, ids, centers = _tile_window(run, rule, table)
    crops = extract_crops(pixels, segments, ids, centers, rule.crop_size, rule.mask, rule.context)
    return crops, ids


def crop_tile_with_previews(
    run: SegmentRun, rule: CropRule, table: pa.Table
) -> tuple[np.ndarray, np.ndarray | None]:
    """Crops of the superpixels in `table` and their color previews: a crop folder's files.

    The previews are cut like the crops from the window's :meth:`CropRule.preview_bands`
    (scaling the window once costs a third of scaling every crop: crops overlap), so
    pixels the mask zeroes are black in them.

    Returns
    -------
    crops : (N, rule.channels, S, S) ndarray
        As :func:`crop_tile`.
    previews : (N, 3 or 4, S, S) uint8 ndarray or None
        The previews of chips (lossless or context rule; RGBA with mask ``alpha``; the
        context view is not shown); None for the 8-bit rule without context.
    """
    pixels, segments, ids, centers = _tile_window(run, rule, table)
    crops = extract_crops(pixels, segments, ids, centers, rule.crop_size, rule.mask, rule.context)
    if not rule.chips:
        return crops, None
    color = rule.preview_bands(pixels)
    return crops, extract_crops(color, segments, ids, centers, rule.crop_size, rule.mask)


def _tile_window(
    run: SegmentRun, rule: CropRule, table: pa.Table
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the window around `table`'s crops: pixels, segments, ids, (N, 2) crop centers."""
    ids = table.column("segment_id").to_numpy()
    rows = np.floor(table.column("row").to_numpy()).astype(np.int64)
    cols = np.floor(table.column("col").to_numpy()).astype(np.int64)
    side = rule.crop_size * (rule.context or 1)  # the widest view read
    half = side // 2
    r0, c0 = int(rows.min()) - half, int(cols.min()) - half
    r1, c1 = int(rows.max()) - half + side, int(cols.max()) - half + side
    pixels, segments = read_crop_window(run, rule, r0, c0, r1 - r0, c1 - c0)
    return pixels, segments, ids, np.stack([rows - r0, cols - c0], axis=1)
