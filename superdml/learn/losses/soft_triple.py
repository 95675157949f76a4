"""SoftTriple loss (Qian et al., ICCV 2019): metric learning without triplet sampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from superdml.learn.losses.base import MetricLoss, check_integer, check_number

__all__ = ["SoftTripleLoss"]

#: Added under the square root of the center regularizer (the official code's 1e-5),
#: which keeps its gradient finite when two centers coincide.
REGULARIZER_EPS = 1e-5


class SoftTripleLoss(MetricLoss):
    r"""SoftTriple: softmax cross-entropy over K learned centers per class.

    With unit centers :math:`w_c^k` (class-major rows ``c*K ... c*K+K-1``)

    .. math::

        S_c(x) = \sum_k q_c^k \, x^\top w_c^k, \quad
        q_c^k = \frac{\exp(x^\top w_c^k / \gamma)}{\sum_{k'} \exp(x^\top w_c^{k'} / \gamma)},

        \ell = \mathrm{CE}\bigl(\lambda (S(x) - \delta\, \mathrm{onehot}(y)), y\bigr)
             + \tau \, \frac{\sum_c \sum_{t < t'} \sqrt{2 + \epsilon - 2\, w_c^{t\top} w_c^{t'}}}
                           {C K (K - 1)}

    with :math:`\epsilon` = ``REGULARIZER_EPS`` as in the official code (the regularizer is 0
    when K = 1). Note the division by gamma (the paper's 1/gamma scaling of the
    similarities). pytorch-metric-learning's ``SoftTripleLoss`` computes the first term
    (its ``margin`` is delta here) without the center regularizer.

    Centers are initialized from torch's global RNG with
    ``kaiming_uniform_(a=sqrt(5))`` (torch's ``nn.Linear`` default, as the official code).

    Parameters
    ----------
    num_classes : int
        Number of classes C.
    embedding_size : int
        Embedding dimension D.
    centers_per_class : int
        Number of centers K >= 1 per class.
    la : float
        Scale lambda > 0 of the logits.
    gamma : float
        Temperature gamma > 0 of the softmax over a class's centers.
    delta : float
        Margin delta >= 0 subtracted from the true class's similarity.
    tau : float
        Weight tau >= 0 of the center regularizer.

    Attributes
    ----------
    centers : (C * K, D) nn.Parameter
        The learned centers, class-major (normalized in the forward pass).
    """

    class_parameters = ("centers",)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        delta: float = 0.01,
        tau: float = 0.2,
    ) -> None:
        super().__init__(num_classes, embedding_size)
        check_integer(centers_per_class, "centers_per_class", 1)
        check_number(la, "la", 0.0, strict=True)
        check_number(gamma, "gamma", 0.0, strict=True)
        check_number(delta, "delta", 0.0)
        check_number(tau, "tau", 0.0)
        self.centers_per_class = centers_per_class
        self.la = float(la)
        self.gamma = float(gamma)
        self.delta = float(delta)
        self.tau = float(tau)
        self.centers = nn.Parameter(torch.empty(num_classes * centers_per_class, embedding_size))
        nn.init.kaiming_uniform_(self.centers, a=math.sqrt(5))

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the SoftTriple loss of the batch (formula in the class docstring)."""
        num_classes, k = self.num_classes, self.centers_per_class
        centers = F.normalize(self.centers.to(embeddings.dtype), dim=1)
        sim = (embeddings @ centers.T).view(-1, num_classes, k)  # (N, C, K)
        prob = F.softmax(sim / self.gamma, dim=2)
        class_sim = (prob * sim).sum(2)  # (N, C)
        margin = self.delta * F.one_hot(labels, num_classes).to(class_sim.dtype)
        classify = F.cross_entropy(self.la * (class_sim - margin), labels)
        return classify + self.tau * self.regularizer(embeddings.dtype)

    def regularizer(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the center regularizer, which the loss weighs by `tau` (0 when K = 1).

        Parameters
        ----------
        dtype : torch.dtype
            Precision of the computation (that of the embeddings in the loss).

        Returns
        -------
        reg : () float tensor
            Mean over classes and center pairs of ``sqrt(2 + eps - 2 w^t.w^t')``.
        """
        num_classes, k = self.num_classes, self.centers_per_class
        centers = F.normalize(self.centers.to(dtype), dim=1)
        if k == 1:
            return centers.new_zeros(())
        per_class = centers.view(num_classes, k, -1)
        center_sim = per_class @ per_class.transpose(1, 2)  # (C, K, K)
        upper = torch.triu_indices(k, k, offset=1, device=centers.device)
        pair_sim = center_sim[:, upper[0], upper[1]]  # (C, K(K-1)/2), t < t'
        return torch.sqrt(2.0 + REGULARIZER_EPS - 2.0 * pair_sim).sum() / (
            num_classes * k * (k - 1)
        )
