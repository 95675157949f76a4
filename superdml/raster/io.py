"""Raster I/O at the edges: opening with clear errors, tiling, windowed reads, profiles.

Arrays are band-first, as rasterio reads them: ``pixels : (C, H, W)``. Windows are given
by their global pixel offsets; reads beyond the raster edge are padded and marked
invalid, so per-tile functions never special-case the edge.

Categorical label rasters (``crops --label-raster``) are read here too: their class
scheme (:func:`read_label_scheme`), their nodata (:func:`read_class_nodata`), and their
values on another raster's grid, reprojected with nearest (:func:`read_labels_on_grid`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from superdml.core.errors import MissingInputError, input_error
from superdml.raster.classes import MAX_CODE, ClassScheme, make_scheme, read_scheme

BLOCK_SIZE = 512

# GDAL's block cache defaults to 5% of RAM per process: it would hold most of a large
# raster and make peak memory grow with raster size. 64 MB (GDAL reads a bare number as
# MB) holds a tile's windows; set GDAL_CACHEMAX in the environment to change it.
os.environ.setdefault("GDAL_CACHEMAX", "64")


@dataclass(frozen=True)
class RasterInfo:
    """What later stages need to know about a source raster.

    Attributes
    ----------
    path : str
        Absolute path of the raster.
    height, width : int
        Size in pixels.
    count : int
        Number of bands.
    dtype : str
        Numpy dtype name of the first band.
    crs : str or None
        CRS as WKT, None for rasters without one (pixel coordinates).
    transform : tuple of float
        The affine transform's six coefficients (a, b, c, d, e, f).
    nodata : float or None
        The raster's nodata value.
    """

    path: str
    height: int
    width: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, ...]
    nodata: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict."""
        return dataclasses.asdict(self)

    @property
    def affine(self) -> rasterio.Affine:
        """The affine transform."""
        return rasterio.Affine(*self.transform)


def open_raster(path: str | os.PathLike[str]) -> rasterio.DatasetReader:
    """Open `path` with rasterio, turning failures into one-line input errors.

    Raises
    ------
    MissingInputError
        When the file does not exist.
    InputError
        When rasterio cannot read it as a raster.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: no such file (raster)")
    if path.is_dir():
        raise input_error(path, "is a folder, expected a raster file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as err:
        raise input_error(path, f"not a raster that rasterio can open ({err})") from None


def raster_info(path: str | os.PathLike[str]) -> RasterInfo:
    """Read the size, bands, grid and CRS of a raster."""
    with open_raster(path) as src:
        return RasterInfo(
            path=str(Path(path).resolve()),
            height=src.height,
            width=src.width,
            count=src.count,
            dtype=src.dtypes[0],
            crs=src.crs.to_wkt() if src.crs else None,
            transform=tuple(src.transform)[:6],
            nodata=src.nodata,
        )


def check_bands(
    path: str | os.PathLike[str], count: int, bands: tuple[int, ...] | None
) -> list[int]:
    """Return the 1-based band list to read, checking it against the raster's `count`."""
    if bands is None:
        return list(range(1, count + 1))
    missing = [b for b in bands if b > count]
    if missing:
        raise input_error(
            path, f"has {count} band(s), --bands asks for band {missing[0]}: pass bands 1..{count}"
        )
    return list(bands)


@dataclass(frozen=True)
class Tile:
    """A core window of the tiling: tile index (`ti`, `tj`) and its pixel extent."""

    ti: int
    tj: int
    row: int
    col: int
    height: int
    width: int

    @property
    def key(self) -> str:
        """A file-name-safe key such as ``t0003_0007``."""
        return f"t{self.ti:04d}_{self.tj:04d}"


def tile_grid(height: int, width: int, tile_size: int) -> list[Tile]:
    """Cut a raster of `height` x `width` into core tiles of `tile_size`, row-major."""
    tiles = []
    for ti, row in enumerate(range(0, height, tile_size)):
        for tj, col in enumerate(range(0, width, tile_size)):
            tiles.append(
                Tile(ti, tj, row, col, min(tile_size, height - row), min(tile_size, width - col))
            )
    return tiles


def read_window(
    src: rasterio.DatasetReader,
    bands: list[int],
    row: int,
    col: int,
    height: int,
    width: int,
    nodata: float | None = None,
    fill: float = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a window that may extend beyond the raster; pad outside with `fill`.

    Parameters
    ----------
    src : rasterio dataset
    bands : list of int
        1-based bands to read.
    row, col, height, width : int
        Global window; may start at negative offsets or end past the edge.
    nodata : float, optional
        Value that marks invalid pixels; the dataset's own mask (nodata value, alpha
        or mask band) is used when None.
    fill : float
        Value of padded pixels.

    Returns
    -------
    pixels : (C, height, width) ndarray of the raster's dtype
    valid : (height, width) bool ndarray
        False for nodata, NaN and padded pixels.
    """
    dtype = np.dtype(src.dtypes[bands[0] - 1])
    pixels = np.full((len(bands), height, width), fill, dtype=dtype)
    valid = np.zeros((height, width), dtype=bool)
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + height, src.height), min(col + width, src.width)
    if r1 <= r0 or c1 <= c0:
        return pixels, valid
    window = Window(c0, r0, c1 - c0, r1 - r0)
    inner = (slice(r0 - row, r1 - row), slice(c0 - col, c1 - col))
    data = src.read(bands, window=window)
    pixels[(slice(None), *inner)] = data
    if nodata is not None:
        ok = ~np.any(data == nodata, axis=0) if not np.isnan(nodata) else np.ones_like(valid[inner])
    elif _all_valid(src, bands):  # no nodata, alpha or mask: GDAL's masks are all 255
        ok = np.ones_like(valid[inner])
    else:
        ok = np.all(src.read_masks(bands, window=window) > 0, axis=0)
    if dtype.kind == "f":
        ok &= np.all(np.isfinite(data), axis=0)
    valid[inner] = ok
    return pixels, valid


def band_ranges(
    path: str | os.PathLike[str],
    bands: list[int],
    nodata: float | None = None,
    max_side: int = 1024,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> tuple[list[float], list[float]]:
    """Per-band value ranges used to scale bands to [0, 1] (and crops to 8 bit).

    uint8 rasters use the fixed range 0..255. Other dtypes use the `percentiles` of
    the valid pixels of a decimated sample (at most `max_side` pixels a side), read one
    strip of block rows at a time, reopening the raster for each, so that neither the
    sample nor GDAL's block cache grows with the raster.

    Returns
    -------
    lo, hi : list of float
        One value per band, ``hi > lo``.

    Raises
    ------
    InputError
        When the raster has no valid pixel at all (all nodata).
    """
    with open_raster(path) as src:
        height, width, dtype = src.height, src.width, np.dtype(src.dtypes[bands[0] - 1])
        strip = max(BLOCK_SIZE, src.block_shapes[0][0])
        if dtype == np.uint8 and nodata is None and _all_valid(src, bands):
            return [0.0] * len(bands), [255.0] * len(bands)  # fixed range, every pixel valid
    step = max(1, int(np.ceil(max(height, width) / max_side)))
    out_width = max(1, width // step)
    samples, valid = [], []
    for row in range(0, height, strip):
        h = min(strip, height - row)
        out_shape = (len(bands), max(1, h // step), out_width)
        with open_raster(path) as src:
            window = Window(0, row, width, h)
            data = src.read(bands, window=window, out_shape=out_shape)
            if nodata is not None:
                ok = ~np.any(data == nodata, axis=0)
            else:
                ok = np.all(src.read_masks(bands, window=window, out_shape=out_shape) > 0, axis=0)
        if data.dtype.kind == "f":
            ok &= np.all(np.isfinite(data), axis=0)
        samples.append(data[:, ok].astype(np.float64) if dtype != np.uint8 else data[:, :0])
        valid.append(bool(ok.any()))
    if not any(valid):
        with open_raster(path) as src:
            if not _any_valid(src, bands, nodata):
                raise input_error(path, "has no valid pixel (every pixel is nodata)")
    if dtype == np.uint8:
        return [0.0] * len(bands), [255.0] * len(bands)
    values = np.concatenate(samples, axis=1)
    if values.shape[1] == 0:  # valid pixels exist, but between the sampled ones
        return [0.0] * len(bands), [1.0] * len(bands)
    lo = np.percentile(values, percentiles[0], axis=1)
    hi = np.percentile(values, percentiles[1], axis=1)
    hi = np.where(hi > lo, hi, lo + 1.0)
    return [float(v) for v in lo], [float(v) for v in hi]


def _all_valid(src: rasterio.DatasetReader, bands: list[int]) -> bool:
    """Whether every pixel of `bands` is valid by the dataset's own masks.

    True when the bands have no nodata value, alpha band or mask band (GDAL's
    ``GMF_ALL_VALID``): their masks would read 255 everywhere.
    """
    return all(src.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands)


def _any_valid(src: rasterio.DatasetReader, bands: list[int], nodata: float | None) -> bool:
    """Scan the raster block row by block row for one valid pixel (bounded memory)."""
    for row in range(0, src.height, BLOCK_SIZE):
        h = min(BLOCK_SIZE, src.height - row)
        _, valid = read_window(src, bands, row, 0, h, src.width, nodata)
        if valid.any():
            return True
    return False


def geotiff_profile(
    info: RasterInfo, dtype: str, count: int = 1, nodata: float | None = 0
) -> dict[str, Any]:
    """Profile of a tiled, compressed GeoTIFF on the grid of `info`.

    Integer rasters (superpixel ids: runs of one value) are deflated without a
    predictor, which would break the runs up: on a 14.6 MP segment raster 20% smaller
    and 40% less CPU than with horizontal differencing (``benchmarks/README.md``).
    """
    integer = np.dtype(dtype).kind in "ui"
    return {
        "driver": "GTiff",
        "height": info.height,
        "width": info.width,
        "count": count,
        "dtype": dtype,
        "crs": info.crs,
        "transform": info.affine,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": BLOCK_SIZE,
        "blockysize": BLOCK_SIZE,
        "compress": "deflate",
        "predictor": 1 if integer else 3,
        "zlevel": 6,
        "BIGTIFF": "IF_SAFER",
    }


def iter_blocks(height: int, width: int, size: int = 2048) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(row, col, h, w)`` windows covering a raster, row-major."""
    for row in range(0, height, size):
        for col in range(0, width, size):
            yield row, col, min(size, height - row), min(size, width - col)


# ------------------------------------------------------------------- label rasters


def read_label_scheme(
    path: str | os.PathLike[str], classes_yaml: str | os.PathLike[str] | None
) -> ClassScheme:
    """Return the class scheme of a label raster: codes, names (checked) and colors.

    Names from the `classes_yaml` scheme file when given (see
    :func:`superdml.raster.classes.read_scheme`), else from the raster's ``class_names`` tag (a
    JSON object code -> name, or a JSON list of names for codes 1, 2, ..., as older
    exports wrote it), else from GDAL's category names of band 1 (``CategoryNames`` in
    the ``<raster>.aux.xml`` sidecar, where GDAL and QGIS keep them for GeoTIFFs).
    Colors the names' source does not give come from the raster's color table, else
    from a palette. The nodata code is the raster's nodata (else 0)
    unless the file says otherwise. Codes without a name are not in the returned scheme
    (crops name them ``class_<code>``).

    Raises
    ------
    InputError
        The scheme file or the tag is malformed (see :func:`superdml.raster.classes.make_scheme`),
        a code does not fit the raster's data type, or a name is the default name
        ``class_<v>`` of another code.
    """
    with open_raster(path) as src:
        try:
            colormap: dict[int, tuple[int, ...]] | None = src.colormap(1)
        except ValueError:  # no color table
            colormap = None
        tag = src.tags(1).get("class_names") or src.tags().get("class_names")
        info, nodata = np.iinfo(np.dtype(src.dtypes[0])), src.nodata
    nodata = int(nodata) if nodata is not None and 0 <= nodata <= MAX_CODE else 0
    source: str | os.PathLike[str] = path
    if classes_yaml is not None:
        source = classes_yaml
        scheme = read_scheme(classes_yaml, colormap, nodata)
    else:
        names = _tag_names(path, tag) if tag else _category_names(path)
        scheme = make_scheme(names, path, nodata=nodata, colormap=colormap)
    for entry in scheme.entries:
        if not info.min <= entry.code <= info.max:
            raise input_error(
                source,
                f"code {entry.code} of {entry.name!r} is outside the label raster's values "
                f"({info.dtype}: {info.min}..{info.max}, {path})",
            )
        default = re.fullmatch(r"class_(-?\d+)", entry.name, re.IGNORECASE)
        if default is not None and int(default[1]) != entry.code:
            raise input_error(
                source,
                f"class name {entry.name!r} for code {entry.code} is the default name of "
                f"code {int(default[1])}: choose another name",
            )
    return scheme


def _category_names(path: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """Entries ``code -> {"name": ...}`` of GDAL's category names (empty names skipped)."""
    import xml.etree.ElementTree as ET

    sidecar = Path(f"{path}.aux.xml")
    if not sidecar.is_file():
        return {}
    try:
        root = ET.parse(sidecar).getroot()
    except ET.ParseError as err:
        raise input_error(sidecar, f"not valid XML ({err})") from None
    band = root.find("PAMRasterBand[@band='1']")
    categories = [] if band is None else band.findall("CategoryNames/Category")
    return {code: {"name": c.text} for code, c in enumerate(categories) if c.text}


def _tag_names(path: str | os.PathLike[str], tag: str) -> dict[int, dict[str, Any]]:
    """Entries ``code -> {"name": ...}`` of a ``class_names`` tag."""
    try:
        listed = json.loads(tag)
    except json.JSONDecodeError:
        listed = None
    if isinstance(listed, list):
        return {code: {"name": name} for code, name in enumerate(listed, start=1)}
    if isinstance(listed, dict) and all(re.fullmatch(r"\d+", k) for k in listed):
        return {int(code): {"name": name} for code, name in listed.items()}
    raise input_error(
        path,
        f"class_names tag {tag[:60]!r} is not a JSON object of code -> name (or a list of "
        "names): fix the tag or pass --classes",
    )


def read_class_nodata(path: str | os.PathLike[str]) -> int | None:
    """Return a label raster's nodata value (no class), checking that it holds classes.

    Raises
    ------
    InputError
        The raster's first band is not of an integer type, or its nodata is not an
        integer (a float label raster with NaN nodata, say).
    """
    with open_raster(path) as lab:
        dtype, nodata = np.dtype(lab.dtypes[0]), lab.nodata
    if dtype.kind not in "ui":
        raise input_error(
            path, f"label raster must be of an integer type (class values), got {dtype}"
        )
    if nodata is None:
        return None
    if not float(nodata).is_integer():
        raise input_error(path, f"label raster nodata {nodata} is not an integer class value")
    return int(nodata)


def check_label_overlap(label_path: str | os.PathLike[str], grid: RasterInfo) -> None:
    """Refuse a label raster that does not overlap the raster `grid` describes.

    Raises
    ------
    InputError
        The rasters do not overlap, or one has no CRS and their sizes differ.
    """
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    with open_raster(label_path) as lab:
        src_crs, lab_crs = grid.crs, lab.crs
        if src_crs is None or lab_crs is None:
            same = (lab.height, lab.width) == (grid.height, grid.width)
            if not same:
                raise input_error(
                    label_path,
                    "has no CRS (or the raster has none) and a different size: "
                    "it must be on the raster's grid",
                )
            return
        west, south, east, north = array_bounds(grid.height, grid.width, grid.affine)
        bounds = transform_bounds(src_crs, lab_crs, west, south, east, north)
        lb = lab.bounds
        if (
            bounds[0] >= lb.right
            or bounds[2] <= lb.left
            or bounds[1] >= lb.top
            or bounds[3] <= lb.bottom
        ):
            raise input_error(label_path, f"does not overlap the raster {grid.path}")


def read_labels_on_grid(
    label_path: str | os.PathLike[str],
    grid: RasterInfo,
    row: int,
    col: int,
    height: int,
    width: int,
) -> np.ndarray:
    """Read a label raster resampled (nearest) onto a window of `grid`'s pixel grid.

    Parameters
    ----------
    label_path : path
        Categorical raster, on any grid (reprojected with nearest when not on `grid`'s).
    grid : RasterInfo
        The raster whose pixel grid the window is on.
    row, col, height, width : int
        Global window of `grid`; pixels beyond the label raster get its nodata (else 0).

    Returns
    -------
    (height, width) ndarray of the label raster's dtype
    """
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with open_raster(label_path) as lab:
        same_grid = (
            (lab.height, lab.width) == (grid.height, grid.width)
            and (lab.crs is None or grid.crs is None or lab.crs.to_wkt() == grid.crs)
            and (lab.crs is None or np.allclose(tuple(lab.transform)[:6], grid.transform))
        )
        if same_grid:
            out, _ = read_window(
                lab, [1], row, col, height, width, nodata=None, fill=lab.nodata or 0
            )
            return out[0]
        with WarpedVRT(
            lab,
            crs=grid.crs,
            transform=grid.affine,
            height=grid.height,
            width=grid.width,
            resampling=Resampling.nearest,
        ) as vrt:
            out, _ = read_window(
                vrt, [1], row, col, height, width, nodata=None, fill=lab.nodata or 0
            )
            return out[0]
