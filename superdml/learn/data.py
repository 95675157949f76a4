"""Labeled crop folders: scanned, decoded once and read by the batch.

A labeled folder is ``ROOT/<class>/<image>`` (PNG, JPEG or TIFF, any size). Class ids
follow the sorted folder names. Images load as RGB (3 bands) or RGBA (4 bands: the
``alpha`` crop mask mode, the superpixel mask is the fourth band). Under a crop rule of
chips (:attr:`CropRule.chips <superdml.crops.rule.CropRule.chips>`: lossless, or with a
context view; the folder's own ``crops.parquet`` or the checkpoint's) the items are the
TIFF chips (every band at its dtype), read with tifffile and scaled by the rule
(:meth:`CropRule.to_unit`): float32 (lossless) or uint8; the preview PNGs beside them
are ignored.

Speed: every image is decoded once when the folder is scanned (that is also how corrupt
files are found), resized to the model's input size and, with ``preload=True`` (the
default), kept as a uint8 tensor. The transforms work on whole batches, with random
parameters drawn per sample, so :meth:`ImageFolderDataset.__getitems__` (which
:class:`torch.utils.data.DataLoader` calls with the indices of a batch) augments a batch
in a handful of tensor operations instead of one pipeline per image. With a train /
validation split on one dataset (:mod:`~superdml.learn.sampling`), leave its transform
unset and apply the transform (:mod:`~superdml.learn.augment`, normalized with
:mod:`~superdml.learn.normalization`) to each uint8 batch in the loop (on the training
device)::

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
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from superdml.core.errors import InputError, input_error, require_dir
from superdml.crops.rule import CropRule, read_crop_rule

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IMAGE_SUFFIXES_TEXT = ", ".join(IMAGE_SUFFIXES)

Transform = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------- decoding


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def _decode_chip(path: Path, rule: CropRule, size: int | None) -> Tensor:
    """Decode a TIFF chip to a ``(C, H, W)`` tensor in the model's units (or uint8).

    Raises
    ------
    OSError, ValueError
        When the file is not a readable TIFF (the caller skips it).
    InputError
        When the chip's bands or dtype are not the crop rule's.
    """
    try:
        array = tifffile.imread(path)
    except tifffile.TiffFileError as err:
        raise ValueError(str(err)) from None
    if array.ndim == 2:
        array = array[None]
    if array.shape[0] != rule.channels or array.dtype != np.dtype(rule.chip_dtype):
        raise input_error(
            path,
            f"holds {array.shape[0]} {array.dtype} band(s), the crop rule takes "
            f"{rule.channels} {rule.chip_dtype} band(s): crop it again with this crop rule",
        )
    pixels = torch.from_numpy(rule.to_unit(array))
    if size is not None and pixels.shape[-2:] != (size, size):
        pixels = TF.resize(pixels, [size, size], antialias=True)
    return pixels.contiguous()


def _decode(
    path: Path, bands: int | None, size: int | None, rule: CropRule | None = None
) -> Tensor:
    """Decode `path` to a ``(bands, H, W)`` tensor, resized to `size` when given.

    uint8 for images; for the TIFF chips of a `rule` of chips (:func:`_decode_chip`),
    float32 in the model's units (lossless) or uint8.

    Raises
    ------
    OSError, SyntaxError, ValueError
        When the file is not a readable image (the caller skips it).
    InputError
        When the image cannot provide `bands` bands.
    """
    if rule is not None and rule.chips:
        return _decode_chip(path, rule, size)
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
        alpha band when 3 are expected, or none when 4 are, is an error. Under a
        `rule` of chips the rule's channels (any count).
    size : int or None
        Side in pixels every image is resized to (antialiased) when it is decoded: the
        model's input size. None keeps each image's own size (and transforms run image by
        image).
    transform : callable, optional
        Applied to ``(C, H, W)`` uint8 items and, in :meth:`__getitems__` when `size` is
        set, to ``(N, C, H, W)`` uint8 batches (the transforms of
        :class:`~superdml.learn.augment.TrainTransform` accepts both).
    preload : bool
        Keep the decoded images in memory, one ``(N, bands, size, size)`` uint8 tensor
        when `size` is set (``N * bands * size**2`` bytes: 16 MB per 1000 RGBA crops of
        64 px), so epochs never decode again; False decodes on every access.
    rule : CropRule, optional
        The crop rule of the crops (a checkpoint's); read from the folder's
        ``crops.parquet`` (or one level up) when None. A rule of chips (lossless, or
        with a context view) makes the items its TIFF chips (``.tif``), scaled by the
        rule; the preview PNGs beside them are ignored.

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
        rule: CropRule | None = None,
    ) -> None:
        self.root = Path(root)
        require_dir(self.root, "labeled crop folder")
        self.rule = rule if rule is not None else read_crop_rule(self.root)
        chips = self.rule is not None and self.rule.chips
        if chips:
            bands = self.rule.channels  # type: ignore[union-attr]  # chips: a rule
        elif bands not in (None, 3, 4):
            raise ValueError(f"bands: got {bands!r}, expected 3 or 4")
        suffixes = (".tif", ".tiff") if chips else IMAGE_SUFFIXES
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
                if path.name.startswith(".") or path.suffix.lower() not in suffixes:
                    continue
                try:
                    pixels = _decode(path, bands, size, self.rule)
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
        """Return sample `index` as a ``(C, H, W)`` tensor, untransformed.

        uint8, or float32 in the model's units for the chips of a lossless rule.
        """
        if self._cache is not None:
            return self._cache[index]
        return _decode(self.samples[index][0], self.bands, self.size, self.rule)

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
