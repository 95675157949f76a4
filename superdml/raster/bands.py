"""A raster's bands by number or description, and which of them hold data (not alpha)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rasterio.enums import ColorInterp

from superdml.core.errors import input_error
from superdml.raster.io import check_bands, open_raster


def band_descriptions(path: str | os.PathLike[str]) -> list[str]:
    """Return the description of every band of a raster (``""`` where a band has none)."""
    with open_raster(path) as src:
        return [d or "" for d in src.descriptions]


def data_bands(path: str | os.PathLike[str]) -> list[int]:
    """Return the 1-based bands of a raster that hold data: all but alpha bands."""
    with open_raster(path) as src:
        interp = src.colorinterp
    return [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha] or [1]


def resolve_bands(
    path: str | os.PathLike[str], count: int, bands: Sequence[int | str]
) -> list[int]:
    """Turn band numbers (1-based) and band descriptions (``B08``, ``nir``) into numbers.

    Descriptions match case-insensitively.

    Raises
    ------
    InputError
        A number beyond `count`, or a description no band of the raster has, naming
        the raster and the band.
    """
    names = band_descriptions(path) if any(isinstance(b, str) for b in bands) else []
    lower = [n.lower() for n in names]
    out = []
    for band in bands:
        if isinstance(band, str):
            if band.lower() not in lower:
                known = ", ".join(n for n in names if n) or "none"
                raise input_error(
                    path, f"has no band described {band!r} (its band descriptions: {known})"
                )
            out.append(lower.index(band.lower()) + 1)
        else:
            out.append(int(band))
    return check_bands(path, count, tuple(out))
