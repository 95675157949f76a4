"""A labeled crop folder embedded into a reference.

The folder is scanned, its crops embedded (reusing what a previous reference of the same
checkpoint holds) and indexed; ``index`` writes the result, ``infer`` keeps it in memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from superdml.config.schema import IndexConfig
from superdml.core.errors import SuperDMLError
from superdml.crops.rule import check_context
from superdml.learn.checkpoint import (
    Checkpoint,
)
from superdml.learn.data import ImageFolderDataset
from superdml.learn.embed import Embedder
from superdml.search.reference import ReferenceIndex
from superdml.search.reference_files import FILE_STATS_NPY, REFERENCE_JSON

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderScan:
    """A labeled crop folder: its dataset, file names and (size, mtime_ns) per file."""

    dataset: ImageFolderDataset
    files: list[str]
    stats: np.ndarray  # (N, 2) int64


def scan_folder(reference_dir: str | os.PathLike[str], ckpt: Checkpoint) -> FolderScan:
    """Scan a labeled crop folder for `ckpt`'s model (its bands, input size, normalization).

    Every image is decoded once to find unreadable ones (skipped with a warning), but
    nothing is kept in memory.

    Raises
    ------
    InputError
        When the folder's crops have another context view than the checkpoint's crop
        rule (:func:`~superdml.crops.rule.check_context`).
    """
    check_context(ckpt.rule, reference_dir, f"the checkpoint {ckpt.path.name}")
    dataset = ImageFolderDataset(
        reference_dir, bands=ckpt.bands, size=ckpt.input_size, preload=False, rule=ckpt.rule
    )
    paths = [path for path, _ in dataset.samples]
    stats = [os.stat(path) for path in paths]
    return FolderScan(
        dataset=dataset,
        files=dataset.files,
        stats=np.array([(s.st_size, s.st_mtime_ns) for s in stats], dtype=np.int64),
    )


def previous_rows(
    out_dir: Path, ckpt_sha: str, scan: FolderScan, tta: str = "none"
) -> tuple[np.ndarray, np.ndarray, int]:
    """Match the scanned crops with the previous reference folder at `out_dir`.

    A crop is reused when the previous reference was made with the same checkpoint and
    test-time augmentation `tta` and holds a crop of the same relative path, size and mtime_ns.

    Returns
    -------
    rows : (N,) int64 ndarray
        Row of each scanned crop in the previous embeddings, -1 to embed it.
    previous : (M, D) float32 ndarray
        The previous embeddings (empty when there is nothing to reuse).
    n_previous : int
        M.
    """
    nothing = np.full(len(scan.files), -1, dtype=np.int64), np.empty((0, 0), np.float32), 0
    if not (out_dir / REFERENCE_JSON).is_file():
        return nothing
    try:
        previous = ReferenceIndex.load(out_dir)
        stats = np.load(out_dir / FILE_STATS_NPY, allow_pickle=False)
    except (SuperDMLError, OSError, ValueError) as err:
        logger.warning("%s: previous reference unusable, embedding every crop (%s)", out_dir, err)
        return nothing
    if stats.shape != (previous.size, 2):
        logger.warning("%s: %s does not fit, embedding every crop", out_dir, FILE_STATS_NPY)
        return nothing
    if previous.checkpoint_sha256 != ckpt_sha or previous.tta != tta:
        logger.info("%s: made with another checkpoint or tta, embedding every crop", out_dir)
        return (*nothing[:2], previous.size)
    known = {
        (name, size, mtime): row
        for row, (name, (size, mtime)) in enumerate(
            zip(previous.files, stats.tolist(), strict=True)
        )
    }
    rows = [
        known.get((name, size, mtime), -1)
        for name, (size, mtime) in zip(scan.files, scan.stats.tolist(), strict=True)
    ]
    return np.array(rows, dtype=np.int64), previous.embeddings, previous.size


def embed_scan(
    ckpt: Checkpoint,
    scan: FolderScan,
    device: torch.device,
    config: IndexConfig,
    rows: np.ndarray,
    previous: np.ndarray,
    embedder: Embedder | None = None,
) -> np.ndarray:
    """Return the (N, D) float32 embeddings of the scanned crops.

    Crop i is copied from ``previous[rows[i]]`` when ``rows[i] >= 0``; the other crops
    are embedded with `embedder` (made from `ckpt` only when some crop needs it).
    """
    embeddings = np.empty((len(scan.files), ckpt.embedding_size), dtype=np.float32)
    kept = rows >= 0
    if kept.any():
        embeddings[kept] = previous[rows[kept]]
    fresh = np.flatnonzero(~kept)
    if fresh.size:
        if embedder is None:
            embedder = Embedder.from_checkpoint(ckpt, device, config.precision, config.tta)
        subset = Subset(scan.dataset, fresh.tolist())
        embeddings[fresh] = embedder.embed_dataset(subset, config.batch_size, "index")[0]
    return embeddings


def index_scan(
    scan: FolderScan, embeddings: np.ndarray, ckpt_sha: str, config: IndexConfig
) -> ReferenceIndex:
    """Index the embeddings of a scanned crop folder with the config's index settings."""
    return ReferenceIndex.build(
        embeddings,
        np.array(scan.dataset.labels, dtype=np.int64),
        scan.dataset.class_names,
        scan.files,
        ckpt_sha,
        ivf_threshold=config.ivf_threshold,
        nprobe=config.nprobe,
        nlist=config.nlist,
        root=scan.dataset.root,
        calibration_recall=config.calibration_recall,
        tta=config.tta,
    )


def reference_from_folder(
    ckpt: Checkpoint,
    ckpt_sha: str,
    reference_dir: str | os.PathLike[str],
    device: torch.device,
    config: IndexConfig | None = None,
    embedder: Embedder | None = None,
) -> ReferenceIndex:
    """Embed a labeled crop folder into an in-memory reference (:class:`ReferenceIndex`).

    Parameters
    ----------
    ckpt : Checkpoint
        The loaded checkpoint.
    ckpt_sha : str
        Its SHA-256 (:func:`~superdml.learn.checkpoint.checkpoint_sha256`).
    reference_dir : path
        ``<class>/<image>`` folders of labeled crops.
    device : torch.device
        Where the model runs.
    config : IndexConfig, optional
        Batch size, precision and index settings.
    embedder : Embedder, optional
        The checkpoint's :class:`~superdml.learn.embed.Embedder` (made when None).
    """
    config = config or IndexConfig()
    scan = scan_folder(reference_dir, ckpt)
    rows = np.full(len(scan.files), -1, dtype=np.int64)
    embeddings = embed_scan(
        ckpt, scan, device, config, rows, np.empty((0, 0), np.float32), embedder
    )
    return index_scan(scan, embeddings, ckpt_sha, config)
