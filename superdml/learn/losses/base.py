"""The base class every metric loss derives from, and the proxy warm-start helper.

As in pytorch-metric-learning's ``BaseMetricLossFunction``, :meth:`MetricLoss.forward`
validates the batch (shapes, dtypes, label range) and then calls the subclass's
:meth:`MetricLoss.compute_loss`, which holds only the paper's formula. The loss is
computed with autocast disabled and in float32 at least (half-precision embeddings are
upcast), so an AMP training loop may call it inside its autocast region.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from superdml.config.schema import check
from superdml.core.errors import CheckpointError, InputError

__all__ = ["MetricLoss", "transfer_proxies"]

_NOT_HYPERPARAMETERS = ("self", "num_classes", "embedding_size")


def check_number(value: Any, key: str, minimum: float, *, strict: bool = False) -> None:
    """Raise ConfigError naming `key` unless `value` is a real number >= (or >) `minimum`."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = is_number and (value > minimum if strict else value >= minimum)
    expected = f"a number {'>' if strict else '>='} {minimum:g}"
    check(ok, key, value, expected)


def check_integer(value: Any, key: str, minimum: int) -> None:
    """Raise ConfigError naming `key` unless `value` is an integer >= `minimum`."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    check(ok, key, value, f"an integer >= {minimum}")


class MetricLoss(nn.Module):
    """Base class of the metric losses: validates a batch, then applies the formula.

    Subclasses implement :meth:`compute_loss`, the formula alone. Learned
    class representatives (proxies, centers) are ``nn.Parameter`` attributes named in
    :attr:`class_parameters`, stored class-major: rows ``c*K ... c*K+K-1`` belong to
    class ``c``, so :func:`transfer_proxies` can carry them over to a new class list.

    Parameters
    ----------
    num_classes : int
        Number of classes; labels must lie in ``[0, num_classes)``.
    embedding_size : int
        Embedding dimension D.
    """

    #: Names of the class-major learned parameters (proxies / centers) of the loss.
    class_parameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        check_integer(num_classes, "num_classes", 1)
        check_integer(embedding_size, "embedding_size", 1)
        self.num_classes = num_classes
        self.embedding_size = embedding_size

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The keyword hyper-parameters of the loss, e.g. ``{"margin": 0.2, ...}``.

        ``get_loss(name, num_classes, embedding_size, **loss.hyperparameters)`` rebuilds it.
        """
        names = inspect.signature(type(self).__init__).parameters
        return {n: getattr(self, n) for n in names if n not in _NOT_HYPERPARAMETERS}

    def extra_repr(self) -> str:
        """Show the hyper-parameters in ``repr(loss)``."""
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())

    @property
    def has_parameters(self) -> bool:
        """Whether the loss has learned parameters (needs its own optimizer group)."""
        return any(True for _ in self.parameters())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss of a batch.

        Parameters
        ----------
        embeddings : (N, D) float tensor
            L2-normalized embeddings (the losses use them as given).
        labels : (N,) int64 tensor
            Class ids in ``[0, num_classes)``.

        Returns
        -------
        loss : () float tensor
            The loss, differentiable with respect to `embeddings` and the parameters.

        Raises
        ------
        InputError
            On a wrong shape, dtype or device, or a label out of range.
        """
        self._validate(embeddings, labels)
        if embeddings.dtype in (torch.float16, torch.bfloat16):
            embeddings = embeddings.float()
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.compute_loss(embeddings, labels)

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the loss of a validated batch; implemented by each loss.

        Parameters
        ----------
        embeddings : (N, D) float tensor
            Embeddings, float32 or float64.
        labels : (N,) int64 tensor
            Class ids in ``[0, num_classes)``.
        """
        raise NotImplementedError

    def _validate(self, embeddings: Any, labels: Any) -> None:
        if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise InputError(
                f"loss inputs: expected torch tensors, got {type(embeddings).__name__} "
                f"embeddings and {type(labels).__name__} labels"
            )
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise InputError(
                f"embeddings: got shape {tuple(embeddings.shape)}, "
                f"expected (N, {self.embedding_size})"
            )
        if not embeddings.is_floating_point():
            raise InputError(f"embeddings: got dtype {embeddings.dtype}, expected a float dtype")
        if embeddings.shape[0] == 0:
            raise InputError("embeddings: got an empty batch, expected at least one row")
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise InputError(
                f"labels: got shape {tuple(labels.shape)}, expected ({embeddings.shape[0]},) "
                "to match the embeddings"
            )
        if labels.dtype != torch.int64:
            raise InputError(f"labels: got dtype {labels.dtype}, expected torch.int64")
        if labels.device != embeddings.device:
            raise InputError(
                f"labels: on {labels.device}, embeddings on {embeddings.device}; "
                "expected the same device"
            )
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            bad = low if low < 0 else high
            raise InputError(
                f"labels: got class id {bad}, expected ids in [0, {self.num_classes}) "
                f"(num_classes={self.num_classes})"
            )

    def zero_loss(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return a zero loss still connected to the graph (``backward`` works on it)."""
        return embeddings.sum() * 0.0


def transfer_proxies(
    old_state_dict: Mapping[str, torch.Tensor],
    old_class_names: Sequence[str],
    new_loss: MetricLoss,
    new_class_names: Sequence[str],
) -> list[str]:
    """Copy the proxies/centers of classes shared by an old and a new loss (warm start).

    For every parameter in ``new_loss.class_parameters``, the rows of each class whose name
    appears in both lists are copied from `old_state_dict` into `new_loss` (in place);
    classes new to `new_class_names` keep their fresh initialization. Classes are matched
    by name, so the order of the two lists may differ.

    Parameters
    ----------
    old_state_dict : mapping of str to tensor
        ``state_dict()`` of the previous loss (same loss type and embedding size).
    old_class_names : sequence of str
        Class names of the previous loss, in class-id order.
    new_loss : MetricLoss
        The freshly built loss to update.
    new_class_names : sequence of str
        Class names of `new_loss`, in class-id order.

    Returns
    -------
    shared : list of str
        Names of the classes whose proxies were carried over, in new class-id order.

    Raises
    ------
    InputError
        If a class list has duplicates or `new_class_names` does not match the loss.
    CheckpointError
        If `old_state_dict` lacks a parameter or its shape does not fit.
    """
    for what, names in (("old_class_names", old_class_names), ("new_class_names", new_class_names)):
        if len(set(names)) != len(names):
            raise InputError(f"{what}: class names must be unique, got {list(names)}")
    if len(new_class_names) != new_loss.num_classes:
        raise InputError(
            f"new_class_names: got {len(new_class_names)} names, the loss has "
            f"{new_loss.num_classes} classes"
        )
    if not new_loss.class_parameters:
        return []
    old_index = {name: i for i, name in enumerate(old_class_names)}
    pairs = [(old_index[n], i) for i, n in enumerate(new_class_names) if n in old_index]
    old_ids = torch.tensor([o for o, _ in pairs], dtype=torch.int64)
    new_ids = torch.tensor([n for _, n in pairs], dtype=torch.int64)
    for name in new_loss.class_parameters:
        param: torch.Tensor = getattr(new_loss, name)
        if name not in old_state_dict:
            raise CheckpointError(f"loss state: no {name!r} to warm-start from")
        old = old_state_dict[name]
        rows_per_class = param.shape[0] // new_loss.num_classes
        expected = (len(old_class_names) * rows_per_class, *param.shape[1:])
        if tuple(old.shape) != expected:
            raise CheckpointError(
                f"loss state: {name!r} has shape {tuple(old.shape)}, expected {expected} "
                f"({len(old_class_names)} classes x {rows_per_class} rows, embedding size "
                f"{param.shape[1]})"
            )
        offsets = torch.arange(rows_per_class)
        src = (old_ids[:, None] * rows_per_class + offsets).reshape(-1)
        dst = (new_ids[:, None] * rows_per_class + offsets).reshape(-1)
        with torch.no_grad():
            param[dst.to(param.device)] = old[src.to(old.device)].to(param)
    return [new_class_names[i] for _, i in pairs]
