"""Loss registry: build a loss by its config name with validated keyword parameters."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from superdml.core.errors import ConfigError, did_you_mean
from superdml.learn.losses.base import MetricLoss
from superdml.learn.losses.proxy_anchor import ProxyAnchorLoss
from superdml.learn.losses.proxy_nca import ProxyNCALoss
from superdml.learn.losses.soft_triple import SoftTripleLoss
from superdml.learn.losses.triplet import TripletLoss

__all__ = ["LOSSES", "get_loss", "loss_parameters"]

#: Config name -> loss class.
LOSSES: Mapping[str, type[MetricLoss]] = MappingProxyType(
    {
        "proxy_anchor": ProxyAnchorLoss,
        "proxy_nca": ProxyNCALoss,
        "soft_triple": SoftTripleLoss,
        "triplet": TripletLoss,
    }
)


def _loss_class(name: str) -> type[MetricLoss]:
    if name not in LOSSES:
        hint = did_you_mean(name, LOSSES)
        raise ConfigError(f"loss: got {name!r}, expected one of {', '.join(LOSSES)}{hint}")
    return LOSSES[name]


def loss_parameters(name: str) -> dict[str, Any]:
    """Return the hyper-parameters of loss `name` with their defaults.

    Parameters
    ----------
    name : str
        A key of :data:`LOSSES`.

    Returns
    -------
    params : dict of str to object
        ``{parameter: default}`` in signature order (``num_classes`` and
        ``embedding_size`` excluded).

    Raises
    ------
    ConfigError
        If `name` is not a known loss.
    """
    signature = inspect.signature(_loss_class(name).__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name not in ("self", "num_classes", "embedding_size")
    }


def get_loss(name: str, num_classes: int, embedding_size: int, **params: Any) -> MetricLoss:
    """Build the loss registered as `name`.

    Parameters
    ----------
    name : {"proxy_anchor", "proxy_nca", "soft_triple", "triplet"}
        Config name of the loss.
    num_classes : int
        Number of classes.
    embedding_size : int
        Embedding dimension D.
    **params
        Hyper-parameters of that loss (see :func:`loss_parameters`); missing ones keep
        their defaults.

    Returns
    -------
    loss : MetricLoss
        The loss module; its proxies/centers (if any) are freshly initialized from
        torch's global RNG.

    Raises
    ------
    ConfigError
        On an unknown loss name (listing the known ones), an unknown parameter (naming
        it) or an invalid value (naming the key).
    """
    cls = _loss_class(name)
    known = loss_parameters(name)
    for key in params:
        if key not in known:
            hint = did_you_mean(key, known)
            raise ConfigError(
                f"{name}: unknown parameter {key!r}{hint}; expected some of {', '.join(known)}"
            )
    return cls(num_classes, embedding_size, **params)
