"""Triplet margin loss with in-batch mining (Schroff et al. 2015; Hermans et al. 2017)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from superdml.config.schema import check
from superdml.learn.losses.base import MetricLoss, check_number

__all__ = ["Mining", "TripletLoss", "pairwise_distances"]

Mining = Literal["batch_hard", "batch_all", "semi_hard"]


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Return the Euclidean distance matrix with a gradient that stays finite at zero.

    ``d_ij**2 = |x_i|**2 + |x_j|**2 - 2 x_i.x_j``, clamped at 0; entries that are zero
    (the diagonal, duplicate embeddings) get distance 0 and gradient 0 instead of the
    infinite gradient of ``sqrt`` at 0.

    Parameters
    ----------
    embeddings : (N, D) float tensor
        Embeddings.

    Returns
    -------
    dist : (N, N) float tensor
        ``dist[i, j] = ||x_i - x_j||``.
    """
    gram = embeddings @ embeddings.T
    sq_norms = gram.diagonal()
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    d2 = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min(0.0)
    zero = eye | (d2 <= 0.0)
    dist = torch.sqrt(torch.where(zero, torch.ones_like(d2), d2))
    return torch.where(zero, torch.zeros_like(dist), dist)


class TripletLoss(MetricLoss):
    r"""Triplet margin loss on Euclidean distances, with one of three mining rules.

    For a triplet (anchor a, positive p of a's class, negative n of another class) the
    loss is :math:`\max(0, d(a, p) - d(a, n) + \text{margin})`; all triplets come from
    the batch (a PK batch: P classes x K samples). Mining rules:

    ``batch_hard`` (Hermans et al. 2017)
        For each anchor that has a positive and a negative in the batch: its farthest
        positive and nearest negative; the loss is the mean over those anchors (anchors
        with zero loss included).
    ``batch_all``
        Every valid triplet; the loss is the mean over triplets with a positive loss
        (0 if there are none). Memory grows as N**3.
    ``semi_hard`` (Schroff et al. 2015, FaceNet)
        For each (anchor, positive) pair: the nearest negative that is still farther than
        the positive but inside the margin, ``d(a, p) < d(a, n) < d(a, p) + margin``; pairs
        without such a negative are skipped (FaceNet leaves the fallback open; TensorFlow's
        implementation falls back to the farthest negative, we do not). The loss is the
        mean over the pairs that have one (0 if none). Memory grows as N**3.

    Parameters
    ----------
    num_classes : int
        Number of classes (labels are validated against it).
    embedding_size : int
        Embedding dimension D.
    margin : float
        Margin between positive and negative distances (>= 0); distances of unit vectors
        lie in [0, 2].
    mining : {"batch_hard", "batch_all", "semi_hard"}
        Mining rule, see above.

    Notes
    -----
    pytorch-metric-learning equivalents: ``batch_hard`` is ``TripletMarginLoss`` with
    ``BatchHardMiner`` and a ``MeanReducer`` (its default reducer averages over non-zero
    losses only); ``batch_all`` is ``TripletMarginLoss`` without miner (default reducer);
    ``semi_hard`` keeps, per (a, p) pair, only the nearest of the negatives that
    ``TripletMarginMiner(type_of_triplets="semihard")`` returns, whereas pml averages over
    all of them.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.2,
        mining: Mining = "batch_hard",
    ) -> None:
        super().__init__(num_classes, embedding_size)
        check_number(margin, "margin", 0.0)
        check(mining in get_args(Mining), "mining", mining, "one of " + ", ".join(get_args(Mining)))
        self.margin = float(margin)
        self.mining = mining

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the mean triplet loss of the mined triplets (see the class docstring)."""
        dist = pairwise_distances(embeddings)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        is_pos = same & ~eye
        is_neg = ~same
        if self.mining == "batch_hard":
            losses = self._batch_hard(dist, is_pos, is_neg)
            return losses.mean() if len(losses) else self.zero_loss(embeddings)
        if self.mining == "batch_all":
            valid = is_pos[:, :, None] & is_neg[:, None, :]
            # violation[a, p, n] = d(a, p) - d(a, n) + margin
            violation = dist[:, :, None] - dist[:, None, :] + self.margin
            losses = F.relu(violation[valid])
            positive = losses[losses > 0]
            return positive.mean() if len(positive) else self.zero_loss(embeddings)
        losses = self._semi_hard(dist, is_pos, is_neg)
        return losses.mean() if len(losses) else self.zero_loss(embeddings)

    def _batch_hard(
        self, dist: torch.Tensor, is_pos: torch.Tensor, is_neg: torch.Tensor
    ) -> torch.Tensor:
        """Return the loss of each anchor with a positive and a negative."""
        anchors = is_pos.any(1) & is_neg.any(1)
        dist, is_pos, is_neg = dist[anchors], is_pos[anchors], is_neg[anchors]
        hardest_pos = torch.where(is_pos, dist, float("-inf")).amax(1)
        hardest_neg = torch.where(is_neg, dist, float("inf")).amin(1)
        return F.relu(hardest_pos - hardest_neg + self.margin)

    def _semi_hard(
        self, dist: torch.Tensor, is_pos: torch.Tensor, is_neg: torch.Tensor
    ) -> torch.Tensor:
        """Return the loss of each (a, p) pair with a semi-hard negative."""
        d_ap = dist[:, :, None]
        d_an = dist[:, None, :]
        semi_hard = (
            is_pos[:, :, None] & is_neg[:, None, :] & (d_an > d_ap) & (d_an < d_ap + self.margin)
        )
        nearest_neg = torch.where(semi_hard, d_an, float("inf")).amin(2)
        has_semi_hard = semi_hard.any(2)
        return dist[has_semi_hard] - nearest_neg[has_semi_hard] + self.margin
