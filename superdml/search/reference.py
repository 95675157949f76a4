"""The reference folder: labeled reference embeddings, their FAISS index, search and vote.

:class:`ReferenceIndex` holds the labeled reference embeddings and their FAISS index; it
searches them (:func:`superdml.search.knn.search`) and votes (:func:`superdml.search.knn.knn_vote`).
``superdml index`` (:func:`superdml.label.index.build_index`) makes one from a labeled crop
folder and saves it as a reference folder (written to a temporary name, renamed when
complete):

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
                    per class, index type, ``root`` and (from ``build_index``) the
                    effective config, class scheme and what was embedded or reused
``file_stats.npy``  (N, 2) int64 size and mtime_ns of each crop (incremental rebuilds;
                    written by ``build_index``)
``config.yaml``     the effective :class:`~superdml.config.schema.IndexConfig` (``build_index``)
==================  ================================================================

The reference's own class folders define the labels, so classes the model was not
trained on can be added without retraining (metric learning generalizes to them);
they are listed in ``reference.json`` as ``classes_not_in_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from superdml import __version__
from superdml.config.checks import is_count
from superdml.config.schema import check
from superdml.core.atomic import atomic_write
from superdml.core.cache import ProcessCache
from superdml.core.errors import InputError, input_error, require_dir
from superdml.core.ownership import claim_output, foreign_files, mark_output
from superdml.core.provenance import combine
from superdml.raster.classes import ClassScheme, default_scheme
from superdml.search import knn
from superdml.search.faiss_index import (
    gpu_faiss_index,
    make_faiss_index,
    reference_problem,
    search_device,
)
from superdml.search.knn import UNKNOWN_LABEL, KnnVote, Weighting

__all__ = [
    "IndexType",
    "ReferenceIndex",
    "check_replaceable",
    "content_sha256",
    "reference_scheme",
]

IndexType = Literal["flat", "ivf"]

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


def content_sha256(embeddings: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> str:
    """Return the hex SHA-256 of a reference's content.

    Hashes the bytes of the (N, D) float32 C-ordered `embeddings`, of the (N,) int64
    `labels` and the JSON list of `class_names`, so two references with the same hash
    label every query alike.
    """
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(json.dumps(list(class_names)).encode())
    return digest.hexdigest()


class ReferenceIndex:
    """Labeled reference embeddings and their FAISS index: search and kNN classification.

    Make one with :meth:`build` (from arrays) or :meth:`load` (a reference folder,
    see the module docstring); :func:`superdml.label.index.build_index` makes and saves one
    from a labeled crop folder. The arrays are read-only.

    Search (:func:`superdml.search.knn.search`) runs on the CPU by ``torch.mm`` + ``topk`` for an
    exact (flat) index and through FAISS for an IVF one (`nprobe` lists, for large sets).
    On a CUDA device it uses FAISS GPU when that build is installed and works on the
    GPU, else ``torch.mm`` + ``topk`` over the reference embeddings kept on the device
    (one copy per device, made on first use); the torch path is exact for an IVF index
    too.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        labels: np.ndarray,
        class_names: list[str],
        files: list[str],
        checkpoint_sha256: str,
        index: faiss.Index,
        index_sha256: str,
        root: Path | None,
        path: Path | None,
    ) -> None:
        # private: use ReferenceIndex.build or ReferenceIndex.load, which validate
        embeddings.flags.writeable = False
        labels.flags.writeable = False
        self._embeddings = embeddings
        self._labels = labels
        self._class_names = class_names
        self._files = files
        self._checkpoint_sha256 = checkpoint_sha256
        self._index_sha256 = index_sha256
        self._sha256 = combine(
            content_sha256(embeddings, labels, class_names), index_sha256, json.dumps(files)
        )
        self._index = index
        self._root = root
        self._path = path
        self._on_device: dict[str, Tensor] = {}
        self._gpu: dict[str, tuple[Any, faiss.Index] | None] = {}

    # ------------------------------------------------------------------ making one

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        files: Sequence[str],
        checkpoint_sha256: str,
        ivf_threshold: int = 100_000,
        nprobe: int = 32,
        nlist: int | None = None,
        root: str | os.PathLike[str] | None = None,
    ) -> ReferenceIndex:
        """Index labeled reference embeddings.

        Parameters
        ----------
        embeddings : (N, D) float ndarray
            L2-normalized reference embeddings (norms within ``NORM_TOLERANCE`` of 1,
            in ``superdml.search.faiss_index``); stored as float32.
        labels : (N,) int ndarray
            Class of each reference, an index into `class_names`.
        class_names : sequence of str
            Distinct class names C.
        files : sequence of str
            Name of each reference crop (relative to `root`).
        checkpoint_sha256 : str
            SHA-256 of the checkpoint whose model made the embeddings.
        ivf_threshold : int
            More than this many references get an ``IndexIVFFlat`` (approximate),
            otherwise an exact ``IndexFlatIP``.
        nprobe : int
            Lists an IVF search visits (at most `nlist`).
        nlist : int or None
            Inverted lists of the IVF index; ``round(4 * sqrt(N))`` when None (at most N).
        root : path, optional
            The folder `files` are relative to.

        Raises
        ------
        InputError
            On an empty reference, embeddings that are not finite and L2-normalized,
            labels outside the classes, or parts of different lengths.
        ConfigError
            On non-positive `ivf_threshold`, `nlist` or `nprobe`.
        """
        check(is_count(ivf_threshold), "ivf_threshold", ivf_threshold, "an integer >= 1")
        check(nlist is None or is_count(nlist), "nlist", nlist, "an integer >= 1")
        check(is_count(nprobe), "nprobe", nprobe, "an integer >= 1")
        emb = np.asarray(embeddings)
        lab = np.asarray(labels)
        names, file_list = list(class_names), list(files)
        problem = reference_problem(emb, lab, names, file_list)
        if problem is not None:
            raise InputError(f"reference: {problem}")
        emb = np.array(emb, dtype=np.float32, order="C")
        index = make_faiss_index(emb, int(ivf_threshold), nlist, int(nprobe))
        return cls(
            emb,
            np.array(lab, dtype=np.int64),
            names,
            file_list,
            str(checkpoint_sha256),
            index,
            hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest(),
            None if root is None else Path(root).absolute(),
            None,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str], nprobe: int | None = None) -> ReferenceIndex:
        """Read a reference folder written by :meth:`save` or ``superdml index``.

        Parameters
        ----------
        directory : path
            The reference folder.
        nprobe : int, optional
            Lists an IVF search visits, instead of the saved value.

        Raises
        ------
        MissingInputError
            When `directory` is not a folder.
        InputError
            One line naming the folder when it is not a reference folder, has another
            format version, or a part is missing, unreadable or inconsistent (its
            content hash is checked).
        """
        require_dir(directory, "reference folder")
        check(nprobe is None or is_count(nprobe), "nprobe", nprobe, "an integer >= 1")
        folder = Path(directory)
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
                raise _damaged(folder, f"{INDEX_FAISS} does not match its hash in {REFERENCE_JSON}")
            index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
            stored_sha, ckpt_sha = str(meta["sha256"]), str(meta["checkpoint_sha256"])
            root = None if meta.get("root") is None else Path(meta["root"])
        except InputError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
            reason = (str(err).strip().splitlines() or [""])[-1][:200]
            raise _damaged(folder, f"{type(err).__name__}: {reason}") from None
        if not isinstance(class_names, list) or not isinstance(files, list):
            raise _damaged(folder, f"{CLASSES_JSON} and {FILES_JSON} must hold JSON lists")
        problem = reference_problem(embeddings, labels, class_names, files)
        if problem is None and (index.ntotal, index.d) != embeddings.shape:
            problem = (
                f"{INDEX_FAISS} holds {index.ntotal} vectors of size {index.d}, "
                f"{EMBEDDINGS_NPY} has shape {embeddings.shape}"
            )
        if problem is not None:
            raise _damaged(folder, problem)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        labels = labels.astype(np.int64, copy=False)
        loaded = cls(
            embeddings, labels, class_names, files, ckpt_sha, index, index_sha, root, folder
        )
        if loaded.sha256 != stored_sha:
            raise _damaged(folder, f"content does not match its sha256 in {REFERENCE_JSON}")
        if nprobe is not None and isinstance(index, faiss.IndexIVF):
            index.nprobe = min(int(nprobe), index.nlist)
        return loaded

    def save(
        self, directory: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the reference folder atomically (temporary folder, then rename).

        Parameters
        ----------
        directory : path
            The reference folder; an existing reference folder there is replaced.
        metadata : mapping, optional
            JSON-serializable provenance stored as ``build`` in ``reference.json``.

        Raises
        ------
        InputError
            When `directory` is a file, or a non-empty folder that is not a reference
            folder (it is never deleted).
        """
        folder = Path(directory)
        with claim_output(folder, "index"):
            check_replaceable(folder)
            with atomic_write(folder) as tmp:
                self.write(tmp, metadata)
        self._path = folder
        return folder

    def write(self, folder: Path, metadata: Mapping[str, Any] | None = None) -> None:
        """Write every part of the reference into the new folder `folder`.

        :meth:`save` claims the output folder and replaces it atomically around this;
        :func:`superdml.label.index.build_index` does the same and adds its own files.

        Parameters
        ----------
        folder : Path
            The folder to create (it must not exist).
        metadata : mapping, optional
            JSON-serializable provenance stored as ``build`` in ``reference.json``.
        """
        folder.mkdir()
        mark_output(folder, "index")
        np.save(folder / EMBEDDINGS_NPY, self._embeddings)
        np.save(folder / LABELS_NPY, self._labels)
        (folder / CLASSES_JSON).write_text(json.dumps(self._class_names, indent=1) + "\n")
        (folder / FILES_JSON).write_text(json.dumps(self._files, indent=1) + "\n")
        faiss.write_index(self._index, os.fspath(folder / INDEX_FAISS))
        meta = {
            "format": REFERENCE_FORMAT,
            "format_version": REFERENCE_FORMAT_VERSION,
            "superdml_version": __version__,
            "checkpoint_sha256": self._checkpoint_sha256,
            "sha256": self._sha256,
            "index_sha256": self._index_sha256,
            "size": self.size,
            "dim": self.dim,
            "class_names": self._class_names,
            "per_class": self.per_class,
            "index": {"type": self.index_type, "nlist": self.nlist, "nprobe": self.nprobe},
            "root": None if self._root is None else os.fspath(self._root),
            "build": dict(metadata or {}),
        }
        (folder / REFERENCE_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n")

    # ---------------------------------------------------------------------- using it

    def check_checkpoint(self, checkpoint_sha256: str, checkpoint: str | os.PathLike[str]) -> None:
        """Raise InputError unless the reference was made with this checkpoint.

        Parameters
        ----------
        checkpoint_sha256 : str
            SHA-256 of the checkpoint that embeds the queries.
        checkpoint : path
            Its file, named in the message.
        """
        if checkpoint_sha256 != self._checkpoint_sha256:
            raise InputError(
                f"{self._where()}: reference built with another checkpoint "
                f"({self._checkpoint_sha256[:12]}, not {checkpoint_sha256[:12]} of "
                f"{os.fspath(checkpoint)}): run superdml index with this checkpoint"
            )

    def search(
        self, embeddings: np.ndarray, k: int, device: str | torch.device | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the k most similar references of each query.

        Parameters
        ----------
        embeddings : (N, D) float ndarray
            L2-normalized query embeddings of the reference's checkpoint.
        k : int
            Number of neighbours, at most :attr:`size`.
        device : {None, "cpu", "cuda", "auto"} or torch.device
            Where to search. An exact (flat) index searches by ``torch.mm`` + ``topk``
            on the CPU (about 3 times FAISS's flat search there, ``benchmarks/knn.py``),
            an IVF index through FAISS; on CUDA through FAISS GPU when it works there,
            else by ``torch.mm`` + ``topk`` on the device.

        Returns
        -------
        sims : (N, k) float32 ndarray
            Similarities, most similar first.
        ids : (N, k) int64 ndarray
            Reference rows (index into :attr:`labels`, :attr:`files`); -1 (with
            similarity ``-inf``) where an IVF search found fewer than k.

        Raises
        ------
        InputError
            When `k` exceeds the reference size, or on queries that are not (N, D) float.
        ConfigError
            On a non-positive `k` or an unusable `device`.
        """
        check(is_count(k), "k", k, "an integer >= 1")
        if k > self.size:
            raise InputError(
                f"k: got {k}, but {self._where()} holds only {self.size} crops: "
                "lower k or add references"
            )
        dev = search_device(device)
        if dev.type == "cpu" and self.index_type != "flat":
            return knn.search(embeddings, self._index, k, backend="faiss")
        key = str(dev)
        if dev.type == "cuda" and key not in self._gpu:
            self._gpu[key] = gpu_faiss_index(self._index, dev, self._embeddings[:1])
        gpu = self._gpu.get(key)
        if gpu is not None:
            return knn.search(embeddings, gpu[1], k, backend="faiss")
        if key not in self._on_device:  # on the CPU the embeddings themselves, no copy
            with warnings.catch_warnings():  # read-only: torch is never asked to write
                warnings.simplefilter("ignore", UserWarning)
                self._on_device[key] = torch.as_tensor(self._embeddings, device=dev)
        return knn.search(embeddings, self._on_device[key], k, backend="torch")

    def classify(
        self,
        embeddings: np.ndarray,
        k: int,
        weighting: Weighting = "similarity",
        temperature: float = 0.1,
        unknown_threshold: float | None = None,
        device: str | torch.device | None = None,
        num_top: int = 5,
    ) -> KnnVote:
        """Label each query by the vote of its k nearest references.

        Parameters
        ----------
        embeddings : (N, D) float ndarray
            L2-normalized query embeddings.
        k : int
            Neighbours that vote, at most :attr:`size`.
        weighting : {"similarity", "softmax"}
            Vote weights, see :func:`~superdml.search.knn.knn_vote`.
        temperature : float
            Softmax temperature.
        unknown_threshold : float or None
            Queries whose nearest reference is less similar get label -1
            (:func:`~superdml.search.knn.apply_unknown`).
        device : {None, "cpu", "cuda", "auto"} or torch.device
            Where to search (see :meth:`search`).
        num_top : int
            Classes in ``topk_classes``.

        Returns
        -------
        KnnVote
            ``label_ids`` index into :attr:`class_names` (-1: unknown).
        """
        sims, ids = self.search(embeddings, k, device)
        return self.vote(sims, ids, weighting, temperature, unknown_threshold, num_top)

    def vote(
        self,
        sims: np.ndarray,
        ids: np.ndarray,
        weighting: Weighting = "similarity",
        temperature: float = 0.1,
        unknown_threshold: float | None = None,
        num_top: int = 5,
    ) -> KnnVote:
        """Vote among neighbours found by :meth:`search` (see :meth:`classify`).

        Parameters
        ----------
        sims : (N, k) float ndarray
            Similarities of the neighbours.
        ids : (N, k) int ndarray
            Their reference rows, -1 for padding.

        Returns
        -------
        KnnVote
            ``label_ids`` index into :attr:`class_names` (-1: unknown).
        """
        ids = np.asarray(ids)
        neighbour_labels = np.where(ids >= 0, self._labels[np.maximum(ids, 0)], UNKNOWN_LABEL)
        vote = knn.knn_vote(
            sims, neighbour_labels, len(self._class_names), weighting, temperature, num_top
        )
        return vote if unknown_threshold is None else knn.apply_unknown(vote, unknown_threshold)

    def _where(self) -> str:
        """Return the folder to name in messages, or "in-memory reference"."""
        return "in-memory reference" if self._path is None else os.fspath(self._path)

    # -------------------------------------------------------------------- properties

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) float32 read-only L2-normalized reference embeddings."""
        return self._embeddings

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 read-only class of each reference (index into class_names)."""
        return self._labels

    @property
    def class_names(self) -> list[str]:
        """The C class names; label i is ``class_names[i]``."""
        return list(self._class_names)

    @property
    def files(self) -> list[str]:
        """Name of each reference crop, relative to :attr:`root`."""
        return list(self._files)

    @property
    def root(self) -> Path | None:
        """Absolute folder the files are relative to, when known."""
        return self._root

    @property
    def path(self) -> Path | None:
        """The reference folder it was loaded from or saved to; None when in memory."""
        return self._path

    @property
    def checkpoint_sha256(self) -> str:
        """SHA-256 of the checkpoint that made the embeddings."""
        return self._checkpoint_sha256

    @property
    def sha256(self) -> str:
        """The reference's hash: its content (:func:`content_sha256`), index and file names."""
        return self._sha256

    @property
    def size(self) -> int:
        """Number of references N."""
        return len(self._embeddings)

    @property
    def dim(self) -> int:
        """Embedding size D."""
        return int(self._embeddings.shape[1])

    @property
    def per_class(self) -> dict[str, int]:
        """References per class name (0 for a class without references)."""
        counts = np.bincount(self._labels, minlength=len(self._class_names))
        return {name: int(n) for name, n in zip(self._class_names, counts, strict=True)}

    @property
    def index_type(self) -> IndexType:
        """``flat`` (exact inner product) or ``ivf`` (approximate inverted lists)."""
        return "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"

    @property
    def nlist(self) -> int | None:
        """Inverted lists of an IVF index; None for a flat one."""
        return int(self._index.nlist) if isinstance(self._index, faiss.IndexIVF) else None

    @property
    def nprobe(self) -> int | None:
        """Lists an IVF search visits; None for a flat index."""
        return int(self._index.nprobe) if isinstance(self._index, faiss.IndexIVF) else None

    def __repr__(self) -> str:
        return (
            f"ReferenceIndex(size={self.size}, dim={self.dim}, classes={len(self._class_names)}, "
            f"index={self.index_type!r}, sha256={self._sha256[:12]!r})"
        )


def _damaged(folder: Path, problem: str) -> InputError:
    return input_error(
        folder, f"damaged reference folder ({problem}): rebuild it with superdml index"
    )


def check_replaceable(folder: Path) -> None:
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
    meta_path = Path(directory) / REFERENCE_JSON
    stored = json.loads(meta_path.read_text()).get("build", {}).get("class_scheme")
    if stored is None:
        return default_scheme(class_names)
    return ClassScheme.from_dict(stored, meta_path).covering(class_names, meta_path)


_REFERENCES: ProcessCache[ReferenceIndex] = ProcessCache(size=2)


def load_reference(ref_dir: str, sha256: str) -> ReferenceIndex:
    """Return the reference in `ref_dir`, loaded once per process (keyed by its hash)."""
    return _REFERENCES.get(sha256, lambda: ReferenceIndex.load(ref_dir))
