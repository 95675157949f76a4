"""Evaluation of a checkpoint on labeled crop folders: metrics and figures.

``evaluate(checkpoint, query_dir, out_dir)`` embeds the query crops (and the reference
crops, when given) with the checkpoint's model and writes into `out_dir`:

``metrics.json``
    ``metrics``: :func:`~superdml.learn.metrics.retrieval_metrics` of the queries against the
    references (without a reference folder the queries are their own references, each
    query's own row left out); its ``top1_accuracy`` is the accuracy of the kNN
    classifier of the confusion matrix; ``per_class_accuracy``: the diagonal of the
    confusion matrix by class name; ``counts``; ``inputs``: the
    checkpoint and its SHA-256, the folders, the kNN settings. Written last, so its
    presence means the evaluation is complete.
``predictions.parquet``
    One row per query crop: ``file`` (relative to the query folder), ``true_label``,
    and the kNN classifier's ``label``, ``score``, ``margin`` and ``similarity``: the
    labeling rule of ``superdml label`` (:meth:`~superdml.search.reference.ReferenceIndex.vote`,
    the similarity-weighted vote of the ``KNN_K`` nearest references, a query that is a
    reference crop keeping its class), so a crop gets the class and score ``label`` and
    ``infer`` give it.
``confusion_matrix.png``
    The kNN classifier against the true classes, each row normalized by the class's
    number of queries.
``tsne.png``
    t-SNE of the query embeddings (scikit-learn, fixed ``random_state``; at most
    ``TSNE_MAX_POINTS`` queries, drawn with a fixed seed), colored by class.
``similarity.png``
    Cosine similarity between a few crops of a few classes, the crops drawn as row and
    column headers.

Class ids of the queries and references are positions in the sorted union of their
class folder names, so the two folders may hold different classes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from superdml.core.atomic import atomic_write, write_json
from superdml.core.devices import resolve_device
from superdml.core.ownership import check_apart, check_output, claim_output
from superdml.learn.checkpoint import checkpoint_sha256, load_checkpoint
from superdml.learn.data import ImageFolderDataset
from superdml.learn.embed import Embedder, resolve_precision
from superdml.learn.metrics import retrieval_metrics
from superdml.learn.plots import plot_confusion_matrix, plot_embedding_2d, plot_similarity
from superdml.raster.classes import UNKNOWN
from superdml.search.knn import KnnVote, search
from superdml.search.reference import ReferenceIndex

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
PREDICTIONS_PARQUET = "predictions.parquet"
CONFUSION_PNG = "confusion_matrix.png"
TSNE_PNG = "tsne.png"
SIMILARITY_PNG = "similarity.png"
KNN_K = 10
TSNE_MAX_POINTS = 5000
SIMILARITY_CLASSES = 6
SIMILARITY_PER_CLASS = 3
SEED = 0
EMBED_BATCH_SIZE = 256


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
    metrics: dict[str, float]
    n_query: int
    n_reference: int
    seconds: float


# ------------------------------------------------------------------ pure functions


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the confusion matrix normalized per true class.

    Parameters
    ----------
    true, predicted : (N,) int ndarray
        Class ids in ``[0, num_classes)``.
    num_classes : int
        C.

    Returns
    -------
    (C, C) float64 ndarray
        ``[t, p]``: share of the samples of class t predicted as p. Each row sums to 1,
        or is all 0 for a class without samples.
    """
    true = np.asarray(true, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if true.shape != predicted.shape or true.ndim != 1:
        raise ValueError(
            f"true and predicted: got shapes {true.shape} and {predicted.shape}, expected (N,)"
        )
    for name, ids in (("true", true), ("predicted", predicted)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"{name}: class ids must lie in [0, {num_classes})")
    counts = np.bincount(true * num_classes + predicted, minlength=num_classes**2)
    counts = counts.reshape(num_classes, num_classes).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


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
    device: torch.device,
) -> KnnVote:
    """Vote on the queries with the labeling rule (:meth:`ReferenceIndex.vote`).

    The ``KNN_K`` nearest references vote (fewer when there are fewer); with
    `exclude_self` the queries are the references and each one's own row is left out.
    """
    k = min(KNN_K, reference.size - int(exclude_self))
    if exclude_self:
        sims, ids = search(query_emb, reference.embeddings, k, exclude_self=True)
    else:
        sims, ids = reference.search(query_emb, k, device)
    return reference.vote(sims, ids)


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


def evaluate(
    checkpoint: str | os.PathLike[str],
    query_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    reference_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
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
    device : {"auto", "cpu", "cuda"}
    precision : {"auto", "fp32", "bf16"}
        Arithmetic of the model (:func:`~superdml.learn.embed.resolve_precision`).

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
    out_dir = Path(out_dir)
    check_apart(out_dir, [p for p in (checkpoint, query_dir, reference_dir) if p is not None])
    check_output(out_dir, "evaluate")
    dev = resolve_device(device)
    resolve_precision(precision, dev)  # fails before any work
    ckpt = load_checkpoint(checkpoint)
    ckpt_sha = checkpoint_sha256(checkpoint)
    folders = [query_dir] if reference_dir is None else [query_dir, reference_dir]
    datasets = [ImageFolderDataset(f, bands=ckpt.bands, size=ckpt.input_size) for f in folders]
    class_names = sorted({name for d in datasets for name in d.class_names})
    embedder = Embedder.from_checkpoint(ckpt, dev, precision)
    embedded = []
    for dataset, what in zip(datasets, ("query", "reference"), strict=False):
        emb, labels = embedder.embed_dataset(dataset, EMBED_BATCH_SIZE, what)
        to_union = np.array([class_names.index(c) for c in dataset.class_names])
        embedded.append((emb, to_union[labels]))
    query_emb, query_labels = embedded[0]
    ref_emb, ref_labels = embedded[-1]
    exclude_self = reference_dir is None
    num_classes = len(class_names)

    metrics = retrieval_metrics(
        query_emb, query_labels, ref_emb, ref_labels, exclude_self, num_classes, knn_k=KNN_K
    )
    reference = ReferenceIndex.build(ref_emb, ref_labels, class_names, datasets[-1].files, ckpt_sha)
    vote = _classify(query_emb, reference, exclude_self, dev)
    matrix = confusion_matrix(query_labels, vote.label_ids, num_classes)

    with claim_output(out_dir, "evaluate"):
        predictions_path = _write_predictions(
            out_dir / PREDICTIONS_PARQUET, datasets[0].files, query_labels, vote, class_names
        )
        confusion_path = plot_confusion_matrix(matrix, class_names, out_dir / CONFUSION_PNG)
        points, chosen = tsne_2d(query_emb)
        tsne_path = plot_embedding_2d(points, query_labels[chosen], class_names, out_dir / TSNE_PNG)
        examples = sample_examples(query_labels)
        crops = np.stack([datasets[0].read(int(i)).numpy() for i in examples])
        similarity = query_emb[examples] @ query_emb[examples].T
        similarity_path = plot_similarity(
            crops, similarity, query_labels[examples], class_names, out_dir / SIMILARITY_PNG
        )
        present = np.unique(query_labels)
        metrics_path = out_dir / METRICS_JSON
        write_json(
            metrics_path,
            {
                "metrics": {k: float(v) for k, v in metrics.items()},
                "per_class_accuracy": {class_names[c]: float(matrix[c, c]) for c in present},
                "counts": {
                    "query": len(query_emb),
                    "reference": len(ref_emb),
                    "classes": num_classes,
                    "query_per_class": {
                        class_names[c]: int(n)
                        for c, n in zip(*np.unique(query_labels, return_counts=True), strict=True)
                    },
                },
                "inputs": {
                    "checkpoint": os.fspath(checkpoint),
                    "checkpoint_sha256": ckpt_sha,
                    "query_dir": os.fspath(query_dir),
                    "reference_dir": None if reference_dir is None else os.fspath(reference_dir),
                    "exclude_self": exclude_self,
                    "knn_k": min(KNN_K, reference.size - int(exclude_self)),
                    "class_names": class_names,
                },
            },
        )
    logger.info("%s: %s", metrics_path, metrics)
    return EvaluateResult(
        out_dir=out_dir,
        metrics_path=metrics_path,
        predictions_path=predictions_path,
        confusion_path=confusion_path,
        tsne_path=tsne_path,
        similarity_path=similarity_path,
        metrics={k: float(v) for k, v in metrics.items()},
        n_query=len(query_emb),
        n_reference=len(ref_emb),
        seconds=time.perf_counter() - start,
    )
