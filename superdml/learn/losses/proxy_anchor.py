"""Proxy-Anchor loss (Kim et al. 2020, "Proxy Anchor Loss for Deep Metric Learning")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from superdml.learn.losses.base import MetricLoss, check_number

__all__ = ["ProxyAnchorLoss"]


def log1p_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """Return ``log(1 + sum_i exp(logits[i, j]))`` per column, computed stably.

    Parameters
    ----------
    logits : (N, C) float tensor
        Exponents; ``-inf`` entries drop out of the sum.

    Returns
    -------
    out : (C,) float tensor
    """
    zeros = logits.new_zeros((1, logits.shape[1]))
    return torch.logsumexp(torch.cat([zeros, logits]), dim=0)


class ProxyAnchorLoss(MetricLoss):
    r"""Proxy-Anchor loss: each proxy is an anchor pulling its samples, pushing the others.

    .. math::

        \ell = \frac{1}{|P^+|} \sum_{p \in P^+}
                 \log\Bigl(1 + \sum_{x \in X_p^+} e^{-\alpha (s(x, p) - \delta)}\Bigr)
             + \frac{1}{|P|} \sum_{p \in P}
                 \log\Bigl(1 + \sum_{x \in X_p^-} e^{\alpha (s(x, p) + \delta)}\Bigr)

    with s the cosine similarity, P all proxies, P+ the proxies of classes present in
    the batch, X_p+ / X_p- the batch samples of / not of p's class. Same definition as
    pytorch-metric-learning's ``ProxyAnchorLoss`` (``margin`` there is delta here).

    Proxies are initialized from torch's global RNG with ``kaiming_normal_(mode="fan_out")``,
    as in the paper's official code.

    Parameters
    ----------
    num_classes : int
        Number of classes C (one proxy each).
    embedding_size : int
        Embedding dimension D.
    alpha : float
        Scale alpha > 0 (the paper's 32).
    delta : float
        Margin delta >= 0 (the paper's 0.1).

    Attributes
    ----------
    proxies : (C, D) nn.Parameter
        The learned proxies (normalized in the forward pass).
    """

    class_parameters = ("proxies",)

    def __init__(
        self, num_classes: int, embedding_size: int, alpha: float = 32.0, delta: float = 0.1
    ) -> None:
        super().__init__(num_classes, embedding_size)
        check_number(alpha, "alpha", 0.0, strict=True)
        check_number(delta, "delta", 0.0)
        self.alpha = float(alpha)
        self.delta = float(delta)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the Proxy-Anchor loss of the batch (formula in the class docstring)."""
        proxies = F.normalize(self.proxies.to(embeddings.dtype), dim=1)
        sim = embeddings @ proxies.T  # (N, C) cosine similarities
        is_pos = F.one_hot(labels, self.num_classes).bool()
        pos_term = log1p_sum_exp(
            torch.where(is_pos, -self.alpha * (sim - self.delta), float("-inf"))
        )
        neg_term = log1p_sum_exp(
            torch.where(is_pos, float("-inf"), self.alpha * (sim + self.delta))
        )
        with_pos = is_pos.any(0)
        pos_loss = pos_term[with_pos].sum() / with_pos.sum()
        neg_loss = neg_term.sum() / self.num_classes
        return pos_loss + neg_loss
