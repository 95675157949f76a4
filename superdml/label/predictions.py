"""The predictions dataset: its schema, layout and readers.

``superdml label`` writes ``OUT/predictions/<raster>/<tile>.parquet``, one part per
raster tile, each holding the superpixels whose centroid lies in that tile, plus
``OUT/label.json`` (classes, tile size, the checkpoint's and reference's hashes, and
each raster's part provenance, :func:`part_provenance`).

A part is *current* when the provenance in its metadata equals the one ``label.json``
records for its raster, and that record names the segment run in front of the reader
(:meth:`LabelRun.parts`). Only current parts are read (:class:`RasterParts`): ``label``
reuses them, ``export`` and ``review`` read them, and ``label`` removes the other parts
it wrote (:func:`remove_stale_parts`), so ``OUT/predictions`` reads as one table with
one row per superpixel.

``OUT`` may be a URI (:mod:`superdml.core.storage`): each part is then one object,
written once by a create-only PUT.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from superdml.config.schema import LabelConfig, config_hash
from superdml.core import storage
from superdml.core.errors import InputError, input_error, require_dir
from superdml.core.provenance import combine
from superdml.core.storage import Location
from superdml.crops.rule import CropRule
from superdml.raster.classes import ClassScheme
from superdml.raster.io import Tile, tile_grid
from superdml.segment.run import SegmentRun

MANIFEST = "label.json"
PARTS = "predictions"
EMBEDDINGS = "embeddings"
PART_FILES = ("*/t*_*.parquet",)
"""Where ``superdml label`` writes parts: ``OUT/predictions/<raster>/<tile key>.parquet``."""
_PART_NAME = re.compile(r"t\d{4,}_\d{4,}\.parquet")
_META_KEY = b"superdml"


def predictions_schema() -> pa.Schema:
    """Arrow schema of a predictions part.

    ``label_code`` is the class's code in the class scheme (the value of the label
    rasters), or the scheme's unknown code for ``unknown``. ``score`` is the winning class's
    share of the similarity-weighted kNN vote (0-1), ``margin`` the best minus the
    second-best share, ``similarity`` the cosine similarity to the nearest reference.
    """
    return pa.schema(
        [
            pa.field("segment_id", pa.uint32(), nullable=False),
            pa.field("raster", pa.string(), nullable=False),
            pa.field("x", pa.float64()),
            pa.field("y", pa.float64()),
            pa.field("label", pa.string()),
            pa.field("label_code", pa.uint16()),
            pa.field("score", pa.float32()),
            pa.field("margin", pa.float32()),
            pa.field("similarity", pa.float32()),
            pa.field("topk_labels", pa.list_(pa.string())),
            pa.field("topk_similarities", pa.list_(pa.float32())),
        ]
    )


def part_provenance(
    segments: str, rule: CropRule, checkpoint_sha256: str, reference_sha256: str,
    config: LabelConfig, codes: tuple[int, ...],
) -> dict[str, str]:  # fmt: skip
    """Return the provenance of a predictions part (it is current only when all of it matches).

    Parameters
    ----------
    segments : str
        The segment run's fingerprint (:attr:`SegmentRun.fingerprint`).
    rule : CropRule
    checkpoint_sha256, reference_sha256 : str
    config : LabelConfig
    codes : tuple of int
        The class scheme's code of each class, then of unknown (a part holds codes: an
        edited ``classes.yaml`` relabels, though the reference's content is the same).
    """
    return {
        "segments": segments,
        "crop_rule": combine(rule.to_dict()),
        "checkpoint_sha256": checkpoint_sha256,
        "reference_sha256": reference_sha256,
        "label_config": config_hash(config),
        "label_codes": combine(*codes),
    }


def part_path(out_dir: Location, raster: str, tile: Tile) -> Path | str:
    """Path (or URI) of the predictions part of one tile of a label run."""
    return storage.join(out_dir, PARTS, raster, f"{tile.key}.parquet")


def _stored_provenance(path: Path | str) -> dict[str, str] | None:
    """Return the provenance a part carries; None for a file ``label`` did not write."""
    where, filesystem = storage.arrow_source(path)
    try:
        stored = pq.read_schema(where, filesystem=filesystem).metadata or {}
        meta = json.loads(stored[_META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    return meta if isinstance(meta, dict) else None


def part_is_current(path: Path | str, provenance: dict[str, str]) -> bool:
    """Whether the part at `path` exists and was made as `provenance` says."""
    return _stored_provenance(path) == provenance  # None for a missing one: one request


def read_part(path: Path | str, columns: list[str] | None = None) -> pa.Table:
    """Read one part (local or in a bucket)."""
    with storage.open_input(path) as stream:  # read_table would import pyarrow.dataset
        return pq.ParquetFile(stream).read(columns=columns)


def remove_stale_parts(out_dir: Location, current: dict[Path | str, dict[str, str]]) -> int:
    """Remove the parts ``label`` wrote under ``OUT/predictions`` that are not current.

    A part stays when its path is a key of `current` and its provenance is that key's
    value. Only files ``label`` wrote (named as parts, ``<raster>/<tile key>.parquet``,
    and carrying a provenance) are removed, never another file; a raster folder left
    empty goes too. Each removal is one unlink: an interruption leaves fewer stale
    parts, never a half-written one.

    Parameters
    ----------
    out_dir : path
        The label run.
    current : dict of Path (or URI) to dict
        Every part the run in front keeps, and its provenance (:func:`part_provenance`).

    Returns
    -------
    int
        How many parts were removed.
    """
    root = storage.join(out_dir, PARTS)
    removed = 0
    for rel in storage.list_files(root):
        path = storage.join(root, rel)
        if rel.count("/") != 1 or not any(fnmatch.fnmatchcase(rel, p) for p in PART_FILES):
            continue
        if not _PART_NAME.fullmatch(storage.name(path)):
            continue
        stored = _stored_provenance(path)
        if stored is None or stored == current.get(path):
            continue
        storage.delete(path)
        removed += 1
        folder = storage.parent(path)
        if not storage.is_uri(folder) and not any(Path(folder).iterdir()):
            Path(folder).rmdir()
    return removed


@dataclass(frozen=True)
class RasterParts:
    """The predictions parts of one raster: which tiles have a current part.

    Attributes
    ----------
    raster : str
    tiles : list of Tile
        The raster's tiles, as labeling cut them.
    paths : list of Path (or URI) or None
        The current part of each tile; None where it has none (missing, or made from
        other segments, checkpoint, reference, crop rule or options).
    """

    raster: str
    tiles: list[Tile]
    paths: list[Path | str | None]

    @property
    def missing(self) -> list[Tile]:
        """The tiles without a current part."""
        return [t for t, p in zip(self.tiles, self.paths, strict=True) if p is None]

    def read(self, columns: list[str] | None = None, index: list[int] | None = None) -> pa.Table:
        """Concatenate the current parts (of the tiles at `index`, default all)."""
        chosen = range(len(self.tiles)) if index is None else index
        tables = [read_part(path, columns) for i in chosen if (path := self.paths[i]) is not None]
        if not tables:
            return predictions_schema().empty_table().select(columns or predictions_schema().names)
        return pa.concat_tables(tables)


@dataclass(frozen=True)
class LabelRun:
    """What a finished (or partial) ``superdml label`` output folder holds.

    Attributes
    ----------
    out_dir : Path or str
        The output folder (or URI).
    class_names : list of str
        The reference's classes, in the order of its labels.
    tile_size : int
        Tiles of the predictions parts.
    meta : dict
        The whole ``label.json``.
    """

    out_dir: Path | str
    class_names: list[str]
    tile_size: int
    meta: dict[str, Any]

    @property
    def scheme(self) -> ClassScheme:
        """The class scheme the predictions' codes belong to (``label.json``'s).

        Raises
        ------
        InputError
            When the recorded scheme is malformed or lacks a class of the label run.
        """
        source = storage.join(self.out_dir, MANIFEST)
        return ClassScheme.from_dict(self.meta["class_scheme"], source).covering(
            self.class_names, source
        )

    def tiles(self, height: int, width: int) -> list[Tile]:
        """Return the tiles of a raster of this size, as labeling cut them."""
        return tile_grid(height, width, self.tile_size)

    def embeddings_path(self, run: SegmentRun, tile: Tile) -> Path | str:
        """Where ``label --keep-embeddings`` kept the embeddings of one tile of `run`."""
        return embeddings_path(
            self.out_dir, self.meta["checkpoint_sha256"], self.meta["crop_rule"],
            self.meta["segment_fingerprints"][run.name], run.name, tile,
            self.meta.get("config", {}).get("tta", "none"),
        )  # fmt: skip

    def check_segments(self, runs: list[SegmentRun], segment_dir: str | Path) -> None:
        """Refuse segment runs that are not the ones this label run labeled.

        Raises
        ------
        InputError
            For a raster that was not labeled here, or one segmented again since (its
            fingerprint differs from the one recorded at labeling time).
        """
        labeled = self.meta.get("segment_fingerprints", {})
        for run in runs:
            if run.name not in labeled:
                raise input_error(
                    segment_dir,
                    f"raster {run.name!r} was not labeled in {self.out_dir} (labeled: "
                    f"{', '.join(sorted(labeled)) or 'none'}): pass the segments given to label",
                )
            if labeled[run.name] != run.fingerprint:
                raise input_error(
                    run.folder,
                    f"segmented again since {self.out_dir} was labeled (the superpixels "
                    "differ): run superdml label again before exporting or reviewing",
                )

    def parts(self, run: SegmentRun) -> RasterParts:
        """Return the current predictions parts of the segment run `run`.

        A part is current when its provenance equals the one ``label.json`` records for
        `run`'s raster and that record was made for `run`'s segments (the same
        fingerprint). Labeling writes a part for every tile (an empty one where a tile
        owns no superpixel): a tile without a current part was not labeled for these
        inputs (an interrupted run, or one of other inputs).
        """
        tiles = self.tiles(run.source.height, run.source.width)
        expected = self.meta["part_meta"].get(run.name)
        if expected is None or expected.get("segments") != run.fingerprint:
            return RasterParts(run.name, tiles, [None] * len(tiles))
        paths = [part_path(self.out_dir, run.name, t) for t in tiles]
        return RasterParts(
            run.name, tiles, [p if part_is_current(p, expected) else None for p in paths]
        )


def embeddings_path(
    out_dir: str | Path, checkpoint_sha256: str, crop_rule: dict[str, Any], segments: str,
    raster: str, tile: Tile, tta: str = "none",
) -> Path | str:  # fmt: skip
    """Return the kept-embeddings file of one tile, keyed by what made the embeddings.

    Parameters
    ----------
    out_dir : path
        The label run.
    checkpoint_sha256 : str
    crop_rule : dict
        :meth:`CropRule.to_dict` of the crops embedded.
    segments : str
        The segment run's fingerprint.
    raster : str
    tile : Tile
    tta : {"none", "d4"}
        The test-time augmentation the embeddings were averaged over (keys made before
        it existed stay valid for ``none``).
    """
    parts = [checkpoint_sha256, json.dumps(crop_rule, sort_keys=True), segments]
    key = combine(*parts, *([tta] if tta != "none" else []))[:16]
    return storage.join(out_dir, EMBEDDINGS, key, raster, f"{tile.key}.npz")


def load_label_run(out_dir: str | Path) -> LabelRun:
    """Read ``OUT/label.json``; a clear error when `out_dir` is not a label output."""
    out_dir = storage.location(out_dir)
    require_dir(out_dir, "label output folder")
    manifest = storage.join(out_dir, MANIFEST)
    if not storage.exists(manifest):
        raise InputError(
            f"{out_dir}: not a label output (no {MANIFEST}): run `superdml label` first"
        )
    meta = json.loads(storage.read_text(manifest))
    if "class_scheme" not in meta:
        raise InputError(
            f"{manifest}: made by an older superdml (no class scheme, predictions without "
            "label_code): run `superdml label` again"
        )
    if "part_meta" not in meta:
        raise InputError(
            f"{manifest}: made by an older superdml (no provenance of its predictions parts): "
            "run `superdml label` again"
        )
    return LabelRun(out_dir, list(meta["class_names"]), int(meta["tile_size"]), meta)


class IdTable:
    """The map ``keys -> values`` from superpixel ids, built once to map many id arrays.

    Unsigned keys of up to 32 bits that span no more values than `dense_up_to` (segment
    ids: a grid's cell numbers) go into a dense table indexed by ``id - min(keys)``:
    one compiled gather per id (:func:`superdml.label.gather.gather`), no search, no
    int64 copy of the ids. Other keys (or ids) are found by binary search in the sorted
    keys. A table is read-only once built: threads may share it.

    Parameters
    ----------
    keys : (N,) ndarray, unique
    values : (N,) ndarray
    fill : scalar
        The value of ids not in `keys`.
    dense_up_to : int
        The largest key span a dense table may have (its size, in entries).
    """

    def __init__(self, keys: np.ndarray, values: np.ndarray, fill: Any, dense_up_to: int) -> None:
        keys, values = np.asarray(keys), np.asarray(values)
        self.fill, self.dtype = fill, values.dtype
        self.lo = int(keys.min()) if keys.size else 0
        span = int(keys.max()) - self.lo if keys.size else 0
        order = np.argsort(keys)
        self.keys, self.values = keys[order], values[order]
        self.table: np.ndarray | None = None
        if keys.dtype.kind in "ui" and self.lo >= 0 and span <= dense_up_to:
            if self.lo + span <= np.iinfo(np.uint32).max:
                self.table = np.full(span + 2, fill, dtype=values.dtype)
                self.table[keys - self.lo] = values

    def take(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Map `ids` through the table.

        Parameters
        ----------
        ids : ndarray of any shape
        out : ndarray of `ids`'s shape and the values' dtype, optional
            Written in place; for ids of other than two dimensions, a contiguous one.

        Returns
        -------
        ndarray of `ids`'s shape and the values' dtype
        """
        if out is None:
            out = np.empty(ids.shape, dtype=self.dtype)
        if self.table is not None and ids.dtype.kind == "u" and ids.dtype.itemsize <= 4:
            from superdml.label.gather import gather

            if ids.ndim == 2:  # a window, perhaps into a larger array
                gather(ids, self.lo, self.table, out)
            else:  # as rows: views of contiguous arrays
                as_2d = (-1, ids.shape[-1]) if ids.ndim > 2 else (1, -1)
                gather(ids.reshape(as_2d), self.lo, self.table, out.reshape(as_2d))
            return out
        out[...] = self.fill
        if self.keys.size:
            pos = np.searchsorted(self.keys, ids).clip(0, self.keys.size - 1)
            hit = self.keys[pos] == ids
            out[hit] = self.values[pos[hit]]
        return out


def lookup(ids: np.ndarray, keys: np.ndarray, values: np.ndarray, fill: Any) -> np.ndarray:
    """Map `ids` through the table ``keys -> values``; ids not in `keys` get `fill`.

    One :class:`IdTable` for one array: dense when the keys span no more values than
    there are ids and keys.

    Parameters
    ----------
    ids : ndarray of any shape
    keys : (N,) ndarray, unique
    values : (N,) ndarray
    fill : scalar

    Returns
    -------
    ndarray of `ids`'s shape and `values`'s dtype
    """
    return IdTable(keys, values, fill, ids.size + np.size(keys)).take(ids)
