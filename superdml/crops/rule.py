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
#: The scaling of lossless crops (:attr:`CropRule.lossless`) into the model's [0, 1] units.
UNIT_RULE = "(value - lo) / (hi - lo) per band, lo..hi its 1st..99th percentile; alpha / 255"


@dataclass(frozen=True)
class CropRule:
    """How crops are cut; travels in ``crops.parquet`` metadata and in checkpoints.

    Two kinds of rule. The 8-bit color rule (``dtype`` None: 8-bit rasters of one to
    three bands, and every rule written before bands were kept) makes 3 color bands
    scaled to 8 bit, stored as PNG. The lossless rule (``dtype`` set: more than three
    bands, or not 8-bit) keeps the chosen bands at the raster's dtype, stored as TIFF
    chips, and scales them into the model's units with per-band statistics measured on
    the raster(s) (:meth:`to_unit`).

    Attributes
    ----------
    crop_size : int
    mask : {"none", "outside", "alpha"}
    bands : tuple of int or None
        1-based source bands of the crop (8-bit rule: None is the first three).
    scaling : str
        The scaling rule (:data:`SCALING_RULE` or :data:`UNIT_RULE`).
    source_bands : int or None
        How many source bands the crops were made from, so labeling can refuse a
        raster that would give other crops; None when unknown.
    dtype : str or None
        The rasters' dtype (lossless rule); None for the 8-bit color rule.
    band_names : tuple of str or None
        The rasters' descriptions of `bands` ("" where a band has none).
    lo, hi : tuple of float or None
        Per band of `bands`: the values mapped to 0 and 1 (1st and 99th percentiles of
        the valid pixels, nodata left out, over every raster of the crops).
    preview : tuple of int or None
        Positions (0-based, into `bands`) of the preview's red, green and blue.
    """

    crop_size: int = 64
    mask: MaskMode = "none"
    bands: tuple[int, ...] | None = None
    scaling: str = SCALING_RULE
    source_bands: int | None = None
    dtype: str | None = None
    band_names: tuple[str, ...] | None = None
    lo: tuple[float, ...] | None = None
    hi: tuple[float, ...] | None = None
    preview: tuple[int, ...] | None = None

    @property
    def lossless(self) -> bool:
        """Whether crops keep their bands at the raster's dtype (TIFF chips)."""
        return self.dtype is not None

    @property
    def channels(self) -> int:
        """Bands of a crop: 3 (8-bit rule) or ``len(bands)``, plus one for the alpha mask."""
        alpha = 1 if self.mask == "alpha" else 0
        if self.lossless and self.bands is not None:
            return len(self.bands) + alpha
        return 3 + alpha

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict (the form stored in metadata and checkpoints).

        An 8-bit color rule gives the same dict as before bands were kept (so the
        keys of earlier predictions stay valid).
        """
        d = dataclasses.asdict(self)
        d["bands"] = list(self.bands) if self.bands else None
        if not self.lossless:
            for key in ("dtype", "band_names", "lo", "hi", "preview"):
                del d[key]
            return d
        for key in ("band_names", "lo", "hi", "preview"):
            d[key] = None if d[key] is None else list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropRule:
        """Inverse of :meth:`to_dict`."""
        bands = d.get("bands")

        def tup(key: str) -> tuple[Any, ...] | None:
            return None if d.get(key) is None else tuple(d[key])

        return cls(
            crop_size=int(d["crop_size"]),
            mask=d["mask"],
            bands=tuple(bands) if bands else None,
            scaling=d.get("scaling", SCALING_RULE),
            source_bands=d.get("source_bands"),
            dtype=d.get("dtype"),
            band_names=tup("band_names"),
            lo=tup("lo"),
            hi=tup("hi"),
            preview=tup("preview"),
        )

    def band_label(self, position: int) -> str:
        """Name band `position` (0-based, into `bands`) for messages: ``band 4 (B08)``."""
        number = self.bands[position] if self.bands else position + 1
        name = self.band_names[position] if self.band_names else ""
        return f"band {number}" + (f" ({name})" if name else "")

    def to_unit(self, crops: np.ndarray) -> np.ndarray:
        """Scale crops into the model's units (what :class:`Embedder` takes).

        Parameters
        ----------
        crops : (..., C, H, W) ndarray
            Crops of this rule, as cut (or read from their files).

        Returns
        -------
        ndarray
            8-bit rule: `crops` unchanged (uint8; the model divides by 255). Lossless
            rule: float32, each band ``(value - lo) / (hi - lo)``, the alpha band / 255.
        """
        if not self.lossless:
            return crops
        lo, scale = self._unit_affine()
        shape = (-1, 1, 1)
        return (crops.astype(np.float32) - lo.reshape(shape)) * scale.reshape(shape)

    def _unit_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel offset and factor of :meth:`to_unit` (alpha: 0 and 1/255)."""
        lo = np.asarray(self.lo, np.float32)
        scale = 1.0 / (np.asarray(self.hi, np.float32) - lo)
        if self.mask == "alpha":
            lo = np.append(lo, np.float32(0))
            scale = np.append(scale, np.float32(1 / 255))
        return lo, scale.astype(np.float32)

    def preview_bands(self, pixels: np.ndarray) -> np.ndarray:
        """Return the 8-bit color bands of lossless pixels, for people (not the model).

        Parameters
        ----------
        pixels : (C, H, W) ndarray
            A window (or crop) of this rule's bands, at its dtype.

        Returns
        -------
        (3, H, W) uint8 ndarray
            The `preview` bands (the first three when unset) scaled from lo..hi to 0..255.
        """
        n_bands = len(self.bands or ())
        picks = list(self.preview or range(min(3, n_bands)))
        lo = [self.lo[i] for i in picks] if self.lo else [0.0] * len(picks)
        hi = [self.hi[i] for i in picks] if self.hi else [255.0] * len(picks)
        return color_bands(to_uint8(pixels[picks], lo, hi))


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
        factor = np.float32(255) / (np.asarray(hi, dtype=np.float32)[:, None, None] - lo_)
        scaled = pixels.astype(np.float32)  # one temporary, scaled in place
        scaled -= lo_
        scaled *= factor
        np.fmax(scaled, 0, out=scaled)  # fmax/fmin, unlike clip, also turn NaN into 0
        np.fmin(scaled, 255, out=scaled)
        out = np.rint(scaled, out=scaled).astype(np.uint8)
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
