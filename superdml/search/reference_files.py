"""The reference folder on disk: its files, reading and writing them, its class scheme.

:class:`~superdml.search.reference.ReferenceIndex` (the in-memory index: search and
vote) loads and saves itself through :func:`read_reference` and :func:`write_reference`.
``superdml index`` (:func:`superdml.label.index.build_index`) writes one from a labeled
crop folder (to a temporary name, renamed when complete):

==================  ================================================================
file                holds
==================  ================================================================
``embeddings.npy``  (N, D) float32, L2-normalized, one row per reference crop
``labels.npy``      (N,) int64, index into ``classes.json``
``classes.json``    class names: the sorted class folder names of the reference
``files.json``      path of every crop relative to the reference folder (``root``)
``index.faiss``     ``faiss.IndexFlatIP`` (exact), or ``faiss.IndexIVFFlat`` above
                    ``IndexConfig.ivf_threshold`` references
``reference.json``  format, ``checkpoint_sha256``, ``sha256`` (the reference's hash over
                    content, ``index.faiss`` and file names), ``index_sha256``, counts
                    per class, index type, ``root``, ``tta`` (the embeddings' test-time
                    augmentation), ``calibration`` (per-class unknown thresholds and
                    their recall, :class:`Calibration`; null in older references, which
                    also lack ``tta``) and (from ``build_index``) the
                    effective config, class scheme and what was embedded or reused
``file_stats.npy``  (N, 2) int64 size and mtime_ns of each crop (incremental rebuilds;
                    written by ``build_index``)
``config.yaml``     the effective :class:`~superdml.config.schema.IndexConfig` (``build_index``)
==================  ================================================================

"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from superdml import __version__
from superdml.core import storage
from superdml.core.errors import InputError, input_error, require_dir
from superdml.core.ownership import foreign_files, mark_output
from superdml.raster.classes import ClassScheme, default_scheme
from superdml.search.faiss_index import reference_problem

__all__ = [
    "CONFIG_YAML",
    "FILE_STATS_NPY",
    "REFERENCE_FILES",
    "REFERENCE_JSON",
    "Calibration",
    "StoredReference",
    "check_replaceable",
    "damaged",
    "read_reference",
    "reference_scheme",
    "write_reference",
]

REFERENCE_FORMAT = "superdml-reference"
REFERENCE_FORMAT_VERSION = 1
EMBEDDINGS_NPY = "embeddings.npy"
LABELS_NPY = "labels.npy"
CLASSES_JSON = "classes.json"
FILES_JSON = "files.json"
INDEX_FAISS = "index.faiss"
REFERENCE_JSON = "reference.json"
FILE_STATS_NPY = "file_stats.npy"
CONFIG_YAML = "config.yaml"
REFERENCE_FILES = (
    EMBEDDINGS_NPY, LABELS_NPY, CLASSES_JSON, FILES_JSON, INDEX_FAISS, REFERENCE_JSON,
    FILE_STATS_NPY, CONFIG_YAML,
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class Calibration:
    """Per-class unknown thresholds (``unknown: calibrated``), in ``reference.json``.

    Attributes
    ----------
    recall : float
        Share of each class's references (left out one at a time) the thresholds keep.
    thresholds : (C,) float32 ndarray
        Least similarity to the nearest reference of a query voted into each class.
    """

    recall: float
    thresholds: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form: ``{"recall": r, "thresholds": [t, ...]}``."""
        return {"recall": self.recall, "thresholds": [float(t) for t in self.thresholds]}

    @classmethod
    def from_json(cls, value: Any, num_classes: int) -> Calibration | None:
        """Read the JSON form (None: an older reference without thresholds).

        Raises
        ------
        ValueError
            When it is not C thresholds and a recall.
        """
        if value is None:
            return None
        thresholds = np.asarray(value["thresholds"], dtype=np.float32)
        if thresholds.shape != (num_classes,):
            raise ValueError(f"calibration: {thresholds.size} thresholds for {num_classes} classes")
        return cls(float(value["recall"]), thresholds)


@dataclass(frozen=True)
class StoredReference:
    """The parts of a reference folder, checked to fit together (:func:`read_reference`)."""

    embeddings: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str]
    checkpoint_sha256: str
    index: faiss.Index
    index_sha256: str
    root: Path | None
    sha256: str
    calibration: Calibration | None
    tta: str


def read_reference(directory: str | os.PathLike[str]) -> StoredReference:
    """Read the parts of a reference folder (the caller checks its ``sha256``).

    Raises
    ------
    MissingInputError
        When `directory` is not a folder.
    InputError
        One line naming the folder when it is not a reference folder, has another
        format version, or a part is missing, unreadable or inconsistent.
    """
    require_dir(directory, "reference folder")
    folder = storage.local_copy(directory)  # a URI's prefix: fetched once into the local cache
    meta_path = folder / REFERENCE_JSON
    if not meta_path.is_file():
        raise input_error(
            folder,
            f"not a reference folder (no {REFERENCE_JSON}): make one with superdml index",
        )
    try:
        meta = json.loads(meta_path.read_text())
        version = meta["format_version"] if meta.get("format") == REFERENCE_FORMAT else None
        if version != REFERENCE_FORMAT_VERSION:
            raise input_error(
                folder,
                f"reference format {meta.get('format')!r} version {version!r}, this "
                f"superdml ({__version__}) reads {REFERENCE_FORMAT!r} version "
                f"{REFERENCE_FORMAT_VERSION}: rebuild it with superdml index",
            )
        embeddings = np.load(folder / EMBEDDINGS_NPY, allow_pickle=False)
        labels = np.load(folder / LABELS_NPY, allow_pickle=False)
        class_names = json.loads((folder / CLASSES_JSON).read_text())
        files = json.loads((folder / FILES_JSON).read_text())
        index_bytes = (folder / INDEX_FAISS).read_bytes()
        index_sha = hashlib.sha256(index_bytes).hexdigest()
        if index_sha != meta["index_sha256"]:  # never parse an unverified index
            raise damaged(folder, f"{INDEX_FAISS} does not match its hash in {REFERENCE_JSON}")
        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        stored_sha, ckpt_sha = str(meta["sha256"]), str(meta["checkpoint_sha256"])
        root = None if meta.get("root") is None else Path(meta["root"])
        calibration = Calibration.from_json(meta.get("calibration"), len(class_names))
        tta = str(meta.get("tta", "none"))  # older references: no test-time augmentation
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [""])[-1][:200]
        raise damaged(folder, f"{type(err).__name__}: {reason}") from None
    if not isinstance(class_names, list) or not isinstance(files, list):
        raise damaged(folder, f"{CLASSES_JSON} and {FILES_JSON} must hold JSON lists")
    problem = reference_problem(embeddings, labels, class_names, files)
    if problem is None and (index.ntotal, index.d) != embeddings.shape:
        problem = (
            f"{INDEX_FAISS} holds {index.ntotal} vectors of size {index.d}, "
            f"{EMBEDDINGS_NPY} has shape {embeddings.shape}"
        )
    if problem is not None:
        raise damaged(folder, problem)
    return StoredReference(
        np.ascontiguousarray(embeddings, dtype=np.float32),
        labels.astype(np.int64, copy=False),
        class_names,
        files,
        ckpt_sha,
        index,
        index_sha,
        root,
        stored_sha,
        calibration,
        tta,
    )


def write_reference(
    folder: Path,
    embeddings: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    files: list[str],
    index: faiss.Index,
    meta: Mapping[str, Any],
) -> None:
    """Write every part of a reference into the new folder `folder` (it must not exist).

    `meta` goes into ``reference.json`` after the format and version.
    """
    folder.mkdir()
    mark_output(folder, "index")
    np.save(folder / EMBEDDINGS_NPY, embeddings)
    np.save(folder / LABELS_NPY, labels)
    (folder / CLASSES_JSON).write_text(json.dumps(class_names, indent=1) + "\n")
    (folder / FILES_JSON).write_text(json.dumps(files, indent=1) + "\n")
    faiss.write_index(index, os.fspath(folder / INDEX_FAISS))
    header = {
        "format": REFERENCE_FORMAT,
        "format_version": REFERENCE_FORMAT_VERSION,
        "superdml_version": __version__,
    }
    text = json.dumps({**header, **meta}, indent=2, default=str)
    (folder / REFERENCE_JSON).write_text(text + "\n")


def damaged(folder: Path, problem: str) -> InputError:
    """Return the error of a reference folder whose parts do not fit (`problem`)."""
    return input_error(
        folder, f"damaged reference folder ({problem}): rebuild it with superdml index"
    )


def check_replaceable(folder: Path | str) -> None:
    """Refuse to replace a reference folder that holds files the index stage did not write."""
    foreign = foreign_files(folder, REFERENCE_FILES)
    if foreign:
        raise input_error(
            folder,
            f"holds {foreign[0]}, which superdml index did not write: move it away, or choose "
            "another output folder (the reference folder is replaced as a whole)",
        )


def reference_scheme(directory: str | os.PathLike[str], class_names: list[str]) -> ClassScheme:
    """Return the class scheme recorded in a reference folder (codes 1..N by name if none).

    Parameters
    ----------
    directory : path
        A reference folder (its ``reference.json`` was read by :meth:`ReferenceIndex.load`).
    class_names : list of str
        The reference's classes; the scheme names them all.

    Raises
    ------
    InputError
        When the recorded scheme is malformed or lacks a class.
    """
    meta_path = storage.join(directory, REFERENCE_JSON)
    stored = json.loads(storage.read_text(meta_path)).get("build", {}).get("class_scheme")
    if stored is None:
        return default_scheme(class_names)
    return ClassScheme.from_dict(stored, meta_path).covering(class_names, meta_path)
