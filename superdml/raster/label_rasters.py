"""Categorical label rasters (``crops --label-raster``), read for their classes.

The class scheme (:func:`read_label_scheme`), the nodata (:func:`read_class_nodata`),
and the values on another raster's grid, reprojected with nearest
(:func:`read_labels_on_grid`); opened through :func:`superdml.raster.io.open_raster`, so
paths, URIs and STAC mosaics all work.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from superdml.core import storage
from superdml.core.errors import input_error
from superdml.raster.classes import MAX_CODE, ClassScheme, make_scheme, read_scheme
from superdml.raster.io import RasterInfo, open_raster, read_window

__all__ = ["check_label_overlap", "read_class_nodata", "read_label_scheme", "read_labels_on_grid"]


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

    sidecar = f"{path}.aux.xml"
    if not storage.isfile(sidecar):
        return {}
    try:
        root = ET.fromstring(storage.read_bytes(sidecar))
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
