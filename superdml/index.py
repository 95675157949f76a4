"""FAISS reference index: exact kNN search and the kNN vote that labels superpixels.

The pure core is :func:`knn_search` (exact inner product, chunked over queries) and
:func:`knn_vote` (similarity-weighted class shares of the k nearest references), plus
:func:`apply_unknown` for the unknown threshold. Embeddings are L2-normalized float32,
so inner product is cosine similarity. :func:`knn_search_torch` is the same exact search
as chunked ``torch.mm`` + ``topk`` on any torch device.

:class:`ReferenceIndex` holds the labeled reference embeddings and their FAISS index;
:func:`build_index` (``superdml index``) embeds a labeled crop folder into one, saved as a
reference folder (written to a temporary name, renamed when complete):

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
                    per class, index type, ``root`` and (from :func:`build_index`) the
                    effective config and what was embedded or reused
``file_stats.npy``  (N, 2) int64 size and mtime_ns of each crop (incremental rebuilds)
``config.yaml``     the effective :class:`~superdml.config.IndexConfig`
==================  ================================================================

The reference's own class folders define the labels, so classes the model was not
trained on can be added without retraining (metric learning generalizes to them);
they are listed in ``reference.json`` as ``classes_not_in_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import faiss
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset

from superdml import __version__
from superdml._private.atomic import atomic_write
from superdml._private.ownership import (
    check_apart,
    claim_output,
    foreign_files,
    mark_output,
)
from superdml.checkpoint import (
    Checkpoint,
    checkpoint_sha256,
    load_checkpoint,
)
from superdml.classes import SCHEME_FILE, ClassScheme, default_scheme, folder_scheme
from superdml.config import (
    IndexConfig,
    check,
    config_hash,
    config_to_dict,
    dump_config,
)
from superdml.data import ImageFolderDataset
from superdml.embed import Embedder, resolve_device, resolve_precision
from superdml.errors import InputError, SuperDMLError, input_error, require_dir
from superdml.provenance import combine

__all__ = [
    "EXACT_MATCH",
    "UNKNOWN_LABEL",
    "IndexResult",
    "IndexType",
    "KnnVote",
    "ReferenceIndex",
    "Weighting",
    "apply_unknown",
    "build_index",
    "content_sha256",
    "knn_search",
    "knn_search_chunks",
    "knn_search_torch",
    "knn_vote",
    "reference_from_folder",
    "reference_scheme",
]

logger = logging.getLogger(__name__)

Weighting = Literal["similarity", "softmax"]

#: Cosine similarity of a crop to itself, up to float16/bf16 rounding: a query this close
#: to a labeled reference is that crop, and keeps the class people gave it.
EXACT_MATCH = 0.9995

#: ``label_id`` of a superpixel left unlabeled (no usable neighbour, or below the
#: unknown threshold); label rasters write it as 0.
UNKNOWN_LABEL = -1


def _as_matrix(array: np.ndarray, name: str) -> np.ndarray:
    """Return `array` as a C-contiguous (N, D) float32 array, or raise InputError."""
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"{name}: got a {array.dtype} array of shape {array.shape}, "
            "expected an (N, D) float array"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _is_count(value: object) -> bool:
    """Whether `value` is an integer >= 1 (Python or NumPy, not bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and bool(value >= 1)


def _drop_self(
    sims: np.ndarray, ids: np.ndarray, first_row: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each query's own reference (by index) from its k + 1 neighbours.

    Row ``i`` of the chunk is reference ``first_row + i``. When the query's own index is
    not among its k + 1 neighbours (more than k + 1 exact duplicates tie with it), the
    last neighbour is dropped instead, which is one of the tied duplicates.
    """
    is_self = ids == np.arange(first_row, first_row + len(ids))[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, keep, axis=1), np.take_along_axis(ids, keep, axis=1)


def knn_search_chunks(
    query: np.ndarray,
    reference: np.ndarray | faiss.Index,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = 65536,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield the k nearest references of consecutive chunks of queries.

    Same arguments and results as :func:`knn_search`, one chunk at a time, so a caller
    can reduce each chunk without holding all ``(N, k)`` neighbours. Arguments are
    checked when this is called, before the first chunk is searched.

    Returns
    -------
    chunks : iterator of (int, ndarray, ndarray)
        ``(start, sims, ids)`` per chunk: the row of `query` where the chunk starts, its
        ``(n, k)`` float32 similarities and ``(n, k)`` int64 reference rows (-1 for
        padding), as :func:`knn_search` returns them.
    """
    check(_is_count(k), "k", k, "an integer >= 1")
    check(_is_count(chunk_size), "chunk_size", chunk_size, "an integer >= 1")
    k, chunk_size = int(k), int(chunk_size)
    query = _as_matrix(query, "query")
    if isinstance(reference, faiss.Index):
        index = reference
    else:
        reference = _as_matrix(reference, "reference")
        index = faiss.IndexFlatIP(reference.shape[1])
        index.add(reference)
    if query.shape[1] != index.d:
        raise InputError(
            f"query: got embeddings of size {query.shape[1]}, the references have size {index.d}"
        )
    if exclude_self and len(query) != index.ntotal:
        raise InputError(
            f"exclude_self needs the queries to be the references: got {len(query)} queries "
            f"and {index.ntotal} references"
        )
    return _search_chunks(query, index, k, exclude_self, chunk_size)


def _search_chunks(
    query: np.ndarray, index: faiss.Index, k: int, exclude_self: bool, chunk_size: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start in range(0, len(query), chunk_size):
        sims, ids = index.search(query[start : start + chunk_size], k + 1 if exclude_self else k)
        if exclude_self:
            sims, ids = _drop_self(sims, ids, start, k)
        sims[ids < 0] = -np.inf
        yield start, sims, ids.astype(np.int64, copy=False)


def knn_search(
    query: np.ndarray,
    reference: np.ndarray | faiss.Index,
    k: int,
    exclude_self: bool = False,
    chunk_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the k most similar references of each query (exact inner product).

    Parameters
    ----------
    query : (N, D) float ndarray
        Query embeddings (L2-normalized for cosine similarity); cast to float32.
    reference : (M, D) float ndarray or faiss.Index
        Reference embeddings, searched with a ``faiss.IndexFlatIP``, or an index whose
        search returns similarities (larger is closer), e.g. a GPU or IVF index.
    k : int
        Number of neighbours. When fewer than `k` references are available the rows
        are padded with id -1 and similarity ``-inf``.
    exclude_self : bool
        The queries are the references (N == M): leave out each query's own row, by
        index, so duplicated embeddings still find each other.
    chunk_size : int
        Number of queries searched at once; FAISS blocks the references itself, so the
        full (N, M) similarity matrix is never formed.

    Returns
    -------
    sims : (N, k) float32 ndarray
        Similarities, most similar first.
    ids : (N, k) int64 ndarray
        Rows of the references, -1 for padding.

    Raises
    ------
    InputError
        On arrays that are not (N, D) float, mismatched sizes, or `exclude_self` with
        N != M.
    ConfigError
        If `k` or `chunk_size` is not a positive integer.
    """
    chunks = knn_search_chunks(query, reference, k, exclude_self, chunk_size)
    sims = np.empty((len(query), k), dtype=np.float32)
    ids = np.empty((len(query), k), dtype=np.int64)
    for start, chunk_sims, chunk_ids in chunks:
        sims[start : start + len(chunk_ids)] = chunk_sims
        ids[start : start + len(chunk_ids)] = chunk_ids
    return sims, ids


@dataclass(frozen=True, eq=False)
class KnnVote:
    """Result of :func:`knn_vote` for N queries over C classes.

    Attributes
    ----------
    label_ids : (N,) int64 ndarray
        Winning class, or ``UNKNOWN_LABEL`` (-1) when no neighbour carried weight (or,
        after :func:`apply_unknown`, when the nearest reference is too dissimilar).
    scores : (N,) float32 ndarray
        Share of the winner in the vote, 0..1.
    margins : (N,) float32 ndarray
        Winner's share minus the runner-up's (the winner's share when C == 1).
    similarity : (N,) float32 ndarray
        Similarity to the nearest reference (``-inf`` when there is none).
    class_scores : (N, C) float32 ndarray
        Share of every class; rows sum to 1 (0 when no neighbour carried weight).
    topk_classes : (N, t) int64 ndarray
        The t best classes, best first (ties: lowest class id first); may include
        classes with a zero share.
    """

    label_ids: np.ndarray
    scores: np.ndarray
    margins: np.ndarray
    similarity: np.ndarray
    class_scores: np.ndarray
    topk_classes: np.ndarray


def knn_vote(
    sims: np.ndarray,
    neighbor_labels: np.ndarray,
    num_classes: int,
    weighting: Weighting = "similarity",
    temperature: float = 0.1,
    num_top: int = 5,
    exact_match: float | None = EXACT_MATCH,
) -> KnnVote:
    """Label each query by a weighted vote of its k nearest references.

    This is the one labeling rule: ``label``, ``infer`` and ``evaluate`` all vote here.
    A class's score is the sum of the weights of its neighbours divided by the sum of
    all k weights. Weights:

    ``similarity``
        The similarities clamped at 0; when all of a query's weights are 0, its
        neighbours count equally.
    ``softmax``
        ``softmax(sims / temperature)`` over the query's neighbours.

    Neighbours labelled -1 (padding from :func:`knn_search`) carry no weight. The winner
    is the class with the highest score, the lowest class id among exact ties. A query
    whose nearest neighbour is itself (similarity >= `exact_match`: a crop people
    labeled) keeps that neighbour's class with score and margin 1, whatever the others.

    Parameters
    ----------
    sims : (N, k) float ndarray
        Similarities of the neighbours.
    neighbor_labels : (N, k) int ndarray
        Class ids of the neighbours in ``[0, num_classes)``, or -1 for padding.
    num_classes : int
        Number of classes C.
    weighting : {"similarity", "softmax"}
        Weighting rule, see above.
    temperature : float
        Softmax temperature (> 0), used by ``weighting="softmax"``.
    num_top : int
        Number of classes t in ``topk_classes`` (at most C).
    exact_match : float or None
        Similarity from which the nearest neighbour decides alone; None: never.

    Returns
    -------
    KnnVote
        Labels, shares, margins, nearest similarities and the best classes.

    Raises
    ------
    InputError
        On arrays of mismatched or wrong shapes, or labels outside ``[-1, num_classes)``.
    ConfigError
        On an unknown `weighting` or non-positive `temperature`, `num_classes`, `num_top`.
    """
    check(weighting in get_args(Weighting), "weighting", weighting, "one of similarity, softmax")
    check(temperature > 0, "temperature", temperature, "a number > 0")
    check(_is_count(num_classes), "num_classes", num_classes, "an integer >= 1")
    check(_is_count(num_top), "num_top", num_top, "an integer >= 1")
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(neighbor_labels)
    if sims.ndim != 2 or labels.shape != sims.shape or sims.shape[1] == 0:
        raise InputError(
            f"knn vote: got similarities of shape {sims.shape} and labels of shape "
            f"{labels.shape}, expected the same (N, k) shape with k >= 1"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"knn vote: got labels of dtype {labels.dtype}, expected integers")
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        bad = labels.min() if labels.min() < -1 else labels.max()
        raise InputError(f"knn vote: got class id {bad}, expected ids in [-1, {num_classes})")
    n = len(sims)
    valid = labels >= 0
    if weighting == "similarity":
        weights = np.where(valid, np.clip(sims, 0.0, None), 0.0)
        all_zero = weights.sum(axis=1) <= 0
        weights[all_zero] = valid[all_zero]
    else:
        logits = np.where(valid, sims / temperature, -np.inf)
        top = logits.max(axis=1, keepdims=True)
        weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(axis=1)
    flat = np.arange(n)[:, None] * num_classes + np.where(valid, labels, 0)
    class_weights = np.bincount(
        flat.ravel(), weights=weights.ravel(), minlength=n * num_classes
    ).reshape(n, num_classes)
    class_scores = np.divide(
        class_weights,
        total[:, None],
        out=np.zeros_like(class_weights),
        where=total[:, None] > 0,
    )
    if exact_match is not None:
        exact = np.flatnonzero(valid[:, 0] & (sims[:, 0] >= exact_match))
        class_scores[exact] = 0.0
        class_scores[exact, labels[exact, 0]] = 1.0
    order = np.argsort(-class_scores, axis=1, kind="stable")
    ranked = np.take_along_axis(class_scores, order[:, :2], axis=1)
    best = ranked[:, 0]
    second = ranked[:, 1] if num_classes > 1 else np.zeros(n)
    return KnnVote(
        label_ids=np.where(total > 0, order[:, 0], UNKNOWN_LABEL).astype(np.int64),
        scores=best.astype(np.float32),
        margins=(best - second).astype(np.float32),
        similarity=np.where(valid, sims, -np.inf).max(axis=1).astype(np.float32),
        class_scores=class_scores.astype(np.float32),
        topk_classes=order[:, : min(num_top, num_classes)].astype(np.int64),
    )


def apply_unknown(vote: KnnVote, threshold: float) -> KnnVote:
    """Mark queries whose nearest reference is less similar than `threshold` as unknown.

    Parameters
    ----------
    vote : KnnVote
        Result of :func:`knn_vote`.
    threshold : float
        Minimum similarity to the nearest reference (cosine, in [-1, 1]).

    Returns
    -------
    KnnVote
        A copy whose ``label_ids`` are ``UNKNOWN_LABEL`` (-1) where
        ``similarity < threshold``; scores, margins and class shares are kept, so the
        review stage can still see what the vote said.
    """
    unknown = vote.similarity < threshold
    return dataclasses.replace(vote, label_ids=np.where(unknown, UNKNOWN_LABEL, vote.label_ids))


# ------------------------------------------------------------------ torch kNN search

#: Largest (queries x references) similarity block :func:`knn_search_torch` forms at once.
TORCH_BLOCK_ELEMENTS = 1 << 26


def _as_tensor(array: np.ndarray | Tensor, name: str) -> Tensor:
    """Return `array` as an (N, D) float32 tensor (on its device), or raise InputError."""
    if isinstance(array, Tensor):
        if array.ndim != 2 or not array.is_floating_point():
            raise InputError(
                f"{name}: got a {array.dtype} tensor of shape {tuple(array.shape)}, "
                "expected an (N, D) float tensor"
            )
        return array.float()
    matrix = _as_matrix(array, name)
    return torch.from_numpy(matrix) if matrix.flags.writeable else torch.tensor(matrix)


def knn_search_torch(
    query: np.ndarray | Tensor,
    reference: np.ndarray | Tensor,
    k: int,
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the k most similar references of each query, by ``torch.mm`` and ``topk``.

    The exact search of :func:`knn_search` on the device of `reference` (a GPU without
    a working FAISS GPU build, or the CPU); results are the same up to the order of
    exactly tied similarities and float rounding.

    Parameters
    ----------
    query : (N, D) float ndarray or Tensor
        Query embeddings; moved to the device of `reference`.
    reference : (M, D) float ndarray or Tensor
        Reference embeddings (keep them on the device between calls).
    k : int
        Number of neighbours; rows are padded with id -1 and similarity ``-inf``
        beyond M.
    chunk_size : int
        Most queries per block; blocks also stay under :data:`TORCH_BLOCK_ELEMENTS`
        similarities, so the full (N, M) matrix is never formed.

    Returns
    -------
    sims : (N, k) float32 ndarray
        Similarities, most similar first.
    ids : (N, k) int64 ndarray
        Rows of the references, -1 for padding.

    Raises
    ------
    InputError
        On inputs that are not (N, D) float or of different sizes D.
    ConfigError
        If `k` or `chunk_size` is not a positive integer.
    """
    check(_is_count(k), "k", k, "an integer >= 1")
    check(_is_count(chunk_size), "chunk_size", chunk_size, "an integer >= 1")
    ref = _as_tensor(reference, "reference")
    queries = _as_tensor(query, "query").to(ref.device)
    if queries.shape[1] != ref.shape[1]:
        raise InputError(
            f"query: got embeddings of size {queries.shape[1]}, the references have size "
            f"{ref.shape[1]}"
        )
    n, m, k = len(queries), len(ref), int(k)
    found = min(k, m)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    rows = max(1, min(int(chunk_size), TORCH_BLOCK_ELEMENTS // max(m, 1)))
    with torch.inference_mode():
        for start in range(0, n, rows):
            top = torch.topk(queries[start : start + rows] @ ref.T, found, dim=1)
            sims[start : start + rows, :found] = top.values.cpu().numpy()
            ids[start : start + rows, :found] = top.indices.cpu().numpy()
    return sims, ids


# --------------------------------------------------------------- the reference index

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
#: Largest accepted deviation of an embedding's L2 norm from 1.
NORM_TOLERANCE = 1e-3


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


def _reference_problem(
    embeddings: np.ndarray, labels: np.ndarray, class_names: list[str], files: list[str]
) -> str | None:
    """Return what is wrong with a reference's parts, or None when they fit together."""
    if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
        return (
            f"got {embeddings.dtype} embeddings of shape {embeddings.shape}, expected (N, D) float"
        )
    n = len(embeddings)
    if n == 0 or embeddings.shape[1] == 0:
        return f"no references (embeddings of shape {embeddings.shape}): add labeled crops"
    if not np.isfinite(embeddings).all():
        return "embeddings hold NaN or infinite values"
    norms = np.linalg.norm(embeddings, axis=1)
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        return (
            f"embeddings are not L2-normalized (norms from {norms.min():.4g} to {norms.max():.4g})"
        )
    if (
        not class_names
        or not all(isinstance(c, str) and c for c in class_names)
        or len(set(class_names)) != len(class_names)
    ):
        return f"class names must be distinct non-empty strings, got {class_names!r}"
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        return f"got {labels.dtype} labels of shape {labels.shape}, expected ({n},) integers"
    if labels.min() < 0 or labels.max() >= len(class_names):
        return f"labels must lie in [0, {len(class_names)}) (the class names)"
    if len(files) != n or not all(isinstance(f, str) for f in files):
        return f"expected {n} file names (str), got {len(files)}"
    return None


def _make_faiss_index(
    embeddings: np.ndarray, ivf_threshold: int, nlist: int | None, nprobe: int
) -> faiss.Index:
    """Return an exact IndexFlatIP, or a trained IndexIVFFlat above `ivf_threshold` rows."""
    n, d = embeddings.shape
    index: faiss.Index
    if n <= ivf_threshold:
        index = faiss.IndexFlatIP(d)
    else:
        lists = int(np.clip(nlist or round(4 * np.sqrt(n)), 1, n))
        # faiss returns the factory's index downcast: "IVF...,Flat" gives an IndexIVFFlat
        ivf = cast(
            faiss.IndexIVFFlat,
            faiss.index_factory(d, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT),
        )
        ivf.train(embeddings)
        ivf.nprobe = min(nprobe, lists)
        index = ivf
    index.add(embeddings)
    return index


def _gpu_faiss_index(
    index: faiss.Index, device: torch.device, probe: np.ndarray
) -> tuple[Any, faiss.Index] | None:
    """Return (resources, index on `device`) when FAISS GPU search works there, else None.

    The FAISS GPU wheels are compiled for a range of compute capabilities; on a GPU
    outside it the copy or the first search fails, which a one-row probe search finds.
    """
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    gpu = torch.cuda.current_device() if device.index is None else device.index
    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, gpu, index)
        gpu_index.search(probe, 1)
    except RuntimeError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        logger.info("FAISS GPU search unusable on %s (%s): searching with torch", device, reason)
        return None
    return resources, gpu_index


def _resolve_search_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return resolve_device(device)


class ReferenceIndex:
    """Labeled reference embeddings and their FAISS index: search and kNN classification.

    Make one with :meth:`build` (from arrays) or :meth:`load` (a reference folder,
    see the module docstring); :func:`build_index` makes and saves one from a labeled
    crop folder. The arrays are read-only.

    Search runs on the CPU through FAISS (exact, or IVF with `nprobe` lists for large
    sets). On a CUDA device it uses FAISS GPU when that build is installed and works on
    the GPU, else an exact chunked ``torch.mm`` + ``topk`` over the reference
    embeddings kept on the device (:func:`knn_search_torch`); both are exact for a flat
    index, and the torch path is exact for an IVF index too.
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
            L2-normalized reference embeddings (norms within :data:`NORM_TOLERANCE`
            of 1); stored as float32.
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
        check(_is_count(ivf_threshold), "ivf_threshold", ivf_threshold, "an integer >= 1")
        check(nlist is None or _is_count(nlist), "nlist", nlist, "an integer >= 1")
        check(_is_count(nprobe), "nprobe", nprobe, "an integer >= 1")
        emb = np.asarray(embeddings)
        lab = np.asarray(labels)
        names, file_list = list(class_names), list(files)
        problem = _reference_problem(emb, lab, names, file_list)
        if problem is not None:
            raise InputError(f"reference: {problem}")
        emb = np.array(emb, dtype=np.float32, order="C")
        index = _make_faiss_index(emb, int(ivf_threshold), nlist, int(nprobe))
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
        """Read a reference folder written by :meth:`save` or :func:`build_index`.

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
        check(nprobe is None or _is_count(nprobe), "nprobe", nprobe, "an integer >= 1")
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
        problem = _reference_problem(embeddings, labels, class_names, files)
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
            _check_replaceable(folder)
            with atomic_write(folder) as tmp:
                self._write(tmp, metadata)
        self._path = folder
        return folder

    def _write(self, folder: Path, metadata: Mapping[str, Any] | None) -> None:
        """Write every part of the reference into the new folder `folder`."""
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
        check(_is_count(k), "k", k, "an integer >= 1")
        if k > self.size:
            raise InputError(
                f"k: got {k}, but {self._where()} holds only {self.size} crops: "
                "lower k or add references"
            )
        dev = _resolve_search_device(device)
        if dev.type == "cpu" and self.index_type != "flat":
            return knn_search(embeddings, self._index, k)
        key = str(dev)
        if dev.type == "cuda" and key not in self._gpu:
            self._gpu[key] = _gpu_faiss_index(self._index, dev, self._embeddings[:1])
        gpu = self._gpu.get(key)
        if gpu is not None:
            return knn_search(embeddings, gpu[1], k)
        if key not in self._on_device:  # on the CPU the embeddings themselves, no copy
            with warnings.catch_warnings():  # read-only: torch is never asked to write
                warnings.simplefilter("ignore", UserWarning)
                self._on_device[key] = torch.as_tensor(self._embeddings, device=dev)
        return knn_search_torch(embeddings, self._on_device[key], k)

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
            Vote weights, see :func:`knn_vote`.
        temperature : float
            Softmax temperature.
        unknown_threshold : float or None
            Queries whose nearest reference is less similar get label -1
            (:func:`apply_unknown`).
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
        vote = knn_vote(
            sims, neighbour_labels, len(self._class_names), weighting, temperature, num_top
        )
        return vote if unknown_threshold is None else apply_unknown(vote, unknown_threshold)

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


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a reference folder that holds files the index stage did not write."""
    foreign = foreign_files(folder, REFERENCE_FILES)
    if foreign:
        raise input_error(
            folder,
            f"holds {foreign[0]}, which superdml index did not write: move it away, or choose "
            "another output folder (the reference folder is replaced as a whole)",
        )


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
        files=[path.relative_to(dataset.root).as_posix() for path in paths],
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
    """Embed a labeled crop folder into an in-memory :class:`ReferenceIndex`.

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
    folders define the labels (see the module docstring). When `out_dir` already holds
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
        _check_replaceable(out)
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
            reference._write(tmp, metadata)
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
