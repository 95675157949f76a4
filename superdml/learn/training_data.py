"""The crops of a training run: split, normalized and augmented views of one preloaded copy.

Training augments its split; validation embeds the held-out crops (or ``--val-dir``)
against the training split without augmentation, as labeling does later.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from superdml.config.schema import TrainConfig
from superdml.core.errors import input_error
from superdml.crops.rule import check_context, read_crop_rule
from superdml.learn.augment import TrainTransform
from superdml.learn.data import ImageFolderDataset
from superdml.learn.normalization import band_statistics, imagenet_statistics
from superdml.learn.sampling import stratified_split


@dataclass(frozen=True)
class TrainingData:
    """The datasets of a run, all sharing one preloaded copy of the training crops."""

    class_names: list[str]
    bands: int
    mean: list[float]
    std: list[float]
    crop_rule: dict[str, Any] | None
    train: Dataset  # training split, augmented
    train_labels: np.ndarray  # (N,) labels of `train`
    references: Dataset  # training split, uint8 (the Embedder normalizes)
    val: Dataset | None  # validation crops, uint8
    val_classes: np.ndarray | None  # (C_val,) training class id of each val class id


def _view(
    dataset: ImageFolderDataset, indices: Sequence[int], transform: Callable | None
) -> Subset:
    """Return samples `indices` of `dataset` under `transform`, sharing its preloaded crops."""
    view = copy.copy(dataset)
    view.transform = transform
    return Subset(view, list(indices))


def load_training_data(
    train_dir: Path,
    val_dir: Path | None,
    config: TrainConfig,
    statistics: tuple[list[float], list[float]] | None = None,
) -> TrainingData:
    """Scan the folders, split, measure the band statistics and build the augmentation.

    Parameters
    ----------
    train_dir : Path
        Labeled crops; a ``crops.parquet`` there (or one level up) gives the crop rule.
    val_dir : Path or None
        Validation crops; without them a stratified ``config.val_fraction`` of
        `train_dir` is held out.
    config : TrainConfig
    statistics : (mean, std), optional
        Normalization to keep (a resumed run's) instead of measuring it.

    Raises
    ------
    InputError
        When `val_dir` holds a class the training folder lacks.
    """
    rule = read_crop_rule(train_dir)
    base = ImageFolderDataset(
        train_dir,
        bands=rule.channels if rule is not None else None,
        size=config.input_size,
        rule=rule,
    )
    if val_dir is None:
        train_idx, val_idx = stratified_split(base, config.val_fraction, config.seed)
    else:
        train_idx, val_idx = list(range(len(base))), []
    if statistics is not None:
        mean, std = statistics
    elif config.normalization == "dataset":
        mean, std = band_statistics(base, indices=train_idx)
    elif rule is None:
        mean, std = imagenet_statistics(base.bands)
    else:
        views = 1 if rule.context is None else 2
        mean, std = imagenet_statistics(base.bands, rule.mask == "alpha", views)
    context_band = rule.view_bands if rule is not None and rule.context is not None else None
    train_tf = TrainTransform(config.augment, config.input_size, mean, std, context_band)
    val: Dataset | None = None
    val_classes = None
    if val_dir is not None:
        check_context(rule, val_dir, f"the training folder {train_dir}")
        val = ImageFolderDataset(val_dir, bands=base.bands, size=config.input_size, rule=rule)
        unknown = [c for c in val.class_names if c not in base.class_names]
        if unknown:
            raise input_error(
                Path(val_dir) / unknown[0],
                f"validation class {unknown[0]!r} is not a class of the training folder "
                f"{train_dir}: remove it or add it to the training folder",
            )
        val_classes = np.array([base.class_names.index(c) for c in val.class_names])
    elif val_idx:
        val = _view(base, val_idx, None)
        val_classes = np.arange(len(base.class_names))
    return TrainingData(
        class_names=list(base.class_names),
        bands=base.bands,
        mean=list(mean),
        std=list(std),
        crop_rule=rule.to_dict() if rule is not None else None,
        train=_view(base, train_idx, train_tf),
        train_labels=np.asarray(base.labels)[train_idx],
        references=_view(base, train_idx, None),
        val=val,
        val_classes=val_classes,
    )
