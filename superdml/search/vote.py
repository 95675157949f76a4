"""The one labeling rule: the kNN vote, its class balance, unknowns and calibrated thresholds.

:func:`knn_vote` turns each query's nearest references (:mod:`superdml.search.knn`) into a
label, a score (the vote share) and a margin; ``label``, ``infer``, ``evaluate``,
``review`` and training's validation all vote here. :func:`apply_unknown` applies one
threshold or one per class (:func:`calibrate_thresholds`, leave-one-out over the reference).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import get_args

import numpy as np

from superdml.config.checks import is_count
from superdml.config.schema import Weighting, check
from superdml.core.errors import InputError

#: Cosine similarity of a crop to itself, up to float16/bf16 rounding: a query this close
#: to a labeled reference is that crop, and keeps the class people gave it.
EXACT_MATCH = 0.9995


#: ``label_id`` of a superpixel left unlabeled (no usable neighbour, or below the
#: unknown threshold); label rasters write it as 0.
UNKNOWN_LABEL = -1


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
