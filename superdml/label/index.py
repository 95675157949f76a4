"""The ``index`` stage: embed a labeled crop folder into a reference folder.

:func:`build_index` (``superdml index``) scans a labeled crop folder (``<class>/<image>``),
embeds every crop with a checkpoint's model and saves the labeled embeddings and their
FAISS index as a reference folder (:mod:`superdml.search.reference` describes its files). A
rebuild into the same folder reuses the embeddings of unchanged crops.
:func:`reference_from_folder` embeds a crop folder into an in-memory
:class:`~superdml.search.reference.ReferenceIndex` (``infer`` without a saved reference).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from superdml.config.schema import IndexConfig, config_hash, config_to_dict, dump_config
from superdml.core import storage
from superdml.core.atomic import atomic_write
from superdml.core.devices import resolve_device
from superdml.core.errors import require_dir
from superdml.core.ownership import check_apart, claim_output
from superdml.label.reference_folder import (
    embed_scan,
    index_scan,
    previous_rows,
    reference_from_folder,
    scan_folder,
)
from superdml.learn.checkpoint import (
    Checkpoint,
    checkpoint_sha256,
    load_checkpoint,
)
from superdml.learn.embed import resolve_precision
from superdml.raster.classes import SCHEME_FILE, ClassScheme, folder_scheme
from superdml.search.reference import IndexType
from superdml.search.reference_files import (
    CONFIG_YAML,
    FILE_STATS_NPY,
    REFERENCE_FILES,
    REFERENCE_JSON,
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

    out_dir: Path | str
    n_references: int
    n_embedded: int
    n_reused: int
    n_removed: int
    per_class: dict[str, int]
    index_type: IndexType
    sha256: str
    seconds: float


def _reference_scheme(
    reference_dir: str | os.PathLike[str],
    class_names: list[str],
    ckpt: Checkpoint,
    checkpoint: str | os.PathLike[str],
) -> ClassScheme:
    """Return the reference folder's class scheme; refuse codes the checkpoint uses otherwise.

    The folder's ``classes.yaml`` when present, else the checkpoint's scheme (when it
    records one) extended by the folder's new classes (see
    :func:`superdml.raster.classes.folder_scheme`).
    """
    theirs = ckpt.class_scheme
    scheme = folder_scheme(reference_dir, class_names, theirs)
    if theirs is not None:
        where = storage.join(reference_dir, SCHEME_FILE)
        scheme.check_compatible(theirs, where, f"checkpoint {checkpoint}")
    return scheme


def _previous(out: Path | str) -> Path:
    """Return the previous reference folder at `out`, local (a bucket's: its cached copy)."""
    if storage.is_uri(out):
        if not storage.isfile(storage.join(out, REFERENCE_JSON)):
            return storage.scratch_dir() / "no-previous-reference"
        return storage.local_copy(out)
    return Path(out)


@contextlib.contextmanager
def _writing(out: Path | str) -> Iterator[Path]:
    """Yield a temporary folder that replaces the reference folder `out` when complete.

    Locally the folder is renamed into place (:func:`~superdml.core.atomic.atomic_write`).
    In a bucket its files are uploaded, ``reference.json`` last (it hashes the others, so
    a reader meanwhile gets a one-line error, never a mixed reference), then the old
    reference's files that were not rewritten are deleted.
    """
    if not storage.is_uri(out):
        with atomic_write(out) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(dir=storage.scratch_dir()) as scratch:
        tmp = Path(scratch) / "reference"
        tmp.mkdir()
        yield tmp
        written = set(storage.upload_tree(tmp, out, last=REFERENCE_JSON))
        for rel in storage.list_files(out):
            if rel not in written and any(fnmatch.fnmatchcase(rel, p) for p in REFERENCE_FILES):
                storage.delete(storage.join(out, rel))


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
    folders define the labels (see :mod:`superdml.search.reference`). When `out_dir` already holds
    a reference made with the same checkpoint, crops with the same relative path, size
    and mtime reuse its embeddings and only new or changed crops are embedded. The new
    folder replaces `out_dir` only when complete.

    Parameters
    ----------
    checkpoint : path or URI
        A ``superdml train`` checkpoint.
    reference_dir : path or URI
        The labeled crop folder (a prefix of a bucket is fetched once into the local
        cache, :func:`superdml.core.storage.local_copy`).
    out_dir : path or URI
        The reference folder to write (an existing reference folder is replaced; in a
        bucket it is built on local scratch space and uploaded file by file,
        ``reference.json`` last, and files of the old one no longer written go).
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
    out = storage.location(out_dir)
    dev = resolve_device(device)
    resolve_precision(config.precision, dev)  # fails before any work
    ckpt = load_checkpoint(checkpoint)
    require_dir(reference_dir, "labeled reference crop folder")
    check_apart(out, [reference_dir, checkpoint])
    with claim_output(out, "index"):
        check_replaceable(out)
        ckpt_sha = checkpoint_sha256(checkpoint)
        crops = storage.local_copy(reference_dir)
        scan = scan_folder(crops, ckpt)
        scheme = _reference_scheme(crops, scan.dataset.class_names, ckpt, checkpoint)
        rows, previous, n_previous = previous_rows(_previous(out), ckpt_sha, scan, config.tta)
        embeddings = embed_scan(ckpt, scan, dev, config, rows, previous)
        reference = index_scan(scan, embeddings, ckpt_sha, config)
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
        with _writing(out) as tmp:
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
