"""Label a few images by kNN against a reference: ``superdml infer``.

:func:`infer` embeds each image with a checkpoint's model (the same decoding, resizing
and normalization as the reference crops) and labels it by the labeling rule of
``superdml label`` (a :class:`~superdml.config.schema.VoteConfig`: the k nearest
references vote, with label's weighting, temperature and unknown threshold), taken from
a saved reference folder (``superdml index``) or embedded on the fly from a labeled crop
folder. The same label config gives an image the label ``label`` gives its superpixel.
:func:`plot_neighbours` draws each image next to its neighbours.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from superdml.config.schema import IndexConfig, VoteConfig
from superdml.core.atomic import atomic_write
from superdml.core.devices import resolve_device
from superdml.core.errors import ConfigError, InputError, input_error, require_file
from superdml.crops.rule import CropRule
from superdml.label.reference_folder import reference_from_folder
from superdml.learn.checkpoint import checkpoint_sha256, load_checkpoint
from superdml.learn.data import IMAGE_SUFFIXES, IMAGE_SUFFIXES_TEXT, _decode
from superdml.learn.embed import Embedder, resolve_precision
from superdml.raster.class_names import UNKNOWN
from superdml.search.reference import ReferenceIndex
from superdml.search.vote import UNKNOWN_LABEL

__all__ = ["InferResult", "Neighbour", "infer", "plot_neighbours"]

logger = logging.getLogger(__name__)

CELL_INCHES = 1.7
DPI = 120


@dataclass(frozen=True)
class Neighbour:
    """One of the nearest references of an image.

    Attributes
    ----------
    file : str
        The reference crop, relative to the reference's crop folder.
    path : Path or None
        Its absolute path, when the reference knows its crop folder.
    label : str
        Its class.
    similarity : float
        Cosine similarity to the image.
    """

    file: str
    path: Path | None
    label: str
    similarity: float


@dataclass(frozen=True)
class InferResult:
    """The kNN label of one image.

    Attributes
    ----------
    image : Path
        The image.
    label : str
        Predicted class (``unknown`` when no neighbour carried weight, or the nearest
        reference is less similar than the unknown threshold).
    label_id : int
        Index of `label` in the reference's class names, -1 for unknown.
    score : float
        Share of the predicted class in the vote, 0..1.
    margin : float
        Its share minus the runner-up's.
    neighbours : tuple of Neighbour
        The k nearest references, nearest first.
    """

    image: Path
    label: str
    label_id: int
    score: float
    margin: float
    neighbours: tuple[Neighbour, ...]


def _read_images(
    paths: Sequence[Path], bands: int, size: int, rule: CropRule | None = None
) -> Tensor:
    """Decode images as the reference crops are: an ``(N, bands, size, size)`` tensor.

    uint8, or the TIFF chips of a lossless or context crop `rule` (the checkpoint's).

    Raises
    ------
    MissingInputError
        When an image does not exist.
    InputError
        Naming the image when it has another suffix than PNG/JPEG/TIFF, cannot be read,
        or cannot provide `bands` bands.
    """
    images = []
    for path in paths:
        require_file(path, "image")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise input_error(path, f"not an image file (expected {IMAGE_SUFFIXES_TEXT})")
        try:
            images.append(_decode(path, bands, size, rule))
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise input_error(path, f"not a readable image ({err})") from None
    return torch.stack(images)


def infer(
    images: Sequence[str | os.PathLike[str]],
    checkpoint: str | os.PathLike[str],
    reference: str | os.PathLike[str] | None = None,
    reference_dir: str | os.PathLike[str] | None = None,
    config: VoteConfig | None = None,
    device: str = "auto",
) -> list[InferResult]:
    """Label images by the labeling rule: the vote of their k nearest references.

    Parameters
    ----------
    images : sequence of path
        PNG, JPEG or TIFF images (crops like the reference's; resized to the model's
        input size).
    checkpoint : path
        A ``superdml train`` checkpoint.
    reference : path, optional
        A reference folder written by ``superdml index`` with this checkpoint.
    reference_dir : path, optional
        A labeled crop folder (``<class>/<image>``) to embed in memory instead.
        Exactly one of `reference` and `reference_dir` is needed.
    config : VoteConfig, optional
        The labeling rule (``k``, at most the reference size, ``weighting``,
        ``temperature``, ``unknown_threshold``), batch size and model arithmetic, as
        ``label`` applies them (a :class:`~superdml.config.schema.LabelConfig` is one);
        the defaults when None.
    device : {"auto", "cpu", "cuda"}
        Where the model and the search run.

    Returns
    -------
    list of InferResult
        One per image, in order.

    Raises
    ------
    ConfigError
        Without exactly one reference source, or on an unusable device or precision.
    CheckpointError
        When `checkpoint` is not a superdml checkpoint.
    MissingInputError, InputError
        On a missing or unreadable image (named), an unusable reference, a reference
        made with another checkpoint, or `k` larger than the reference.
    """
    if (reference is None) == (reference_dir is None):
        raise ConfigError(
            "reference: give a reference folder (--reference) or a labeled crop folder "
            "(--reference-dir), exactly one of them"
        )
    rule = VoteConfig() if config is None else config
    dev = resolve_device(device)
    resolve_precision(rule.precision, dev)  # fails before any work
    ckpt = load_checkpoint(checkpoint)
    ckpt_sha = checkpoint_sha256(checkpoint)
    ref = None if reference is None else ReferenceIndex.load(reference)
    if ref is not None:
        ref.check_checkpoint(ckpt_sha, checkpoint)
    paths = [Path(p) for p in images]
    pixels = _read_images(paths, ckpt.bands, ckpt.input_size, ckpt.rule)
    embedder = Embedder.from_checkpoint(ckpt, dev, rule.precision, rule.tta)
    if ref is None:
        # exactly one of reference and reference_dir is given (checked above)
        folder = cast("str | os.PathLike[str]", reference_dir)
        embedding = IndexConfig(batch_size=rule.batch_size, precision=rule.precision, tta=rule.tta)
        ref = reference_from_folder(ckpt, ckpt_sha, folder, dev, embedding, embedder)
    embeddings = embedder(pixels, rule.batch_size)
    sims, ids = ref.search(embeddings, rule.k, dev)
    vote = ref.vote(sims, ids, rule, embeddings)
    names, files, labels = ref.class_names, ref.files, ref.labels
    root = ref.root
    results = []
    for i, path in enumerate(paths):
        label_id = int(vote.label_ids[i])
        neighbours = tuple(
            Neighbour(
                file=files[j],
                path=None if root is None else root / files[j],
                label=names[labels[j]],
                similarity=float(s),
            )
            for s, j in zip(sims[i], ids[i], strict=True)
            if j >= 0
        )
        results.append(
            InferResult(
                image=path,
                label=UNKNOWN if label_id == UNKNOWN_LABEL else names[label_id],
                label_id=label_id,
                score=float(vote.scores[i]),
                margin=float(vote.margins[i]),
                neighbours=neighbours,
            )
        )
    return results


def _show(ax: Axes, path: Path | None, title: str) -> None:
    """Draw the image at `path` (RGB) in `ax` under `title`; a note when it is missing."""
    ax.set_axis_off()
    ax.set_title(title, fontsize=7)
    if path is None or not path.is_file():
        ax.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=7, color="gray")
        return
    with Image.open(path) as image:
        ax.imshow(np.asarray(image.convert("RGB")))


def plot_neighbours(results: Sequence[InferResult], path: str | os.PathLike[str]) -> Path:
    """Draw each image (first column) next to its nearest references, one row per image.

    Image titles give the predicted class and its score; reference titles their class
    and similarity. References whose crop is no longer on disk are marked "missing".
    The format follows the suffix of `path` (PNG, PDF, SVG, ...); the file is written
    atomically.

    Parameters
    ----------
    results : sequence of InferResult
        From :func:`infer`; not empty.
    path : path
        The figure file.

    Returns
    -------
    Path
        `path`.

    Raises
    ------
    InputError
        When there is nothing to draw or the suffix is not a matplotlib format.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise input_error(path, "unsupported figure format: use .png, .pdf or .svg")
    if not results:
        raise input_error(path, "no images to plot")
    cols = 1 + max(len(r.neighbours) for r in results)
    fig = Figure(figsize=(CELL_INCHES * cols, (CELL_INCHES + 0.3) * len(results)))
    axes = fig.subplots(len(results), cols, squeeze=False)
    for row, result in zip(axes, results, strict=True):
        _show(row[0], result.image, f"{result.image.name}\n{result.label} ({result.score:.2f})")
        for ax, neighbour in zip(row[1:], result.neighbours, strict=False):
            _show(ax, neighbour.path, f"{neighbour.label}\n{neighbour.similarity:.3f}")
        for ax in row[1 + len(result.neighbours) :]:
            ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight")
    return path
