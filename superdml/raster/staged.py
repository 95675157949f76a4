"""A raster and its overviews, computed in place on unnamed temporary files, then written by GDAL.

An export computes every pixel of a label raster and of each overview level itself,
window by window, straight into these arrays; GDAL then reads them where they are (a
VRT over ``MEM`` datasets on the arrays' memory, its overview levels declared) and
writes the final file in one pass: the COG driver with the overviews as given, or a
tiled GeoTIFF. Nothing is compressed twice, nothing is resampled by GDAL.

Up to :data:`IN_MEMORY_BYTES` (a raster and its levels) the arrays are in memory.
Larger ones are memory maps of temporary files in the output folder that have no name
(``O_TMPFILE``), so nothing is left behind, not even after a crash, and the kernel
can page them out: memory is not what bounds the raster's size. Their space is
reserved up front, so a full disk is an error before any pixel is written, not a
``SIGBUS`` halfway.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.io import MemoryFile

from superdml.core import storage
from superdml.core.errors import input_error
from superdml.raster.io import RasterInfo

#: Rasters whose levels take up to this many bytes are staged in memory: a file-backed
#: map costs more than the rest of a small export (2048^2 float32 with its levels, 22 MB:
#: filling and dropping the map 50 to 60 ms, the same array in memory 6 to 14 ms).
IN_MEMORY_BYTES = 128 << 20
#: GDAL type names of the dtypes rasters are staged in.
_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "uint32": "UInt32", "float32": "Float32"}


def _reserve(fd: int, size: int) -> None:
    """Give the file `size` bytes of disk now (``posix_fallocate``; a sparse size elsewhere)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # macOS: no reservation
        os.ftruncate(fd, size)


#: GDAL settings that let a VRT read ``MEM:::`` datasets: GDAL refuses them by default
#: (since 3.10), as a VRT file from elsewhere could point them at any memory; ours are
#: made here, on arrays alive for the whole copy.
_MEM_SOURCES = {"GDAL_MEM_ENABLE_OPEN": "YES", "VRT_ALLOW_MEM_DRIVER": "YES"}


class StagedRaster:
    """A one-band raster and its overview levels as writable arrays.

    Parameters
    ----------
    folder : path
        Where the temporary files live (the output's folder: the same disk).
    info : RasterInfo
        The raster's grid.
    dtype : str
    nodata : float
    factors : list of int
        Overview factors (2, 4, 8...), possibly none.

    Attributes
    ----------
    levels : list of (ceil(H / f), ceil(W / f)) ndarray
        The raster (factor 1), then one array per factor.

    Raises
    ------
    InputError
        When the folder's disk has no room for the arrays (staged on disk).
    """

    def __init__(
        self, folder: Path, info: RasterInfo, dtype: str, nodata: float, factors: list[int]
    ) -> None:
        self.info, self.dtype, self.nodata, self.factors = info, np.dtype(dtype), nodata, factors
        self._files = []
        self.levels = []
        shapes = [
            (math.ceil(info.height / factor), math.ceil(info.width / factor))
            for factor in [1, *factors]
        ]
        if sum(h * w for h, w in shapes) * self.dtype.itemsize <= IN_MEMORY_BYTES:
            self.levels = [np.zeros(shape, self.dtype) for shape in shapes]
            return
        for shape in shapes:
            file = tempfile.TemporaryFile(dir=folder)
            self._files.append(file)
            try:
                _reserve(file.fileno(), shape[0] * shape[1] * self.dtype.itemsize)
            except OSError as e:
                self.close()
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                total = sum(h * w for h, w in shapes) * self.dtype.itemsize
                raise input_error(folder, f"no room on its disk to stage a {dtype} raster "
                                  f"of {info.height} x {info.width} and its overviews "
                                  f"({total / 1e9:.2f} GB)") from None  # fmt: skip
            self.levels.append(np.memmap(file, self.dtype, "r+", shape=shape))

    def window(self, level: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Return the view of a window of the raster (given at factor 1) at one level."""
        factor = 1 if level == 0 else self.factors[level - 1]
        r0, c0 = row // factor, col // factor
        r1, c1 = math.ceil((row + height) / factor), math.ceil((col + width) / factor)
        return self.levels[level][r0:r1, c0:c1]

    def write(
        self,
        path: Path | str,
        cog: bool,
        options: dict[str, Any],
        colormap: dict[int, tuple[int, int, int, int]] | None = None,
        tags: dict[str, str] | None = None,
        band_tags: dict[str, str] | None = None,
    ) -> None:
        """Write the raster to `path` atomically: a COG with these levels, or a GeoTIFF.

        Parameters
        ----------
        path : Path or str
            A file, or an object uploaded whole once written on local scratch space
            (:func:`superdml.core.storage.write_once`).
        cog : bool
            GDAL's COG driver with the levels as its overviews; else the GTiff driver
            (no overviews).
        options : dict
            The driver's creation options (compression, block size, threads).
        colormap, tags, band_tags : optional
            The color table of band 1, dataset tags, band 1 tags.
        """
        with MemoryFile(ext=".vrt") as skeleton:
            profile = {
                "driver": "VRT", "width": self.info.width, "height": self.info.height,
                "count": 1, "dtype": self.dtype.name, "crs": self.info.crs,
                "transform": self.info.affine, "nodata": self.nodata,
            }  # fmt: skip
            with skeleton.open(**profile) as vrt:
                if colormap:
                    vrt.write_colormap(1, colormap)
                vrt.update_tags(**(tags or {}))
                vrt.update_tags(1, **(band_tags or {}))
            skeleton_xml = skeleton.read().decode()
        # the band's sources: the staged arrays (no XML parse and rewrite of the skeleton,
        # whose color table alone is 256 elements)
        sources = [("SimpleSource", self._mem_name(0))]
        sources += [("Overview", self._mem_name(level)) for level in range(1, len(self.levels))]
        xml = "".join(
            f"<{tag}><SourceFilename>{name}</SourceFilename><SourceBand>1</SourceBand></{tag}>"
            for tag, name in sources[: None if cog else 1]
        )
        end = skeleton_xml.rindex("</VRTRasterBand>")
        vrt_xml = skeleton_xml[:end] + xml + skeleton_xml[end:]
        driver = {"driver": "GTiff"}
        if cog:
            driver = {"driver": "COG", "OVERVIEWS": "FORCE_USE_EXISTING"}
        with (
            MemoryFile(vrt_xml.encode(), ext=".vrt") as vrt_file,
            rasterio.Env(**_MEM_SOURCES),
            storage.write_once(path) as out,
        ):
            rasterio.shutil.copy(vrt_file.name, out, **driver, **options)

    def _mem_name(self, level: int) -> str:
        """Return a GDAL ``MEM`` dataset name on the memory of one level (no copy)."""
        array = self.levels[level]
        height, width = array.shape
        return (
            f"MEM:::DATAPOINTER={array.ctypes.data},PIXELS={width},LINES={height},BANDS=1,"
            f"DATATYPE={_GDAL_TYPES[self.dtype.name]}"
        )

    def close(self) -> None:
        """Unmap the arrays and drop their files."""
        self.levels.clear()
        for file in self._files:
            file.close()
        self._files.clear()

    def __enter__(self) -> StagedRaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
