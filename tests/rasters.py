"""Small rasters for tests, written with rasterio from scikit-image's bundled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from skimage import data, transform

from superdml.cli.demo import voronoi_regions

CRS = "EPSG:32633"
TRANSFORM = from_origin(500_000.0, 4_000_000.0, 2.0, 2.0)


def write_raster(
    path: Path,
    pixels: np.ndarray,
    crs: str | None = CRS,
    nodata: float | None = None,
    transform_: rasterio.Affine | None = TRANSFORM,
    driver: str = "GTiff",
    tags: dict[str, str] | None = None,
    **extra: object,
) -> Path:
    """Write band-first `pixels` (C, H, W) to `path`, with dataset `tags` if given."""
    count, height, width = pixels.shape
    profile: dict[str, object] = {
        "driver": driver,
        "height": height,
        "width": width,
        "count": count,
        "dtype": pixels.dtype.name,
    }
    if crs is not None:
        profile.update(crs=crs, transform=transform_)
    if nodata is not None:
        profile["nodata"] = nodata
    profile.update(extra)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        if tags:
            dst.update_tags(**tags)
    return path


def texture_mosaic(size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """An RGB mosaic of four textures in irregular regions, and its truth (1..4).

    Every class has a region in the left and in the right half.

    Returns
    -------
    rgb : (3, size, size) uint8 ndarray
    truth : (size, size) uint8 ndarray
    """

    def tile(img: np.ndarray) -> np.ndarray:
        img = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
        reps = (size // img.shape[0] + 1, size // img.shape[1] + 1, 1)
        return np.tile(img, reps)[:size, :size]

    sources = [
        tile(data.brick()),
        tile(data.grass()),
        tile(data.gravel()),
        tile(
            (transform.resize(data.coffee(), (200, 300), anti_aliasing=True) * 255).astype(np.uint8)
        ),
    ]
    truth = voronoi_regions(size, n_classes=len(sources))
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    for k, src in enumerate(sources, start=1):
        rgb[truth == k] = src[truth == k]
    return rgb.transpose(2, 0, 1), truth


def write_top_half_labeled(root: Path, pixels: np.ndarray, truth: np.ndarray) -> tuple[Path, Path]:
    """Write ``root/mosaic.tif`` and ``root/top.tif``: the truth of its top half only.

    Parameters
    ----------
    pixels : (C, H, W) ndarray
    truth : (H, W) uint8 ndarray
        Class codes; ``top.tif`` keeps the top half's and is 0 (nodata) below.

    Returns
    -------
    mosaic, labels : Path
    """
    top = truth.copy()
    top[truth.shape[0] // 2 :] = 0
    return write_raster(root / "mosaic.tif", pixels), write_raster(
        root / "top.tif", top[None], nodata=0
    )
