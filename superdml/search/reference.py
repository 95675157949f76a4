"""The in-memory reference index: labeled reference embeddings, their FAISS index, search, vote.

:class:`ReferenceIndex` holds the labeled reference embeddings and their FAISS index; it
searches them (:func:`~superdml.search.knn.search`) and votes
(:func:`~superdml.search.vote.knn_vote`).
``superdml index`` (:func:`superdml.label.index.build_index`) makes one from a labeled crop
folder and saves it as a reference folder (:mod:`superdml.search.reference_files`, the
on-disk format). :func:`load_reference` keeps one per process.

The reference's own class folders define the labels, so classes the model was not
trained on can be added without retraining (metric learning generalizes to them);
they are listed in ``reference.json`` as ``classes_not_in_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from superdml.config.checks import is_count
from superdml.config.schema import VoteConfig, check
from superdml.core import storage
from superdml.core.atomic import atomic_write
from superdml.core.cache import ProcessCache
from superdml.core.errors import InputError
from superdml.core.ownership import claim_output
from superdml.core.provenance import combine
from superdml.search import knn
from superdml.search.faiss_index import (
    gpu_faiss_index,
    make_faiss_index,
    reference_problem,
    search_device,
)
from superdml.search.reference_files import (
    REFERENCE_JSON,
    Calibration,
    check_replaceable,
    damaged,
    read_reference,
    write_reference,
)
from superdml.search.vote import (
    EXACT_MATCH,
    UNKNOWN_LABEL,
    KnnVote,
    apply_unknown,
    balance_weights,
    calibrate_thresholds,
    knn_vote,
)

__all__ = [
    "IndexType",
    "ReferenceIndex",
    "content_sha256",
    "load_reference",
]

IndexType = Literal["flat", "ivf"]

logger = logging.getLogger(__name__)

#: A reference on a device: FAISS GPU resources and index, or the embeddings as a tensor.
_DeviceCopy = tuple[Any, faiss.Index] | Tensor


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


# long: one class, ReferenceIndex (making, searching, voting, and its documented read-only
# properties); its on-disk format already lives apart, in reference_files.py.
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
        calibration: Calibration | None = None,
        tta: str = "none",
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
        self._copies: dict[str, _DeviceCopy] = {}
        self._copies_lock = threading.Lock()  # threads share a cached reference
        self._calibration = calibration
        self._tta = tta
        self._warned_uncalibrated = False
        self._class_means: np.ndarray | None = None  # made on first use

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
        calibration_recall: float | None = None,
        tta: str = "none",
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
        calibration_recall : float, optional
            Set per-class unknown thresholds (``unknown: calibrated``) that keep this
            share of each class's references, left out one at a time
            (:func:`~superdml.search.calibrate_thresholds`); None: none.
        tta : {"none", "d4"}
            The test-time augmentation the embeddings were made with (recorded).

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
        lab = np.array(lab, dtype=np.int64)
        calibration = None
        if calibration_recall is not None:
            calibration = _calibrate(emb, lab, len(names), index, float(calibration_recall))
        return cls(
            emb,
            lab,
            names,
            file_list,
            str(checkpoint_sha256),
            index,
            hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest(),
            None if root is None else Path(root).absolute(),
            None,
            calibration,
            tta,
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
        check(nprobe is None or is_count(nprobe), "nprobe", nprobe, "an integer >= 1")
        stored = read_reference(directory)
        folder = storage.local_copy(directory)  # where read_reference read it
        loaded = cls(
            stored.embeddings, stored.labels, stored.class_names, stored.files,
            stored.checkpoint_sha256, stored.index, stored.index_sha256, stored.root, folder,
            stored.calibration, stored.tta,
        )  # fmt: skip
        if loaded.sha256 != stored.sha256:
            raise damaged(folder, f"content does not match its sha256 in {REFERENCE_JSON}")
        index = stored.index
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
        meta = {
            "checkpoint_sha256": self._checkpoint_sha256,
            "sha256": self._sha256,
            "index_sha256": self._index_sha256,
            "size": self.size,
            "dim": self.dim,
            "class_names": self._class_names,
            "per_class": self.per_class,
            "index": {"type": self.index_type, "nlist": self.nlist, "nprobe": self.nprobe},
            "tta": self._tta,
            "calibration": None if self._calibration is None else self._calibration.to_json(),
            "root": None if self._root is None else os.fspath(self._root),
            "build": dict(metadata or {}),
        }
        write_reference(
            folder, self._embeddings, self._labels, self._class_names, self._files, self._index,
            meta,
        )  # fmt: skip

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
        copy = self._on(dev)
        if isinstance(copy, Tensor):
            return knn.search(embeddings, copy, k, backend="torch")
        return knn.search(embeddings, copy[1], k, backend="faiss")

    def _on(self, dev: torch.device) -> _DeviceCopy:
        """Return the reference's copy on `dev`, made once per device.

        On CUDA a FAISS GPU index (with its resources) where FAISS GPU works there,
        else the embeddings as a tensor on the device (on the CPU the embeddings
        themselves, no copy). A lock makes two threads that search at once make one.
        """
        key = str(dev)
        with self._copies_lock:
            copy = self._copies.get(key)
            if copy is None:
                if dev.type == "cuda":
                    copy = gpu_faiss_index(self._index, dev, self._embeddings[:1])
                if copy is None:
                    with warnings.catch_warnings():  # read-only: torch is never asked to write
                        warnings.simplefilter("ignore", UserWarning)
                        copy = torch.as_tensor(self._embeddings, device=dev)
                self._copies[key] = copy
        return copy

    def classify(
        self,
        embeddings: np.ndarray,
        rule: VoteConfig | None = None,
        device: str | torch.device | None = None,
        num_top: int = 5,
    ) -> KnnVote:
        """Label each query by the labeling rule: search its neighbours, then :meth:`vote`.

        Parameters
        ----------
        embeddings : (N, D) float ndarray
            L2-normalized query embeddings.
        rule : VoteConfig, optional
            The labeling rule (``k`` at most :attr:`size`); the defaults when None.
        device : {None, "cpu", "cuda", "auto"} or torch.device
            Where to search (see :meth:`search`).
        num_top : int
            Classes in ``topk_classes``.

        Returns
        -------
        KnnVote
            ``label_ids`` index into :attr:`class_names` (-1: unknown).
        """
        rule = VoteConfig() if rule is None else rule
        sims, ids = self.search(embeddings, rule.k, device)
        return self.vote(sims, ids, rule, embeddings, num_top)

    def vote(
        self,
        sims: np.ndarray,
        ids: np.ndarray,
        rule: VoteConfig | None = None,
        queries: np.ndarray | None = None,
        num_top: int = 5,
    ) -> KnnVote:
        """Apply the labeling rule to neighbours found by :meth:`search`.

        The rule's ``vote``: ``knn`` is :func:`~superdml.search.knn_vote` over the
        neighbours, each weighted by its class's reference count to the power
        ``-class_balance`` (:func:`~superdml.search.balance_weights`);
        ``class_mean`` votes over the similarities of the query to every class's mean
        reference embedding (nearest class mean; the same weighting and temperature),
        except that a query whose nearest reference is its own crop keeps that class.
        Then ``unknown``: ``threshold`` applies ``unknown_threshold`` when set,
        ``calibrated`` the reference's per-class thresholds (a reference without them
        votes with no threshold and says so once, in the log).

        Parameters
        ----------
        sims : (N, k) float ndarray
            Similarities of the neighbours.
        ids : (N, k) int ndarray
            Their reference rows, -1 for padding.
        rule : VoteConfig, optional
            The labeling rule; the defaults when None.
        queries : (N, D) float ndarray, optional
            The query embeddings: needed by the ``class_mean`` vote.
        num_top : int
            Classes in ``topk_classes``.

        Returns
        -------
        KnnVote
            ``label_ids`` index into :attr:`class_names` (-1: unknown).

        Raises
        ------
        InputError
            On a ``class_mean`` vote without `queries`, or arrays of mismatched shapes.
        """
        rule = VoteConfig() if rule is None else rule
        ids = np.asarray(ids)
        neighbour_labels = np.where(ids >= 0, self._labels[np.maximum(ids, 0)], UNKNOWN_LABEL)
        num_classes = len(self._class_names)
        if rule.vote == "class_mean":
            vote = self._class_mean_vote(sims, neighbour_labels, rule, queries, num_top)
        else:
            factors = balance_weights(self.class_counts, rule.class_balance)
            vote = knn_vote(
                sims, neighbour_labels, num_classes, rule.weighting, rule.temperature, num_top,
                class_weights=factors,
            )  # fmt: skip
        threshold = self._unknown_threshold(rule)
        return vote if threshold is None else apply_unknown(vote, threshold)

    def _class_mean_vote(
        self,
        sims: np.ndarray,
        neighbour_labels: np.ndarray,
        rule: VoteConfig,
        queries: np.ndarray | None,
        num_top: int,
    ) -> KnnVote:
        """Vote over the class means (see :meth:`vote`), keeping exact matches' classes."""
        if queries is None:
            raise InputError("vote: the class_mean vote needs the query embeddings")
        query = np.asarray(queries, dtype=np.float32)
        if query.ndim != 2 or query.shape != (len(sims), self.dim):
            raise InputError(
                f"vote: got queries of shape {query.shape}, expected ({len(sims)}, {self.dim})"
            )
        means = self.class_means
        mean_sims = query @ means.T
        present = self.class_counts > 0
        order = np.argsort(-np.where(present, mean_sims, -np.inf), axis=1, kind="stable")
        classes = np.where(present[order], order, UNKNOWN_LABEL)
        by_mean = knn_vote(
            np.take_along_axis(mean_sims, order, axis=1), classes, len(means),
            rule.weighting, rule.temperature, num_top, exact_match=None,
        )  # fmt: skip
        by_ref = knn_vote(sims[:, :1], neighbour_labels[:, :1], len(means), num_top=num_top)
        exact = (by_ref.label_ids >= 0) & (by_ref.similarity >= EXACT_MATCH)
        rows = exact[:, None]
        return KnnVote(
            label_ids=np.where(exact, by_ref.label_ids, by_mean.label_ids),
            scores=np.where(exact, by_ref.scores, by_mean.scores),
            margins=np.where(exact, by_ref.margins, by_mean.margins),
            similarity=by_ref.similarity,
            class_scores=np.where(rows, by_ref.class_scores, by_mean.class_scores),
            topk_classes=np.where(rows, by_ref.topk_classes, by_mean.topk_classes),
        )

    def _unknown_threshold(self, rule: VoteConfig) -> float | np.ndarray | None:
        """Return the rule's unknown threshold: one number, one per class, or None."""
        if rule.unknown == "threshold":
            return rule.unknown_threshold
        if self._calibration is None:
            if not self._warned_uncalibrated:
                self._warned_uncalibrated = True
                logger.warning(
                    "%s: no calibrated unknown thresholds (an older reference): voting "
                    "without unknowns; rebuild it with superdml index to calibrate",
                    self._where(),
                )
            return None
        return self._calibration.thresholds

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
    def class_counts(self) -> np.ndarray:
        """(C,) int64 references per class (the class-aware vote's counts)."""
        return np.bincount(self._labels, minlength=len(self._class_names))

    @property
    def class_means(self) -> np.ndarray:
        """(C, D) float32 L2-normalized mean embedding of each class (0 without references)."""
        if self._class_means is None:
            sums = np.zeros((len(self._class_names), self.dim), dtype=np.float64)
            for c in np.unique(self._labels):  # C classes: a short loop
                sums[c] = self._embeddings[self._labels == c].sum(axis=0)
            norms = np.linalg.norm(sums, axis=1, keepdims=True)
            means = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
            self._class_means = means.astype(np.float32)
        return self._class_means

    @property
    def calibration(self) -> Calibration | None:
        """The per-class unknown thresholds and the recall they were set for, if any."""
        return self._calibration

    @property
    def tta(self) -> str:
        """Test-time augmentation of the embeddings (``none`` or ``d4``)."""
        return self._tta

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


def _calibrate(
    embeddings: np.ndarray, labels: np.ndarray, num_classes: int, index: faiss.Index, recall: float
) -> Calibration:
    """Per-class unknown thresholds from each reference's nearest other reference."""
    if isinstance(index, faiss.IndexIVF):
        sims, _ = knn.search(embeddings, index, 1, backend="faiss", exclude_self=True)
    else:
        sims, _ = knn.search(embeddings, torch.from_numpy(embeddings), 1, exclude_self=True)
    thresholds = calibrate_thresholds(sims[:, 0], labels, num_classes, recall)
    return Calibration(recall, thresholds)


_REFERENCES: ProcessCache[ReferenceIndex] = ProcessCache(size=2)


def load_reference(ref_dir: str, sha256: str) -> ReferenceIndex:
    """Return the reference in `ref_dir`, loaded once per process (keyed by its hash).

    A reference in object storage (a prefix) is fetched on the first load into this
    machine's cache folder (:func:`~superdml.core.storage.local_copy`), so a worker that
    shares no disk with the client downloads it once.

    Raises
    ------
    InputError
        The reference no longer has that hash (replaced mid-run).
    """

    def load() -> ReferenceIndex:
        reference = ReferenceIndex.load(storage.local_copy(ref_dir))
        if reference.sha256 != sha256:
            raise InputError(
                f"{ref_dir}: replaced since the run began (sha256 {reference.sha256[:12]}, the "
                f"run labels with {sha256[:12]}): rerun with the reference as it is now"
            )
        return reference

    return _REFERENCES.get(sha256, load)
