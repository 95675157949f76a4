"""The ``index`` stage: embed a labeled crop folder into a reference folder.

:func:`build_index` (``superdml index``) scans a labeled crop folder (``<class>/<image>``),
embeds every crop with a checkpoint's model and saves the labeled embeddings and their
FAISS index as a reference folder (:mod:`superdml.reference` describes its files). A
rebuild into the same folder reuses the embeddings of unchanged crops.
:func:`reference_from_folder` embeds a crop folder into an in-memory
:class:`~superdml.reference.ReferenceIndex` (``infer`` without a saved reference).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from superdml._private.atomic import atomic_write
from superdml._private.ownership import check_apart, claim_output
from superdml.checkpoint import (
    Checkpoint,
    checkpoint_sha256,
    load_checkpoint,
)
from superdml.classes import SCHEME_FILE, ClassScheme, folder_scheme
from superdml.config import IndexConfig, config_hash, config_to_dict, dump_config
from superdml.data import ImageFolderDataset
from superdml.embed import Embedder, resolve_device, resolve_precision
from superdml.errors import SuperDMLError, require_dir
from superdml.reference import (
    CONFIG_YAML,
    FILE_STATS_NPY,
    REFERENCE_JSON,
    IndexType,
    ReferenceIndex,
    check_replaceable,
)

__all__ = ["IndexResult", "build_index", "reference_from_folder"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexResult:
    """What :func:`build_index` wrote.

    Attributes
    ----------
    out_dir : Path
        The reference folder.
    n_references : int
        Reference crops in it.
    n_embedded : int
        Crops embedded by this run (new, changed, or all with another checkpoint).
    n_reused : int
        Crops whose embeddings were copied from the previous reference folder.
    n_removed : int
        Crops of the previous reference folder no longer in the crop folder (or changed).
    per_class : dict of str to int
        References per class.
    index_type : {"flat", "ivf"}
        FAISS index written.
    sha256 : str
        Content hash of the reference.
    seconds : float
        Wall time.
    """

    out_dir: Path
    n_references: int
    n_embedded: int
    n_reused: int
    n_removed: int
    per_class: dict[str, int]
    index_type: IndexType
    sha256: str
    seconds: float


@dataclass(frozen=True)
class _Scan:
    """A labeled crop folder: its dataset, file names and (size, mtime_ns) per file."""

    dataset: ImageFolderDataset
    files: list[str]
    stats: np.ndarray  # (N, 2) int64


def _scan(reference_dir: str | os.PathLike[str], ckpt: Checkpoint) -> _Scan:
    """Scan a labeled crop folder for `ckpt`'s model (its bands, input size, normalization).

    Every image is decoded once to find unreadable ones (skipped with a warning), but
    nothing is kept in memory.
    """
    dataset = ImageFolderDataset(
        reference_dir, bands=ckpt.bands, size=ckpt.input_size, preload=False
    )
    paths = [path for path, _ in dataset.samples]
    stats = [os.stat(path) for path in paths]
    return _Scan(
        dataset=dataset,
        files=dataset.files,
        stats=np.array([(s.st_size, s.st_mtime_ns) for s in stats], dtype=np.int64),
    )


def _previous_rows(out_dir: Path, ckpt_sha: str, scan: _Scan) -> tuple[np.ndarray, np.ndarray, int]:
    """Match the scanned crops with the previous reference folder at `out_dir`.

    A crop is reused when the previous reference was made with the same checkpoint and
    holds a crop of the same relative path, size and mtime_ns.

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
    if previous.checkpoint_sha256 != ckpt_sha:
        logger.info("%s: made with another checkpoint, embedding every crop", out_dir)
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


def _embed_reference(
    ckpt: Checkpoint,
    scan: _Scan,
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
            embedder = Embedder.from_checkpoint(ckpt, device, config.precision)
        subset = Subset(scan.dataset, fresh.tolist())
        embeddings[fresh] = embedder.embed_dataset(subset, config.batch_size, "index")[0]
    return embeddings


def _index_scan(
    scan: _Scan, embeddings: np.ndarray, ckpt_sha: str, config: IndexConfig
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
    )


def reference_from_folder(
    ckpt: Checkpoint,
    ckpt_sha: str,
    reference_dir: str | os.PathLike[str],
    device: torch.device,
    config: IndexConfig | None = None,
    embedder: Embedder | None = None,
) -> ReferenceIndex:
    """Embed a labeled crop folder into an in-memory :class:`~superdml.reference.ReferenceIndex`.

    Parameters
    ----------
    ckpt : Checkpoint
        The loaded checkpoint.
    ckpt_sha : str
        Its SHA-256 (:func:`~superdml.checkpoint.checkpoint_sha256`).
    reference_dir : path
        ``<class>/<image>`` folders of labeled crops.
    device : torch.device
        Where the model runs.
    config : IndexConfig, optional
        Batch size, precision and index settings.
    embedder : Embedder, optional
        The checkpoint's :class:`~superdml.embed.Embedder` (made when None).
    """
    config = config or IndexConfig()
    scan = _scan(reference_dir, ckpt)
    rows = np.full(len(scan.files), -1, dtype=np.int64)
    embeddings = _embed_reference(
        ckpt, scan, device, config, rows, np.empty((0, 0), np.float32), embedder
    )
    return _index_scan(scan, embeddings, ckpt_sha, config)


def _reference_scheme(
    reference_dir: str | os.PathLike[str],
    class_names: list[str],
    ckpt: Checkpoint,
    checkpoint: str | os.PathLike[str],
) -> ClassScheme:
    """Return the reference folder's class scheme; refuse codes the checkpoint uses otherwise.

    The folder's ``classes.yaml`` when present, else the checkpoint's scheme (when it
    records one) extended by the folder's new classes (see
    :func:`superdml.classes.folder_scheme`).
    """
    theirs = ckpt.class_scheme
    scheme = folder_scheme(reference_dir, class_names, theirs)
    if theirs is not None:
        where = Path(reference_dir) / SCHEME_FILE
        scheme.check_compatible(theirs, where, f"checkpoint {checkpoint}")
    return scheme


def build_index(
    checkpoint: str | os.PathLike[str],
    reference_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: IndexConfig | None = None,
    device: str = "auto",
) -> IndexResult:
    """Embed a labeled crop folder with a checkpoint's model and save a reference folder.

    Every readable crop of `reference_dir` (``<class>/<image>``, unreadable files
    skipped with a warning) is resized to the model's input size, normalized as the
    checkpoint says and embedded in batches under ``torch.inference_mode``. The class
    folders define the labels (see :mod:`superdml.reference`). When `out_dir` already holds
    a reference made with the same checkpoint, crops with the same relative path, size
    and mtime reuse its embeddings and only new or changed crops are embedded. The new
    folder replaces `out_dir` only when complete.

    Parameters
    ----------
    checkpoint : path
        A ``superdml train`` checkpoint.
    reference_dir : path
        The labeled crop folder.
    out_dir : path
        The reference folder to write (an existing reference folder is replaced).
    config : IndexConfig, optional
        Batch size, precision and index settings; defaults when None.
    device : {"auto", "cpu", "cuda"}
        Where the model runs.

    Returns
    -------
    IndexResult

    Raises
    ------
    CheckpointError
        When `checkpoint` is not a superdml checkpoint.
    MissingInputError, InputError
        On a missing or unusable crop folder (no class folders, an empty class folder,
        crops whose band count the model cannot take), or an `out_dir` that is a file,
        a non-empty folder other than a reference folder, or inside `reference_dir`.
    ConfigError
        On an unusable device.
    """
    start = time.perf_counter()
    config = config or IndexConfig()
    out = Path(out_dir)
    dev = resolve_device(device)
    resolve_precision(config.precision, dev)  # fails before any work
    ckpt = load_checkpoint(checkpoint)
    require_dir(reference_dir, "labeled reference crop folder")
    check_apart(out, [reference_dir, checkpoint])
    with claim_output(out, "index"):
        check_replaceable(out)
        ckpt_sha = checkpoint_sha256(checkpoint)
        scan = _scan(reference_dir, ckpt)
        scheme = _reference_scheme(reference_dir, scan.dataset.class_names, ckpt, checkpoint)
        rows, previous, n_previous = _previous_rows(out, ckpt_sha, scan)
        embeddings = _embed_reference(ckpt, scan, dev, config, rows, previous)
        reference = _index_scan(scan, embeddings, ckpt_sha, config)
        n_reused = int(np.count_nonzero(rows >= 0))
        unseen = sorted(set(reference.class_names) - set(ckpt.class_names))
        if unseen:
            logger.info("classes the checkpoint was not trained on: %s", ", ".join(unseen))
        metadata = {
            "checkpoint": os.fspath(checkpoint),
            "config": config_to_dict(config),
            "config_hash": config_hash(config),
            "classes_not_in_checkpoint": unseen,
            "class_scheme": scheme.to_dict(),
            "n_embedded": reference.size - n_reused,
            "n_reused": n_reused,
            "n_skipped": scan.dataset.n_skipped,
        }
        with atomic_write(out) as tmp:
            reference.write(tmp, metadata)
            np.save(tmp / FILE_STATS_NPY, scan.stats)
            dump_config(config, tmp / CONFIG_YAML)
    logger.info("%s: %s", out, reference)
    return IndexResult(
        out_dir=out,
        n_references=reference.size,
        n_embedded=reference.size - n_reused,
        n_reused=n_reused,
        n_removed=n_previous - n_reused,
        per_class=reference.per_class,
        index_type=reference.index_type,
        sha256=reference.sha256,
        seconds=time.perf_counter() - start,
    )
