"""The crop rule: how a superpixel's crop is cut and scaled (pure functions, no raster I/O)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from superdml.config.schema import MaskMode
from superdml.crops.folder import (
    CROPS_TABLE,
    read_crops_meta,
)

SCALING_RULE = "uint8 as is; else linear 1st..99th percentile -> 0..255, clipped"


@dataclass(frozen=True)
class CropRule:
    """How crops are cut; travels in ``crops.parquet`` metadata and in checkpoints.

    Attributes
    ----------
    crop_size : int
    mask : {"none", "outside", "alpha"}
    bands : tuple of int or None
        1-based source bands that become the color bands (None: the first three).
    scaling : str
        The 8-bit scaling rule (see the module docstring).
    source_bands : int or None
        How many source bands the color bands were made from (1 to 3), so labeling can
        refuse a raster that would give other crops; None when unknown.
    """

    crop_size: int = 64
    mask: MaskMode = "none"
    bands: tuple[int, ...] | None = None
    scaling: str = SCALING_RULE
    source_bands: int | None = None

    @property
    def channels(self) -> int:
        """Bands of a crop: 3, or 4 with the alpha mask."""
        return 4 if self.mask == "alpha" else 3

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict (the form stored in metadata and checkpoints)."""
        d = dataclasses.asdict(self)
        d["bands"] = list(self.bands) if self.bands else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropRule:
        """Inverse of :meth:`to_dict`."""
        bands = d.get("bands")
        return cls(
            crop_size=int(d["crop_size"]),
            mask=d["mask"],
            bands=tuple(bands) if bands else None,
            scaling=d.get("scaling", SCALING_RULE),
            source_bands=d.get("source_bands"),
        )


def to_uint8(
    pixels: np.ndarray, lo: list[float], hi: list[float], valid: np.ndarray | None = None
) -> np.ndarray:
    """Scale bands to uint8 by the crop rule.

    Parameters
    ----------
    pixels : (C, H, W) ndarray
    lo, hi : list of float, length C
        Per-band values mapped to 0 and 255 (ignored for uint8 input).
    valid : (H, W) bool ndarray, optional
        Invalid pixels become 0.

    Returns
    -------
    (C, H, W) uint8 ndarray
    """
    if pixels.dtype == np.uint8:
        out = pixels.copy()
    else:
        lo_ = np.asarray(lo, dtype=np.float32)[:, None, None]
        hi_ = np.asarray(hi, dtype=np.float32)[:, None, None]
        scaled = (pixels.astype(np.float32) - lo_) * (255.0 / (hi_ - lo_))
        out = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    if valid is not None:
        out[:, ~valid] = 0
    return out


def color_bands(pixels: np.ndarray) -> np.ndarray:
    """Make exactly three color bands: gray repeated, or a zero band added.

    Parameters
    ----------
    pixels : (C, H, W) uint8 ndarray, C in 1..3

    Returns
    -------
    (3, H, W) uint8 ndarray
    """
    if pixels.shape[0] == 1:
        return np.repeat(pixels, 3, axis=0)
    if pixels.shape[0] == 2:
        return np.concatenate([pixels, np.zeros_like(pixels[:1])], axis=0)
    return pixels[:3]


def extract_crops(
    window: np.ndarray,
    segments: np.ndarray,
    ids: np.ndarray,
    centers: np.ndarray,
    size: int,
    mask: MaskMode = "outside",
) -> np.ndarray:
    """Cut one square crop per superpixel from a window, in one gather.

    Parameters
    ----------
    window : (C, H, W) uint8 ndarray
        Pixels of the window, including a margin of at least ``size // 2`` around every
        center (padding beyond the raster is the caller's).
    segments : (H, W) uint32 ndarray
        Superpixel ids of the same window.
    ids : (N,) ndarray
        Superpixel id of each crop.
    centers : (N, 2) int ndarray
        Row, column of each crop's center pixel, in window coordinates.
    size : int
    mask : {"none", "outside", "alpha"}

    Returns
    -------
    (N, C, size, size) uint8 ndarray, or (N, C + 1, size, size) with ``mask="alpha"``
    """
    half = size // 2
    top = np.asarray(centers[:, 0], dtype=np.intp) - half
    left = np.asarray(centers[:, 1], dtype=np.intp) - half
    h, w = segments.shape
    if top.size and (
        top.min() < 0 or left.min() < 0 or top.max() + size > h or left.max() + size > w
    ):
        raise ValueError("crop centers closer than size // 2 to the window edge")
    views = np.lib.stride_tricks.sliding_window_view(window, (size, size), axis=(1, 2))
    crops = views[:, top, left].transpose(1, 0, 2, 3)
    if mask == "none":
        return np.ascontiguousarray(crops)
    seg_views = np.lib.stride_tricks.sliding_window_view(segments, (size, size))
    inside = seg_views[top, left] == np.asarray(ids, dtype=segments.dtype)[:, None, None]
    if mask == "outside":
        return crops * inside[:, None].astype(np.uint8)
    alpha = (inside * np.uint8(255)).astype(np.uint8)[:, None]
    return np.concatenate([crops, alpha], axis=1)


def read_crop_rule(folder: str | Path) -> CropRule | None:
    """Return the crop rule recorded in ``folder/crops.parquet`` (or one level up), if any."""
    for candidate in (Path(folder) / CROPS_TABLE, Path(folder).parent / CROPS_TABLE):
        if candidate.exists() and "crop_rule" in (meta := read_crops_meta(candidate)):
            return CropRule.from_dict(meta["crop_rule"])
    return None
