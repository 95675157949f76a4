"""More like this: the superpixels of the mosaic nearest a given one in the model's embedding.

:class:`MosaicEmbeddings` holds one L2-normalized embedding per superpixel of the served
rasters (every superpixel of the mosaic, not only the folder's crops). It is built once,
on first use, in a background thread whose progress the page shows, tile by tile (the
label run's tiles): a tile's embeddings kept by ``label --keep-embeddings`` are read, any
other tile is cut (:func:`~superdml.crops.cut.crop_tile`, the checkpoint's crop rule) and
embedded as labeling does. The label run's predictions come along, so a superpixel found
this way shows its predicted class and score like any crop.

A query is one matrix product (:func:`nearest`). A superpixel found that has no crop in
the folder gets one (:func:`cut_crops`): :meth:`~superdml.serve.decisions.Sorter.add`
writes it under ``FOLDER/more/`` and lists it in ``FOLDER/more.jsonl`` before the page
sees it, so from then on it is a crop of the folder like the others (journaled moves,
undo, one class folder at a time, never an overwrite).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from superdml.crops.rule import CropRule
from superdml.label.predictions import LabelRun, embeddings_path
from superdml.raster.io import Tile, tile_grid
from superdml.segment.run import SegmentRun
from superdml.serve.decisions import Sorter
from superdml.serve.queue import MORE_DIR, PENDING

TILE_SIZE = 1024
"""Tiles of the on-demand embedding without a label run."""
_TRAIN_NAME = re.compile(r"^(.+)_(\d+)(?:_s\d+\.\d+)?\.(?:png|tif)$")


def nearest(embeddings: np.ndarray, i: int, k: int, allowed: np.ndarray) -> np.ndarray:
    """Indexes of the `k` rows most similar to row `i` (cosine), among `allowed`, `i` excluded.

    Parameters
    ----------
    embeddings : (N, D) float32 ndarray, L2-normalized
    i, k : int
    allowed : (N,) bool ndarray

    Returns
    -------
    (M,) int64 ndarray, M <= k
        Most similar first.
    """
    similarity = embeddings @ embeddings[i]
    candidates = np.flatnonzero(allowed)
    candidates = candidates[candidates != i]
    if len(candidates) > k:
        part = np.argpartition(-similarity[candidates], k - 1)[:k]
        candidates = candidates[part]
    return candidates[np.argsort(-similarity[candidates], kind="stable")].astype(np.int64)


@dataclass(frozen=True)
class EmbedModel:
    """What embeds the mosaic: a checkpoint, its crop rule, and how labeling ran it.

    Attributes
    ----------
    checkpoint : Path
    sha256 : str
    rule : CropRule
    device : {"cpu", "cuda"}
    precision, tta : str
        As the label run (so kept and new embeddings agree).
    kept_from : LabelRun or None
        The label run whose kept embeddings are this model's.
    """

    checkpoint: Path
    sha256: str
    rule: CropRule
    device: str
    precision: str = "auto"
    tta: str = "none"
    kept_from: LabelRun | None = None

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """Embed crops of :attr:`rule` (as cut) into (N, D) float32."""
        from superdml.learn.embed import load_embedder

        embed = load_embedder(
            str(self.checkpoint), self.sha256, self.device, None, self.precision, self.tta
        )
        return embed(self.rule.to_unit(crops), 128)


def _kept(model: EmbedModel, run: SegmentRun, tile: Tile, ids: np.ndarray) -> np.ndarray | None:
    """Return a tile's kept embeddings when they are the model's, for these superpixels."""
    label_run = model.kept_from
    if label_run is None:
        return None
    path = embeddings_path(
        label_run.out_dir, model.sha256, model.rule.to_dict(), run.fingerprint, run.name, tile,
        model.tta,
    )  # fmt: skip
    if not Path(path).is_file():  # the page serves local folders
        return None
    with np.load(path) as stored:
        if stored["embeddings"].dtype == np.float32 and np.array_equal(stored["segment_id"], ids):
            return np.asarray(stored["embeddings"])
    return None


def _predictions(label_run: LabelRun | None, path: Path | str | None, ids: np.ndarray) -> pa.Table:
    """Return the label run's label, score and margin of `ids` (nulls where it has none)."""
    n = len(ids)
    empty = pa.table({"label": pa.nulls(n, pa.string()), "score": pa.nulls(n, pa.float32()),
                      "margin": pa.nulls(n, pa.float32())})  # fmt: skip
    if label_run is None or path is None:
        return empty
    part = pq.ParquetFile(path).read(columns=["segment_id", "label", "score", "margin"])
    if not np.array_equal(part.column("segment_id").to_numpy(), ids):
        return empty
    return part.drop_columns(["segment_id"])


class MosaicEmbeddings:
    """The embeddings of every superpixel of the served rasters, built once in the background.

    Parameters
    ----------
    runs : list of SegmentRun
        The served rasters' segment runs.
    model : EmbedModel
    label_run : LabelRun or None
        Its tiles (and predictions); without one, tiles of :data:`TILE_SIZE`.
    train_dir : Path
        Superpixels already in its class folders (crops named ``<raster>_<segment_id>``)
        are never offered.
    """

    def __init__(
        self, runs: list[SegmentRun], model: EmbedModel, label_run: LabelRun | None,
        train_dir: Path,
    ) -> None:  # fmt: skip
        self.runs, self.model, self.label_run, self.train_dir = runs, model, label_run, train_dir
        self.rasters = [run.name for run in runs]
        tile_size = label_run.tile_size if label_run is not None else TILE_SIZE
        self.tiles = [tile_grid(r.source.height, r.source.width, tile_size) for r in runs]
        self.total = sum(len(t) for t in self.tiles)
        self.done = self.kept = 0
        self.error: str | None = None
        self.embeddings: np.ndarray | None = None
        self.table: pa.Table | None = None
        self.keys: np.ndarray = np.zeros(0, np.int64)
        self.in_train: np.ndarray = np.zeros(0, bool)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start building unless it started already."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            self.build()
        except Exception as err:  # shown on the page: the server keeps serving
            self.error = f"{type(err).__name__}: {err}"

    def build(self) -> None:
        """Embed (or read) every tile; :attr:`embeddings` is set last, when all are done."""
        tables, parts = [], []
        for code, (run, tiles) in enumerate(zip(self.runs, self.tiles, strict=True)):
            paths = (
                self.label_run.parts(run).paths if self.label_run is not None
                else [None] * len(tiles)
            )  # fmt: skip
            for t, tile in enumerate(tiles):
                table = run.superpixels_in(
                    tile.row, tile.col, tile.height, tile.width,
                    ["segment_id", "row", "col", "x", "y"],
                )  # fmt: skip
                ids = table.column("segment_id").to_numpy()
                if len(ids):
                    embeddings = _kept(self.model, run, tile, ids)
                    self.kept += embeddings is not None
                    if embeddings is None:
                        from superdml.crops.cut import crop_tile

                        embeddings = self.model(crop_tile(run, self.model.rule, table)[0])
                    predictions = _predictions(self.label_run, paths[t], ids)
                    n = len(ids)
                    where = pa.table({"raster": np.full(n, code, np.int32),
                                      "tile": np.full(n, t, np.int32)})  # fmt: skip
                    tables.append(_concat_columns(table, predictions, where))
                    parts.append(np.asarray(embeddings, np.float32))
                self.done += 1
        self.table = table = pa.concat_tables(tables) if tables else None
        self.keys = _keys(
            table.column("raster").to_numpy() if table is not None else np.zeros(0, np.int32),
            table.column("segment_id").to_numpy() if table is not None else np.zeros(0, np.uint32),
        )
        self.in_train = np.isin(self.keys, self._train_keys())
        joined = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
        joined /= np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)
        self.embeddings = joined

    def _train_keys(self) -> np.ndarray:
        """Keys of the superpixels whose crops lie in the training folder's class folders."""
        codes = {name: code for code, name in enumerate(self.rasters)}
        found = []
        for folder in self.train_dir.iterdir() if self.train_dir.is_dir() else ():
            if folder.is_dir() and not folder.name.startswith("."):
                for name in (m for f in folder.iterdir() if (m := _TRAIN_NAME.match(f.name))):
                    if name.group(1) in codes:
                        found.append((codes[name.group(1)], int(name.group(2))))
        if not found:
            return np.zeros(0, np.int64)
        pairs = np.asarray(found, np.int64)
        return _keys(pairs[:, 0], pairs[:, 1])

    def progress(self) -> dict[str, object]:
        """``{"ready", "done", "total", "kept", "error"}`` for the page (tiles)."""
        return {
            "ready": self.embeddings is not None, "done": self.done, "total": self.total,
            "kept": self.kept, "error": self.error,
        }  # fmt: skip

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.keys, kind="stable")
        return self.keys[order], order

    def rows_of(self, rasters: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
        """Return the rows of many superpixels (-1 where the mosaic has none)."""
        codes = {name: code for code, name in enumerate(self.rasters)}
        raster_codes = np.array([codes.get(str(r), -1) for r in rasters], np.int64)
        keys = _keys(raster_codes, segment_ids)
        sorted_keys, order = self._sorted()
        at = np.clip(np.searchsorted(sorted_keys, keys), 0, max(0, len(sorted_keys) - 1))
        found = (raster_codes >= 0) & (len(sorted_keys) > 0)
        found &= sorted_keys[at] == keys if len(sorted_keys) else False
        return np.where(found, order[at] if len(order) else -1, -1)

    def similar(self, row: int, k: int, taken: np.ndarray) -> np.ndarray:
        """Return the `k` rows nearest `row`, neither `taken` nor in the training folder."""
        assert self.embeddings is not None
        allowed = ~self.in_train
        allowed[taken[taken >= 0]] = False
        return nearest(self.embeddings, row, k, allowed)

    def rows(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """Return the table rows (``raster`` as its name) of `rows`."""
        assert self.table is not None
        picked = self.table.take(pa.array(rows)).to_pylist()
        for r in picked:
            r["raster"] = self.rasters[r["raster"]]
        return picked


def _keys(codes: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    return (np.asarray(codes, np.int64) << 32) | np.asarray(segment_ids, np.int64)


def _concat_columns(*tables: pa.Table) -> pa.Table:
    columns: dict[str, pa.ChunkedArray] = {}
    for table in tables:
        columns.update({name: table.column(name) for name in table.column_names})
    return pa.table(columns)


def write_crops_of(
    model: EmbedModel, runs: dict[str, SegmentRun], folder: Path, rows: list[dict[str, Any]]
) -> None:
    """Write the crop files of found superpixels (:meth:`MosaicEmbeddings.rows` + ``file``).

    Crops are cut per tile (one window read each) with the model's crop rule: PNGs, or
    TIFF chips with their PNG previews (lossless or context rule), as ``superdml crops``
    writes them.
    """
    from superdml.core.atomic import atomic_files
    from superdml.crops.cut import crop_tile_with_previews
    from superdml.crops.folder import add_crop

    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["raster"], row["tile"]), []).append(row)
    schema = pa.schema([("segment_id", pa.uint32()), ("row", pa.float64()), ("col", pa.float64())])
    for (raster, _), group in groups.items():
        table = pa.table({name: [r[name] for r in group] for name in schema.names}, schema=schema)
        crops, previews = crop_tile_with_previews(runs[raster], model.rule, table)
        with atomic_files() as batch:
            for i, (row, crop) in enumerate(zip(group, crops, strict=True)):
                add_crop(
                    batch, folder / row["file"], crop, None if previews is None else previews[i]
                )


def embed_model(checkpoint: Path, label_run: LabelRun | None, device: str) -> EmbedModel:
    """Return how to embed the mosaic with `checkpoint`.

    The label run's crop rule, precision and test-time augmentation when it was labeled
    with this checkpoint (its kept embeddings are then used); else the checkpoint's rule.
    """
    from superdml.core.devices import resolve_device
    from superdml.learn.checkpoint import checkpoint_sha256, load_checkpoint

    sha = checkpoint_sha256(checkpoint)
    device = resolve_device(device).type
    if label_run is not None and label_run.meta.get("checkpoint_sha256") == sha:
        config = label_run.meta.get("config", {})
        return EmbedModel(
            Path(checkpoint), sha, CropRule.from_dict(label_run.meta["crop_rule"]), device,
            config.get("precision", "auto"), config.get("tta", "none"), label_run,
        )  # fmt: skip
    stored = load_checkpoint(checkpoint).crop_rule
    rule = CropRule.from_dict(stored) if stored else CropRule()
    return EmbedModel(Path(checkpoint), sha, rule, device)


def more_like(
    mosaic: MosaicEmbeddings, sorter: Sorter, runs: dict[str, SegmentRun], i: int, k: int
) -> list[int]:
    """Return the crops of the `k` superpixels most like crop `i`'s, still to sort.

    Superpixels of the mosaic without a crop in the folder get one (:meth:`Sorter.add`:
    ``more/<raster>_<segment_id>.png``, a chip for the lossless or context rule).

    Returns
    -------
    list of int
        Queue indexes, most similar first; empty when `i`'s superpixel is not in the mosaic.
    """
    queue = sorter.queue
    queued = mosaic.rows_of(queue.raster, queue.segment_id)
    row = int(queued[i])
    if row < 0:
        return []
    crop_of = np.full(len(mosaic.keys), -1, np.int64)
    crop_of[queued[queued >= 0]] = np.flatnonzero(queued >= 0)
    found = mosaic.similar(row, k, queued[queue.state != PENDING])
    ext = ".tif" if mosaic.model.rule.chips else ".png"
    rows = mosaic.rows(found)
    for r in rows:
        r["file"] = f"{MORE_DIR}/{r['raster']}_{r['segment_id']}{ext}"
    new = [r for r, j in zip(rows, crop_of[found], strict=True) if j < 0]
    added = iter(sorter.add(new, lambda folder, rs: write_crops_of(mosaic.model, runs, folder, rs)))
    out = [int(j) if j >= 0 else next(added) for j in crop_of[found]]
    return [j for j in out if j >= 0]
