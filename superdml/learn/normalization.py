"""Input normalization: the per-band mean and std a model's inputs are scaled with.

ImageNet's statistics (with 0.5 / 0.5 for the alpha band) or those of the training
crops (``normalization: dataset``); the checkpoint records which, and the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from superdml.learn.data import ImageFolderDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALPHA_MEAN = 0.5
ALPHA_STD = 0.5
MIN_STD = 1.0 / 255.0


def imagenet_statistics(
    bands: int, alpha: bool | None = None, views: int = 1
) -> tuple[list[float], list[float]]:
    """Return ImageNet's per-band mean and std; an alpha band gets 0.5 / 0.5.

    The alpha band holds the superpixel mask (0 or 1 after scaling), so 0.5 / 0.5 maps
    it to [-1, 1], the range of the normalized RGB bands. Bands beyond the first three
    (the extra bands of lossless crops, in [0, 1] between their 1st and 99th
    percentiles) get the mean of ImageNet's three values. A context view's bands get
    the values of the crop's.

    Parameters
    ----------
    bands : int
        Bands of a crop, the alpha band and a context view's bands included.
    alpha : bool, optional
        Whether the last band is the alpha mask; None: when there are 4 bands (the
        8-bit color rule's RGBA crops).
    views : int
        1, or 2 when the crop's bands are followed by its context view's.
    """
    if bands < 1:
        raise ValueError(f"bands: got {bands!r}, expected >= 1")
    alpha = bands == 4 if alpha is None else alpha
    data = (bands - int(alpha)) // views
    extra_mean, extra_std = float(np.mean(IMAGENET_MEAN)), float(np.mean(IMAGENET_STD))
    mean = [*IMAGENET_MEAN, *[extra_mean] * max(0, data - 3)][:data] * views
    std = [*IMAGENET_STD, *[extra_std] * max(0, data - 3)][:data] * views
    if alpha:
        mean.append(ALPHA_MEAN)
        std.append(ALPHA_STD)
    return mean, std


def band_statistics(
    dataset: ImageFolderDataset,
    max_images: int | None = 2000,
    indices: Sequence[int] | None = None,
) -> tuple[list[float], list[float]]:
    """Return the per-band mean and std of a dataset's pixels in the model's units.

    uint8 images count scaled to [0, 1]; float ones (lossless chips) as they are.

    Statistics are over pixels (every pixel of every image counts once), accumulated
    in float64. With more than `max_images` images, evenly spaced ones are used (samples
    are ordered by class, so every class contributes); the result is deterministic.
    A std below 1/255 (a constant band) is raised to 1/255.

    Parameters
    ----------
    dataset : ImageFolderDataset
        Read untransformed through :meth:`ImageFolderDataset.read`.
    max_images : int or None
        Cap on the images read; None reads all.
    indices : sequence of int, optional
        Restrict to these samples (the training split).

    Returns
    -------
    mean, std : list of float
        One value per band.
    """
    chosen = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
    if chosen.size == 0:
        raise ValueError("band_statistics: no images to compute statistics from")
    if max_images is not None and chosen.size > max_images:
        chosen = chosen[np.linspace(0, chosen.size - 1, max_images).round().astype(np.int64)]
    total = torch.zeros(dataset.bands, dtype=torch.float64)
    squares = torch.zeros(dataset.bands, dtype=torch.float64)
    count = 0
    for i in chosen.tolist():
        image = dataset.read(i)
        pixels = image.to(torch.float64).flatten(1)
        if image.dtype == torch.uint8:
            pixels = pixels / 255.0
        total += pixels.sum(1)
        squares += (pixels * pixels).sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(MIN_STD)
    return mean.tolist(), std.tolist()
