"""Which crops train together: the stratified train / validation split and the PK batch sampler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor
from torch.utils.data import Sampler

if TYPE_CHECKING:
    from superdml.learn.data import ImageFolderDataset


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
