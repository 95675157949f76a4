"""The segment-run format: where a run's files are and how later stages read it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from superdml.core.errors import InputError
from superdml.raster.io import (
    RasterInfo,
    open_raster,
    raster_info,
)

SEGMENTS_NAME = "segments.tif"


TABLE_NAME = "superpixels.parquet"


MANIFEST_NAME = "manifest.json"


def run_dir(out_dir: str | Path, source: str | Path) -> Path:
    """Return the subfolder of `out_dir` for `source`: its stem, ``-2``, ``-3``... on clashes.

    A folder already used for the same source is reused (resume, rerun).
    """
    out_dir, source = Path(out_dir), Path(source).resolve()
    stem = source.stem
    for n in range(1, 10_000):
        candidate = out_dir / (stem if n == 1 else f"{stem}-{n}")
        marker = candidate / "source.json"
        if not candidate.exists():
            return candidate
        if marker.exists() and json.loads(marker.read_text()).get("source") == str(source):
            return candidate
        if not marker.exists() and not any(candidate.iterdir()):
            return candidate
    raise InputError(f"{out_dir}: too many rasters named {stem!r}")


@dataclass(frozen=True)
class SegmentRun:
    """A finished segment run of one raster, as later stages read it.

    Attributes
    ----------
    folder : Path
        The raster's subfolder holding ``segments.tif`` and ``superpixels.parquet``.
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

    folder: Path
    name: str
    source: RasterInfo
    bands: list[int]
    band_lo: list[float]
    band_hi: list[float]
    fingerprint: str

    @property
    def segments_path(self) -> Path:
        """Path of ``segments.tif``."""
        return self.folder / SEGMENTS_NAME

    @property
    def table_path(self) -> Path:
        """Path of ``superpixels.parquet``."""
        return self.folder / TABLE_NAME

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
        return pq.read_table(self.table_path, columns=columns, filters=filters)

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

    path = Path(path)
    require_dir(path, "segment folder")
    folders = (
        [path]
        if (path / MANIFEST_NAME).exists()
        else sorted(p.parent for p in path.glob(f"*/{MANIFEST_NAME}"))
    )
    if not folders:
        raise InputError(
            f"{path}: not a segment folder (no {MANIFEST_NAME}): run `superdml segment` first"
        )
    runs = []
    for folder in folders:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        source = RasterInfo(
            **{**manifest["source"], "transform": tuple(manifest["source"]["transform"])}
        )
        runs.append(
            SegmentRun(
                folder,
                folder.name,
                source,
                list(manifest["bands"]),
                list(manifest["band_lo"]),
                list(manifest["band_hi"]),
                str(manifest.get("fingerprint", "")),
            )  # fmt: skip
        )
    return runs
