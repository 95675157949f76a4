"""Crops of the superpixels the model is least sure of, sorted by predicted class.

``superdml review`` reads the current predictions parts of a label run
(:meth:`LabelRun.parts`: made for the segments in front of it) tile by tile and keeps the
candidates: superpixels whose vote share (``score``) is at most ``max_score``, plus
those labeled ``unknown`` when asked. It orders them by score, then margin, lowest
first, and keeps at most ``per_class`` per predicted class, or ``limit`` in all. Only
four small columns of each part are read, and the running selection never holds more
than the crops it will write (or, with ``diverse``, a pool of ``POOL_FACTOR`` times as
many), so memory does not grow with the raster.

With ``diverse`` the picks are spread over the embedding space: a seeded FAISS k-means
clusters the pool's embeddings (those ``label --keep-embeddings`` kept, else computed
with the label run's checkpoint) into as many clusters as crops to write, and the
member nearest each centroid is taken.

The crops are cut with the label run's crop rule, tile by tile, and written as
``FOLDER/<predicted class>/<raster>_<segment_id>_s<score>.png``, with
``FOLDER/crops.parquet`` recording where each came from. A person moves them into the
right class folders of the training set; ``superdml train --init`` closes the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from superdml.config.schema import ReviewConfig, config_to_dict, dump_config
from superdml.core.errors import input_error
from superdml.core.ownership import check_apart, check_output, claim_output
from superdml.core.progress import progress
from superdml.crops.cut import color_band_indexes, crop_tile
from superdml.crops.folder import (
    CROPS_TABLE,
    clear_crops,
    count_labels,
    write_crops,
    write_crops_table,
)
from superdml.crops.rule import CropRule
from superdml.label.predictions import MANIFEST, LabelRun, RasterParts, load_label_run, lookup
from superdml.raster.class_names import UNKNOWN, check_class_names
from superdml.segment.run import SegmentRun, load_segment_runs

logger = logging.getLogger(__name__)

#: With ``diverse``, k-means runs over this many times the crops to write (least certain first).
POOL_FACTOR = 10
REVIEW_YAML = "review.yaml"
REVIEW_FILES = ("*/*.png", "*/*.tif", CROPS_TABLE, REVIEW_YAML)  # crops, chips, previews
"""What ``review`` writes into its folder (a rerun replaces only a folder of these)."""
_PART_COLUMNS = ["segment_id", "label_code", "score", "margin"]


@dataclass(frozen=True)
class ReviewResult:
    """What :func:`review` wrote.

    Attributes
    ----------
    folder : Path
        ``<predicted class>/`` folders of crops and ``crops.parquet``.
    n_crops : int
    per_class : dict of str to int
        Crops per predicted class.
    seconds : float
    """

    folder: Path
    n_crops: int
    per_class: dict[str, int]
    seconds: float


# ------------------------------------------------------------------ pure functions


def pick_lowest(
    score: np.ndarray,
    margin: np.ndarray,
    classes: np.ndarray,
    limit: int | None = None,
    per_class: int | None = None,
) -> np.ndarray:
    """Indexes of the least certain items: by score, then margin, lowest first.

    Ties keep the input order.

    Parameters
    ----------
    score, margin : (N,) float ndarray
    classes : (N,) non-negative int ndarray
        Predicted class of each item.
    limit : int, optional
        At most this many in all.
    per_class : int, optional
        At most this many of each class (the lowest of that class).

    Returns
    -------
    (M,) int64 ndarray
        Into the inputs, lowest score first.
    """
    order = np.lexsort((margin, score))
    if per_class is not None:
        cls = classes[order]
        counts = np.bincount(cls)
        starts = np.cumsum(counts) - counts
        grouped = np.argsort(cls, kind="stable")
        rank = np.empty(order.size, dtype=np.int64)
        rank[grouped] = np.arange(order.size) - np.repeat(starts, counts)
        order = order[rank < per_class]
    return order[:limit].astype(np.int64)


def pick_diverse(embeddings: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indexes of `n` items spread over the embedding space.

    A seeded k-means (FAISS, the best of 5 starts) makes `n` clusters; each non-empty
    cluster gives the member nearest its centroid.

    Parameters
    ----------
    embeddings : (N, D) float ndarray
    n : int
    seed : int

    Returns
    -------
    (M,) int64 ndarray, M <= n
        Sorted indexes into `embeddings` (all of them when N <= n).
    """
    import faiss

    if len(embeddings) <= n:
        return np.arange(len(embeddings), dtype=np.int64)
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    kmeans = faiss.Kmeans(
        x.shape[1],
        n,
        niter=20,
        nredo=5,  # keep the best of 5 seeded starts: a bad start misses whole regions
        seed=seed,
        min_points_per_centroid=1,  # a small pool is expected here, no warning
        verbose=False,
    )
    kmeans.train(x)
    distance, cluster = kmeans.index.search(x, 1)
    order = np.lexsort((distance[:, 0], cluster[:, 0]))
    _, first = np.unique(cluster[order, 0], return_index=True)
    return np.sort(order[first]).astype(np.int64)


# ---------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class _Candidates:
    """Selected superpixels: where they are (run, tile), their id and their vote."""

    run: np.ndarray
    tile: np.ndarray
    segment_id: np.ndarray
    label_id: np.ndarray
    score: np.ndarray
    margin: np.ndarray

    def take(self, index: np.ndarray) -> _Candidates:
        return _Candidates(*(getattr(self, f)[index] for f in _CANDIDATE_FIELDS))

    @staticmethod
    def concat(parts: list[_Candidates]) -> _Candidates:
        return _Candidates(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in _CANDIDATE_FIELDS)
        )

    def __len__(self) -> int:
        return len(self.segment_id)


_CANDIDATE_FIELDS = ("run", "tile", "segment_id", "label_id", "score", "margin")


def _empty_candidates() -> _Candidates:
    return _Candidates(
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint32),
        np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32),
    )  # fmt: skip


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of a review: label run, segment runs, their parts, crop rule."""

    label_run: LabelRun
    runs: list[SegmentRun]
    parts: list[RasterParts]
    rule: CropRule


def _select(
    inputs: _Inputs, config: ReviewConfig, limit: int | None, per_class: int | None
) -> _Candidates:
    """Stream every current predictions part; keep the lowest candidates (within the caps)."""
    label_run = inputs.label_run
    # label_id: 0 for unknown, i + 1 for class_names[i] (the order of `names` in review)
    codes = label_run.scheme.codes_of([UNKNOWN, *label_run.class_names])
    selected = _empty_candidates()
    for r, (run, parts) in enumerate(zip(inputs.runs, inputs.parts, strict=True)):
        n_tiles = len(parts.tiles)
        for t in progress(range(n_tiles), n_tiles, f"{run.name}: candidates", "tile"):
            if parts.paths[t] is None:
                continue
            part = parts.read(_PART_COLUMNS, [t])
            score = part.column("score").to_numpy()
            label_code = part.column("label_code").to_numpy()
            label_id = lookup(label_code, codes, np.arange(len(codes)), 0)
            known = label_id > 0
            keep = (score <= config.max_score) & known
            if config.unknown:
                keep |= ~known
            n = int(keep.sum())
            found = _Candidates(
                np.full(n, r), np.full(n, t), part.column("segment_id").to_numpy()[keep],
                label_id[keep], score[keep], part.column("margin").to_numpy()[keep],
            )  # fmt: skip
            selected = _Candidates.concat([selected, found])
            selected = selected.take(
                pick_lowest(selected.score, selected.margin, selected.label_id, limit, per_class)
            )
    return selected


def _by_tile(picks: _Candidates) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (run, tile, indexes into `picks`) for each tile holding picks."""
    keys = np.stack([picks.run, picks.tile], axis=1)
    unique, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    groups = np.split(np.argsort(inverse.ravel(), kind="stable"), np.cumsum(counts)[:-1])
    for (r, t), index in zip(unique, groups, strict=True):
        yield int(r), int(t), index


# ---------------------------------------------------------------------- embeddings


def _kept_embeddings(path: Path, ids: np.ndarray) -> np.ndarray | None:
    """Embeddings of `ids` from a ``label --keep-embeddings`` file, None if not all there."""
    if not path.exists():
        return None
    with np.load(path) as stored:
        kept_ids, kept = stored["segment_id"], stored["embeddings"]
    row = lookup(ids, kept_ids, np.arange(len(kept_ids)), -1)
    if (row < 0).any():
        return None
    return kept[row].astype(np.float32)


def _pool_embeddings(inputs: _Inputs, pool: _Candidates, device: str) -> np.ndarray:
    """Embeddings of the pool: kept ones where they exist, else computed per tile.

    Returns
    -------
    (N, D) float32 ndarray, in `pool`'s order
    """
    from superdml.core.devices import resolve_device
    from superdml.learn.checkpoint import checkpoint_sha256
    from superdml.learn.embed import load_embedder

    meta = inputs.label_run.meta
    sha = str(meta["checkpoint_sha256"])
    tiles = list(_by_tile(pool))
    kept = [
        _kept_embeddings(
            inputs.label_run.embeddings_path(inputs.runs[r], inputs.parts[r].tiles[t]),
            pool.segment_id[index],
        )
        for r, t, index in tiles
    ]
    if any(emb is None for emb in kept):
        checkpoint = str(meta["checkpoint"])
        if checkpoint_sha256(checkpoint) != sha:
            raise input_error(
                checkpoint,
                f"changed since labeling (SHA-256 {sha[:12]} recorded in "
                f"{inputs.label_run.out_dir}): label again, or label with --keep-embeddings",
            )
        labeled = meta.get("config", {})  # embed as the label run did
        precision = str(labeled.get("precision", "auto"))
        tta = str(labeled.get("tta", "none"))
        dev = resolve_device(device).type
        embedder = load_embedder(checkpoint, sha, dev, None, precision, tta)
        batch_size = int(labeled.get("batch_size", 256))
        for i, (r, t, index) in enumerate(tiles):
            if kept[i] is None:
                crops, _ = _tile_crops(inputs, r, t, pool.segment_id[index])
                kept[i] = embedder(inputs.rule.to_unit(crops), batch_size)
    dim = cast(np.ndarray, kept[0]).shape[1]  # every None was filled in above
    out = np.empty((len(pool), dim), np.float32)
    for (_, _, index), emb in zip(tiles, kept, strict=True):
        out[index] = emb
    return out


# --------------------------------------------------------------------------- crops


def _tile_crops(inputs: _Inputs, r: int, t: int, ids: np.ndarray) -> tuple[np.ndarray, pa.Table]:
    """Crops of superpixels `ids` of tile `t` of run `r`, in the order of `ids`.

    Returns
    -------
    crops : (N, C, S, S) uint8 ndarray
    table : pyarrow.Table
        Their superpixel table rows, in the same order.
    """
    run, tile = inputs.runs[r], inputs.parts[r].tiles[t]
    table = run.superpixels_in(tile.row, tile.col, tile.height, tile.width)
    table = table.filter(pc.is_in(table.column("segment_id"), pa.array(ids, pa.uint32())))
    position = lookup(ids, table.column("segment_id").to_numpy(), np.arange(table.num_rows), -1)
    if (position < 0).any():
        raise input_error(
            run.table_path,
            f"superpixel {ids[position < 0][0]} of the predictions is not in this table: "
            "were these segments made again after labeling?",
        )
    table = table.take(pa.array(position))
    crops, _ = crop_tile(run, inputs.rule, table)
    return crops, table


def _write_tile(
    folder: Path, inputs: _Inputs, r: int, t: int, picks: _Candidates, names: np.ndarray
) -> pa.Table:
    """Write the crops of one tile's picks; return their ``crops.parquet`` rows."""
    crops, table = _tile_crops(inputs, r, t, picks.segment_id)
    labels = list(names[picks.label_id])
    previews = inputs.rule.preview_image(crops) if inputs.rule.chips else None
    return write_crops(
        folder, inputs.runs[r].name, table, crops, labels, score=picks.score,
        margin=picks.margin, previews=previews,
    )  # fmt: skip


def _spread(inputs: _Inputs, pool: _Candidates, config: ReviewConfig, device: str) -> _Candidates:
    """Pick from the pool spread over the embedding space (per class with ``per_class``)."""
    embeddings = _pool_embeddings(inputs, pool, device)
    if config.per_class is None:
        return pool.take(pick_diverse(embeddings, config.limit, config.seed))
    chosen = [
        members[pick_diverse(embeddings[members], config.per_class, config.seed)]
        for members in (np.flatnonzero(pool.label_id == c) for c in np.unique(pool.label_id))
    ]
    return pool.take(np.concatenate(chosen))


# ------------------------------------------------------------------------ the stage


def _check_class_names(label_run: LabelRun) -> None:
    """Fail before any work when a class name of the label run is not a folder name."""
    check_class_names(
        dict(enumerate(label_run.class_names, start=1)),
        label_run.out_dir / MANIFEST,
        key="class id",
    )


def _check_inputs(inputs: _Inputs) -> None:
    """Fail before any work: segments that were not labeled, a source that does not fit."""
    for run in inputs.runs:
        run.check_source()
        color_band_indexes(run, inputs.rule)


def _check_parts(label_run: LabelRun, parts: list[RasterParts]) -> None:
    """Refuse a label run without current parts; warn about tiles without one.

    Raises
    ------
    InputError
        When no tile has a current part (an interrupted run of other inputs).
    """
    missing = sum(len(p.missing) for p in parts)
    tiles = sum(len(p.tiles) for p in parts)
    if missing == tiles:
        raise input_error(
            label_run.out_dir,
            f"none of the {tiles} tiles has current predictions (an interrupted label run, "
            "or one of other segments or inputs): run superdml label again",
        )
    if missing:
        logger.warning(
            "%s: %d of %d tiles have no current predictions (an unfinished label run): "
            "their superpixels are not reviewed",
            label_run.out_dir,
            missing,
            tiles,
        )


def review(
    out: str | Path,
    segment_dir: str | Path,
    folder: str | Path,
    config: ReviewConfig | None = None,
    raster: str | Path | None = None,
    device: str = "auto",
) -> ReviewResult:
    """Write crops of the least certain superpixels of a label run for relabeling.

    Parameters
    ----------
    out : path
        A ``superdml label`` output folder.
    segment_dir : path
        The segment run (or one raster's subfolder) that was labeled.
    folder : path
        Where ``<predicted class>/<raster>_<segment_id>_s<score>.png`` crops,
        ``crops.parquet`` (:data:`superdml.crops.folder.CROPS_SCHEMA`: ``label`` is the
        predicted class, ``score`` and ``margin`` its vote; the crop rule in its metadata)
        and ``review.yaml`` go.
    config : ReviewConfig, optional
    raster : path, optional
        The source raster when it moved since segmentation (one raster only).
    device : {"auto", "cpu", "cuda"}
        Where the model runs with ``diverse`` when no kept embeddings cover the pool.

    Returns
    -------
    ReviewResult
        With ``n_crops`` 0 (and nothing written) when no superpixel is a candidate.

    Raises
    ------
    InputError, MissingInputError
        Before any work: `out` is not a label output, a class name of the label run is
        not a folder name (see :mod:`superdml.raster.classes`), `segment_dir` holds a raster that
        was not labeled there (or was segmented again since), no tile has a current
        predictions part, or the source raster is missing or does not fit.
    """
    start = time.perf_counter()
    config = config or ReviewConfig()
    out, segment_dir, folder = Path(out), Path(segment_dir), Path(folder)
    label_run = load_label_run(out)
    _check_class_names(label_run)
    runs = load_segment_runs(segment_dir)
    check_apart(folder, [out, *(run.folder for run in runs)])
    check_output(folder, "review")
    if raster is not None:
        if len(runs) != 1:
            raise input_error(segment_dir, "--raster needs one raster's segment subfolder")
        runs = [runs[0].with_source(raster)]
    rule = CropRule.from_dict(label_run.meta["crop_rule"])
    label_run.check_segments(runs, segment_dir)
    inputs = _Inputs(label_run, runs, [label_run.parts(run) for run in runs], rule)
    _check_inputs(inputs)
    _check_parts(label_run, inputs.parts)
    if config.diverse:
        from superdml.core.devices import resolve_device

        resolve_device(device)  # an unusable device fails now, not after the selection
    limit = None if config.per_class is not None else config.limit
    factor = POOL_FACTOR if config.diverse else 1
    picks = _select(
        inputs,
        config,
        None if limit is None else limit * factor,
        None if config.per_class is None else config.per_class * factor,
    )
    if len(picks) == 0:
        what = "or unknown " if config.unknown else ""
        logger.warning(
            "%s: no superpixel %swith score <= %g: nothing to review, nothing written",
            out,
            what,
            config.max_score,
        )
        return ReviewResult(folder, 0, {}, time.perf_counter() - start)
    if config.diverse:
        picks = _spread(inputs, picks, config, device)
    names = np.asarray([UNKNOWN, *label_run.class_names], dtype=object)  # by label_id
    with claim_output(folder, "review"):
        # an earlier review's crops go, unless people moved or added files there
        clear_crops(folder, "review", "holds an earlier review", also=[REVIEW_YAML])
        tables = [
            _write_tile(folder, inputs, r, t, picks.take(index), names)
            for r, t, index in progress(_by_tile(picks), desc="review crops", unit="tile")
        ]
        table = pa.concat_tables(tables).sort_by([("score", "ascending"), ("margin", "ascending")])
        meta = {
            "crop_rule": rule.to_dict(),
            "config": config_to_dict(config),
            "label_run": str(out.resolve()),
            "checkpoint_sha256": label_run.meta.get("checkpoint_sha256"),
            "segments": [str(run.folder.resolve()) for run in runs],
        }
        dump_config(config, folder / REVIEW_YAML)
        write_crops_table(folder, table, meta)
    seconds = time.perf_counter() - start
    logger.info("%d crops to review in %.1f s -> %s", table.num_rows, seconds, folder)
    return ReviewResult(folder, table.num_rows, count_labels(table), seconds)
