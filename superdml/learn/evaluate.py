"""Evaluation of a checkpoint on labeled crop folders: metrics and figures.

``evaluate(checkpoint, query_dir, out_dir)`` embeds the query crops (and the reference
crops, when given) with the checkpoint's model and writes into `out_dir`:

``metrics.json``
    ``metrics``: :func:`~superdml.learn.metrics.retrieval_metrics` of the queries against the
    references (without a reference folder the queries are their own references, each
    query's own row left out; ``top1_accuracy`` and ``top5_accuracy`` are its
    similarity-weighted vote of the ``k`` nearest, as training's validation scores it),
    plus ``accuracy`` and ``macro_f1`` of the labeling rule's classes (scikit-learn's,
    ``unknown`` counting as wrong) and ``ece``, the expected calibration error of its
    scores (:mod:`superdml.learn.calibration`, 10 bins); ``per_class_accuracy`` and
    ``per_class_f1`` by class name (the accuracy is the diagonal of the confusion
    matrix); ``counts``; ``inputs``: the checkpoint and its SHA-256, the folders, the
    labeling rule. Written last, so its presence means the evaluation is complete.
``predictions.parquet``
    One row per query crop: ``file`` (relative to the query folder), ``true_label``,
    and the labeling rule's ``label``, ``score``, ``margin`` and ``similarity``: the
    rule of ``superdml label`` with the same options (a
    :class:`~superdml.config.schema.VoteConfig`, e.g. read from ``label.yaml``:
    :meth:`~superdml.search.reference.ReferenceIndex.vote` of the ``k`` nearest
    references, a query that is a reference crop keeping its class), so a crop gets the
    class and score ``label`` and ``infer`` give it.
``confusion_matrix.png``
    The labeling rule's classes against the true classes (scikit-learn's confusion
    matrix), each row normalized by the class's number of queries (a row sums to less
    than 1 when some of its queries are ``unknown``).
``tsne.png``
    t-SNE of the query embeddings (scikit-learn, fixed ``random_state``; at most
    ``TSNE_MAX_POINTS`` queries, drawn with a fixed seed), colored by class.
``similarity.png``
    Cosine similarity between a few crops of a few classes, the crops drawn as row and
    column headers.
``reliability.png``
    Reliability diagram of the scores: share labeled right against mean score, per
    score bin, with the ECE.

Class ids of the queries and references are positions in the sorted union of their
class folder names, so the two folders may hold different classes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn import metrics as sk

from superdml.config.schema import IndexConfig, VoteConfig
from superdml.core.atomic import atomic_write, write_json
from superdml.core.devices import resolve_device
from superdml.core.ownership import check_apart, check_output, claim_output
from superdml.crops.rule import check_context
from superdml.learn.calibration import expected_calibration_error, reliability_bins
from superdml.learn.checkpoint import Checkpoint, checkpoint_sha256, load_checkpoint
from superdml.learn.data import ImageFolderDataset
from superdml.learn.embed import Embedder, resolve_precision
from superdml.learn.metrics import retrieval_metrics
from superdml.learn.plots import (
    plot_confusion_matrix,
    plot_embedding_2d,
    plot_reliability,
    plot_similarity,
)
from superdml.raster.class_names import UNKNOWN
from superdml.search.knn import search
from superdml.search.reference import ReferenceIndex
from superdml.search.vote import UNKNOWN_LABEL, KnnVote

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
PREDICTIONS_PARQUET = "predictions.parquet"
CONFUSION_PNG = "confusion_matrix.png"
TSNE_PNG = "tsne.png"
SIMILARITY_PNG = "similarity.png"
RELIABILITY_PNG = "reliability.png"
TSNE_MAX_POINTS = 5000
SIMILARITY_CLASSES = 6
SIMILARITY_PER_CLASS = 3
SEED = 0


@dataclass(frozen=True)
class EvaluateResult:
    """What :func:`evaluate` wrote.

    Attributes
    ----------
    out_dir : Path
    metrics_path, predictions_path : Path
        ``metrics.json`` and ``predictions.parquet``.
    confusion_path, tsne_path, similarity_path : Path
        The three figures.
    metrics : dict of str to float
        The ``metrics`` section of ``metrics.json``.
    n_query, n_reference : int
        Crops embedded (``n_reference`` equals ``n_query`` without a reference folder).
    seconds : float
        Wall time.
    """

    out_dir: Path
    metrics_path: Path
    predictions_path: Path
    confusion_path: Path
    tsne_path: Path
    similarity_path: Path
    reliability_path: Path
    metrics: dict[str, float]
    n_query: int
    n_reference: int
    seconds: float


@dataclass(frozen=True)
class _Embedded:
    """The embedded crop folders of an evaluation.

    Attributes
    ----------
    datasets : list of ImageFolderDataset
        The query folder, then the reference folder when there is one.
    class_names : list of str
        Sorted union of their class folder names; labels index into it.
    query, reference : (N, D) float32 ndarray
        Embeddings (the same array without a reference folder).
    query_labels, reference_labels : (N,) int64 ndarray
    """

    datasets: list[ImageFolderDataset]
    class_names: list[str]
    query: np.ndarray
    query_labels: np.ndarray
    reference: np.ndarray
    reference_labels: np.ndarray


# ------------------------------------------------------------------ pure functions


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the confusion matrix (scikit-learn's) normalized per true class.

    Parameters
    ----------
    true : (N,) int ndarray
        Class ids in ``[0, num_classes)``.
    predicted : (N,) int ndarray
        Class ids in ``[0, num_classes)``, or ``UNKNOWN_LABEL`` (-1).
    num_classes : int
        C.

    Returns
    -------
    (C, C) float64 ndarray
        ``[t, p]``: share of the samples of class t predicted as p. A row sums to 1 less
        the share of its samples predicted unknown, or is all 0 for a class without
        samples.

    Raises
    ------
    ValueError
        On ids outside these ranges or arrays of different lengths.
    """
    true, predicted = np.asarray(true), np.asarray(predicted)
    for name, ids, low in (("true", true, 0), ("predicted", predicted, UNKNOWN_LABEL)):
        if ids.size and (ids.min() < low or ids.max() >= num_classes):
            raise ValueError(f"{name}: class ids must lie in [{low}, {num_classes})")
    labels = [*range(num_classes), UNKNOWN_LABEL]
    counts = sk.confusion_matrix(true, predicted, labels=labels).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return shares[:num_classes, :num_classes]


def tsne_2d(
    embeddings: np.ndarray, max_points: int = TSNE_MAX_POINTS, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Map embeddings to 2-D with t-SNE (scikit-learn, fixed random state).

    Parameters
    ----------
    embeddings : (N, D) float ndarray, N >= 2
    max_points : int
        Larger sets are subsampled (without replacement, seeded) to this many points.
    seed : int
        Seed of the subsample and of t-SNE.

    Returns
    -------
    points : (M, 2) float32 ndarray
    chosen : (M,) int64 ndarray
        Rows of `embeddings` the points belong to, ascending.
    """
    from sklearn.manifold import TSNE

    n = len(embeddings)
    chosen = np.arange(n)
    if n > max_points:
        chosen = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    perplexity = float(np.clip((len(chosen) - 1) / 3, 1.0, 30.0))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    points = tsne.fit_transform(np.asarray(embeddings, dtype=np.float32)[chosen])
    return points.astype(np.float32), chosen.astype(np.int64)


def sample_examples(
    labels: np.ndarray,
    max_classes: int = SIMILARITY_CLASSES,
    per_class: int = SIMILARITY_PER_CLASS,
    seed: int = SEED,
) -> np.ndarray:
    """Pick up to `per_class` samples of up to `max_classes` classes, grouped by class.

    The classes are spread evenly over the classes present; samples are drawn with a
    fixed seed.

    Parameters
    ----------
    labels : (N,) int ndarray

    Returns
    -------
    (M,) int64 ndarray
        Sample rows, by class then by draw.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    spread = np.linspace(0, len(present) - 1, min(max_classes, len(present)))
    classes = present[np.unique(spread.round().astype(np.int64))]
    rows = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.concatenate(rows).astype(np.int64)


def _classify(
    query_emb: np.ndarray,
    reference: ReferenceIndex,
    exclude_self: bool,
    rule: VoteConfig,
    device: torch.device,
) -> tuple[KnnVote, int]:
    """Vote on the queries with the labeling rule (:meth:`ReferenceIndex.vote`).

    The ``rule.k`` nearest references vote (fewer when there are fewer); with
    `exclude_self` the queries are the references and each one's own row is left out.
    Returns the vote and the k it used.
    """
    k = min(rule.k, reference.size - int(exclude_self))
    if exclude_self:
        sims, ids = search(query_emb, reference.embeddings, k, exclude_self=True)
    else:
        sims, ids = reference.search(query_emb, k, device)
    vote = reference.vote(sims, ids, rule, query_emb)
    return vote, k


def _classification_report(
    true: np.ndarray, predicted: np.ndarray, class_names: list[str]
) -> tuple[dict[str, float], dict[str, float], dict[str, float], np.ndarray]:
    """Score the labeling rule's classes against the true ones (scikit-learn).

    Returns
    -------
    metrics : dict
        ``accuracy`` and ``macro_f1`` (over the classes of the queries).
    per_class_accuracy, per_class_f1 : dict of str to float
        By name, for each class of the queries.
    matrix : (C, C) float64 ndarray
        :func:`confusion_matrix`.
    """
    present = np.unique(true)
    matrix = confusion_matrix(true, predicted, len(class_names))
    f1 = sk.f1_score(true, predicted, labels=present, average=None, zero_division=0.0)
    metrics = {
        "accuracy": float(sk.accuracy_score(true, predicted)),
        "macro_f1": float(np.mean(f1)),
    }
    accuracy = {class_names[c]: float(matrix[c, c]) for c in present}
    by_class = {class_names[c]: float(v) for c, v in zip(present, f1, strict=True)}
    return metrics, accuracy, by_class, matrix


def _write_predictions(
    path: Path, files: list[str], true: np.ndarray, vote: KnnVote, class_names: list[str]
) -> Path:
    """Write the per-query predictions table (see the module docstring)."""
    names = np.asarray([*class_names, UNKNOWN], dtype=object)  # label -1 takes the last
    table = pa.table(
        {
            "file": pa.array(files, pa.string()),
            "true_label": pa.array(names[true], pa.string()),
            "label": pa.array(names[vote.label_ids], pa.string()),
            "score": pa.array(vote.scores, pa.float32()),
            "margin": pa.array(vote.margins, pa.float32()),
            "similarity": pa.array(vote.similarity, pa.float32()),
        }
    )
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


# ---------------------------------------------------------------------- the stage


def _embed_folders(
    folders: list[str | os.PathLike[str]], embedder: Embedder, ckpt: Checkpoint, batch: int
) -> _Embedded:
    """Embed the query folder (and the reference folder) with class ids of their union."""
    for folder in folders:
        check_context(ckpt.rule, folder, f"the checkpoint {ckpt.path.name}")
    datasets = [
        ImageFolderDataset(f, bands=ckpt.bands, size=ckpt.input_size, rule=ckpt.rule)
        for f in folders
    ]
    class_names = sorted({name for d in datasets for name in d.class_names})
    embedded = []
    for dataset, what in zip(datasets, ("query", "reference"), strict=False):
        emb, labels = embedder.embed_dataset(dataset, batch, what)
        to_union = np.array([class_names.index(c) for c in dataset.class_names])
        embedded.append((emb, to_union[labels]))
    (query, query_labels), (reference, reference_labels) = embedded[0], embedded[-1]
    return _Embedded(datasets, class_names, query, query_labels, reference, reference_labels)


def _draw_figures(out_dir: Path, data: _Embedded, matrix: np.ndarray) -> tuple[Path, Path, Path]:
    """Draw the confusion matrix, t-SNE and similarity figures; return their paths."""
    names, labels, query = data.class_names, data.query_labels, data.query
    confusion_path = plot_confusion_matrix(matrix, names, out_dir / CONFUSION_PNG)
    points, chosen = tsne_2d(query)
    tsne_path = plot_embedding_2d(points, labels[chosen], names, out_dir / TSNE_PNG)
    examples = sample_examples(labels)
    crops = np.stack([data.datasets[0].read(int(i)).numpy() for i in examples])
    similarity = query[examples] @ query[examples].T
    similarity_path = plot_similarity(
        crops, similarity, labels[examples], names, out_dir / SIMILARITY_PNG
    )
    return confusion_path, tsne_path, similarity_path


def evaluate(
    checkpoint: str | os.PathLike[str],
    query_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    reference_dir: str | os.PathLike[str] | None = None,
    config: VoteConfig | None = None,
    device: str = "auto",
) -> EvaluateResult:
    """Evaluate a checkpoint on labeled crop folders (see the module docstring).

    Parameters
    ----------
    checkpoint : path
        A ``superdml train`` checkpoint.
    query_dir : path
        ``<class>/<image>`` folders of labeled crops to evaluate.
    out_dir : path
        Folder for ``metrics.json`` and the figures (created).
    reference_dir : path, optional
        Labeled references the queries are searched against; without it the query set
        is its own reference (each query's own crop left out).
    config : VoteConfig, optional
        The labeling rule and model arithmetic, as ``label`` applies them (a
        :class:`~superdml.config.schema.LabelConfig` is one); the defaults when None.
        ``k`` is capped at the references available.
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    EvaluateResult

    Raises
    ------
    CheckpointError
        When `checkpoint` is not a superdml checkpoint.
    InputError, MissingInputError
        On unusable folders, or crops whose band count differs from the checkpoint's.
    ConfigError
        On an unusable device or precision.
    """
    start = time.perf_counter()
    rule = VoteConfig() if config is None else config
    out_dir = Path(out_dir)
    check_apart(out_dir, [p for p in (checkpoint, query_dir, reference_dir) if p is not None])
    check_output(out_dir, "evaluate")
    dev = resolve_device(device)
    resolve_precision(rule.precision, dev)  # fails before any work
    ckpt = load_checkpoint(checkpoint)
    ckpt_sha = checkpoint_sha256(checkpoint)
    folders = [query_dir] if reference_dir is None else [query_dir, reference_dir]
    embedder = Embedder.from_checkpoint(ckpt, dev, rule.precision, rule.tta)
    data = _embed_folders(folders, embedder, ckpt, rule.batch_size)
    exclude_self = reference_dir is None
    recall = IndexConfig().calibration_recall if rule.unknown == "calibrated" else None
    reference = ReferenceIndex.build(
        data.reference, data.reference_labels, data.class_names, data.datasets[-1].files,
        ckpt_sha, calibration_recall=recall,
    )  # fmt: skip
    vote, k = _classify(data.query, reference, exclude_self, rule, dev)
    metrics = retrieval_metrics(
        data.query, data.query_labels, data.reference, data.reference_labels, exclude_self,
        len(data.class_names), knn_k=k,
    )  # fmt: skip
    scores, accuracy, f1, matrix = _classification_report(
        data.query_labels, vote.label_ids, data.class_names
    )
    correct = vote.label_ids == data.query_labels
    ece = expected_calibration_error(vote.scores, correct)
    metrics = {**{key: float(v) for key, v in metrics.items()}, **scores, "ece": ece}
    with claim_output(out_dir, "evaluate"):
        predictions_path = _write_predictions(
            out_dir / PREDICTIONS_PARQUET,
            data.datasets[0].files,
            data.query_labels,
            vote,
            data.class_names,
        )
        figures = _draw_figures(out_dir, data, matrix)
        reliability = reliability_bins(vote.scores, correct)
        reliability_path = plot_reliability(reliability, ece, out_dir / RELIABILITY_PNG)
        inputs = {
            "checkpoint": os.fspath(checkpoint),
            "checkpoint_sha256": ckpt_sha,
            "query_dir": os.fspath(query_dir),
            "reference_dir": None if reference_dir is None else os.fspath(reference_dir),
            "exclude_self": exclude_self,
            "rule": {**_rule_dict(rule), "k": k},
            "class_names": data.class_names,
        }
        metrics_path = out_dir / METRICS_JSON
        report = {
            "metrics": metrics,
            "per_class_accuracy": accuracy,
            "per_class_f1": f1,
            "counts": _counts(data),
            "inputs": inputs,
        }
        write_json(metrics_path, report)
    logger.info("%s: %s", metrics_path, metrics)
    return EvaluateResult(
        out_dir, metrics_path, predictions_path, *figures, reliability_path, metrics,
        len(data.query), len(data.reference), time.perf_counter() - start,
    )  # fmt: skip


def _rule_dict(rule: VoteConfig) -> dict[str, Any]:
    """Return the labeling rule's own keys of `rule` (a label config's tiling left out)."""
    return {f.name: getattr(rule, f.name) for f in dataclasses.fields(VoteConfig)}


def _counts(data: _Embedded) -> dict[str, Any]:
    """Return the ``counts`` section of ``metrics.json``."""
    classes, counts = np.unique(data.query_labels, return_counts=True)
    return {
        "query": len(data.query),
        "reference": len(data.reference),
        "classes": len(data.class_names),
        "query_per_class": {
            data.class_names[c]: int(n) for c, n in zip(classes, counts, strict=True)
        },
    }
