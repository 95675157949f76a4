"""Metric losses: triplet, ProxyNCA, Proxy-Anchor and SoftTriple, and their registry.

Every loss is an ``nn.Module`` called as ``loss(embeddings, labels)`` on L2-normalized
``(N, D)`` embeddings and ``(N,)`` int64 labels, returning a scalar. Learned proxies and
centers are parameters of the loss module (train them in their own optimizer group,
save them with ``state_dict``).
"""

from superdml.learn.losses.base import MetricLoss, transfer_proxies
from superdml.learn.losses.proxy_anchor import ProxyAnchorLoss
from superdml.learn.losses.proxy_nca import ProxyNCALoss
from superdml.learn.losses.registry import LOSSES, get_loss, loss_parameters
from superdml.learn.losses.soft_triple import SoftTripleLoss
from superdml.learn.losses.triplet import TripletLoss

__all__ = [
    "LOSSES",
    "MetricLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "TripletLoss",
    "get_loss",
    "loss_parameters",
    "transfer_proxies",
]
