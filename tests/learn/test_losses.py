"""Metric losses: values against hand computations, gradients, pml, failure paths."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from superdml.core.errors import CheckpointError, ConfigError, InputError
from superdml.learn.losses import (
    LOSSES,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
    TripletLoss,
    get_loss,
    loss_parameters,
    transfer_proxies,
)


def unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def circle(degrees: list[float]) -> np.ndarray:
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def random_batch(n: int, d: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = torch.arange(n) % classes
    return x, y


# --------------------------------------------------------------------------- triplet

# Four points on the unit circle: class 0 at 0 and 80 degrees, class 1 at 30 and 170.
# The distance of two unit vectors at an angle t is the chord 2 sin(t / 2).
TRIPLET_X = circle([0.0, 80.0, 30.0, 170.0])
TRIPLET_Y = np.array([0, 0, 1, 1])


def chord(degrees: float) -> float:
    return 2 * math.sin(math.radians(degrees) / 2)


D01, D02, D03 = chord(80), chord(30), chord(170)  # 1.2856, 0.5176, 1.9924
D12, D13, D23 = chord(50), chord(90), chord(140)  # 0.8452, 1.4142, 1.8794


def triplets(labels: np.ndarray) -> list[tuple[int, int, int]]:
    n = len(labels)
    return [
        (a, p, q)
        for a, p, q in itertools.product(range(n), repeat=3)
        if a != p and labels[a] == labels[p] and labels[a] != labels[q]
    ]


def dist_np(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)


def batch_hard_np(x: np.ndarray, y: np.ndarray, margin: float) -> float:
    d = dist_np(x)
    losses = []
    for a in range(len(y)):
        pos = [d[a, p] for p in range(len(y)) if p != a and y[p] == y[a]]
        neg = [d[a, q] for q in range(len(y)) if y[q] != y[a]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + margin))
    return float(np.mean(losses))


def batch_all_np(x: np.ndarray, y: np.ndarray, margin: float) -> float:
    d = dist_np(x)
    losses = [max(0.0, d[a, p] - d[a, q] + margin) for a, p, q in triplets(y)]
    positive = [v for v in losses if v > 0]
    return float(np.mean(positive)) if positive else 0.0


def semi_hard_np(x: np.ndarray, y: np.ndarray, margin: float) -> float:
    d = dist_np(x)
    losses = []
    for a, p in itertools.permutations(range(len(y)), 2):
        if y[a] != y[p]:
            continue
        semi = [
            d[a, q] for q in range(len(y)) if y[q] != y[a] and d[a, p] < d[a, q] < d[a, p] + margin
        ]
        if semi:
            losses.append(d[a, p] - min(semi) + margin)
    return float(np.mean(losses)) if losses else 0.0


def test_triplet_distances_by_hand():
    d = dist_np(TRIPLET_X)
    expected = [[0, D01, D02, D03], [D01, 0, D12, D13], [D02, D12, 0, D23], [D03, D13, D23, 0]]
    np.testing.assert_allclose(d, expected, atol=1e-12)


def test_batch_hard_by_hand():
    # anchor 0: farthest positive 1, nearest negative 2 (of 2, 3)
    # anchor 1: positive 0, nearest negative 2 (of 2, 3)
    # anchor 2: positive 3, nearest negative 0 (of 0, 1)
    # anchor 3: positive 2, nearest negative 1 (of 0, 1)
    per_anchor = [D01 - D02 + 0.2, D01 - D12 + 0.2, D23 - D02 + 0.2, D23 - D13 + 0.2]
    expected = float(np.mean(per_anchor))  # 0.9589
    assert expected == pytest.approx(batch_hard_np(TRIPLET_X, TRIPLET_Y, 0.2))
    loss = TripletLoss(2, 2, margin=0.2, mining="batch_hard")
    value = loss(t64(TRIPLET_X), torch.tensor(TRIPLET_Y))
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_batch_all_by_hand_differs_from_batch_hard():
    # the 8 triplets (a, p, n); (0, 1, 3) is easy (D01 - D03 + 0.2 = -0.507), the other 7
    # are active, and batch_all averages over those 7
    active = [
        D01 - D02 + 0.2,  # (0, 1, 2)
        D01 - D12 + 0.2,  # (1, 0, 2)
        D01 - D13 + 0.2,  # (1, 0, 3)
        D23 - D02 + 0.2,  # (2, 3, 0)
        D23 - D12 + 0.2,  # (2, 3, 1)
        D23 - D03 + 0.2,  # (3, 2, 0)
        D23 - D13 + 0.2,  # (3, 2, 1)
    ]
    assert D01 - D03 + 0.2 < 0 < min(active)
    expected = float(np.mean(active))  # 0.7469
    assert expected == pytest.approx(batch_all_np(TRIPLET_X, TRIPLET_Y, 0.2))
    y = torch.tensor(TRIPLET_Y)
    loss = TripletLoss(2, 2, margin=0.2, mining="batch_all")
    assert loss(t64(TRIPLET_X), y).item() == pytest.approx(expected, rel=1e-12)
    hard = TripletLoss(2, 2, margin=0.2, mining="batch_hard")(t64(TRIPLET_X), y).item()
    assert hard - expected > 0.2


def test_semi_hard_by_hand():
    # margin 0.8; (a, p): the nearest negative n with d(a, p) < d(a, n) < d(a, p) + 0.8
    # (0, 1): negatives at D02 (closer), D03 (inside)         -> D01 - D03 + 0.8
    # (1, 0): negatives at D12 (closer), D13 (inside)         -> D01 - D13 + 0.8
    # (2, 3): negatives at D02, D12, both closer              -> skipped
    # (3, 2): negatives at D03 (inside), D13 (closer)         -> D23 - D03 + 0.8
    expected = np.mean([D01 - D03 + 0.8, D01 - D13 + 0.8, D23 - D03 + 0.8])  # 0.4839
    assert expected == pytest.approx(semi_hard_np(TRIPLET_X, TRIPLET_Y, 0.8))
    loss = TripletLoss(2, 2, margin=0.8, mining="semi_hard")
    value = loss(t64(TRIPLET_X), torch.tensor(TRIPLET_Y)).item()
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
def test_triplet_matches_loop_reference_on_random_batch(mining):
    x, y = random_batch(12, 5, 3, seed=1)
    ref = {"batch_hard": batch_hard_np, "batch_all": batch_all_np, "semi_hard": semi_hard_np}
    expected = ref[mining](x.numpy(), y.numpy(), 0.3)
    assert TripletLoss(3, 5, margin=0.3, mining=mining)(x, y).item() == pytest.approx(expected)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
def test_triplet_gradcheck(mining):
    x, y = random_batch(8, 3, 2, seed=2)
    loss = TripletLoss(2, 3, margin=0.4, mining=mining)
    assert loss(x, y).item() > 0
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x.requires_grad_(),))


def test_triplet_gradient_finite_for_duplicates():
    x = torch.tensor(unit([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    for mining in ("batch_hard", "batch_all", "semi_hard"):
        value = TripletLoss(2, 2, margin=0.5, mining=mining)(x, y)
        (grad,) = torch.autograd.grad(value, x)
        assert torch.isfinite(grad).all()


def test_triplet_without_valid_triplets_is_zero_and_differentiable():
    x = torch.tensor(unit([[1.0, 0.0], [0.0, 1.0]]), requires_grad=True)
    y = torch.tensor([1, 1])
    for mining in ("batch_hard", "batch_all", "semi_hard"):
        loss = TripletLoss(2, 2, mining=mining)
        value = loss(x, y)
        value.backward()
        assert value.item() == 0.0


def test_triplet_batch_hard_matches_pml():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    x, y = random_batch(16, 8, 4, seed=3)
    ours = TripletLoss(4, 8, margin=0.2, mining="batch_hard")(x, y)
    # pml's default AvgNonZeroReducer skips zero losses; "mean over anchors" is MeanReducer
    pml = pml_losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer())
    expected = pml(x, y, miners.BatchHardMiner()(x, y))
    torch.testing.assert_close(ours, expected)


def test_triplet_batch_all_matches_pml():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = random_batch(16, 8, 4, seed=4)
    ours = TripletLoss(4, 8, margin=0.2, mining="batch_all")(x, y)
    torch.testing.assert_close(ours, pml_losses.TripletMarginLoss(margin=0.2)(x, y))


def test_triplet_semi_hard_matches_pml_nearest_semi_hard_negative():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    x, y = random_batch(16, 8, 4, seed=5)
    a, p, n = miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")(x, y)
    # pml keeps every semi-hard negative; FaceNet (and we) keep the nearest per (a, p)
    d = torch.cdist(x, x)
    best: dict[tuple[int, int], int] = {}
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        key = (ai, pi)
        if key not in best or d[ai, ni] < d[ai, best[key]]:
            best[key] = ni
    assert len(best) < len(a)  # the two definitions differ on this batch
    keys = sorted(best)
    nearest = (
        torch.tensor([k[0] for k in keys]),
        torch.tensor([k[1] for k in keys]),
        torch.tensor([best[k] for k in keys]),
    )
    expected = pml_losses.TripletMarginLoss(margin=0.3, reducer=reducers.MeanReducer())(
        x, y, nearest
    )
    ours = TripletLoss(4, 8, margin=0.3, mining="semi_hard")(x, y)
    torch.testing.assert_close(ours, expected)


# --------------------------------------------------------------------------- ProxyNCA

# 4 embeddings in 3-D, 3 classes with fixed (unnormalized) proxies.
PROXY_X = unit([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.3, 1.0], [0.7, 0.7, 0.1]])
PROXY_Y = np.array([0, 1, 2, 0])
PROXIES = np.array([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.3, 0.0, 1.0]])


def with_proxies(loss, proxies: np.ndarray):
    loss.double()
    name = loss.class_parameters[0]
    with torch.no_grad():
        getattr(loss, name).copy_(t64(proxies))
    return loss


def test_proxy_nca_by_hand():
    scale = 3.0
    p_hat = unit(PROXIES)
    total = 0.0
    for x, y in zip(PROXY_X, PROXY_Y, strict=True):
        logits = np.array([-scale * np.sum((x - p) ** 2) for p in p_hat])
        total += -(logits[y] - np.log(np.sum(np.exp(logits))))
    expected = total / len(PROXY_Y)
    loss = with_proxies(ProxyNCALoss(3, 3, scale=scale), PROXIES)
    assert loss(t64(PROXY_X), torch.tensor(PROXY_Y)).item() == pytest.approx(expected, rel=1e-12)


def test_proxy_nca_label_smoothing_by_hand():
    scale, eps = 9.0, 0.1
    p_hat = unit(PROXIES)
    total = 0.0
    for x, y in zip(PROXY_X, PROXY_Y, strict=True):
        logits = np.array([-scale * np.sum((x - p) ** 2) for p in p_hat])
        log_prob = logits - np.log(np.sum(np.exp(logits)))
        target = np.full(3, eps / 3)
        target[y] += 1 - eps
        total += -np.sum(target * log_prob)
    loss = with_proxies(ProxyNCALoss(3, 3, label_smoothing=eps), PROXIES)
    value = loss(t64(PROXY_X), torch.tensor(PROXY_Y)).item()
    assert value == pytest.approx(total / 4, rel=1e-12)


def test_proxy_nca_matches_pml():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = random_batch(16, 8, 5, seed=6)
    ours = ProxyNCALoss(5, 8, scale=9.0).double()
    pml = pml_losses.ProxyNCALoss(5, 8, softmax_scale=9.0)
    with torch.no_grad():
        pml.proxies.copy_(ours.proxies)
    torch.testing.assert_close(ours(x, y), pml(x, y))


def test_proxy_nca_default_scale_is_proxynca_pp_temperature():
    assert ProxyNCALoss(3, 4).scale == 9.0


# --------------------------------------------------------------------------- Proxy-Anchor


def proxy_anchor_np(x, y, proxies, num_classes, alpha, delta):
    s = x @ unit(proxies).T
    pos_terms, neg_terms = [], []
    for c in range(num_classes):
        pos = [np.exp(-alpha * (s[i, c] - delta)) for i in range(len(y)) if y[i] == c]
        neg = [np.exp(alpha * (s[i, c] + delta)) for i in range(len(y)) if y[i] != c]
        if pos:
            pos_terms.append(np.log(1 + sum(pos)))
        neg_terms.append(np.log(1 + sum(neg)))
    return sum(pos_terms) / len(pos_terms) + sum(neg_terms) / num_classes


def test_proxy_anchor_by_hand():
    # class 2 has no sample in this batch: |P+| = 2 while |P| = 3
    y = np.array([0, 1, 1, 0])
    expected = proxy_anchor_np(PROXY_X, y, PROXIES, 3, alpha=4.0, delta=0.1)
    loss = with_proxies(ProxyAnchorLoss(3, 3, alpha=4.0, delta=0.1), PROXIES)
    assert loss(t64(PROXY_X), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-12)
    # the paper's alpha = 32: exponents up to e^35, still computed stably
    expected = proxy_anchor_np(PROXY_X, y, PROXIES, 3, alpha=32.0, delta=0.1)
    loss = with_proxies(ProxyAnchorLoss(3, 3), PROXIES)
    assert loss(t64(PROXY_X), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-12)


def test_proxy_anchor_matches_pml():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = random_batch(16, 8, 4, seed=7)
    y[y == 3] = 0  # proxy 3 without positives
    ours = ProxyAnchorLoss(5, 8).double()
    pml = pml_losses.ProxyAnchorLoss(5, 8, margin=0.1, alpha=32)
    with torch.no_grad():
        pml.proxies.copy_(ours.proxies)
    x_ours, x_pml = x.clone().requires_grad_(), x.clone().requires_grad_()
    value, expected = ours(x_ours, y), pml(x_pml, y)
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    # pml normalizes the embeddings itself, so its gradient is the tangential part of ours
    tangential = x_ours.grad - (x_ours.grad * x).sum(1, keepdim=True) * x
    torch.testing.assert_close(tangential, x_pml.grad)
    torch.testing.assert_close(ours.proxies.grad, pml.proxies.grad)


# --------------------------------------------------------------------------- SoftTriple


def soft_triple_np(x, y, centers, num_classes, k, la, gamma, delta, tau):
    w = unit(centers)
    ce = 0.0
    for xi, yi in zip(x, y, strict=True):
        class_sim = np.zeros(num_classes)
        for c in range(num_classes):
            s = np.array([xi @ w[c * k + t] for t in range(k)])
            q = np.exp(s / gamma) / np.sum(np.exp(s / gamma))
            class_sim[c] = np.sum(q * s)
        logits = la * (class_sim - delta * (np.arange(num_classes) == yi))
        ce += -(logits[yi] - np.log(np.sum(np.exp(logits))))
    reg = 0.0
    for c in range(num_classes):
        for t in range(k):
            for u in range(t + 1, k):
                reg += np.sqrt(2 + 1e-5 - 2 * w[c * k + t] @ w[c * k + u])
    reg = reg / (num_classes * k * (k - 1)) if k > 1 else 0.0
    return ce / len(y) + tau * reg


SOFT_CENTERS = np.array(
    [
        [1.0, 0.0, 0.0],
        [0.8, 0.6, 0.0],
        [0.0, 2.0, 0.0],
        [0.0, 1.0, 1.0],
        [0.0, 0.0, 3.0],
        [-1.0, 0.0, 1.0],
    ]
)


def test_soft_triple_by_hand():
    args = dict(la=20.0, gamma=0.1, delta=0.01, tau=0.2)
    expected = soft_triple_np(PROXY_X, PROXY_Y, SOFT_CENTERS, 3, 2, **args)
    loss = with_proxies(SoftTripleLoss(3, 3, centers_per_class=2, **args), SOFT_CENTERS)
    value = loss(t64(PROXY_X), torch.tensor(PROXY_Y)).item()
    assert value == pytest.approx(expected, rel=1e-12)
    # class 0 owns rows 0 and 1, with cosine 0.8: sqrt(2 + eps - 1.6)
    # classes 1 and 2 own pairs at 45 degrees: 2 - 2 cos 45 = 2 - sqrt(2); C K (K - 1) = 6
    reg = (math.sqrt(0.4 + 1e-5) + 2 * math.sqrt(2 + 1e-5 - math.sqrt(2))) / 6
    assert loss.regularizer(torch.float64).item() == pytest.approx(reg, rel=1e-12)


def test_soft_triple_divides_by_gamma():
    # x = e1; class 0 centers at similarities 1 and 0.8, class 1 at 0 and 0, class 2 at 0 and
    # -0.71. With gamma = 0.01 the softmax over centers picks the most similar one, so
    # S = (1, 0, 0) and the loss (la = 1, no margin) is log(1 + 2 / e). Multiplying by
    # gamma instead would average the centers: S_0 = 0.9.
    loss = SoftTripleLoss(3, 3, centers_per_class=2, la=1.0, gamma=0.01, delta=0.0, tau=0.0)
    loss = with_proxies(loss, SOFT_CENTERS)
    value = loss(t64([[1.0, 0.0, 0.0]]), torch.tensor([0])).item()
    assert value == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)


def test_soft_triple_single_center_has_no_regularizer():
    x, y = t64(PROXY_X), torch.tensor(PROXY_Y)
    loss = with_proxies(SoftTripleLoss(3, 3, centers_per_class=1, tau=5.0), PROXIES)
    untaxed = with_proxies(SoftTripleLoss(3, 3, centers_per_class=1, tau=0.0), PROXIES)
    assert loss.regularizer().item() == 0.0
    assert loss(x, y).item() == untaxed(x, y).item()


def test_soft_triple_matches_pml_without_regularizer():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = random_batch(16, 8, 4, seed=8)
    ours = SoftTripleLoss(4, 8, centers_per_class=3, tau=0.0).double()
    pml = pml_losses.SoftTripleLoss(4, 8, centers_per_class=3, la=20, gamma=0.1, margin=0.01)
    with torch.no_grad():
        pml.fc.copy_(ours.centers.T)  # pml stores (D, C*K), class-major columns
    torch.testing.assert_close(ours(x, y), pml(x, y))


# --------------------------------------------------------------------------- common


def make(name: str, num_classes: int, dim: int, **params):
    torch.manual_seed(0)
    return get_loss(name, num_classes, dim, **params).double()


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("proxy_nca", {"label_smoothing": 0.1}),
        ("proxy_anchor", {"alpha": 8.0}),
        ("soft_triple", {"centers_per_class": 3, "la": 5.0}),
    ],
)
def test_proxy_losses_gradcheck(name, params):
    loss = make(name, 3, 4, **params)
    x, y = random_batch(6, 4, 3, seed=9)
    y[0] = 1  # unbalanced batch
    (pname,) = loss.class_parameters
    proxies = getattr(loss, pname).detach().clone()

    def f(emb, prox):
        return functional_call(loss, {pname: prox}, (emb, y))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), proxies.requires_grad_()))


@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "soft_triple"])
def test_proxies_are_parameters_and_sgd_moves_them(name):
    loss = make(name, 3, 4)
    (pname,) = loss.class_parameters
    proxies = getattr(loss, pname)
    assert loss.has_parameters
    assert any(p is proxies for p in loss.parameters())
    assert pname in loss.state_dict()
    before = proxies.detach().clone()
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    x, y = random_batch(6, 4, 3, seed=10)
    loss(x, y).backward()
    optimizer.step()
    assert not torch.allclose(before, proxies.detach())


def test_triplet_has_no_parameters():
    assert not TripletLoss(3, 4).has_parameters


def test_initialization_follows_global_seed():
    torch.manual_seed(1)
    a = ProxyAnchorLoss(3, 4).proxies.detach().clone()
    torch.manual_seed(1)
    b = ProxyAnchorLoss(3, 4).proxies.detach().clone()
    torch.testing.assert_close(a, b)
    assert SoftTripleLoss(3, 4, centers_per_class=5).centers.shape == (15, 4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_precision_input_gives_float32_loss(name):
    loss = get_loss(name, 3, 4)
    x, y = random_batch(6, 4, 3, seed=11)
    value = loss(x.to(torch.bfloat16), y)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_forward_reads_no_value_back_to_the_host(name, monkeypatch):
    # a .item() per step waits for the GPU every batch; the loss returns a tensor only
    def item(self):
        raise AssertionError("the loss called .item()")

    loss = get_loss(name, 3, 4)
    monkeypatch.setattr(torch.Tensor, "item", item)
    value = loss(*random_batch(6, 4, 3, seed=12))
    assert value.ndim == 0


@pytest.mark.parametrize(
    ("embeddings", "labels", "message"),
    [
        (
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.int64),
            r"embeddings: got shape \(4, 3\), expected \(N, 4\)",
        ),
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64), r"embeddings: got shape \(4,\)"),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), "empty batch"),
        (
            torch.zeros(4, 4, dtype=torch.int64),
            torch.zeros(4, dtype=torch.int64),
            "expected a float dtype",
        ),
        (
            torch.zeros(4, 4),
            torch.zeros(3, dtype=torch.int64),
            r"labels: got shape \(3,\), expected \(4,\)",
        ),
        (torch.zeros(4, 4), torch.zeros(4, 1, dtype=torch.int64), r"labels: got shape \(4, 1\)"),
        (torch.zeros(4, 4), torch.zeros(4, dtype=torch.int32), "expected torch.int64"),
        (torch.zeros(4, 4), torch.tensor([0, 1, 3, 0]), r"class id 3, expected ids in \[0, 3\)"),
        (torch.zeros(4, 4), torch.tensor([0, -1, 2, 0]), r"class id -1"),
        (np.zeros((4, 4)), torch.zeros(4, dtype=torch.int64), "expected torch tensors"),
    ],
)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_inputs_raise_input_error(name, embeddings, labels, message):
    loss = get_loss(name, 3, 4)
    with pytest.raises(InputError, match=message):
        loss(embeddings, labels)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "triplet",
            {"mining": "hardest"},
            "mining: got 'hardest', expected one of batch_hard, batch_all, semi_hard",
        ),
        ("triplet", {"margin": -0.1}, r"margin: got -0.1, expected a number >= 0"),
        ("triplet", {"margin": True}, "margin: got True"),
        ("triplet", {"margin": "0.2"}, "margin: got '0.2'"),
        ("proxy_nca", {"scale": 0}, r"scale: got 0, expected a number > 0"),
        (
            "proxy_nca",
            {"label_smoothing": 1.0},
            r"label_smoothing: got 1.0, expected a number in \[0, 1\)",
        ),
        ("proxy_anchor", {"alpha": -1}, "alpha: got -1"),
        ("proxy_anchor", {"delta": -0.1}, "delta: got -0.1"),
        (
            "soft_triple",
            {"centers_per_class": 0},
            "centers_per_class: got 0, expected an integer >= 1",
        ),
        ("soft_triple", {"centers_per_class": 2.5}, "centers_per_class: got 2.5"),
        ("soft_triple", {"gamma": 0.0}, "gamma: got 0.0"),
        ("soft_triple", {"la": -20}, "la: got -20"),
        ("soft_triple", {"tau": -0.2}, "tau: got -0.2"),
        (
            "triplet",
            {"marign": 0.1},
            "triplet: unknown parameter 'marign' \\(did you mean 'margin'\\?\\)",
        ),
        ("proxy_anchor", {"scale": 3}, "proxy_anchor: unknown parameter 'scale'"),
    ],
)
def test_bad_hyperparameters_raise_config_error(name, params, message):
    with pytest.raises(ConfigError, match=message):
        get_loss(name, 3, 4, **params)


def test_unknown_loss_lists_known_names():
    with pytest.raises(
        ConfigError,
        match=(
            r"loss: got 'proxyanchor', expected one of proxy_anchor, proxy_nca, soft_triple, "
            r"triplet \(did you mean 'proxy_anchor'\?\)"
        ),
    ):
        get_loss("proxyanchor", 3, 4)


@pytest.mark.parametrize(("key", "value"), [("num_classes", 0), ("embedding_size", -1)])
def test_bad_sizes_raise_config_error(key, value):
    sizes = {"num_classes": 3, "embedding_size": 4, key: value}
    with pytest.raises(ConfigError, match=f"{key}: got {value}"):
        get_loss("proxy_anchor", **sizes)


def test_registry_parameters_and_hyperparameters_round_trip():
    assert loss_parameters("soft_triple") == {
        "centers_per_class": 10,
        "la": 20.0,
        "gamma": 0.1,
        "delta": 0.01,
        "tau": 0.2,
    }
    assert loss_parameters("triplet") == {"margin": 0.2, "mining": "batch_hard"}
    assert loss_parameters("proxy_anchor") == {"alpha": 32.0, "delta": 0.1}
    loss = get_loss("triplet", 3, 4, margin=0.5, mining="semi_hard")
    assert loss.hyperparameters == {"margin": 0.5, "mining": "semi_hard"}
    assert "mining='semi_hard'" in repr(loss)
    for name in LOSSES:
        assert get_loss(name, 3, 4).hyperparameters == loss_parameters(name)


# --------------------------------------------------------------------------- warm start


def test_transfer_proxies_keeps_shared_classes():
    torch.manual_seed(0)
    old = SoftTripleLoss(3, 4, centers_per_class=2)
    new = SoftTripleLoss(3, 4, centers_per_class=2)
    fresh = new.centers.detach().clone()
    shared = transfer_proxies(
        old.state_dict(), ["water", "forest", "urban"], new, ["urban", "crop", "water"]
    )
    assert shared == ["urban", "water"]
    torch.testing.assert_close(new.centers[0:2], old.centers[4:6])  # urban
    torch.testing.assert_close(new.centers[4:6], old.centers[0:2])  # water
    torch.testing.assert_close(new.centers[2:4], fresh[2:4])  # crop keeps its fresh centers


def test_transfer_proxies_to_more_classes():
    torch.manual_seed(0)
    old = ProxyAnchorLoss(2, 4)
    new = ProxyAnchorLoss(3, 4)
    assert transfer_proxies(old.state_dict(), ["a", "b"], new, ["b", "c", "a"]) == ["b", "a"]
    torch.testing.assert_close(new.proxies[0], old.proxies[1])
    torch.testing.assert_close(new.proxies[2], old.proxies[0])


def test_transfer_proxies_rejects_mismatches():
    old = ProxyNCALoss(2, 4)
    with pytest.raises(CheckpointError, match=r"'proxies' has shape \(2, 4\), expected \(2, 8\)"):
        transfer_proxies(old.state_dict(), ["a", "b"], ProxyNCALoss(2, 8), ["a", "b"])
    with pytest.raises(CheckpointError, match="no 'proxies'"):
        transfer_proxies({}, ["a", "b"], ProxyNCALoss(2, 4), ["a", "b"])
    with pytest.raises(InputError, match="must be unique"):
        transfer_proxies(old.state_dict(), ["a", "a"], ProxyNCALoss(2, 4), ["a", "b"])
    with pytest.raises(InputError, match="got 3 names, the loss has 2 classes"):
        transfer_proxies(old.state_dict(), ["a", "b"], ProxyNCALoss(2, 4), ["a", "b", "c"])
    assert transfer_proxies({}, ["a"], TripletLoss(2, 4), ["a", "b"]) == []
