"""kNN search and the kNN vote: the labeling rule of ``label``, ``infer`` and ``evaluate``.

:func:`search` finds the k most similar references of each query by exact inner product
(:func:`search_chunks` yields the same results chunk by chunk, so a caller can reduce
them without holding all neighbours). Embeddings are L2-normalized float32, so inner
product is cosine similarity. Two backends do the search:

``faiss``
    A ``faiss.IndexFlatIP`` over the reference embeddings, or the ``faiss.Index`` given
    as references (IVF, GPU, ...), searched chunk by chunk of queries.
``torch``
    Chunked ``torch.mm`` + ``topk`` on the device of the reference tensor (a GPU without
    a working FAISS GPU build, or the CPU, where it is about 3 times FAISS's flat search,
    ``benchmarks/knn.py``).

Both are exact and give the same results up to the order of exactly tied similarities
and float rounding. :func:`knn_vote` turns the neighbours' classes into labels, scores
and margins, and :func:`apply_unknown` applies the unknown threshold.

This module depends on numpy, torch and FAISS only, not on checkpoints, data or models,
so metrics can use it without loading them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import faiss
import numpy as np
import torch
from torch import Tensor

from superdml.config.checks import is_count
from superdml.config.schema import Weighting, check
from superdml.core.errors import InputError

__all__ = [
    "EXACT_MATCH",
    "TORCH_BLOCK_ELEMENTS",
    "UNKNOWN_LABEL",
    "Backend",
    "KnnVote",
    "Weighting",
    "apply_unknown",
    "balance_weights",
    "calibrate_thresholds",
    "knn_vote",
    "search",
    "search_chunks",
]

Backend = Literal["auto", "faiss", "torch"]

#: Cosine similarity of a crop to itself, up to float16/bf16 rounding: a query this close
#: to a labeled reference is that crop, and keeps the class people gave it.
EXACT_MATCH = 0.9995

#: ``label_id`` of a superpixel left unlabeled (no usable neighbour, or below the
#: unknown threshold); label rasters write it as 0.
UNKNOWN_LABEL = -1

#: Largest (queries x references) similarity block the torch backend forms at once.
TORCH_BLOCK_ELEMENTS = 1 << 26

#: Queries per chunk of each backend when `chunk_size` is not given.
_DEFAULT_CHUNK = {"faiss": 65536, "torch": 4096}

#: ``find(start, stop, k)``: (sims, ids) of queries ``start:stop``, padded to k columns.
_Find = Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------ search


def _as_matrix(array: np.ndarray | Tensor, name: str) -> np.ndarray:
    """Return `array` as a C-contiguous (N, D) float32 ndarray, or raise InputError."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"{name}: got a {array.dtype} array of shape {array.shape}, "
            "expected an (N, D) float array"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


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


def _check_sizes(query_dim: int, reference_dim: int) -> None:
    if query_dim != reference_dim:
        raise InputError(
            f"query: got embeddings of size {query_dim}, the references have size {reference_dim}"
        )


def _faiss_find(
    queries: np.ndarray | Tensor, references: np.ndarray | Tensor | faiss.Index
) -> tuple[int, int, _Find]:
    """Return (N, M, find) searching a FAISS index (a flat one over plain embeddings)."""
    query = _as_matrix(queries, "query")
    if isinstance(references, faiss.Index):
        index = references
    else:
        reference = _as_matrix(references, "reference")
        index = faiss.IndexFlatIP(reference.shape[1])
        index.add(reference)
    _check_sizes(query.shape[1], index.d)

    def find(start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(query[start:stop], k)

    return len(query), int(index.ntotal), find


def _torch_find(
    queries: np.ndarray | Tensor, references: np.ndarray | Tensor | faiss.Index
) -> tuple[int, int, _Find]:
    """Return (N, M, find) computing ``torch.mm`` + ``topk`` on the references' device."""
    if isinstance(references, faiss.Index):
        raise InputError(
            "reference: the torch backend searches embeddings, got a faiss index: "
            "pass backend='faiss' or the embeddings"
        )
    reference = _as_tensor(references, "reference")
    query = _as_tensor(queries, "query").to(reference.device)
    _check_sizes(query.shape[1], reference.shape[1])

    def find(start: int, stop: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = query[start:stop]
        sims = np.full((len(rows), k), -np.inf, dtype=np.float32)
        ids = np.full((len(rows), k), -1, dtype=np.int64)
        found = min(k, len(reference))
        with torch.inference_mode():
            top = torch.topk(rows @ reference.T, found, dim=1)
            sims[:, :found] = top.values.cpu().numpy()
            ids[:, :found] = top.indices.cpu().numpy()
        return sims, ids

    return len(query), len(reference), find


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


def search_chunks(
    queries: np.ndarray | Tensor,
    references: np.ndarray | Tensor | faiss.Index,
    k: int,
    *,
    backend: Backend = "auto",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield the k nearest references of consecutive chunks of queries.

    Same arguments and results as :func:`search`, one chunk at a time, so a caller can
    reduce each chunk without holding all ``(N, k)`` neighbours. Arguments are checked
    when this is called, before the first chunk is searched.

    Returns
    -------
    chunks : iterator of (int, ndarray, ndarray)
        ``(start, sims, ids)`` per chunk: the row of `queries` where the chunk starts,
        its ``(n, k)`` float32 similarities and ``(n, k)`` int64 reference rows (-1 for
        padding), as :func:`search` returns them.
    """
    check(is_count(k), "k", k, "an integer >= 1")
    check(chunk_size is None or is_count(chunk_size), "chunk_size", chunk_size, "an integer >= 1")
    check(backend in get_args(Backend), "backend", backend, "one of auto, faiss, torch")
    if backend == "auto":
        backend = "torch" if isinstance(references, Tensor) else "faiss"
    make = _faiss_find if backend == "faiss" else _torch_find
    n, m, find = make(queries, references)
    if exclude_self and n != m:
        raise InputError(
            f"exclude_self needs the queries to be the references: got {n} queries "
            f"and {m} references"
        )
    rows = int(chunk_size or _DEFAULT_CHUNK[backend])
    if backend == "torch":
        rows = max(1, min(rows, TORCH_BLOCK_ELEMENTS // max(m, 1)))
    return _chunks(n, find, int(k), exclude_self, rows)


def _chunks(
    n: int, find: _Find, k: int, exclude_self: bool, rows: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start in range(0, n, rows):
        sims, ids = find(start, start + rows, k + 1 if exclude_self else k)
        if exclude_self:
            sims, ids = _drop_self(sims, ids, start, k)
        sims[ids < 0] = -np.inf
        yield start, sims, ids.astype(np.int64, copy=False)


def search(
    queries: np.ndarray | Tensor,
    references: np.ndarray | Tensor | faiss.Index,
    k: int,
    *,
    backend: Backend = "auto",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the k most similar references of each query (exact inner product).

    Parameters
    ----------
    queries : (N, D) float ndarray or Tensor
        Query embeddings (L2-normalized for cosine similarity); cast to float32.
    references : (M, D) float ndarray or Tensor, or faiss.Index
        Reference embeddings, or (``faiss`` backend) an index whose search returns
        similarities (larger is closer), e.g. a GPU or IVF index.
    k : int
        Number of neighbours. When fewer than `k` references are available the rows
        are padded with id -1 and similarity ``-inf``.
    backend : {"auto", "faiss", "torch"}
        How to search (see the module docstring). ``auto``: ``torch`` for a Tensor of
        references (on its device), ``faiss`` otherwise. The ``torch`` backend moves
        the queries to the device of the references (keep them there between calls).
    exclude_self : bool
        The queries are the references (N == M): leave out each query's own row, by
        index, so duplicated embeddings still find each other.
    chunk_size : int, optional
        Most queries searched at once (65536 for ``faiss``, 4096 for ``torch``, whose
        blocks also stay under :data:`TORCH_BLOCK_ELEMENTS` similarities), so the full
        (N, M) similarity matrix is never formed.

    Returns
    -------
    sims : (N, k) float32 ndarray
        Similarities, most similar first.
    ids : (N, k) int64 ndarray
        Rows of the references, -1 for padding.

    Raises
    ------
    InputError
        On inputs that are not (N, D) float, mismatched sizes D, `exclude_self` with
        N != M, or a faiss index for the ``torch`` backend.
    ConfigError
        If `k` or `chunk_size` is not a positive integer, or on an unknown `backend`.
    """
    chunks = search_chunks(
        queries, references, k, backend=backend, exclude_self=exclude_self, chunk_size=chunk_size
    )
    n = len(queries)
    sims = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for start, chunk_sims, chunk_ids in chunks:
        sims[start : start + len(chunk_ids)] = chunk_sims
        ids[start : start + len(chunk_ids)] = chunk_ids
    return sims, ids


# -------------------------------------------------------------------------- vote


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
    class_weights: np.ndarray | None = None,
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

    With `class_weights`, each neighbour's weight is multiplied by its class's entry
    (:func:`balance_weights`: the class-aware vote, so a class with few references is
    not outvoted by one with many). Neighbours labelled -1 (padding from
    :func:`search`) carry no weight. The winner
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
    class_weights : (C,) float ndarray, optional
        Factor of each class's neighbours (> 0); None: every class counts alike.

    Returns
    -------
    KnnVote
        Labels, shares, margins, nearest similarities and the best classes.

    Raises
    ------
    InputError
        On arrays of mismatched or wrong shapes, or labels outside ``[-1, num_classes)``.
    ConfigError
        On an unknown `weighting` or non-positive `temperature`, `num_classes`, `num_top`,
        or `class_weights` that are not C positive numbers.
    """
    check(weighting in get_args(Weighting), "weighting", weighting, "one of similarity, softmax")
    check(temperature > 0, "temperature", temperature, "a number > 0")
    check(is_count(num_classes), "num_classes", num_classes, "an integer >= 1")
    check(is_count(num_top), "num_top", num_top, "an integer >= 1")
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
    if class_weights is not None:
        factors = np.asarray(class_weights, dtype=np.float64)
        check(
            factors.shape == (num_classes,) and bool(np.all(factors > 0)),
            "class_weights",
            class_weights,
            f"{num_classes} numbers > 0",
        )
        weights = weights * factors[np.where(valid, labels, 0)]
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


def apply_unknown(vote: KnnVote, threshold: float | np.ndarray) -> KnnVote:
    """Mark queries whose nearest reference is less similar than `threshold` as unknown.

    Parameters
    ----------
    vote : KnnVote
        Result of :func:`knn_vote`.
    threshold : float or (C,) float ndarray
        Minimum similarity to the nearest reference (cosine, in [-1, 1]); one per
        class (:func:`calibrate_thresholds`): the threshold of the class voted for.

    Returns
    -------
    KnnVote
        A copy whose ``label_ids`` are ``UNKNOWN_LABEL`` (-1) where
        ``similarity < threshold``; scores, margins and class shares are kept, so the
        review stage can still see what the vote said.
    """
    limit = np.asarray(threshold, dtype=np.float64)
    if limit.ndim == 1:
        limit = np.where(vote.label_ids >= 0, limit[np.maximum(vote.label_ids, 0)], -np.inf)
    unknown = vote.similarity < limit
    return dataclasses.replace(vote, label_ids=np.where(unknown, UNKNOWN_LABEL, vote.label_ids))


def balance_weights(counts: np.ndarray, class_balance: float) -> np.ndarray | None:
    """Return the class factors of the class-aware vote: ``count ** -class_balance``.

    Parameters
    ----------
    counts : (C,) int ndarray
        References per class (a class without any counts as 1: it is never a neighbour).
    class_balance : float
        0: every neighbour counts alike (None is returned: today's vote, bit for bit);
        1: each class's references weigh 1 / their number in all (fully balanced).

    Returns
    -------
    (C,) float64 ndarray or None
        The `class_weights` of :func:`knn_vote`, scaled so the largest is 1.
    """
    check(0.0 <= class_balance <= 1.0, "class_balance", class_balance, "a number in [0, 1]")
    if class_balance == 0:
        return None
    factors = np.maximum(np.asarray(counts, dtype=np.float64), 1.0) ** -float(class_balance)
    return factors / factors.max()


def calibrate_thresholds(
    nearest: np.ndarray, labels: np.ndarray, num_classes: int, recall: float
) -> np.ndarray:
    """Per-class unknown thresholds that keep `recall` of each class's held-out crops.

    The thresholds of ``unknown: calibrated``, set on the reference itself, leave one
    out (Sun et al., ICML 2022: a kNN similarity threshold set on in-distribution
    data): `nearest` is each reference's similarity to its nearest *other* reference.
    Class c's threshold is the largest value that at least ``recall`` of class c's
    references reach, so a new crop of c drawn like them keeps its label with
    probability about `recall` (a class with one reference gets -1: never unknown).

    Parameters
    ----------
    nearest : (N,) float ndarray
        Leave-one-out nearest similarity of each reference.
    labels : (N,) int ndarray
        Class of each reference, in ``[0, num_classes)``.
    num_classes : int
    recall : float
        Share of each class's references above its threshold, in (0, 1].

    Returns
    -------
    (C,) float32 ndarray
        Threshold of each class, -1 for a class with fewer than 2 references.
    """
    check(0.0 < recall <= 1.0, "recall", recall, "a number in (0, 1]")
    thresholds = np.full(num_classes, -1.0, dtype=np.float32)
    nearest = np.asarray(nearest, dtype=np.float64)
    for c in range(num_classes):  # C classes: a short loop
        own = np.sort(nearest[np.asarray(labels) == c])
        if len(own) >= 2:
            # the value of rank floor((1 - recall) * n): at least ceil(recall * n) reach it
            keep = int(np.ceil(recall * len(own) - 1e-9))
            thresholds[c] = own[len(own) - keep]
    return thresholds
