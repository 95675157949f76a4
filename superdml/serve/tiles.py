"""Map tiles cut on demand from a source raster (and its overviews), and superpixel outlines.

The page's map is in pixel space (Leaflet's ``CRS.Simple``): at zoom :func:`max_zoom`
one tile pixel is one raster pixel, each zoom level below halves the resolution. A tile
is one decimated window read; GDAL serves it from the raster's overviews when the
raster has them, so a zoomed-out tile costs about what a full-resolution one does.
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.windows import Window

from superdml.raster.classes import ClassScheme
from superdml.segment.run import SegmentRun

TILE = 256
_local = threading.local()


def max_zoom(height: int, width: int, tile: int = TILE) -> int:
    """Return the zoom level at which a tile pixel is a raster pixel (0: one tile holds it all)."""
    return max(0, math.ceil(math.log2(max(height, width, 1) / tile)))


def tile_window(
    z: int, x: int, y: int, height: int, width: int, tile: int = TILE
) -> tuple[Window, tuple[int, int]] | None:
    """Return the raster window of tile (`z`, `x`, `y`) and where it lands in the tile.

    Returns
    -------
    window : rasterio.windows.Window
        Clipped to the raster.
    shape : (int, int)
        Rows and columns of the tile the window fills (from its top left corner).
    None
        When the tile lies outside the raster or `z` is out of range.
    """
    top = max_zoom(height, width, tile)
    if not 0 <= z <= top or x < 0 or y < 0:
        return None
    scale = 2 ** (top - z)
    row0, col0 = y * tile * scale, x * tile * scale
    if row0 >= height or col0 >= width:
        return None
    rows, cols = min(tile * scale, height - row0), min(tile * scale, width - col0)
    window = Window(col0, row0, cols, rows)
    return window, (max(1, math.ceil(rows / scale)), max(1, math.ceil(cols / scale)))


def _open(path: str | Path) -> Any:
    """Return a dataset per thread and path (rasterio handles are not shared between threads)."""
    cache = getattr(_local, "datasets", None)
    if cache is None:
        cache = _local.datasets = {}
    key = str(path)
    if key not in cache:
        cache[key] = rasterio.open(key)
    return cache[key]


def encode_png(rgba: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 4) uint8 image (fast compression: tiles are cut per request)."""
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def image_tile(run: SegmentRun, bands: list[int], z: int, x: int, y: int) -> bytes | None:
    """PNG of one map tile of `run`'s source raster, scaled to 8 bits as crops are.

    Parameters
    ----------
    run : SegmentRun
    bands : list of int
        Positions into ``run.bands`` of the red, green, blue bands (one band: gray).
    z, x, y : int
        The tile (see the module docstring).

    Returns
    -------
    bytes or None
        None when the tile lies outside the raster.
    """
    placed = tile_window(z, x, y, run.source.height, run.source.width)
    if placed is None:
        return None
    window, (rows, cols) = placed
    src = _open(run.source.path)
    indexes = [run.bands[b] for b in bands]
    data = src.read(indexes, window=window, out_shape=(len(indexes), rows, cols)).astype(np.float32)
    lo = np.asarray([run.band_lo[b] for b in bands], np.float32)[:, None, None]
    hi = np.asarray([run.band_hi[b] for b in bands], np.float32)[:, None, None]
    scaled = np.clip((data - lo) * (255.0 / np.maximum(hi - lo, 1e-12)), 0, 255).astype(np.uint8)
    if len(indexes) < 3:
        scaled = np.repeat(scaled[:1], 3, axis=0)
    rgba = np.zeros((TILE, TILE, 4), np.uint8)
    rgba[:rows, :cols, :3] = scaled[:3].transpose(1, 2, 0)
    rgba[:rows, :cols, 3] = 255
    if run.source.nodata is not None:
        rgba[:rows, :cols, 3][np.all(data == run.source.nodata, axis=0)] = 0
    return encode_png(rgba)


def class_colors(scheme: ClassScheme, alpha: int = 150) -> np.ndarray:
    """RGBA lookup table by label code: class colors at `alpha`, unknown gray, nodata clear."""
    size = max([scheme.unknown, scheme.nodata, *(e.code for e in scheme.entries)]) + 1
    table = np.zeros((size, 4), np.uint8)
    for entry in scheme.entries:
        table[entry.code] = (*entry.color, alpha)
    table[scheme.unknown] = (128, 128, 128, alpha)
    table[scheme.nodata] = 0
    return table


def label_tile(path: Path, colors: np.ndarray, z: int, x: int, y: int) -> bytes | None:
    """PNG of one tile of a ``labels.tif`` in class colors (`colors` from :func:`class_colors`)."""
    src = _open(path)
    placed = tile_window(z, x, y, src.height, src.width)
    if placed is None:
        return None
    window, (rows, cols) = placed
    codes = src.read(1, window=window, out_shape=(rows, cols))
    rgba = np.zeros((TILE, TILE, 4), np.uint8)
    rgba[:rows, :cols] = colors[np.minimum(codes, len(colors) - 1)]
    return encode_png(rgba)


def pixel_of(run: SegmentRun, x: float, y: float) -> tuple[float, float]:
    """Pixel (row, col) of map coordinates (`x`, `y`) in `run`'s raster."""
    col, row = ~Affine(*run.source.transform[:6]) * (x, y)
    return float(row), float(col)


def outline(run: SegmentRun, segment_id: int, row: float, col: float, reach: int) -> list:
    """Return the outline of one superpixel, as rings of (row, col) pixel corners.

    Parameters
    ----------
    run : SegmentRun
    segment_id : int
    row, col : float
        A pixel of the superpixel's neighbourhood (its centroid).
    reach : int
        Half the side of the window searched around it (a superpixel lies within it).

    Returns
    -------
    list of list of [float, float]
        Exterior rings (empty when the superpixel is not there).
    """
    from rasterio.features import shapes

    src = _open(run.segments_path)
    r0, c0 = max(0, int(row) - reach), max(0, int(col) - reach)
    window = Window(c0, r0, min(2 * reach, src.width - c0), min(2 * reach, src.height - r0))
    mask = src.read(1, window=window) == segment_id
    rings = []
    for geometry, _ in shapes(mask.astype(np.uint8), mask=mask, connectivity=8):
        ring = geometry["coordinates"][0]
        rings.append([[r0 + r, c0 + c] for c, r in ring])
    return rings
