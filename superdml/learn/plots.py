"""Figures: confusion matrix, 2-D embedding map and crop similarity matrix.

Pure functions of arrays that write one PNG each. They draw on a bare
:class:`matplotlib.figure.Figure` (the Agg renderer, no pyplot and no global backend
switch), so they run headless, in worker threads and inside notebooks alike. Every file
is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, ListedColormap
from matplotlib.figure import Figure

from superdml.core.atomic import atomic_write
from superdml.learn.calibration import Reliability

ANNOTATE_MAX = 16  # matrices up to this side get their values written in the cells
DPI = 120


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _listed_colors(name: str) -> Sequence[tuple[float, float, float]]:
    """Return the colors of matplotlib's qualitative colormap `name` (tab10, tab20)."""
    # these are ListedColormaps holding a tuple of RGB tuples; the stubs type it ArrayLike
    colors = cast(ListedColormap, colormaps[name]).colors
    return cast(Sequence[tuple[float, float, float]], colors)


def class_colors(n: int) -> Colormap:
    """Return a colormap of `n` distinct colors: tab10, tab20, or turbo samples beyond 20."""
    if n <= 10:
        return ListedColormap(_listed_colors("tab10")[:n])
    if n <= 20:
        return ListedColormap(_listed_colors("tab20")[:n])
    return ListedColormap(colormaps["turbo"](np.linspace(0.0, 1.0, n)))


def _annotate(ax: Axes, matrix: np.ndarray, dark: np.ndarray, offset: float) -> None:
    """Write each value in its cell, in white on `dark` cells and black elsewhere."""
    rows, cols = np.indices(matrix.shape)
    for r, c, v, d in zip(rows.ravel(), cols.ravel(), matrix.ravel(), dark.ravel(), strict=True):
        ax.text(c + offset, r + offset, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if d else "black")  # fmt: skip


def plot_confusion_matrix(
    matrix: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "kNN confusion matrix (rows: true class, normalized)",
) -> Path:
    """Draw a row-normalized confusion matrix with class names on both axes.

    Parameters
    ----------
    matrix : (C, C) float ndarray
        ``matrix[t, p]``: share of class t's samples predicted as p (rows sum to 1, or
        to 0 for a class without samples).
    class_names : sequence of str, length C
    path : path
        PNG to write.
    title : str

    Returns
    -------
    Path
        `path`.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"matrix: got shape {matrix.shape}, expected ({n}, {n})")
    side = float(np.clip(0.45 * n + 2.5, 4.0, 24.0))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(np.arange(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(np.arange(n), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= ANNOTATE_MAX:
        _annotate(ax, matrix, matrix > 0.5, 0.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_embedding_2d(
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "t-SNE of the embeddings",
) -> Path:
    """Scatter 2-D points colored by class, with a legend of class names.

    Parameters
    ----------
    points : (N, 2) float ndarray
        E.g. t-SNE coordinates of the embeddings.
    labels : (N,) int ndarray
        Class id of each point, in ``[0, C)``.
    class_names : sequence of str, length C
    path : path
        PNG to write.
    title : str

    Returns
    -------
    Path
        `path`.
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if points.ndim != 2 or points.shape[1] != 2 or labels.shape != (len(points),):
        raise ValueError(
            f"points and labels: got shapes {points.shape} and {labels.shape}, "
            "expected (N, 2) and (N,)"
        )
    colors = class_colors(len(class_names))
    fig = Figure(figsize=(8.0, 6.5))
    ax = fig.subplots()
    present = np.unique(labels)
    size = float(np.clip(3000.0 / max(len(points), 1), 2.0, 30.0))
    for c in present:
        xy = points[labels == c]
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color=colors(int(c)), label=class_names[c],
                   alpha=0.8, linewidths=0)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=2.0,
              ncols=1 + len(present) // 30, frameon=False)  # fmt: skip
    return _save(fig, path)


def _rgb(crop: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 crop -> (H, W, 3) for display (an alpha mask band is left out)."""
    return np.ascontiguousarray(np.moveaxis(crop[:3], 0, -1))


def plot_similarity(
    crops: np.ndarray,
    similarity: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "cosine similarity of sample crops",
) -> Path:
    """Draw a similarity matrix whose row and column headers are the crops themselves.

    Parameters
    ----------
    crops : (M, C, H, W) uint8 ndarray
        The crops, grouped by class; C is 3 or 4 (the alpha mask band is not drawn).
    similarity : (M, M) float ndarray
        Cosine similarity between the crops' embeddings, in [-1, 1].
    labels : (M,) int ndarray
        Class id of each crop; class names label the rows and columns.
    class_names : sequence of str
    path : path
        PNG to write.
    title : str

    Returns
    -------
    Path
        `path`.
    """
    crops = np.asarray(crops)
    similarity = np.asarray(similarity, dtype=np.float64)
    m = len(crops)
    if crops.ndim != 4 or similarity.shape != (m, m) or len(labels) != m:
        raise ValueError(
            f"crops, similarity and labels: got shapes {crops.shape}, {similarity.shape} and "
            f"{np.shape(labels)}, expected (M, C, H, W), (M, M) and (M,)"
        )
    side = float(np.clip(0.55 * m + 2.5, 4.0, 24.0))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    # y grows downwards; the matrix fills [0, m) x [0, m), crops sit in the margin [-1, 0)
    image = ax.imshow(similarity, cmap="viridis", vmin=-1.0, vmax=1.0, extent=(0, m, m, 0))
    pad = 0.06
    for i, crop in enumerate(crops):
        rgb = _rgb(crop)
        ax.imshow(rgb, extent=(-1 + pad, -pad, i + 1 - pad, i + pad))
        ax.imshow(rgb, extent=(i + pad, i + 1 - pad, -pad, -1 + pad))
    ax.set_xlim(-1.0, m)
    ax.set_ylim(m, -1.0)
    names = [class_names[int(c)] for c in labels]
    ax.set_xticks(np.arange(m) + 0.5, labels=names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(np.arange(m) + 0.5, labels=names, fontsize=8)
    ax.tick_params(length=0)
    edges = np.flatnonzero(np.diff(np.asarray(labels))) + 1
    for e in edges:
        ax.axhline(float(e), xmin=1.0 / (m + 1), color="white", linewidth=1.5)
        ax.axvline(float(e), ymax=m / (m + 1), color="white", linewidth=1.5)
    if m <= ANNOTATE_MAX:
        _annotate(ax, similarity, similarity < 0.2, 0.5)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_reliability(reliability: Reliability, ece: float, path: str | os.PathLike[str]) -> Path:
    """Draw a reliability diagram: accuracy against mean score per score bin.

    Parameters
    ----------
    reliability : Reliability
        :func:`superdml.learn.calibration.reliability_bins` of the scores.
    ece : float
        The expected calibration error, shown in the title.
    path : path
        PNG to write.

    Returns
    -------
    Path
        `path`.
    """
    edges = reliability.edges
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = reliability.counts > 0
    fig = Figure(figsize=(5.0, 5.0))
    ax = fig.subplots()
    ax.bar(centers[filled], reliability.accuracy[filled], width[filled] * 0.9,
           color="tab:blue", label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    ax.plot(reliability.mean_score[filled], reliability.accuracy[filled], "o", color="tab:orange",
            label="mean score")  # fmt: skip
    for x, n in zip(centers[filled], reliability.counts[filled], strict=True):
        ax.annotate(str(int(n)), (x, 0.02), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="score (vote share)", ylabel="share labeled right",
           title=f"reliability, ECE {ece:.3f}")  # fmt: skip
    ax.legend(loc="upper left")
    return _save(fig, path)
