"""The segment-run format: where a run's files are and how later stages read it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from superdml.core import storage
from superdml.core.errors import InputError
from superdml.core.storage import Location
from superdml.raster.io import (
    RasterInfo,
    open_raster,
    raster_info,
)

SEGMENTS_NAME = "segments.tif"


TABLE_NAME = "superpixels.parquet"


MANIFEST_NAME = "manifest.json"


def run_dir(out_dir: Location, source: Location) -> Path | str:
    """Return the subfolder of `out_dir` for `source`: its stem, ``-2``, ``-3``... on clashes.

    A folder already used for the same source is reused (resume, rerun). Both may be
    URIs (:mod:`superdml.core.storage`): then the subfolder is a key prefix.
    """
    resolved = storage.resolve(source)
    stem = storage.stem(resolved)
    for n in range(1, 10_000):
        candidate = storage.join(out_dir, stem if n == 1 else f"{stem}-{n}")
        marker = storage.join(candidate, "source.json")
        if not storage.exists(candidate):
            return candidate
        if storage.exists(marker):
            if json.loads(storage.read_text(marker)).get("source") == resolved:
                return candidate
        elif not storage.listdir(candidate):
            return candidate
    raise InputError(f"{out_dir}: too many rasters named {stem!r}")


@dataclass(frozen=True)
class SegmentRun:
    """A finished segment run of one raster, as later stages read it.

    Attributes
    ----------
    folder : Path or str
        The raster's subfolder holding ``segments.tif`` and ``superpixels.parquet`` (a
        URI's key prefix: :mod:`superdml.core.storage`).
    name : str
        The raster's name in tables and crop file names.
    source : RasterInfo
        The source raster as recorded at segment time.
    bands : list of int
        1-based bands segmented on.
    band_lo, band_hi : list of float
        Per-band value ranges (see :func:`superdml.raster.io.band_ranges`).
    fingerprint : str
        Content fingerprint of the run (source, config, superpixel table): what later
        stages record and compare (:mod:`superdml.core.provenance`).
    """

    folder: Path | str
    name: str
    source: RasterInfo
    bands: list[int]
    band_lo: list[float]
    band_hi: list[float]
    fingerprint: str

    @property
    def segments_path(self) -> Path | str:
        """Path (or URI) of ``segments.tif``."""
        return storage.join(self.folder, SEGMENTS_NAME)

    @property
    def table_path(self) -> Path | str:
        """Path (or URI) of ``superpixels.parquet``."""
        return storage.join(self.folder, TABLE_NAME)

    def superpixels_in(
        self, row: int, col: int, height: int, width: int, columns: list[str] | None = None
    ) -> pa.Table:
        """Return the table rows of the superpixels whose centroid lies in a window.

        Row groups follow the tiles, so the filter reads only the groups it needs.
        """
        filters = [
            ("row", ">=", float(row)), ("row", "<", float(row + height)),
            ("col", ">=", float(col)), ("col", "<", float(col + width)),
        ]  # fmt: skip
        path, filesystem = storage.arrow_source(self.table_path)
        return pq.read_table(path, columns=columns, filters=filters, filesystem=filesystem)

    def check_source(self) -> None:
        """Raise :class:`InputError` unless the source raster opens with the segments' size."""
        with open_raster(self.source.path) as src:
            if (src.height, src.width) != (self.source.height, self.source.width):
                raise InputError(
                    f"{self.source.path}: {src.width}x{src.height} px, the segments in "
                    f"{self.folder} are {self.source.width}x{self.source.height}: pass --raster "
                    "with the source, or segment it again"
                )

    def with_source(self, raster: str | Path) -> SegmentRun:
        """Return this run reading from `raster` instead (a moved source); grids must match."""
        info = raster_info(raster)
        if (info.height, info.width) != (self.source.height, self.source.width) or not np.allclose(
            info.transform, self.source.transform
        ):
            raise InputError(
                f"{raster}: grid {info.width}x{info.height} does not match the segments in "
                f"{self.folder} ({self.source.width}x{self.source.height}, same transform "
                "expected)"
            )
        return dataclasses.replace(self, source=info)


def load_segment_runs(path: str | Path) -> list[SegmentRun]:
    """Read a segment run folder (all its rasters) or one raster's subfolder.

    Raises
    ------
    MissingInputError, InputError
        When `path` does not exist or holds no finished segment run.
    """
    from superdml.core.errors import require_dir

    path = storage.location(path)
    require_dir(path, "segment folder")
    folders = (
        [path]
        if storage.isfile(storage.join(path, MANIFEST_NAME))
        else [
            storage.join(path, sub)
            for sub in storage.listdir(path)
            if storage.isfile(storage.join(path, sub, MANIFEST_NAME))
        ]
    )
    if not folders:
        raise InputError(
            f"{path}: not a segment folder (no {MANIFEST_NAME}): run `superdml segment` first"
        )
    runs = []
    for folder in folders:
        manifest = json.loads(storage.read_text(storage.join(folder, MANIFEST_NAME)))
        source = RasterInfo(
            **{**manifest["source"], "transform": tuple(manifest["source"]["transform"])}
        )
        runs.append(
            SegmentRun(
                folder,
                storage.name(folder),
                source,
                list(manifest["bands"]),
                list(manifest["band_lo"]),
                list(manifest["band_hi"]),
                str(manifest.get("fingerprint", "")),
            )  # fmt: skip
        )
    return runs
