"""Retrieval and clustering metrics of an embedding: MAP@R, R-precision, P@k, kNN accuracy, NMI.

Definitions follow Musgrave et al. 2020, "A Metric Learning Reality Check". Neighbours
come from :func:`superdml.search.knn.search_chunks` (exact cosine similarity through FAISS),
reduced chunk by chunk, so memory stays bounded by ``NEIGHBOR_BUDGET`` entries however
many queries there are.
"""

from __future__ import annotations

import faiss
import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from superdml.config.schema import check
from superdml.core.errors import InputError
from superdml.search.knn import search_chunks
from superdml.search.vote import knn_vote

__all__ = ["NEIGHBOR_BUDGET", "retrieval_metrics"]

#: Most (query, neighbour) pairs held at once; queries are searched in chunks of
#: ``NEIGHBOR_BUDGET // k`` rows.
NEIGHBOR_BUDGET = 1 << 22

#: Seed of the k-means clustering behind the NMI.
KMEANS_SEED = 0


def _embeddings(array: np.ndarray, name: str) -> np.ndarray:
    """Return `array` as L2-normalized float32 (N, D) embeddings, or raise InputError."""
    array = np.asarray(array)
    if array.ndim != 2 or len(array) == 0 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"{name}: got a {array.dtype} array of shape {array.shape}, "
            "expected a non-empty (N, D) float array"
        )
    array = array.astype(np.float32)
    array /= np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
    return array


def _labels(array: np.ndarray, name: str, length: int) -> np.ndarray:
    """Return `array` as (length,) int64 class ids >= 0, or raise InputError."""
    array = np.asarray(array)
    if array.shape != (length,) or not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"{name}: got a {array.dtype} array of shape {array.shape}, "
            f"expected ({length},) integer class ids"
        )
    if array.min() < 0:
        raise InputError(f"{name}: got class id {array.min()}, expected ids >= 0")
    return array.astype(np.int64)


def _nmi(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """NMI between the labels and a seeded k-means with one cluster per distinct label."""
    num_clusters = len(np.unique(labels))
    kmeans = faiss.Kmeans(
        embeddings.shape[1],
        num_clusters,
        niter=20,
        seed=KMEANS_SEED,
        min_points_per_centroid=1,  # small validation sets are fine, no warning
        verbose=False,
    )
    kmeans.train(embeddings)
    _, clusters = kmeans.index.search(embeddings, 1)
    return float(normalized_mutual_info_score(labels, clusters[:, 0]))


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    ref_emb: np.ndarray,
    ref_labels: np.ndarray,
    exclude_self: bool = False,
    num_classes: int | None = None,
    *,
    knn_k: int = 10,
) -> dict[str, float]:
    """Return retrieval, kNN-classification and clustering metrics of query embeddings.

    For each query the references are ranked by cosine similarity. With R the number of
    references of the query's class (minus one for the query itself when
    `exclude_self`), rel(i) = 1 when the i-th reference has the query's class, and P(i)
    the precision of the first i:

    - ``map_at_r``: mean over queries of ``(1/R) sum_{i<=R} P(i) rel(i)``;
    - ``r_precision``: mean of ``P(R)``;
    - ``precision_at_1``, ``precision_at_5``: mean of ``P(1)``, ``P(5)``;
    - ``recall_at_1``, ``recall_at_5``: fraction of queries with a reference of their
      class among the first 1, 5;
    - ``top1_accuracy``, ``top5_accuracy``: fraction of queries whose class is the
      winner, or among the 5 best classes with a non-zero share, of the kNN vote the
      labeling uses (:func:`superdml.search.vote.knn_vote`, similarity weighting, `knn_k`
      neighbours);
    - ``nmi``: normalized mutual information between the query labels and a k-means
      clustering of the query embeddings (FAISS, seed ``KMEANS_SEED``) with as many
      clusters as distinct query labels.

    Queries whose class has no reference (R = 0) are left out of ``map_at_r`` and
    ``r_precision`` (NaN when all are) and count as misses elsewhere. When fewer than
    5 (or `knn_k`) references are available, k is capped at their number: P@5 is then
    the precision over all of them.

    Parameters
    ----------
    query_emb : (N, D) float ndarray
        Query embeddings; normalized here.
    query_labels : (N,) int ndarray
        Class ids of the queries (>= 0).
    ref_emb : (M, D) float ndarray
        Reference embeddings; normalized here.
    ref_labels : (M,) int ndarray
        Class ids of the references (>= 0).
    exclude_self : bool
        The queries are the references (same rows, same labels): each query's own row
        is left out of its ranking, by index, so duplicate embeddings are handled.
    num_classes : int, optional
        Number of classes C; ``max(label) + 1`` when omitted.
    knn_k : int
        Neighbours of the kNN vote.

    Returns
    -------
    metrics : dict of str to float
        The keys listed above.

    Raises
    ------
    InputError
        On empty or mis-shaped arrays, negative labels, a label >= `num_classes`, mismatched
        queries and references with `exclude_self`, or fewer than 2 rows with it.
    ConfigError
        If `knn_k` is not a positive integer.
    """
    check(isinstance(knn_k, int) and knn_k >= 1, "knn_k", knn_k, "an integer >= 1")
    query = _embeddings(query_emb, "query_emb")
    ref = _embeddings(ref_emb, "ref_emb")
    if query.shape[1] != ref.shape[1]:
        raise InputError(
            f"query_emb: got embeddings of size {query.shape[1]}, "
            f"the references have size {ref.shape[1]}"
        )
    query_labels = _labels(query_labels, "query_labels", len(query))
    ref_labels = _labels(ref_labels, "ref_labels", len(ref))
    if exclude_self and (len(query) < 2 or not np.array_equal(query_labels, ref_labels)):
        raise InputError(
            "exclude_self needs the queries to be the references (same rows and labels) "
            f"and at least 2 of them: got {len(query)} queries and {len(ref)} references"
        )
    max_label = int(max(query_labels.max(), ref_labels.max()))
    if num_classes is None:
        num_classes = max_label + 1
    elif max_label >= num_classes:
        raise InputError(f"labels: got class id {max_label}, expected ids < {num_classes}")

    num_refs = len(ref) - int(exclude_self)
    r = np.bincount(ref_labels, minlength=num_classes)[query_labels] - int(exclude_self)
    k = min(max(int(r.max()), 5, knn_k), num_refs)
    k5, k_vote = min(5, k), min(knn_k, k)
    chunk_size = max(1, NEIGHBOR_BUDGET // k)
    positions = np.arange(1, k + 1)

    sums = dict.fromkeys(
        ("map_at_r", "r_precision", "precision_at_1", "precision_at_5", "recall_at_1",
         "recall_at_5", "top1_accuracy", "top5_accuracy"),
        0.0,
    )  # fmt: skip
    chunks = search_chunks(query, ref, k, exclude_self=exclude_self, chunk_size=chunk_size)
    for start, sims, ids in chunks:
        true = query_labels[start : start + len(ids)]
        r_chunk = r[start : start + len(ids)]
        neighbor_labels = np.where(ids >= 0, ref_labels[np.maximum(ids, 0)], -1)
        rel = neighbor_labels == true[:, None]  # (n, k)

        rel_r = rel & (positions <= r_chunk[:, None])  # relevant within the first R
        precision = np.cumsum(rel_r, axis=1) / positions
        has_r = r_chunk > 0
        r_safe = np.maximum(r_chunk, 1)
        sums["map_at_r"] += float(((precision * rel_r).sum(axis=1) / r_safe)[has_r].sum())
        sums["r_precision"] += float((rel_r.sum(axis=1) / r_safe)[has_r].sum())
        sums["precision_at_1"] += float(rel[:, 0].sum())
        sums["precision_at_5"] += float(rel[:, :k5].sum() / k5)
        sums["recall_at_1"] += float(rel[:, 0].sum())
        sums["recall_at_5"] += float(rel[:, :k5].any(axis=1).sum())

        vote = knn_vote(sims[:, :k_vote], neighbor_labels[:, :k_vote], num_classes)
        top5 = vote.topk_classes[:, :5]
        in_top5 = (top5 == true[:, None]) & (
            np.take_along_axis(vote.class_scores, top5, axis=1) > 0
        )
        sums["top1_accuracy"] += float((vote.label_ids == true).sum())
        sums["top5_accuracy"] += float(in_top5.any(axis=1).sum())

    metrics = {key: value / len(query) for key, value in sums.items()}
    num_with_r = int((r > 0).sum())
    for key in ("map_at_r", "r_precision"):
        metrics[key] = sums[key] / num_with_r if num_with_r else float("nan")
    metrics["nmi"] = _nmi(query, query_labels)
    return metrics
