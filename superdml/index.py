"""FAISS reference index: exact kNN search and the kNN vote that labels superpixels.

The pure core is :func:`knn_search` (exact inner product, chunked over queries) and
:func:`knn_vote` (similarity-weighted class shares of the k nearest references), plus
:func:`apply_unknown` for the unknown threshold. Embeddings are L2-normalized float32,
so inner product is cosine similarity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import faiss
import numpy as np

from superdml.config import check
from superdml.errors import InputError

__all__ = [
    "UNKNOWN_LABEL",
    "KnnVote",
    "Weighting",
    "apply_unknown",
    "knn_search",
    "knn_search_chunks",
    "knn_vote",
]

Weighting = Literal["similarity", "softmax"]

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
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1


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
) -> KnnVote:
    """Label each query by a weighted vote of its k nearest references.

    A class's score is the sum of the weights of its neighbours divided by the sum of
    all k weights. Weights:

    ``similarity``
        The similarities clamped at 0; when all of a query's weights are 0, its
        neighbours count equally.
    ``softmax``
        ``softmax(sims / temperature)`` over the query's neighbours.

    Neighbours labelled -1 (padding from :func:`knn_search`) carry no weight. The winner
    is the class with the highest score, the lowest class id among exact ties.

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
