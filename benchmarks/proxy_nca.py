"""Proxy-NCA against pytorch-metric-learning's, same budget, on handwritten digits.

What it measures
----------------
scikit-learn's ``load_digits`` (1797 8x8 digits, shipped offline), split in half per
class (train / test, fixed seed). A small MLP (64 -> 128 -> 64, L2-normalized) trains
from scratch for 3 epochs (no augmentation, batches of 64, AdamW: network lr 1e-3,
proxies at the proxy lr of the case, weight decay 1e-4) with:

``pml defaults``
    ``pytorch_metric_learning.losses.ProxyNCALoss`` as constructed by default
    (``softmax_scale=1``, proxies drawn ``normal(0, 1)``), proxies at lr 1e-3.
``superdml <variant>``
    :class:`superdml.learn.losses.proxy_nca.ProxyNCALoss` with the variant's scale,
    proxy initialization (the shipped ``randn / 8``, or ``randn``) and proxy lr.

Each case reports MAP@R (:func:`superdml.learn.metrics.retrieval_metrics`, test queries
against themselves, own row left out), mean and per seed, and the loss of its first
batch against PML's at the same parameters (the formulas agree to float rounding).

Run ``python benchmarks/proxy_nca.py [--seeds N]``; results are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from sklearn.datasets import load_digits
from torch import nn

from superdml.learn.losses.proxy_nca import ProxyNCALoss
from superdml.learn.metrics import retrieval_metrics

EPOCHS = 3
BATCH = 64


def _split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    train = np.zeros(len(y), bool)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        train[rows[: len(rows) // 2]] = True
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return x[train], y[train], x[~train], y[~train]


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))


def _loss(case: dict) -> nn.Module:
    if case["impl"] == "pml":
        return pml_losses.ProxyNCALoss(10, 64)
    loss = ProxyNCALoss(10, 64, scale=case["scale"])
    if case["init"] == "randn":
        with torch.no_grad():
            loss.proxies.copy_(torch.randn(10, 64))
    return loss


def run(case: dict, seed: int) -> float:
    """Train one case with one seed; return the test MAP@R."""
    xtr, ytr, xte, yte = _split()
    torch.manual_seed(seed)
    net = _net()
    loss = _loss(case)
    opt = torch.optim.AdamW(
        [{"params": net.parameters(), "lr": 1e-3},
         {"params": loss.parameters(), "lr": case["proxy_lr"]}],
        weight_decay=1e-4,
    )  # fmt: skip
    for _ in range(EPOCHS):
        order = torch.randperm(len(ytr))
        for start in range(0, len(order), BATCH):
            rows = order[start : start + BATCH]
            value = loss(F.normalize(net(xtr[rows]), dim=1), ytr[rows])
            opt.zero_grad()
            value.backward()
            opt.step()
    with torch.no_grad():
        emb = F.normalize(net(xte), dim=1).numpy()
    metrics = retrieval_metrics(emb, yte.numpy(), emb, yte.numpy(), exclude_self=True)
    return float(metrics["map_at_r"])


def loss_gap() -> float:
    """Largest |ours - PML| over random batches at the same proxies and scale 1."""
    torch.manual_seed(0)
    ours, theirs = ProxyNCALoss(10, 64, scale=1.0), pml_losses.ProxyNCALoss(10, 64)
    with torch.no_grad():
        ours.proxies.copy_(theirs.proxies)
    gaps = []
    for _ in range(5):
        emb = F.normalize(torch.randn(BATCH, 64), dim=1)
        labels = torch.randint(0, 10, (BATCH,))
        gaps.append(abs(ours(emb, labels).item() - theirs(emb, labels).item()))
    return max(gaps)


CASES = {
    "pml defaults": {"impl": "pml", "proxy_lr": 1e-3},
    "superdml shipped (scale 9, randn/8, proxy lr 1e-2)": {
        "impl": "ours", "scale": 9.0, "init": "randn/8", "proxy_lr": 1e-2},
    "superdml scale 1": {"impl": "ours", "scale": 1.0, "init": "randn/8", "proxy_lr": 1e-2},
    "superdml scale 2": {"impl": "ours", "scale": 2.0, "init": "randn/8", "proxy_lr": 1e-2},
    "superdml scale 4": {"impl": "ours", "scale": 4.0, "init": "randn/8", "proxy_lr": 1e-2},
    "superdml scale 1, randn, proxy lr 1e-3": {
        "impl": "ours", "scale": 1.0, "init": "randn", "proxy_lr": 1e-3},
    "superdml init randn": {"impl": "ours", "scale": 9.0, "init": "randn", "proxy_lr": 1e-2},
    "superdml proxy lr 1e-3": {"impl": "ours", "scale": 9.0, "init": "randn/8", "proxy_lr": 1e-3},
    "superdml proxy lr 1e-1": {"impl": "ours", "scale": 9.0, "init": "randn/8", "proxy_lr": 1e-1},
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# load_digits, {EPOCHS} epochs, MLP 64-128-64; |loss - pml loss| {loss_gap():.1e}")
    print(f"{'case':<52}{'MAP@R':>7}   per seed")
    for name, case in CASES.items():
        scores = [run(case, seed) for seed in range(args.seeds)]
        print(f"{name:<52}{statistics.fmean(scores):>7.3f}   "
              + " ".join(f"{s:.3f}" for s in scores), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
