"""The crop rule: how a superpixel's crop is cut and scaled (pure functions, no raster I/O)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from superdml.config.schema import MaskMode
from superdml.core.errors import input_error
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
    context : int or None
        The side of a second, wider view of each superpixel in crop sizes (3: a square
        three times the crop's side around the same center, averaged down to the crop's
        size), stacked after the crop's bands and before the alpha band; None: none.
        Crops with a context view are TIFF chips (:attr:`chips`).
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
    context: int | None = None

    @property
    def lossless(self) -> bool:
        """Whether crops keep their bands at the raster's dtype (TIFF chips)."""
        return self.dtype is not None

    @property
    def chips(self) -> bool:
        """Whether crops are stored as TIFF chips (lossless, or with a context view)."""
        return self.lossless or self.context is not None

    @property
    def chip_dtype(self) -> str:
        """The dtype of the crops' bands: the raster's (lossless rule) or uint8."""
        return self.dtype or "uint8"

    @property
    def view_bands(self) -> int:
        """Bands of one view (the crop or its context): 3 (8-bit rule) or ``len(bands)``."""
        return len(self.bands) if self.lossless and self.bands is not None else 3

    @property
    def channels(self) -> int:
        """Bands of a crop: its view's, doubled by a context view, plus one for alpha."""
        alpha = 1 if self.mask == "alpha" else 0
        return self.view_bands * (1 if self.context is None else 2) + alpha

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict (the form stored in metadata and checkpoints).

        An 8-bit color rule gives the same dict as before bands were kept, and a rule
        without context the same as before context views (so the keys of earlier
        predictions stay valid).
        """
        d = dataclasses.asdict(self)
        if self.context is None:
            del d["context"]
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
            context=d.get("context"),
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
            rule: float32, each band ``(value - lo) / (hi - lo)`` (a context view's
            bands as the crop's), the alpha band / 255.
        """
        if not self.lossless:
            return crops
        lo, scale = self._unit_affine()
        shape = (-1, 1, 1)
        return (crops.astype(np.float32) - lo.reshape(shape)) * scale.reshape(shape)

    def _unit_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel offset and factor of :meth:`to_unit` (alpha: 0 and 1/255)."""
        views = 1 if self.context is None else 2
        lo = np.tile(np.asarray(self.lo, np.float32), views)
        scale = 1.0 / (np.tile(np.asarray(self.hi, np.float32), views) - lo)
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
        picks = list(self.preview or range(min(3, self.view_bands)))
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
    context: int | None = None,
) -> np.ndarray:
    """Cut one square crop per superpixel from a window, in one gather.

    Parameters
    ----------
    window : (C, H, W) ndarray
        Pixels of the window, including a margin of at least ``size // 2`` around every
        center (``size * context // 2`` with a context view; padding beyond the raster
        is the caller's).
    segments : (H, W) uint32 ndarray
        Superpixel ids of the same window.
    ids : (N,) ndarray
        Superpixel id of each crop.
    centers : (N, 2) int ndarray
        Row, column of each crop's center pixel, in window coordinates.
    size : int
    mask : {"none", "outside", "alpha"}
    context : int, optional
        Add the context view (:func:`context_views`, never masked) of this factor after
        the crop's bands, before the alpha band.

    Returns
    -------
    (N, C', size, size) ndarray of the window's dtype
        C' = C, doubled with `context`, plus one with ``mask="alpha"``.
    """
    half = size // 2
    top = np.asarray(centers[:, 0], dtype=np.intp) - half
    left = np.asarray(centers[:, 1], dtype=np.intp) - half
    _check_inside(top, left, size, segments.shape)
    views = np.lib.stride_tricks.sliding_window_view(window, (size, size), axis=(1, 2))
    crops = views[:, top, left].transpose(1, 0, 2, 3)
    parts = [crops]
    if mask != "none":
        seg_views = np.lib.stride_tricks.sliding_window_view(segments, (size, size))
        inside = seg_views[top, left] == np.asarray(ids, dtype=segments.dtype)[:, None, None]
        if mask == "outside":
            parts = [crops * inside[:, None].astype(crops.dtype)]
    if context is not None:
        parts.append(context_views(window, centers, size, context))
    if mask == "alpha":
        parts.append((inside[:, None] * 255).astype(crops.dtype))
    if len(parts) == 1:
        return np.ascontiguousarray(parts[0])
    return np.concatenate(parts, axis=1)


def _check_inside(top: np.ndarray, left: np.ndarray, side: int, shape: tuple[int, ...]) -> None:
    """Raise ValueError when a square of `side` at `top`, `left` leaves a window of `shape`."""
    h, w = shape[-2:]
    if top.size and (
        top.min() < 0 or left.min() < 0 or top.max() + side > h or left.max() + side > w
    ):
        raise ValueError("crop centers closer than the crop's half side to the window edge")


def context_views(window: np.ndarray, centers: np.ndarray, size: int, factor: int) -> np.ndarray:
    """Cut the wider view of each center: a ``size * factor`` square, averaged to `size`.

    Each output pixel is the mean of a ``factor x factor`` block (area resampling:
    exact, no aliasing), computed from one summed-area table per band, so the cost
    is a few passes over the window plus one gather per band.

    Parameters
    ----------
    window : (C, H, W) ndarray
        With a margin of at least ``size * factor // 2`` around every center.
    centers : (N, 2) int ndarray
        Row, column of each view's center pixel, in window coordinates (the crop's).
    size, factor : int

    Returns
    -------
    (N, C, size, size) ndarray of the window's dtype
        Integer dtypes rounded to the nearest value.
    """
    side = size * factor
    top = np.asarray(centers[:, 0], dtype=np.intp) - side // 2
    left = np.asarray(centers[:, 1], dtype=np.intp) - side // 2
    _check_inside(top, left, side, window.shape)
    steps = np.arange(size) * factor
    rows = (top[:, None] + steps)[:, :, None]  # (N, size, 1): each block's first row
    cols = (left[:, None] + steps)[:, None, :]
    out = np.empty((len(top), window.shape[0], size, size), dtype=window.dtype)
    integer = np.issubdtype(window.dtype, np.integer)
    for band, pixels in enumerate(window):  # a handful of bands, each fully vectorized
        table = np.zeros((pixels.shape[0] + 1, pixels.shape[1] + 1), np.float64)
        np.cumsum(np.cumsum(pixels, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
        f = factor
        sums = table[f:, f:] - table[:-f, f:] - table[f:, :-f] + table[:-f, :-f]
        mean = sums[rows, cols] / (f * f)
        out[:, band] = np.rint(mean) if integer else mean
    return out


def read_crop_rule(folder: str | os.PathLike[str]) -> CropRule | None:
    """Return the crop rule recorded in ``folder/crops.parquet`` (or one level up), if any."""
    for candidate in (Path(folder) / CROPS_TABLE, Path(folder).parent / CROPS_TABLE):
        if candidate.exists() and "crop_rule" in (meta := read_crops_meta(candidate)):
            return CropRule.from_dict(meta["crop_rule"])
    return None


def _views(context: int | None) -> str:
    return "no context view" if context is None else f"a {context}x context view"


def check_context(rule: CropRule | None, folder: str | os.PathLike[str], whose: str) -> None:
    """Refuse a crop folder cut with another context view than `rule` (a model's).

    A folder without a crop rule (images people brought) has no context view.

    Parameters
    ----------
    rule : CropRule or None
        The rule the model takes (None: an old checkpoint without one, no context).
    folder : path
        A labeled crop folder (its ``crops.parquet``, or one level up, has its rule).
    whose : str
        Where `rule` comes from, for the message: ``the checkpoint model.pt``.

    Raises
    ------
    InputError
        ``<folder>: crops with no context view, the checkpoint model.pt takes a 3x
        context view: cut them with --context 3 (superdml crops), or retrain on such crops``.
    """
    want = None if rule is None else rule.context
    own = read_crop_rule(folder)
    have = None if own is None else own.context
    if want != have:
        fix = "without --context" if want is None else f"with --context {want}"
        raise input_error(
            folder,
            f"crops with {_views(have)}, {whose} takes {_views(want)}: cut them {fix} "
            "(superdml crops), or retrain on such crops",
        )
