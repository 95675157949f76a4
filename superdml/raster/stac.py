"""A STAC item or item collection read as one mosaic: a VRT over one asset of each item.

A mosaic is named by its JSON document (``items.json``: a ``FeatureCollection`` of STAC
items, or a single item, a ``Feature``), optionally followed by ``#asset=KEY`` to pick
the asset of each item to read. Without a key the asset is the item's only image asset,
else its ``visual`` asset, else its ``image`` asset. Relative hrefs are resolved against
the item's ``self`` link, else against the document's own location.

GDAL's STACIT driver does the same for item collections, but not as labeling needs it:
it requires the projection extension on every item, skips items it cannot place
without an error, averages differing resolutions (resampling silently), and leaves
relative and ``s3://`` hrefs unresolved. Here the items must share one CRS, one
resolution and one pixel grid, and a bad item is one error line naming it. Each item's
grid comes from its projection extension (``proj:transform`` and ``proj:shape``) when it
has them, so opening the mosaic reads no asset but the first (for its bands), else from
the asset's header. Later items lie on top of earlier ones where they overlap.

The VRT is built once per process for each document content (:func:`stac_vrt`); the
datasets it names are opened by GDAL only when a read touches them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioIOError

from superdml.core import storage
from superdml.core.cache import ProcessCache
from superdml.core.errors import input_error
from superdml.core.gdal_settings import REMOTE_OPEN_SETTINGS, is_remote
from superdml.core.provenance import file_fingerprint

__all__ = [
    "ASSET_FRAGMENT", "DEFAULT_ASSETS", "is_stac", "raster_fingerprint", "split_asset",
    "stac_vrt",
]  # fmt: skip

#: What follows a document's name to pick the asset of each item: ``items.json#asset=red``.
ASSET_FRAGMENT = "#asset="
#: The assets a mosaic reads by default when an item has several image assets.
DEFAULT_ASSETS = ("visual", "image")
#: Document suffixes read as STAC.
_SUFFIXES = (".json", ".geojson")
#: Asset roles that are never the mosaic's pixels.
_NOT_DATA = {"thumbnail", "overview", "metadata"}
#: Largest misalignment, in pixels, of an item's origin with the mosaic's pixel grid.
_GRID_TOLERANCE = 1e-3
#: GDAL's file-system prefix of each URI scheme (the hrefs of the items' assets).
_VSI = {
    "s3": "/vsis3/",
    "gs": "/vsigs/",
    "az": "/vsiaz/",
    "http": "/vsicurl/",
    "https": "/vsicurl/",
}

_VRTS: ProcessCache[str] = ProcessCache(size=4)


def split_asset(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """Split ``items.json#asset=KEY`` into the document and the asset key (None without)."""
    text = str(path)
    doc, sep, key = text.partition(ASSET_FRAGMENT)
    return (doc, key) if sep else (text, None)


def is_stac(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a STAC document (``.json``/``.geojson``, maybe ``#asset=KEY``)."""
    return split_asset(path)[0].lower().endswith(_SUFFIXES)


def raster_fingerprint(path: str | Path) -> str:
    """Return the content fingerprint of a source raster (:mod:`superdml.core.provenance`).

    A STAC mosaic's is its document's and asset key's: like a VRT file's, it follows
    what the mosaic names, not the bytes of the assets.
    """
    if not is_stac(path):
        return file_fingerprint(path)
    doc, key = split_asset(path)
    return f"{file_fingerprint(doc)}:asset={key or ''}"


def stac_vrt(path: str | os.PathLike[str]) -> str:
    """Return the VRT (XML) of the mosaic of a STAC document, built once per process.

    Parameters
    ----------
    path : str or path
        The document, with ``#asset=KEY`` to pick the asset.

    Raises
    ------
    MissingInputError
        The document does not exist (a file, or an object of a bucket).
    InputError
        One line naming the document (and the item): not a STAC item or item collection,
        no items, an item without the asset, items of another CRS, resolution or pixel
        grid than the first, or an asset that GDAL cannot open.
    """
    doc, key = split_asset(path)
    if not storage.is_uri(doc) and Path(doc).is_dir():  # (a bucket: no listing for this)
        raise input_error(doc, "is a folder, expected a STAC item or item collection")
    data = storage.read_bytes(doc)
    base = storage.resolve(doc)
    digest = hashlib.sha256(data).hexdigest()
    return _VRTS.get((digest, base, key), lambda: _build_vrt(doc, base, data, key))


@dataclass(frozen=True)
class _Asset:
    """One item's asset: where GDAL reads it and where it lies."""

    item: str
    name: str  # GDAL's name of the asset (a path, /vsis3/..., /vsicurl/...)
    crs: CRS | None
    transform: rasterio.Affine
    width: int
    height: int


def _build_vrt(doc: str, base: str, data: bytes, key: str | None) -> str:
    """Read the items of a document and return the VRT of their assets."""
    assets = [_item_asset(doc, base, item, key) for item in _items(doc, data)]
    first = assets[0]
    with _open_asset(doc, first.item, first.name) as src:
        bands = _Bands(src.count, src.dtypes, src.nodata, src.colorinterp, src.block_shapes[0])
    return _vrt_xml(doc, assets, bands)


@contextlib.contextmanager
def _open_asset(doc: str, item_id: str, name: str) -> Iterator[rasterio.DatasetReader]:
    """Open an item's asset for its header (no listing of its prefix in object storage)."""
    remote = is_remote(name)
    try:
        with rasterio.Env(**(REMOTE_OPEN_SETTINGS if remote else {})), rasterio.open(name) as src:
            yield src
    except RasterioIOError as err:
        raise input_error(doc, f"item {item_id!r}: cannot open {name} ({err})") from None


def _items(doc: str, data: bytes) -> list[dict[str, Any]]:
    """Return the items of a STAC document (a collection's features, or the one item)."""
    try:
        root = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise input_error(doc, f"not valid JSON ({err})") from None
    kind = root.get("type") if isinstance(root, dict) else None
    if kind == "Feature":
        items = [root]
    elif kind == "FeatureCollection":
        items = root.get("features") or []
    else:
        raise input_error(
            doc, f"not a STAC item or item collection (type {kind!r}, expected 'Feature' or "
            "'FeatureCollection')",
        )  # fmt: skip
    if not items:
        raise input_error(doc, "holds no STAC items")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("assets"), dict):
            raise input_error(doc, f"feature {i} is not a STAC item (no assets)")
    return items


def _item_asset(doc: str, base: str, item: dict[str, Any], key: str | None) -> _Asset:
    """Pick the item's asset, resolve its href, and find its grid."""
    item_id = str(item.get("id", "?"))
    assets: dict[str, Any] = item["assets"]
    name = key if key is not None else _default_asset(doc, item_id, assets)
    if name not in assets or not isinstance(assets[name], dict) or "href" not in assets[name]:
        raise input_error(
            doc, f"item {item_id!r} has no asset {name!r} (it has: {', '.join(assets) or 'none'})"
        )
    asset = assets[name]
    location = _self_href(item) or base
    gdal_name = _gdal_name(_resolve(location, str(asset["href"])))
    props = {**item.get("properties", {}), **asset}
    grid = _proj_grid(doc, item_id, props)
    if grid is None:
        with _open_asset(doc, item_id, gdal_name) as src:
            grid = (src.crs, src.transform, src.width, src.height)
    return _Asset(item_id, gdal_name, *grid)


def _default_asset(doc: str, item_id: str, assets: dict[str, Any]) -> str:
    """Return the asset a mosaic reads without a key: the only image, else visual, else image."""
    images = [name for name, asset in assets.items() if _is_image(asset)]
    if len(images) == 1:
        return images[0]
    for name in DEFAULT_ASSETS:
        if name in assets:
            return name
    listed = ", ".join(images or assets) or "none"
    raise input_error(
        doc, f"item {item_id!r}: no single image asset to read (assets: {listed}): name one, "
        f"as {doc}{ASSET_FRAGMENT}KEY",
    )  # fmt: skip


def _is_image(asset: Any) -> bool:
    """Whether an asset holds raster pixels (by media type or suffix, and roles)."""
    if not isinstance(asset, dict) or _NOT_DATA & set(asset.get("roles") or ()):
        return False
    media = str(asset.get("type", "")).lower()
    suffix = posixpath.splitext(str(asset.get("href", "")).split("?")[0])[1].lower()
    return media.startswith(("image/tiff", "image/vnd.stac.geotiff", "image/jp2")) or (
        not media and suffix in (".tif", ".tiff", ".vrt", ".jp2")
    )


def _self_href(item: dict[str, Any]) -> str | None:
    """Return the item's absolute ``self`` link, if it has one."""
    for link in item.get("links") or ():
        href = str(link.get("href", "")) if isinstance(link, dict) else ""
        if link.get("rel") == "self" and ("://" in href or href.startswith("/")):
            return href
    return None


def _resolve(location: str, href: str) -> str:
    """Resolve `href` against the document or item at `location` (a path or a URI)."""
    if "://" in href or href.startswith("/"):
        return href.removeprefix("file://")
    if "://" in location:
        scheme, rest = location.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), href))}"
    return str((Path(location).parent / href).resolve())


def _gdal_name(href: str) -> str:
    """Return GDAL's name of an asset: a local path, or a URI behind its /vsi prefix."""
    scheme, sep, rest = href.partition("://")
    if not sep:
        return href
    prefix = _VSI.get(scheme.lower())
    if prefix is None:
        return href  # GDAL may know it (/vsi... names have no scheme)
    return prefix + (href if prefix == "/vsicurl/" else rest)


def _proj_grid(
    doc: str, item_id: str, props: dict[str, Any]
) -> tuple[CRS | None, rasterio.Affine, int, int] | None:
    """Return an asset's grid from the projection extension, None when it is incomplete."""
    transform, shape = props.get("proj:transform"), props.get("proj:shape")
    crs_value = next(
        (props[k] for k in ("proj:code", "proj:epsg", "proj:wkt2", "proj:projjson") if k in props),
        None,
    )
    if transform is None or shape is None or crs_value is None:
        return None
    try:
        if isinstance(crs_value, int):
            crs_value = f"EPSG:{crs_value}"
        elif isinstance(crs_value, dict):
            crs_value = json.dumps(crs_value)
        crs = CRS.from_user_input(crs_value)
        height, width = (int(v) for v in shape)
        affine = rasterio.Affine(*(float(v) for v in list(transform)[:6]))
    except (CRSError, TypeError, ValueError) as err:
        raise input_error(doc, f"item {item_id!r}: bad projection metadata ({err})") from None
    return crs, affine, width, height


@dataclass(frozen=True)
class _Bands:
    """The bands of the mosaic, as the first item's asset has them."""

    count: int
    dtypes: tuple[str, ...]
    nodata: float | None
    colorinterp: tuple[Any, ...]
    block: tuple[int, int]


def _check_grids(doc: str, assets: list[_Asset]) -> None:
    """Refuse items of another CRS, resolution or pixel grid than the first."""
    first = assets[0]
    a, e = first.transform.a, first.transform.e
    for asset in assets:
        t = asset.transform
        if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
            raise input_error(
                doc, f"item {asset.item!r} is not north-up (transform {tuple(t)[:6]})"
            )
        if asset.crs != first.crs:
            raise input_error(
                doc, f"item {asset.item!r} is in {asset.crs}, item {first.item!r} in {first.crs}: "
                "a mosaic needs one CRS",
            )  # fmt: skip
        if not (math.isclose(t.a, a, rel_tol=1e-9) and math.isclose(t.e, e, rel_tol=1e-9)):
            raise input_error(
                doc, f"item {asset.item!r} has pixels of {t.a:g} x {-t.e:g}, item "
                f"{first.item!r} of {a:g} x {-e:g}: a mosaic needs one resolution",
            )  # fmt: skip
        cols, rows = (t.c - first.transform.c) / a, (t.f - first.transform.f) / e
        off = max(abs(cols - round(cols)), abs(rows - round(rows)))
        if off > _GRID_TOLERANCE:
            raise input_error(
                doc, f"item {asset.item!r} is off the pixel grid of item {first.item!r} by "
                f"{off:.3f} px: a mosaic needs one pixel grid",
            )  # fmt: skip


def _vrt_xml(doc: str, assets: list[_Asset], bands: _Bands) -> str:
    """Return the VRT of the assets on their common grid (see the module docstring).

    Assets with nodata are complex sources that skip it, under bands of that nodata;
    without nodata, a mask band from the assets' own masks (all valid, alpha or
    internal) marks where no item lies.
    """
    _check_grids(doc, assets)
    t0 = assets[0].transform
    a, e = t0.a, t0.e
    left = min(asset.transform.c for asset in assets)
    top = max(asset.transform.f for asset in assets)
    offsets = [
        (round((asset.transform.c - left) / a), round((asset.transform.f - top) / e))
        for asset in assets
    ]
    width = max(col + asset.width for (col, _), asset in zip(offsets, assets, strict=True))
    height = max(row + asset.height for (_, row), asset in zip(offsets, assets, strict=True))
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    if assets[0].crs is not None:
        ET.SubElement(root, "SRS").text = assets[0].crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(
        repr(v) for v in (left, a, 0.0, top, 0.0, e)
    )

    def add_sources(band: ET.Element, source_band: str, dtype: str) -> None:
        for (col, row), asset in zip(offsets, assets, strict=True):
            kind = "ComplexSource" if bands.nodata is not None else "SimpleSource"
            source = ET.SubElement(band, kind)
            ET.SubElement(source, "SourceFilename", relativeToVRT="0").text = asset.name
            ET.SubElement(source, "SourceBand").text = source_band
            ET.SubElement(
                source, "SourceProperties", RasterXSize=str(asset.width),
                RasterYSize=str(asset.height), DataType=_gdal_type(dtype),
                BlockXSize=str(bands.block[1]), BlockYSize=str(bands.block[0]),
            )  # fmt: skip
            size = {"xSize": str(asset.width), "ySize": str(asset.height)}
            ET.SubElement(source, "SrcRect", {"xOff": "0", "yOff": "0", **size})
            ET.SubElement(source, "DstRect", {"xOff": str(col), "yOff": str(row), **size})
            if kind == "ComplexSource":
                ET.SubElement(source, "NODATA").text = repr(bands.nodata)

    for i in range(bands.count):
        dtype = bands.dtypes[i]
        band = ET.SubElement(root, "VRTRasterBand", dataType=_gdal_type(dtype), band=str(i + 1))
        if bands.nodata is not None:
            ET.SubElement(band, "NoDataValue").text = repr(bands.nodata)
        ET.SubElement(band, "ColorInterp").text = bands.colorinterp[i].name  # GDAL: any case
        add_sources(band, str(i + 1), dtype)
    if bands.nodata is None:
        mask = ET.SubElement(ET.SubElement(root, "MaskBand"), "VRTRasterBand", dataType="Byte")
        add_sources(mask, "mask,1", "uint8")
    return ET.tostring(root, encoding="unicode")


def _gdal_type(dtype: str) -> str:
    """GDAL's name of a numpy dtype name (``uint8`` -> ``Byte``)."""
    from rasterio.dtypes import _gdal_typename

    return str(_gdal_typename(dtype))
