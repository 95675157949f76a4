"""Labeled crop folders, batched augmentation and the PK (classes x samples) batch sampler.

A labeled folder is ``ROOT/<class>/<image>`` (PNG, JPEG or TIFF, any size). Class ids
follow the sorted folder names. Images load as RGB (3 bands) or RGBA (4 bands: the
``alpha`` crop mask mode, the superpixel mask is the fourth band).

Speed: every image is decoded once when the folder is scanned (that is also how corrupt
files are found), resized to the model's input size and, with ``preload=True`` (the
default), kept as a uint8 tensor. The transforms work on whole batches, with random
parameters drawn per sample, so :meth:`ImageFolderDataset.__getitems__` (which
:class:`torch.utils.data.DataLoader` calls with the indices of a batch) augments a batch
in a handful of tensor operations instead of one pipeline per image. With a train /
validation split on one dataset, leave its transform unset and apply the transform to
each uint8 batch in the loop (on the training device)::

    dataset = ImageFolderDataset(root, size=config.input_size)
    train_idx, val_idx = stratified_split(dataset, config.val_fraction, config.seed)
    mean, std = band_statistics(dataset, indices=train_idx)
    augment = TrainTransform(config.augment, config.input_size, mean, std)
    sampler = PKSampler([dataset.labels[i] for i in train_idx], P, K, seed=config.seed)
    loader = DataLoader(Subset(dataset, train_idx), batch_sampler=sampler)
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        for images, labels in loader:  # (N, C, S, S) uint8, (N,) int64
            images = augment(images.to(device))
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from superdml.config.schema import AugmentConfig
from superdml.core.errors import InputError, input_error, require_dir

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IMAGE_SUFFIXES_TEXT = ", ".join(IMAGE_SUFFIXES)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALPHA_MEAN = 0.5
ALPHA_STD = 0.5
MIN_STD = 1.0 / 255.0

Transform = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------- decoding


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def _decode(path: Path, bands: int | None, size: int | None) -> Tensor:
    """Decode `path` to a ``(bands, H, W)`` uint8 tensor, resized to `size` when given.

    Raises
    ------
    OSError, SyntaxError, ValueError
        When the file is not a readable image (the caller skips it).
    InputError
        When the image cannot provide `bands` bands.
    """
    with Image.open(path) as image:
        image.load()
        alpha = _has_alpha(image)
        if bands is not None and alpha != (bands == 4):
            if alpha:
                problem = (
                    f"has an alpha band ({image.mode}), expected {bands} bands: "
                    "use bands=4 for alpha-masked crops"
                )
            else:
                problem = (
                    f"has no alpha band ({image.mode}), expected 4 bands (RGB + superpixel "
                    "mask): export the crops with mask 'alpha' or use bands=3"
                )
            raise input_error(path, problem)
        array = np.asarray(image.convert("RGBA" if alpha else "RGB"))
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)
    if size is not None and pixels.shape[-2:] != (size, size):
        pixels = TF.resize(pixels, [size, size], antialias=True)
    return pixels.contiguous()


# ------------------------------------------------------------------------ dataset


class ImageFolderDataset(Dataset):
    """Labeled crops in ``ROOT/<class>/<image>`` folders.

    Every image is fully decoded once while the folder is scanned (a cheap
    ``Image.verify()`` misses truncated JPEG and TIFF files). Unreadable files (a text file
    named ``.png``, a truncated PNG) are skipped with one warning each and counted in
    `n_skipped`. Hidden files and files without an image suffix are ignored.

    Parameters
    ----------
    root : path
        The folder holding one sub-folder per class.
    bands : {3, 4} or None
        Bands per item: 3 (RGB; grayscale and palette images are converted) or 4 (RGB +
        alpha mask). None takes the band count of the first image. An image that has an
        alpha band when 3 are expected, or none when 4 are, is an error.
    size : int or None
        Side in pixels every image is resized to (antialiased) when it is decoded: the
        model's input size. None keeps each image's own size (and transforms run image by
        image).
    transform : callable, optional
        Applied to ``(C, H, W)`` uint8 items and, in :meth:`__getitems__` when `size` is
        set, to ``(N, C, H, W)`` uint8 batches (the transforms of
        :class:`TrainTransform` accepts both).
    preload : bool
        Keep the decoded images in memory, one ``(N, bands, size, size)`` uint8 tensor
        when `size` is set (``N * bands * size**2`` bytes: 16 MB per 1000 RGBA crops of
        64 px), so epochs never decode again; False decodes on every access.

    Attributes
    ----------
    class_names : list of str
        Sorted class folder names; the label of a sample is its index here.
    samples : list of (Path, int)
        Image path and label of every readable image, by class then file name.
    n_skipped : int
        Files with an image suffix that could not be read.
    bands : int
        Bands of every item.

    Raises
    ------
    MissingInputError
        When `root` is not a folder.
    InputError
        When there are no class folders with images, only one class, a class folder
        without a readable image, or an image that cannot provide `bands` bands.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        bands: int | None = None,
        size: int | None = None,
        transform: Transform | None = None,
        preload: bool = True,
    ) -> None:
        self.root = Path(root)
        require_dir(self.root, "labeled crop folder")
        if bands not in (None, 3, 4):
            raise ValueError(f"bands: got {bands!r}, expected 3 or 4")
        self.size = size
        self.transform = transform
        self.preload = preload
        self.n_skipped = 0
        folders = sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not folders:
            raise input_error(self.root, "no class folders (expected ROOT/<class>/<image>)")
        self.class_names = [f.name for f in folders]
        self.samples: list[tuple[Path, int]] = []
        cache: list[Tensor] = []
        for label, folder in enumerate(folders):
            found = 0
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    pixels = _decode(path, bands, size)
                except InputError:
                    raise
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                    logger.warning("%s: skipped, not a readable image (%s)", path, err)
                    self.n_skipped += 1
                    continue
                bands = pixels.shape[0]
                found += 1
                self.samples.append((path, label))
                if preload:
                    cache.append(pixels)
            if found == 0:
                raise input_error(
                    folder,
                    f"class folder has no readable images ({IMAGE_SUFFIXES_TEXT}): "
                    "add images or remove the folder",
                )
        if len(folders) < 2:
            raise input_error(
                self.root,
                f"only one class folder ({folders[0].name!r}); metric learning needs at "
                "least 2 classes",
            )
        self.bands = int(bands)  # type: ignore[arg-type]  # set by the first image
        # one tensor when the images share a size: cheap to index and to share with workers
        self._cache: Tensor | list[Tensor] | None = None
        if preload:
            self._cache = torch.stack(cache) if size is not None else cache

    @property
    def labels(self) -> list[int]:
        """Label of every sample, in sample order."""
        return [label for _, label in self.samples]

    @property
    def files(self) -> list[str]:
        """Path of every sample relative to the root folder (``/``-separated), in order."""
        return [path.relative_to(self.root).as_posix() for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Tensor:
        """Return sample `index` as a ``(C, H, W)`` uint8 tensor, untransformed."""
        if self._cache is not None:
            return self._cache[index]
        return _decode(self.samples[index][0], self.bands, self.size)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        pixels = self.read(index)
        if self.transform is not None:
            pixels = self.transform(pixels)
        return pixels, self.samples[index][1]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """Return the items of a whole batch, transformed in one batched call."""
        labels = [self.samples[i][1] for i in indices]
        if self.transform is None or self.size is None:
            return [self[i] for i in indices]
        if isinstance(self._cache, Tensor):
            images = self._cache[torch.as_tensor(indices, dtype=torch.long)]
        else:
            images = torch.stack([self.read(i) for i in indices])
        batch = self.transform(images)
        return list(zip(batch.unbind(0), labels, strict=True))


def _labels_of(dataset_or_labels: Any) -> np.ndarray:
    if hasattr(dataset_or_labels, "labels"):
        dataset_or_labels = dataset_or_labels.labels
    labels = np.asarray(dataset_or_labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected a 1-D sequence, got shape {labels.shape}")
    return labels


def stratified_split(
    dataset_or_labels: ImageFolderDataset | Sequence[int] | np.ndarray | Tensor,
    fraction: float,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """Split sample indices into train and validation sets class by class.

    Each class sends ``round(n * fraction)`` of its n samples to validation, but at
    least one when ``n >= 2`` and ``fraction > 0``, and always keeps at least one for
    training.

    Parameters
    ----------
    dataset_or_labels : ImageFolderDataset or (N,) int sequence
        A dataset (its `labels`) or the labels themselves.
    fraction : float
        Validation share in [0, 1).
    seed : int
        Seed of the draw; the same seed gives the same split.

    Returns
    -------
    train_indices, val_indices : list of int
        Sorted sample indices.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: got {fraction!r}, expected a number in [0, 1)")
    labels = _labels_of(dataset_or_labels)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = len(members)
        n_val = round(n * fraction)
        if fraction > 0 and n >= 2:
            n_val = max(n_val, 1)
        n_val = min(n_val, n - 1)
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)


# ------------------------------------------------------------------------ sampler


class PKSampler(Sampler[list[int]]):
    """Batch sampler of P classes x K samples per class that visits every sample.

    Each epoch, every class's shuffled indices are padded by repetition to a multiple of
    K and cut into chunks of K. A batch takes one chunk from each of P classes, drawn
    without replacement in proportion to the chunks each class has left, until every
    chunk is used. When fewer than P classes have chunks left, the batch is topped up
    with chunks re-drawn (by repetition) from other classes, so every batch holds
    ``min(P, n_classes)`` classes with exactly K samples each and metric losses always
    see negatives. With fewer than P classes in all, every batch uses all of them.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` and call
    :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); the same seed
    and epoch give the same batches.

    Parameters
    ----------
    labels : ImageFolderDataset or (N,) int sequence
        Label of every sample (a dataset's `labels` is used).
    classes_per_batch : int
        P.
    samples_per_class : int
        K.
    seed : int
        Base seed; epoch e draws from ``numpy.random.default_rng([seed, e])``.
    """

    def __init__(
        self,
        labels: ImageFolderDataset | Sequence[int] | np.ndarray | Tensor,
        classes_per_batch: int,
        samples_per_class: int,
        seed: int = 0,
    ) -> None:
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(
                "classes_per_batch and samples_per_class: expected integers >= 1, got "
                f"{classes_per_batch} and {samples_per_class}"
            )
        labels_array = _labels_of(labels)
        if labels_array.size == 0:
            raise ValueError("labels: expected at least one sample")
        self.members = [np.flatnonzero(labels_array == c) for c in np.unique(labels_array)]
        self.classes_per_batch = min(classes_per_batch, len(self.members))
        self.samples_per_class = samples_per_class
        self.seed = seed
        self.epoch = 0
        self._plan: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches :meth:`__iter__` yields."""
        self.epoch = epoch

    def _chunks(self, rng: np.random.Generator, members: np.ndarray) -> list[np.ndarray]:
        k = self.samples_per_class
        order = rng.permutation(members)
        pad = -len(order) % k
        if pad:
            order = np.concatenate([order, rng.choice(members, size=pad)])
        return list(order.reshape(-1, k))

    def batches(self) -> list[list[int]]:
        """Return this epoch's batches (lists of P * K sample indices)."""
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        p, k = self.classes_per_batch, self.samples_per_class
        chunks = [self._chunks(rng, m) for m in self.members]
        left = np.array([len(c) for c in chunks], dtype=np.float64)
        result: list[list[int]] = []
        while left.sum() > 0:
            fresh = rng.choice(
                len(chunks),
                size=min(p, int(np.count_nonzero(left))),
                replace=False,
                p=left / left.sum(),
            )
            batch = [chunks[c][len(chunks[c]) - int(left[c])] for c in fresh]
            left[fresh] -= 1
            if len(fresh) < p:
                others = np.setdiff1d(np.arange(len(chunks)), fresh)
                extra = rng.choice(others, size=p - len(fresh), replace=False)
                batch += [rng.choice(self.members[c], size=k) for c in extra]
            result.append([int(i) for chunk in batch for i in chunk])
        self._plan = (self.epoch, result)
        return result

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


# --------------------------------------------------------------------- transforms


def imagenet_statistics(bands: int) -> tuple[list[float], list[float]]:
    """Return ImageNet's per-band mean and std; a fourth (alpha) band gets 0.5 / 0.5.

    The alpha band holds the superpixel mask (0 or 1 after scaling), so 0.5 / 0.5 maps
    it to [-1, 1], the range of the normalized RGB bands.
    """
    if bands not in (3, 4):
        raise ValueError(f"bands: got {bands!r}, expected 3 or 4")
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if bands == 4:
        mean.append(ALPHA_MEAN)
        std.append(ALPHA_STD)
    return mean, std


def band_statistics(
    dataset: ImageFolderDataset,
    max_images: int | None = 2000,
    indices: Sequence[int] | None = None,
) -> tuple[list[float], list[float]]:
    """Return the per-band mean and std of a dataset's pixels, scaled to [0, 1].

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
        pixels = dataset.read(i).to(torch.float64).flatten(1) / 255.0
        total += pixels.sum(1)
        squares += (pixels * pixels).sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(MIN_STD)
    return mean.tolist(), std.tolist()


class TrainTransform(nn.Module):
    """Batched training augmentation with random parameters drawn per sample.

    Steps: scale to [0, 1] floats; resize to the input size (antialiased) when needed;
    one ``grid_sample`` applying each sample's random resized crop, flips and 90-degree
    rotation to all bands alike (alpha included, bilinear); brightness, contrast and
    saturation jitter on the first three (RGB) bands only, in that order; normalize.

    Accepts ``(C, H, W)`` or ``(N, C, H, W)`` uint8 (or float in [0, 1]) tensors and
    returns float32 ``(..., C, S, S)`` on the input's device (so a batch can be augmented
    on the GPU). Random parameters are drawn on the CPU from `generator` or torch's
    global generator (seeded per DataLoader worker).
    """

    mean: Tensor  # buffers registered in __init__
    std: Tensor

    def __init__(
        self, augment: AugmentConfig, input_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean and std: got {len(mean)} and {len(std)} values, expected equal")
        super().__init__()
        self.augment = augment
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment `images`, ``(C, H, W)`` or ``(N, C, H, W)``, into normalized floats."""
        single = images.ndim == 3
        x = images.unsqueeze(0) if single else images
        x = _to_float(x)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x,
                size=(self.input_size,) * 2,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        x = self._geometry(x, generator)
        if self.augment.color_jitter > 0:
            x = self._jitter(x, generator)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x[0] if single else x

    def _geometry(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        a = self.augment
        if not (a.hflip or a.vflip or a.rot90 or a.random_resized_crop is not None):
            return x
        n = x.shape[0]
        # theta maps output (col, row) coordinates in [-1, 1] to input coordinates:
        # input = diag(width, height) @ flips @ rotation @ output + center
        linear = torch.eye(2).repeat(n, 1, 1)
        if a.rot90:
            angle = torch.randint(0, 4, (n,), generator=generator) * (math.pi / 2)
            cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
            linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
        for axis, enabled in ((0, a.hflip), (1, a.vflip)):
            if enabled:
                sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
                linear[:, axis] = linear[:, axis] * sign[:, None]
        center = torch.zeros(n, 2)
        if a.random_resized_crop is not None:
            area = torch.empty(n).uniform_(a.random_resized_crop, 1.0, generator=generator)
            log_ratio = torch.empty(n).uniform_(
                math.log(3 / 4), math.log(4 / 3), generator=generator
            )
            width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
            height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
            center = (torch.rand(n, 2, generator=generator) * 2 - 1) * (
                1 - torch.stack([width, height], 1)
            )
            linear = linear * torch.stack([width, height], 1)[:, :, None]
        theta = torch.cat([linear, center[:, :, None]], 2).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        strength = self.augment.color_jitter
        color = x[:, :3]
        n = x.shape[0]

        def factor() -> Tensor:
            draw = torch.empty(n, 1, 1, 1).uniform_(1 - strength, 1 + strength, generator=generator)
            return draw.to(x.device)

        color = (color * factor()).clamp(0, 1)
        if color.shape[1] == 3:
            mean_gray = TF.rgb_to_grayscale(color).mean((2, 3), keepdim=True)
            color = (mean_gray + (color - mean_gray) * factor()).clamp(0, 1)
            gray = TF.rgb_to_grayscale(color)
            color = (gray + (color - gray) * factor()).clamp(0, 1)
        return torch.cat([color, x[:, 3:]], 1)


def _to_float(x: Tensor) -> Tensor:
    return x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
