"""ProxyNCA loss with a softmax over all proxies (ProxyNCA++, Teh et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from superdml.config.schema import check
from superdml.learn.losses.base import MetricLoss, check_number

__all__ = ["ProxyNCALoss"]


class ProxyNCALoss(MetricLoss):
    r"""Cross-entropy over negative squared distances to one learned proxy per class.

    .. math::

        \ell(x, y) = -\log \frac{\exp(-s \lVert x - \hat p_y \rVert^2)}
                                {\sum_c \exp(-s \lVert x - \hat p_c \rVert^2)},
        \qquad \hat p_c = p_c / \lVert p_c \rVert,

    averaged over the batch, with optional label smoothing (torch's convention: the
    target distribution is ``(1 - eps) * onehot + eps / num_classes``). Unlike the
    original ProxyNCA (Movshovitz-Attias et al. 2017) the true proxy stays in the
    denominator, as in ProxyNCA++, so the loss is a plain softmax cross-entropy.

    The default ``scale=9`` is ProxyNCA++'s temperature ``T = 1/9`` (logits
    ``-d**2 / T``): with unit vectors the squared distances lie in [0, 4], so with
    ``scale=1`` the logits span only [-4, 0] and the softmax cannot become confident
    (with 20 classes the true class gets at most about 74 %); scale 9 spans [-36, 0],
    which ProxyNCA++ found to train best.

    Proxies are initialized from torch's global RNG as ``randn / 8`` (the reference
    implementations' choice; only their direction matters since they are normalized).

    Parameters
    ----------
    num_classes : int
        Number of classes C (one proxy each).
    embedding_size : int
        Embedding dimension D.
    scale : float
        Inverse temperature s > 0 of the softmax.
    label_smoothing : float
        Label smoothing eps in [0, 1).

    Attributes
    ----------
    proxies : (C, D) nn.Parameter
        The learned proxies (normalized in the forward pass).
    """

    class_parameters = ("proxies",)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 9.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_classes, embedding_size)
        check_number(scale, "scale", 0.0, strict=True)
        check_number(label_smoothing, "label_smoothing", 0.0)
        check(label_smoothing < 1, "label_smoothing", label_smoothing, "a number in [0, 1)")
        self.scale = float(scale)
        self.label_smoothing = float(label_smoothing)
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size) / 8)

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the batch mean of the ProxyNCA++ cross-entropy."""
        proxies = F.normalize(self.proxies.to(embeddings.dtype), dim=1)
        # ||x - p||^2 = |x|^2 + |p|^2 - 2 x.p, for all (sample, proxy) pairs
        sq_dist = (
            embeddings.pow(2).sum(1, keepdim=True)
            + proxies.pow(2).sum(1)
            - 2.0 * embeddings @ proxies.T
        )
        logits = -self.scale * sq_dist
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
