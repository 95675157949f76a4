"""Calibration of the labeling rule's scores: expected calibration error, reliability bins.

A score (the vote share of the winning class, 0..1) is calibrated when, among crops
scored about s, a share s is labeled right. :func:`reliability_bins` groups the scores
into equal-width bins; :func:`expected_calibration_error` is the bins' gap between
accuracy and mean score, weighted by their share of the crops (Guo et al., ICML 2017):

    ECE = sum_b |B_b| / N * |accuracy(B_b) - mean score(B_b)|

``superdml evaluate`` reports it beside the metrics and draws the bins
(:func:`superdml.learn.plots.plot_reliability`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from superdml.config.checks import is_count
from superdml.config.schema import check
from superdml.core.errors import InputError

__all__ = ["ECE_BINS", "Reliability", "expected_calibration_error", "reliability_bins"]

#: Equal-width score bins of the expected calibration error.
ECE_BINS = 10


@dataclass(frozen=True, eq=False)
class Reliability:
    """Scores and accuracy per equal-width score bin.

    Attributes
    ----------
    edges : (B + 1,) float64 ndarray
        Bin edges over [0, 1]; bin b holds ``edges[b] < score <= edges[b + 1]`` (the
        first bin also holds 0).
    counts : (B,) int64 ndarray
        Crops per bin.
    mean_score : (B,) float64 ndarray
        Mean score in each bin (NaN when empty).
    accuracy : (B,) float64 ndarray
        Share labeled right in each bin (NaN when empty).
    """

    edges: np.ndarray
    counts: np.ndarray
    mean_score: np.ndarray
    accuracy: np.ndarray


def reliability_bins(scores: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Group scores into `bins` equal-width bins over [0, 1] with their accuracy.

    Parameters
    ----------
    scores : (N,) float ndarray
        Scores in [0, 1].
    correct : (N,) bool ndarray
        Whether each crop's label is right.
    bins : int

    Raises
    ------
    InputError
        On arrays of different lengths or scores outside [0, 1].
    """
    check(is_count(bins), "bins", bins, "an integer >= 1")
    s = np.asarray(scores, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if s.shape != ok.shape:
        raise InputError(f"calibration: got {s.size} scores and {ok.size} outcomes")
    if s.size and (s.min() < 0 or s.max() > 1 + 1e-6):
        raise InputError(f"calibration: scores must lie in [0, 1], got {s.min()} to {s.max()}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(which, weights=s, minlength=bins) / counts
        accuracy = np.bincount(which, weights=ok, minlength=bins) / counts
    return Reliability(edges, counts, mean_score, accuracy)


def expected_calibration_error(
    scores: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Return the expected calibration error of `scores` (see the module docstring).

    Parameters are those of :func:`reliability_bins`; NaN for no crops.
    """
    rel = reliability_bins(scores, correct, bins)
    total = int(rel.counts.sum())
    if total == 0:
        return float("nan")
    filled = rel.counts > 0
    gaps = np.abs(rel.accuracy[filled] - rel.mean_score[filled])
    return float(np.sum(rel.counts[filled] / total * gaps))
