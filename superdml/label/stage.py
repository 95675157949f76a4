"""Batch labeling of every superpixel of segmented rasters, one raster tile per task.

A task reads the tile's source window (with the halo its crops need) and segment
window, cuts the crops of the superpixels the tile owns (the crop rule of the
checkpoint's training folder), embeds them in fixed-size batches, searches the
reference index and votes, then writes one predictions part, renamed into place when
complete (in a bucket: one create-only PUT of the whole part). Tasks carry paths or
URIs and small descriptions only: each worker process loads the model and the
reference index once (a cache keyed by their SHA-256) and reuses them.

The model runs through :class:`superdml.learn.embed.Embedder`: channels_last, bf16 autocast
where the device computes bf16 (``LabelConfig.precision``); on CUDA the batch is copied
from pinned memory without blocking and the kNN search runs on the GPU too. By default
the tiles are labeled in the calling process, one after another, the model on every
core (:data:`superdml.core.cluster.SHAPES`); a worker with several task threads runs one
forward at a time, so one task can read and crop its tile while another's are embedded.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from superdml.config.schema import LabelConfig, config_to_dict, dump_config
from superdml.core import storage
from superdml.core.cluster import default_workers, map_tasks
from superdml.core.errors import InputError, MissingInputError
from superdml.core.ownership import check_apart, claim_output
from superdml.crops.cut import color_band_indexes, crop_tile
from superdml.crops.rule import CropRule
from superdml.label.predictions import (
    MANIFEST,
    embeddings_path,
    part_is_current,
    part_path,
    part_provenance,
    predictions_schema,
    remove_stale_parts,
)
from superdml.learn.embed import load_embedder
from superdml.raster.class_names import UNKNOWN
from superdml.raster.io import Tile, tile_grid
from superdml.search.reference import load_reference
from superdml.segment.run import SegmentRun, load_segment_runs

logger = logging.getLogger(__name__)

_ID_COLUMNS = ("segment_id", "raster", "x", "y")


# ---------------------------------------------------------------------- the task


@dataclass(frozen=True)
class _LabelJob:
    """Everything a tile task needs, small and picklable."""

    run: SegmentRun
    rule: CropRule
    config: LabelConfig
    checkpoint: str
    checkpoint_sha256: str
    reference: str
    reference_sha256: str
    class_names: tuple[str, ...]
    codes: tuple[int, ...]  # scheme code of each class, then of unknown
    out: str
    device: str
    threads: int | None

    @property
    def part_meta(self) -> dict[str, str]:
        return part_provenance(
            self.run.fingerprint, self.rule, self.checkpoint_sha256, self.reference_sha256,
            self.config, self.codes,
        )  # fmt: skip

    def part_path(self, tile: Tile) -> Path | str:
        return part_path(self.out, self.run.name, tile)

    def embeddings_path(self, tile: Tile) -> Path | str:
        return embeddings_path(
            self.out, self.checkpoint_sha256, self.rule.to_dict(), self.run.fingerprint,
            self.run.name, tile, self.config.tta,
        )  # fmt: skip


def _label_tile(job: _LabelJob, tile: Tile) -> int:
    """Label the superpixels owned by one tile; return how many."""
    part = job.part_path(tile)
    if part_is_current(part, job.part_meta):
        where, filesystem = storage.arrow_source(part)
        return pq.read_metadata(where, filesystem=filesystem).num_rows
    table = job.run.superpixels_in(tile.row, tile.col, tile.height, tile.width)
    ids = table.column("segment_id").to_numpy()
    embeddings = _tile_embeddings(job, tile, table, ids)
    reference = load_reference(job.reference, job.reference_sha256)
    predictions = predict(embeddings, reference, job.config, job.class_names, job.codes, job.device)
    columns = {
        "segment_id": pa.array(ids, pa.uint32()),
        "raster": pa.array([job.run.name] * len(ids), pa.string()),
        "x": table.column("x"),
        "y": table.column("y"),
        **predictions,
    }
    out = pa.table(columns, schema=predictions_schema()).replace_schema_metadata(
        {"superdml": json.dumps(job.part_meta)}
    )
    try:
        with storage.write_once(part, create_only=True) as tmp:
            pq.write_table(out, tmp, compression="zstd")
    except FileExistsError:  # a twin attempt of this task wrote it first: the same part
        if not part_is_current(part, job.part_meta):
            raise
    return len(ids)


def _tile_embeddings(job: _LabelJob, tile: Tile, table: pa.Table, ids: np.ndarray) -> np.ndarray:
    """Embed a tile's crops, or reuse the embeddings kept by an earlier run.

    Embeddings are kept as the float32 the vote used, so a revote on them gives the
    labels of the run that kept them, bit for bit (float16 copies changed up to 3%).
    """
    kept = job.embeddings_path(tile)
    try:
        found = storage.read_bytes(kept)  # one request in a bucket, found or not
    except MissingInputError:
        found = None
    if found is not None:
        with np.load(io.BytesIO(found)) as stored:
            embeddings = stored["embeddings"]
            if embeddings.dtype == np.float32 and np.array_equal(stored["segment_id"], ids):
                return embeddings
    config = job.config
    embedder = load_embedder(
        job.checkpoint, job.checkpoint_sha256, job.device, job.threads, config.precision, config.tta
    )
    if len(ids) == 0:
        return np.zeros((0, 1), np.float32)
    crops, _ = crop_tile(job.run, job.rule, table)
    embeddings = embedder(job.rule.to_unit(crops), job.config.batch_size)
    if job.config.keep_embeddings:
        with storage.write_once(kept) as tmp, open(tmp, "wb") as f:
            np.savez(f, segment_id=ids, embeddings=embeddings.astype(np.float32, copy=False))
    return embeddings


def predict(
    embeddings: np.ndarray,
    reference: Any,
    config: LabelConfig,
    class_names: tuple[str, ...] | list[str],
    codes: tuple[int, ...] | list[int],
    device: str = "cpu",
) -> dict[str, pa.Array]:
    """Apply the kNN labeling rule to embeddings; return the predictions columns.

    The reference's vote (:meth:`ReferenceIndex.vote`, the one labeling rule that
    ``infer`` and ``evaluate`` apply too) decides: the similarity-weighted vote of the k
    nearest references, except that a superpixel whose own crop is a labeled reference
    keeps its class.

    Parameters
    ----------
    embeddings : (N, D) float32 ndarray
    reference : ReferenceIndex
    config : LabelConfig
        The labeling rule (:class:`~superdml.config.schema.VoteConfig`'s fields).
    class_names : sequence of str
        The reference's classes C, in the order of its labels.
    codes : sequence of int, length C + 1
        The class scheme's code of each class, then the code of ``unknown``.
    device : str
        Where the search runs.

    Returns
    -------
    dict of pyarrow arrays
        ``label``, ``label_code``, ``score``, ``margin``, ``similarity``, ``topk_labels``,
        ``topk_similarities`` (of the k nearest references, nearest first).
    """
    n, k = len(embeddings), config.k
    if n == 0:
        empty = predictions_schema()
        return {f.name: pa.array([], f.type) for f in empty if f.name not in _ID_COLUMNS}
    sims, neighbours = reference.search(embeddings, k, device=device)
    neighbour_labels = np.where(neighbours >= 0, reference.labels[neighbours.clip(0)], -1)
    vote = reference.vote(sims, neighbours, config, embeddings)
    label_ids, scores, margins = vote.label_ids, vote.scores, vote.margins
    names = np.asarray([*class_names, UNKNOWN], dtype=object)
    code_of = np.asarray(codes, dtype=np.int64)  # label -1 (unknown) takes the last
    offsets = np.arange(n + 1, dtype=np.int32) * k
    return {
        "label": pa.array(names[label_ids], pa.string()),
        "label_code": pa.array(code_of[label_ids], pa.uint16()),
        "score": pa.array(scores, pa.float32()),
        "margin": pa.array(margins, pa.float32()),
        "similarity": pa.array(vote.similarity, pa.float32()),
        "topk_labels": pa.ListArray.from_arrays(
            offsets, pa.array(names[neighbour_labels.ravel()], pa.string())
        ),
        "topk_similarities": pa.ListArray.from_arrays(
            offsets, pa.array(sims.ravel().astype(np.float32), pa.float32())
        ),
    }


# ------------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class LabelResult:
    """What :func:`label` did.

    Attributes
    ----------
    out_dir : Path or str
    n_superpixels, n_tiles : int
    n_skipped : int
        Tiles whose predictions were already current.
    seconds : float
    superpixels_per_second : float
    """

    out_dir: Path | str
    n_superpixels: int
    n_tiles: int
    n_skipped: int
    seconds: float
    superpixels_per_second: float


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of a label run, loaded once before any tile."""

    runs: list[SegmentRun]
    checkpoint: str
    checkpoint_sha256: str
    reference: str
    reference_sha256: str
    class_names: tuple[str, ...]
    scheme: Any  # ClassScheme
    rule: CropRule

    @property
    def codes(self) -> tuple[int, ...]:
        """The scheme's code of each class, then of unknown."""
        return tuple(self.scheme.codes_of([*self.class_names, UNKNOWN]).tolist())


def _load_inputs(
    segment_dir: str | Path, checkpoint: str | Path, reference: str | Path,
    config: LabelConfig, raster: str | Path | None,
) -> _Inputs:  # fmt: skip
    """Load and check everything `label` takes; fail before any work (see :func:`label`)."""
    from superdml.learn.checkpoint import checkpoint_sha256, load_checkpoint
    from superdml.search.reference import ReferenceIndex
    from superdml.search.reference_files import reference_scheme

    runs = load_segment_runs(segment_dir)
    if raster is not None:
        if len(runs) != 1:
            raise InputError(f"{segment_dir}: --raster needs one raster's segment subfolder")
        runs = [runs[0].with_source(raster)]
    ckpt = load_checkpoint(checkpoint)
    ckpt_sha = checkpoint_sha256(checkpoint)
    ref = ReferenceIndex.load(reference)
    scheme = reference_scheme(reference, ref.class_names)
    if ref.checkpoint_sha256 != ckpt_sha:
        raise InputError(
            f"{reference}: reference built with another checkpoint "
            f"({ref.checkpoint_sha256[:12]}, not {ckpt_sha[:12]} of {checkpoint}): "
            "run `superdml index` with this checkpoint"
        )
    if config.k > ref.size:
        raise InputError(f"{reference}: k={config.k} but the reference holds {ref.size} crops")
    if ref.tta != config.tta:
        raise InputError(
            f"{reference}: reference embedded with tta {ref.tta!r}, label asks for "
            f"{config.tta!r}: pass --tta {ref.tta}, or run `superdml index` with --tta {config.tta}"
        )
    rule = CropRule.from_dict(ckpt.crop_rule) if ckpt.crop_rule else CropRule()
    if config.crop_size is not None:
        rule = dataclasses.replace(rule, crop_size=config.crop_size)
    if rule.channels != ckpt.bands:
        raise InputError(
            f"{checkpoint}: the model takes {ckpt.bands} bands, the crop rule gives "
            f"{rule.channels} (mask {rule.mask!r}): retrain, or label with the checkpoint's "
            "crop rule"
        )
    for run in runs:
        run.check_source()
        color_band_indexes(run, rule)
    return _Inputs(
        runs, storage.resolve(checkpoint), ckpt_sha, storage.resolve(reference),
        ref.sha256, tuple(ref.class_names), scheme, rule,
    )  # fmt: skip


def _manifest(inputs: _Inputs, config: LabelConfig, jobs: list[_LabelJob]) -> dict[str, Any]:
    """Return ``label.json``: classes, inputs, options and each raster's part provenance."""
    return {
        "class_names": list(inputs.class_names),
        "class_scheme": inputs.scheme.to_dict(),
        "tile_size": config.tile_size,
        "rasters": [run.name for run in inputs.runs],
        "segments": [storage.resolve(run.folder) for run in inputs.runs],
        "segment_fingerprints": {run.name: run.fingerprint for run in inputs.runs},
        "checkpoint": inputs.checkpoint,
        "checkpoint_sha256": inputs.checkpoint_sha256,
        "reference": inputs.reference,
        "reference_sha256": inputs.reference_sha256,
        "crop_rule": inputs.rule.to_dict(),
        "config": config_to_dict(config),
        "part_meta": {job.run.name: job.part_meta for job in jobs},
    }


def label(
    segment_dir: str | Path,
    checkpoint: str | Path,
    reference: str | Path,
    out: str | Path,
    config: LabelConfig | None = None,
    raster: str | Path | None = None,
    device: str = "auto",
    client: Any = None,
    overwrite: bool = False,
) -> LabelResult:
    """Label every superpixel of a segment run by kNN against a reference index.

    Before labeling, the parts of `out` that are not current for these inputs (other
    segments, tile size, rasters, reference, crop rule or options: an earlier or
    interrupted run) are removed, so ``predictions/`` always reads as one table with
    at most one row per superpixel (one each once the run finishes). Only parts that
    ``label`` wrote are removed, never other files.

    Parameters
    ----------
    segment_dir : path or URI
        A segment run (all its rasters) or one raster's subfolder.
    checkpoint : path or URI
        The model (``superdml train``).
    reference : path or URI
        A reference index built with that checkpoint (``superdml index``).
    out : path or URI
        Output folder (or prefix): ``predictions/<raster>/<tile>.parquet`` and
        ``label.json``.
    config : LabelConfig, optional
    raster : path, optional
        The source raster when it moved since segmentation (one raster only).
    device : {"auto", "cpu", "cuda"}
    client : distributed.Client, optional
        Where the tile tasks run; in this process when None.
    overwrite : bool
        Replace predictions made with another checkpoint (refused otherwise).

    Returns
    -------
    LabelResult

    Raises
    ------
    InputError, CheckpointError
        Before any work: a reference made with another checkpoint, an empty reference,
        k larger than the reference, a band count the model cannot take, a moved raster
        of another size, or predictions of another checkpoint in `out`.
    """
    from superdml.core.devices import resolve_device
    from superdml.learn.embed import resolve_precision

    start = time.perf_counter()
    config = config or LabelConfig()
    inputs = _load_inputs(segment_dir, checkpoint, reference, config, raster)
    torch_device = resolve_device(device)
    resolve_precision(config.precision, torch_device)  # fails here, not in a worker
    dev = torch_device.type
    out = storage.location(out)
    check_apart(out, [*(run.folder for run in inputs.runs), checkpoint, reference])
    with claim_output(out, "label"):
        _check_checkpoint(out, inputs.checkpoint_sha256, overwrite)
        threads = _threads_per_worker(client)
        jobs = [
            _LabelJob(
                run,
                inputs.rule,
                config,
                inputs.checkpoint,
                inputs.checkpoint_sha256,
                inputs.reference,
                inputs.reference_sha256,
                inputs.class_names,
                inputs.codes,
                str(out),
                dev,
                threads,
            )  # fmt: skip
            for run in inputs.runs
        ]
        calls = [
            (job, tile)
            for job in jobs
            for tile in tile_grid(job.run.source.height, job.run.source.width, config.tile_size)
        ]
        removed = remove_stale_parts(out, {job.part_path(t): job.part_meta for job, t in calls})
        if removed:
            logger.info("%s: removed %d predictions parts of other inputs", out, removed)
        storage.write_json(storage.join(out, MANIFEST), _manifest(inputs, config, jobs))
        dump_config(config, storage.join(out, "label.yaml"))
        done_before = sum(part_is_current(job.part_path(t), job.part_meta) for job, t in calls)
        counts = map_tasks(
            _label_tile, calls, client, desc="label", count=int, count_unit="superpixels",
            threads=task_threads(dev),
        )  # fmt: skip
    seconds = time.perf_counter() - start
    total = int(sum(counts))
    logger.info("labeled %d superpixels in %.1f s (%.0f/s)", total, seconds, total / seconds)
    return LabelResult(out, total, len(calls), done_before, seconds, total / max(seconds, 1e-9))


def task_threads(device_type: str) -> int:
    """Return how many tiles `label` works on at once in its own process (no cluster).

    Two on a GPU: one thread reads and crops the next tile while the other's forward
    runs (the :class:`~superdml.learn.embed.Embedder`'s lock keeps forwards one at a time), so
    the GPU does not wait for GDAL and the cropping. One on the CPU, whose forward uses
    every core: a cropping thread beside it made labeling slower on 2 cores
    (``benchmarks/README.md``).
    """
    return 2 if device_type == "cuda" else 1


def _check_checkpoint(out: Path | str, checkpoint_sha: str, overwrite: bool) -> None:
    """Refuse predictions of another checkpoint in `out`, unless `overwrite`.

    Parts of another checkpoint cannot be rebuilt without it; with `overwrite` they go
    with the other stale parts (:func:`remove_stale_parts`).
    """
    manifest = storage.join(out, MANIFEST)
    if storage.exists(manifest) and not overwrite:
        previous = json.loads(storage.read_text(manifest)).get("checkpoint_sha256")
        if previous != checkpoint_sha:
            raise InputError(
                f"{out}: holds predictions of another checkpoint ({str(previous)[:12]}): "
                "pass --overwrite to replace them, or choose another --out"
            )


def _threads_per_worker(client: Any) -> int | None:
    """Torch threads per worker so that workers x threads = cores (local clusters)."""
    if client is None:
        return None
    workers = client.nthreads()
    local = all(addr.startswith(("tcp://127.0.0.1", "inproc://")) for addr in workers)
    if not local:
        return None
    return max(1, default_workers() // max(1, len(workers)))
