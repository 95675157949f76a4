"""Retrieval metrics: hand-ranked cases, brute force, pml, NMI against sklearn."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import SOURCE_ROOT, child_env
from sklearn.metrics import normalized_mutual_info_score

import superdml.learn.metrics
from superdml.core.errors import ConfigError, InputError
from superdml.learn.metrics import retrieval_metrics

A, B, C = 0, 1, 2


def circle(degrees: list[float]) -> np.ndarray:
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def cos(degrees: float) -> float:
    return math.cos(math.radians(degrees))


# references r0..r6 on the unit circle; similarity ranks by angular distance
REF_DEG = [0.0, 10.0, 20.0, 40.0, 60.0, 90.0, 180.0]
REF_LABELS = np.array([A, B, A, A, B, B, C])
QUERY_DEG = [4.0, 52.0, 170.0, 97.0]
QUERY_LABELS = np.array([A, B, C, A])


def test_retrieval_by_hand():
    # q0 (A, 4 deg):   r0 A 4, r1 B 6, r2 A 16, r3 A 36, r4 B 56, ...   rel 1 0 1 1 0, R = 3
    #   MAP@R = (1 + 2/3) / 3 = 5/9, R-prec 2/3, P@1 1, P@5 3/5
    # q1 (B, 52 deg):  r4 B 8, r3 A 12, r2 A 32, r5 B 38, r1 B 42, ... rel 1 0 0 1 1, R = 3
    #   MAP@R = 1/3, R-prec 1/3, P@1 1, P@5 3/5
    # q2 (C, 170 deg): r6 C 10, r5 B 80, r4 B 110, r3 A 130, ...        rel 1 0 0 0 0, R = 1
    #   MAP@R = 1, R-prec 1, P@1 1, P@5 1/5
    # q3 (A, 97 deg):  r5 B 7, r4 B 37, r3 A 57, r2 A 77, r6 C 83, ...  rel 0 0 1 1 0, R = 3
    #   MAP@R = (1/3) / 3 = 1/9, R-prec 1/3, P@1 0, P@5 2/5
    out = retrieval_metrics(circle(QUERY_DEG), QUERY_LABELS, circle(REF_DEG), REF_LABELS, knn_k=3)
    assert out["map_at_r"] == pytest.approx((5 / 9 + 1 / 3 + 1 + 1 / 9) / 4)
    assert out["r_precision"] == pytest.approx((2 / 3 + 1 / 3 + 1 + 1 / 3) / 4)
    assert out["precision_at_1"] == pytest.approx(3 / 4)
    assert out["precision_at_5"] == pytest.approx((3 / 5 + 3 / 5 + 1 / 5 + 2 / 5) / 4)
    assert out["recall_at_1"] == pytest.approx(3 / 4)
    assert out["recall_at_5"] == pytest.approx(1.0)
    # kNN vote over 3 neighbours, similarity-weighted:
    # q0: A (cos 4 + cos 16) vs B cos 6 -> A, right
    # q1: B cos 8 vs A (cos 12 + cos 32) -> A, wrong; B second with a share > 0
    # q2: C cos 10, B cos 80, the third (110 deg) clamped to 0 -> C, right
    # q3: B (cos 7 + cos 37) vs A cos 57 -> B, wrong; A second
    assert out["top1_accuracy"] == pytest.approx(2 / 4)
    assert out["top5_accuracy"] == pytest.approx(1.0)
    assert set(out) == {
        "map_at_r",
        "r_precision",
        "precision_at_1",
        "precision_at_5",
        "recall_at_1",
        "recall_at_5",
        "top1_accuracy",
        "top5_accuracy",
        "nmi",
    }
    assert all(isinstance(v, float) for v in out.values())


def test_top5_needs_a_nonzero_share():
    # query (B, 185 deg), 3 neighbours: r6 C at 5 deg, r5 B at 95 and r4 B at 125 deg have
    # negative similarity, so B's share is 0 and B does not count among the best classes
    out = retrieval_metrics(circle([185.0]), np.array([B]), circle(REF_DEG), REF_LABELS, knn_k=3)
    assert out["top1_accuracy"] == 0.0
    assert out["top5_accuracy"] == 0.0
    # with 7 neighbours the vote still gives B nothing, nor A: C takes it all
    out = retrieval_metrics(circle([185.0]), np.array([B]), circle(REF_DEG), REF_LABELS)
    assert out["top5_accuracy"] == 0.0


def test_exclude_self_by_hand():
    # p0 A 0, p1 A 12, p2 B 30, p3 A 50, p4 B 65, p5 B 90; each ranks the other five:
    # p0 (A): p1 A 12, p2 B 30, p3 A 50, p4 B 65, p5 B 90  rel 1 0 1 0 0, R = 2: MAP 1/2
    # p1 (A): p0 A 12, p2 B 18, p3 A 38, p4 B 53, p5 B 78  rel 1 0 1 0 0, R = 2: MAP 1/2
    # p2 (B): p1 A 18, p3 A 20, p0 A 30, p4 B 35, p5 B 60  rel 0 0 0 1 1, R = 2: MAP 0
    # p3 (A): p4 B 15, p2 B 20, p1 A 38, p5 B 40, p0 A 50  rel 0 0 1 0 1, R = 2: MAP 0
    # p4 (B): p3 A 15, p5 B 25, p2 B 35, p1 A 53, p0 A 65  rel 0 1 1 0 0, R = 2: MAP 1/4
    # p5 (B): p4 B 25, p3 A 40, p2 B 60, p1 A 78, p0 A 90  rel 1 0 1 0 0, R = 2: MAP 1/2
    emb = circle([0.0, 12.0, 30.0, 50.0, 65.0, 90.0])
    labels = np.array([A, A, B, A, B, B])
    out = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)
    assert out["map_at_r"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 0 + 1 / 4 + 1 / 2) / 6)
    assert out["r_precision"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 0 + 1 / 2 + 1 / 2) / 6)
    assert out["precision_at_1"] == pytest.approx(3 / 6)
    assert out["precision_at_5"] == pytest.approx(2 / 5)
    assert out["recall_at_5"] == pytest.approx(1.0)
    # without exclusion every query finds itself first
    assert retrieval_metrics(emb, labels, emb, labels)["precision_at_1"] == 1.0


def test_exclude_self_with_duplicate_embeddings():
    # rows 0 and 1 are identical with different classes; row 2 is a copy of row 0's class
    emb = circle([0.0, 0.0, 30.0, 31.0])
    labels = np.array([A, B, A, B])
    out = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)
    # row 0's nearest other row is row 1 (B): a miss; row 1's is row 0 (A): a miss;
    # row 2 -> row 3 (B) miss; row 3 -> row 2 (A) miss
    assert out["precision_at_1"] == 0.0


def test_queries_without_references_of_their_class():
    # the C query has no C reference: out of MAP@R / R-precision, a miss for P@1
    ref = circle([0.0, 90.0])
    out = retrieval_metrics(circle([5.0, 100.0]), np.array([A, C]), ref, np.array([A, B]))
    assert out["map_at_r"] == 1.0
    assert out["r_precision"] == 1.0
    assert out["precision_at_1"] == 0.5
    out = retrieval_metrics(circle([5.0]), np.array([C]), ref, np.array([A, B]))
    assert math.isnan(out["map_at_r"])
    assert math.isnan(out["r_precision"])
    assert out["precision_at_1"] == 0.0


def test_k_is_capped_at_the_number_of_references():
    # 3 references: P@5 is the precision over all 3, top-5 over the 2 classes present
    ref = circle([0.0, 10.0, 90.0])
    out = retrieval_metrics(circle([3.0]), np.array([A]), ref, np.array([A, A, B]))
    assert out["precision_at_5"] == pytest.approx(2 / 3)
    assert out["recall_at_5"] == 1.0
    assert out["map_at_r"] == 1.0
    assert out["top1_accuracy"] == 1.0


def brute_force(query, query_labels, ref, ref_labels, exclude_self):
    """Full similarity matrix and explicit per-query loops."""
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    sims = query.astype(np.float64) @ ref.T.astype(np.float64)
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    map_r, r_prec, p1, p5 = [], [], [], []
    for i, label in enumerate(query_labels):
        order = np.argsort(-sims[i], kind="stable")
        if exclude_self:
            order = order[order != i]
        rel = ref_labels[order] == label
        r = int((ref_labels == label).sum()) - int(exclude_self)
        precision = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        map_r.append(float(np.sum(precision * rel[:r]) / r))
        r_prec.append(rel[:r].mean())
        p1.append(float(rel[0]))
        p5.append(rel[:5].mean())
    return {
        "map_at_r": np.mean(map_r),
        "r_precision": np.mean(r_prec),
        "precision_at_1": np.mean(p1),
        "precision_at_5": np.mean(p5),
    }


def clustered(n: int, classes: int, dim: int, seed: int, spread: float = 0.6):
    centers = np.random.default_rng(0).normal(size=(classes, dim))  # shared by all seeds
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    emb = centers[labels] + spread * rng.normal(size=(n, dim))
    return emb.astype(np.float32), labels


@pytest.mark.parametrize("exclude_self", [False, True])
def test_matches_brute_force_and_chunking(exclude_self, monkeypatch):
    query, query_labels = clustered(150, 5, 8, seed=1)
    ref, ref_labels = (query, query_labels) if exclude_self else clustered(220, 5, 8, seed=2)
    out = retrieval_metrics(query, query_labels, ref, ref_labels, exclude_self=exclude_self)
    expected = brute_force(query, query_labels, ref, ref_labels, exclude_self)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert 0.2 < out["map_at_r"] < 0.95  # neither trivial nor hopeless
    monkeypatch.setattr(superdml.learn.metrics, "NEIGHBOR_BUDGET", 500)  # chunks of a few rows
    chunked = retrieval_metrics(query, query_labels, ref, ref_labels, exclude_self=exclude_self)
    assert chunked == pytest.approx(out)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_matches_pml_accuracy_calculator(exclude_self):
    accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    query, query_labels = clustered(120, 4, 6, seed=3)
    ref, ref_labels = (query, query_labels) if exclude_self else clustered(200, 4, 6, seed=4)
    calculator = accuracy.AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision", "precision_at_1"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    normalized = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (query, ref)]
    if exclude_self:
        expected = calculator.get_accuracy(normalized[0], query_labels)
    else:
        expected = calculator.get_accuracy(normalized[0], query_labels, normalized[1], ref_labels)
    out = retrieval_metrics(query, query_labels, ref, ref_labels, exclude_self=exclude_self)
    assert out["map_at_r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)
    assert out["r_precision"] == pytest.approx(expected["r_precision"], abs=1e-6)
    assert out["precision_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-6)


# --------------------------------------------------------------------------- NMI


def nmi_by_hand(labels: np.ndarray, clusters: np.ndarray) -> float:
    """2 I(Y; K) / (H(Y) + H(K)), sklearn's default (arithmetic) normalization."""
    n = len(labels)
    joint = np.zeros((labels.max() + 1, clusters.max() + 1))
    np.add.at(joint, (labels, clusters), 1.0 / n)
    py, pk = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = np.sum(joint[nz] * np.log(joint[nz] / np.outer(py, pk)[nz]))

    def entropy(p):
        return -np.sum(p[p > 0] * np.log(p[p > 0]))

    return 2 * mutual / (entropy(py) + entropy(pk))


def test_nmi_of_separated_clusters_is_one_whatever_the_label_ids():
    emb = np.repeat(circle([0.0, 120.0, 240.0]), 4, axis=0)
    emb += np.random.default_rng(0).normal(scale=0.01, size=emb.shape).astype(np.float32)
    labels = np.repeat([7, 2, 4], 4)
    assert retrieval_metrics(emb, labels, emb, labels)["nmi"] == pytest.approx(1.0)


def test_nmi_of_mixed_clusters_matches_sklearn_and_hand():
    # three tight geometric groups; the labels only partly follow them:
    # group 0: A A A B, group 1: B B B B, group 2: C C C A
    groups = np.repeat([0, 1, 2], 4)
    emb = circle([0.0, 120.0, 240.0])[groups]
    emb += np.random.default_rng(1).normal(scale=0.01, size=emb.shape).astype(np.float32)
    labels = np.array([A, A, A, B, B, B, B, B, C, C, C, A])
    out = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)
    expected = normalized_mutual_info_score(labels, groups)
    assert expected == pytest.approx(nmi_by_hand(labels, groups))
    assert out["nmi"] == pytest.approx(expected)
    assert 0.3 < expected < 0.9


def test_nmi_is_deterministic():
    emb, labels = clustered(300, 6, 8, seed=5, spread=1.5)
    first = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)["nmi"]
    second = retrieval_metrics(emb, labels, emb, labels, exclude_self=True)["nmi"]
    assert first == second


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"query_emb": np.zeros((2, 3), np.float32)},
            InputError,
            "size 3, the references have size 2",
        ),
        (
            {"query_emb": np.zeros((0, 2), np.float32), "query_labels": np.zeros(0, int)},
            InputError,
            "non-empty",
        ),
        (
            {"query_labels": np.array([0, 1, 2])},
            InputError,
            r"query_labels: .* expected \(2,\) integer",
        ),
        ({"query_labels": np.array([0.0, 1.0])}, InputError, "query_labels: got a float64"),
        ({"ref_labels": np.array([0, -1, 0])}, InputError, "ref_labels: got class id -1"),
        ({"exclude_self": True}, InputError, "exclude_self needs the queries to be the references"),
        ({"num_classes": 2}, InputError, "class id 2, expected ids < 2"),
        ({"knn_k": 0}, ConfigError, "knn_k: got 0"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = {
        "query_emb": circle([0.0, 50.0]),
        "query_labels": np.array([0, 2]),
        "ref_emb": circle([10.0, 60.0, 90.0]),
        "ref_labels": np.array([0, 1, 2]),
        **kwargs,
    }
    with pytest.raises(error, match=message):
        retrieval_metrics(**args)


def test_importing_metrics_loads_no_checkpoint_data_or_index_code():
    code = (
        "import json, sys, superdml.learn.metrics as m; print(json.dumps([m.__file__, "
        "sorted(name for name in sys.modules if name.startswith('superdml'))]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), check=True, capture_output=True, text=True
    )
    path, loaded = json.loads(out.stdout)
    assert Path(path).parents[2] == SOURCE_ROOT  # this checkout's package
    assert "superdml.search.knn" in loaded
    heavy = {"superdml.learn.checkpoint", "superdml.learn.data", "superdml.learn.embed",
             "superdml.label.index", "superdml.search.reference"}  # fmt: skip
    assert not heavy & set(loaded), sorted(heavy & set(loaded))
