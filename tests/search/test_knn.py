"""superdml.search.knn: exact search on both backends, the weighted vote, the unknown threshold."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch
from vectors import circle, cos, unit_rows

import superdml.search.knn
from superdml.core.errors import ConfigError, InputError
from superdml.search.knn import search, search_chunks
from superdml.search.vote import (
    UNKNOWN_LABEL,
    KnnVote,
    apply_unknown,
    balance_weights,
    calibrate_thresholds,
    knn_vote,
)

BACKENDS = ["faiss", "torch"]


# references at 0, 10, 40, 100 degrees; queries at 6 and 68 degrees. The similarity of
# two unit vectors is the cosine of their angle.
REF = circle([0.0, 10.0, 40.0, 100.0])
QUERY = circle([6.0, 68.0])


# ------------------------------------------------------------------------------ search


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_by_hand(backend):
    sims, ids = search(QUERY, REF, k=3, backend=backend)
    # query at 6: refs at 10 (4 deg), 0 (6 deg), 40 (34 deg)
    assert ids[0].tolist() == [1, 0, 2]
    np.testing.assert_allclose(sims[0], [cos(4), cos(6), cos(34)], rtol=1e-6)
    # query at 68: refs at 40 (28 deg), 100 (32 deg), 10 (58 deg)
    assert ids[1].tolist() == [2, 3, 1]
    np.testing.assert_allclose(sims[1], [cos(28), cos(32), cos(58)], rtol=1e-6)
    assert sims.dtype == np.float32
    assert ids.dtype == np.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_pads_when_k_exceeds_references(backend):
    sims, ids = search(QUERY[:1], REF[:2], k=4, backend=backend)
    assert ids.tolist() == [[1, 0, -1, -1]]
    assert np.isneginf(sims[0, 2:]).all()
    np.testing.assert_allclose(sims[0, :2], [cos(4), cos(6)], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_exclude_self_by_index_with_duplicates(backend):
    # rows 0 and 1 are the same vector: each must find the other, not itself
    emb = circle([0.0, 0.0, 50.0, 55.0])
    sims, ids = search(emb, emb, k=2, backend=backend, exclude_self=True)
    assert ids[:2].tolist() == [[1, 2], [0, 2]]
    assert ids[2:, 0].tolist() == [3, 2]
    assert set(ids[2:, 1].tolist()) <= {0, 1}  # rows 0 and 1 tie at 50 and 55 degrees
    np.testing.assert_allclose(sims[:2, 0], 1.0, rtol=1e-6)
    assert (ids != np.arange(4)[:, None]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_exclude_self_with_more_duplicates_than_k(backend):
    # five identical rows: any 2 others are right, but never the row itself
    emb = np.repeat(circle([20.0]), 5, axis=0)
    sims, ids = search(emb, emb, k=2, backend=backend, exclude_self=True, chunk_size=2)
    assert (ids != np.arange(5)[:, None]).all()
    assert (ids >= 0).all()
    np.testing.assert_allclose(sims, 1.0, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_exclude_self_pads_past_the_others(backend):
    emb = circle([0.0, 30.0])
    sims, ids = search(emb, emb, k=3, backend=backend, exclude_self=True)
    assert ids.tolist() == [[1, -1, -1], [0, -1, -1]]
    assert np.isneginf(sims[:, 1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_search_chunking_does_not_change_results(backend, exclude_self):
    emb = unit_rows(np.random.default_rng(0), 50, 8)
    whole = search(emb, emb, k=5, backend=backend, exclude_self=exclude_self)
    chunked = search(emb, emb, k=5, backend=backend, exclude_self=exclude_self, chunk_size=7)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)
    # brute force
    full = emb @ emb.T
    if exclude_self:
        np.fill_diagonal(full, -np.inf)
    np.testing.assert_array_equal(whole[1], np.argsort(-full, axis=1, kind="stable")[:, :5])
    chunks = search_chunks(emb, emb, 5, backend=backend, chunk_size=20)
    assert [start for start, _, _ in chunks] == [0, 20, 40]


@pytest.mark.parametrize(("k", "chunk_size"), [(1, None), (5, 7), (60, 16)])
def test_the_backends_agree_on_random_embeddings(k, chunk_size):
    rng = np.random.default_rng(0)
    ref, query = unit_rows(rng, 50, 8), unit_rows(rng, 33, 8)
    sims, ids = search(query, torch.from_numpy(ref), k, backend="torch", chunk_size=chunk_size)
    expected_sims, expected_ids = search(query, ref, k, backend="faiss")
    np.testing.assert_array_equal(ids, expected_ids)  # random floats: no ties
    np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-6)
    if k > 50:  # padded past the 50 references
        assert (ids[:, 50:] == -1).all() and np.isneginf(sims[:, 50:]).all()


def test_auto_searches_a_tensor_with_torch_in_blocks(monkeypatch):
    monkeypatch.setattr(
        superdml.search.knn, "TORCH_BLOCK_ELEMENTS", 4 * len(REF)
    )  # 4 queries a block
    query = circle([float(d) for d in range(10)])
    tensor_starts = [s for s, _, _ in search_chunks(query, torch.from_numpy(REF), 2)]
    assert tensor_starts == [0, 4, 8]  # torch: blocks of at most 4 x 4 similarities
    assert [s for s, _, _ in search_chunks(query, REF, 2)] == [0]  # ndarray: faiss, one chunk
    sims, ids = search(torch.from_numpy(QUERY), torch.from_numpy(REF), 1)
    assert ids[:, 0].tolist() == [1, 2]
    np.testing.assert_allclose(sims[:, 0], [cos(4), cos(28)], rtol=1e-6)


def test_search_accepts_a_faiss_index():
    index = faiss.IndexFlatIP(2)
    index.add(REF)
    for backend in ("auto", "faiss"):
        sims, ids = search(QUERY, index, k=1, backend=backend)
        assert ids[:, 0].tolist() == [1, 2]
        np.testing.assert_allclose(sims[0, 0], cos(4), rtol=1e-6)
    with pytest.raises(InputError, match="the torch backend searches embeddings, got a faiss"):
        search(QUERY, index, k=1, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_casts_float64(backend):
    sims, ids = search(QUERY.astype(np.float64), REF.astype(np.float64), k=1, backend=backend)
    assert ids[0, 0] == 1
    assert sims.dtype == np.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_empty_query(backend):
    sims, ids = search(np.zeros((0, 2), np.float32), REF, k=2, backend=backend)
    assert sims.shape == (0, 2)
    assert ids.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"queries": QUERY[0]}, InputError, r"query: got a float32 array of shape \(2,\)"),
        ({"queries": np.zeros((2, 2), np.int64)}, InputError, "expected an \\(N, D\\) float"),
        (
            {"queries": np.zeros((2, 3), np.float32)},
            InputError,
            "size 3, the references have size 2",
        ),
        ({"exclude_self": True}, InputError, "got 2 queries and 4 references"),
        ({"k": 0}, ConfigError, "k: got 0, expected an integer >= 1"),
        ({"k": 2.0}, ConfigError, "k: got 2.0"),
        ({"chunk_size": 0}, ConfigError, "chunk_size: got 0"),
    ],
)
def test_search_bad_arguments(backend, kwargs, error, message):
    args = {"queries": QUERY, "references": REF, "k": 2, "backend": backend, **kwargs}
    with pytest.raises(error, match=message):
        search(**args)
    with pytest.raises(error, match=message):
        search_chunks(**args)  # checked on call, before iterating


def test_search_rejects_an_unknown_backend_and_a_bad_tensor():
    with pytest.raises(ConfigError, match="backend: got 'gpu', expected one of auto, faiss, torch"):
        search(QUERY, REF, 1, backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="query: got a torch.int64 tensor of shape \\(3,\\)"):
        search(torch.ones(3, dtype=torch.int64), torch.from_numpy(REF), 1)


# ---------------------------------------------------------------------------- knn_vote


def test_vote_similarity_weighting_by_hand():
    vote = knn_vote(np.array([[0.9, 0.8, 0.5]]), np.array([[1, 0, 1]]), num_classes=3)
    # class 1: 0.9 + 0.5 = 1.4, class 0: 0.8, total 2.2
    np.testing.assert_allclose(vote.class_scores, [[0.8 / 2.2, 1.4 / 2.2, 0.0]], rtol=1e-6)
    assert vote.label_ids.tolist() == [1]
    np.testing.assert_allclose(vote.scores, [1.4 / 2.2], rtol=1e-6)
    np.testing.assert_allclose(vote.margins, [0.6 / 2.2], rtol=1e-6)
    np.testing.assert_allclose(vote.similarity, [0.9], rtol=1e-6)
    assert vote.topk_classes.tolist() == [[1, 0, 2]]
    assert vote.label_ids.dtype == np.int64
    assert vote.scores.dtype == vote.class_scores.dtype == np.float32


def test_vote_clamps_negative_similarities():
    vote = knn_vote(np.array([[0.5, -0.2, 0.3]]), np.array([[0, 1, 1]]), num_classes=2)
    # weights 0.5, 0, 0.3
    np.testing.assert_allclose(vote.class_scores, [[0.625, 0.375]], rtol=1e-6)


def test_vote_all_zero_weights_count_equally():
    vote = knn_vote(np.array([[-0.1, -0.2, -0.3]]), np.array([[2, 1, 2]]), num_classes=3)
    np.testing.assert_allclose(vote.class_scores, [[0.0, 1 / 3, 2 / 3]], rtol=1e-6)
    assert vote.label_ids.tolist() == [2]
    np.testing.assert_allclose(vote.similarity, [-0.1], rtol=1e-6)


def test_vote_softmax_weighting_by_hand():
    vote = knn_vote(
        np.array([[0.9, 0.8, 0.5]]),
        np.array([[1, 0, 1]]),
        num_classes=2,
        weighting="softmax",
        temperature=0.1,
    )
    e9, e8, e5 = math.exp(9), math.exp(8), math.exp(5)
    share1 = (e9 + e5) / (e9 + e8 + e5)
    np.testing.assert_allclose(vote.class_scores, [[1 - share1, share1]], rtol=1e-6)
    np.testing.assert_allclose(vote.margins, [2 * share1 - 1], rtol=1e-6)


@pytest.mark.parametrize("weighting", ["similarity", "softmax"])
def test_vote_padding_carries_no_weight(weighting):
    sims = np.array([[0.7, -np.inf, -np.inf], [-np.inf, -np.inf, -np.inf]])
    labels = np.array([[0, -1, -1], [-1, -1, -1]])
    vote = knn_vote(sims, labels, num_classes=2, weighting=weighting)
    np.testing.assert_allclose(vote.class_scores, [[1.0, 0.0], [0.0, 0.0]])
    assert vote.label_ids.tolist() == [0, UNKNOWN_LABEL]
    assert vote.scores.tolist() == [1.0, 0.0]
    np.testing.assert_allclose(vote.similarity, [0.7, -np.inf], rtol=1e-6)
    assert np.isfinite(vote.class_scores).all()


def test_vote_ties_go_to_lowest_class_id():
    vote = knn_vote(np.array([[0.5, 0.5]]), np.array([[2, 1]]), num_classes=3)
    assert vote.label_ids.tolist() == [1]
    assert vote.topk_classes.tolist() == [[1, 2, 0]]
    assert vote.margins.tolist() == [0.0]


def test_vote_single_class_and_num_top():
    vote = knn_vote(np.array([[0.5, 0.4]]), np.array([[0, 0]]), num_classes=1)
    assert vote.margins.tolist() == [1.0]
    assert vote.topk_classes.shape == (1, 1)
    vote = knn_vote(np.array([[0.5, 0.4]]), np.array([[0, 3]]), num_classes=9, num_top=2)
    assert vote.topk_classes.tolist() == [[0, 3]]


def vote_loop(sims, labels, num_classes, weighting, temperature):
    """Per-query reference implementation of the vote."""
    out = []
    for s, lab in zip(sims, labels, strict=True):
        valid = lab >= 0
        if weighting == "similarity":
            w = np.where(valid, np.maximum(s, 0), 0.0)
            if w.sum() == 0:
                w = valid.astype(float)
        else:
            z = np.where(valid, s / temperature, -np.inf)
            w = np.exp(z - z[valid].max()) if valid.any() else np.zeros_like(s)
        scores = np.zeros(num_classes)
        for wi, li in zip(w, lab, strict=True):
            if li >= 0:
                scores[li] += wi
        out.append(scores / w.sum() if w.sum() > 0 else scores)
    return np.array(out)


@pytest.mark.parametrize("weighting", ["similarity", "softmax"])
def test_vote_matches_loop_reference(weighting):
    rng = np.random.default_rng(1)
    sims = -np.sort(-rng.uniform(-0.3, 1.0, size=(200, 7)), axis=1)
    labels = rng.integers(-1, 5, size=(200, 7))
    vote = knn_vote(sims, labels, 5, weighting=weighting, temperature=0.2, exact_match=None)
    expected = vote_loop(sims, labels, 5, weighting, 0.2)
    np.testing.assert_allclose(vote.class_scores, expected, rtol=1e-5, atol=1e-7)
    has_vote = expected.sum(1) > 0
    np.testing.assert_array_equal(vote.label_ids[has_vote], expected[has_vote].argmax(1))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"neighbor_labels": np.array([[0, 1]])},
            InputError,
            r"shape \(1, 3\) and labels of shape \(1, 2\)",
        ),
        (
            {"neighbor_labels": np.array([[0, 1, 3]])},
            InputError,
            r"class id 3, expected ids in \[-1, 3\)",
        ),
        ({"neighbor_labels": np.array([[0, -2, 1]])}, InputError, "class id -2"),
        ({"neighbor_labels": np.array([[0.0, 1.0, 1.0]])}, InputError, "expected integers"),
        (
            {"weighting": "distance"},
            ConfigError,
            "weighting: got 'distance', expected one of similarity, softmax",
        ),
        ({"temperature": 0.0}, ConfigError, "temperature: got 0.0"),
        ({"num_classes": 0}, ConfigError, "num_classes: got 0"),
    ],
)
def test_vote_bad_arguments(kwargs, error, message):
    args = {
        "sims": np.array([[0.9, 0.8, 0.5]]),
        "neighbor_labels": np.array([[0, 1, 1]]),
        "num_classes": 3,
        **kwargs,
    }
    with pytest.raises(error, match=message):
        knn_vote(**args)


# --------------------------------------------------------------------------- unknown


def test_apply_unknown_marks_dissimilar_queries():
    vote = knn_vote(np.array([[0.9, 0.1], [0.4, 0.3]]), np.array([[1, 0], [0, 0]]), 2)
    out = apply_unknown(vote, threshold=0.5)
    assert isinstance(out, KnnVote)
    assert out.label_ids.tolist() == [1, UNKNOWN_LABEL]
    np.testing.assert_array_equal(out.scores, vote.scores)
    assert vote.label_ids.tolist() == [1, 0]  # the input vote is unchanged
    assert apply_unknown(vote, threshold=0.4).label_ids.tolist() == [1, 0]  # not below


def test_search_then_vote_end_to_end():
    ref_labels = np.array([0, 0, 1, 1])
    sims, ids = search(QUERY, REF, k=3)
    vote = knn_vote(sims, ref_labels[ids], num_classes=2)
    # query at 6 deg: refs 1 (0), 0 (0), 2 (1) -> class 0 with (cos4 + cos6) / total
    total = cos(4) + cos(6) + cos(34)
    assert vote.label_ids[0] == 0
    assert vote.scores[0] == pytest.approx((cos(4) + cos(6)) / total, rel=1e-6)
    # query at 68 deg: refs 2 (1) at 28, 3 (1) at 32 and 1 (0) at 58 deg -> class 1
    assert vote.label_ids[1] == 1
    total = cos(28) + cos(32) + cos(58)
    assert vote.scores[1] == pytest.approx((cos(28) + cos(32)) / total, rel=1e-6)


def test_a_query_that_is_a_labeled_crop_keeps_its_class():
    sims = np.array([[0.9999, 0.9, 0.9, 0.9], [0.99, 0.9, 0.9, 0.9]])
    labels = np.array([[0, 1, 1, 1], [0, 1, 1, 1]])
    vote = knn_vote(sims, labels, 2)
    assert vote.label_ids.tolist() == [0, 1]
    assert (vote.scores[0], vote.margins[0]) == (1.0, 1.0)
    np.testing.assert_allclose(vote.scores[1], 2.7 / 3.69, rtol=1e-6)  # 3 x 0.9 of 3.69
    assert knn_vote(sims, labels, 2, exact_match=None).label_ids.tolist() == [1, 1]


# ------------------------------------------------------------- class-aware vote


def three_vs_three_hundred() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A query whose 10 neighbours are all 3 references of a rare class and 7 of a common one.

    Returns the (1, 10) similarities, labels and the reference counts (3 rare, 300 common).
    """
    sims = np.array([[0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]])
    labels = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    return sims, labels, np.array([3, 300])


def test_balancing_flips_a_three_vs_three_hundred_vote():
    sims, labels, counts = three_vs_three_hundred()
    plain = knn_vote(sims, labels, 2, exact_match=None)
    # today: rare 3 * 0.9 = 2.7 against common 7 * 0.8 = 5.6
    assert plain.label_ids.tolist() == [1]
    np.testing.assert_allclose(plain.class_scores, [[2.7 / 8.3, 5.6 / 8.3]], rtol=1e-6)
    # class_balance 1: factors 1/3 and 1/300, scaled to 1 and 1/100
    factors = balance_weights(counts, 1.0)
    np.testing.assert_allclose(factors, [1.0, 0.01])
    full = knn_vote(sims, labels, 2, exact_match=None, class_weights=factors)
    assert full.label_ids.tolist() == [0]
    np.testing.assert_allclose(full.class_scores, [[2.7 / 2.756, 0.056 / 2.756]], rtol=1e-6)
    np.testing.assert_allclose(full.margins, [(2.7 - 0.056) / 2.756], rtol=1e-6)
    # class_balance 0.5: the common class weighs (3 / 300) ** 0.5 = 0.1: 2.7 against 0.56
    half = knn_vote(sims, labels, 2, exact_match=None, class_weights=balance_weights(counts, 0.5))
    np.testing.assert_allclose(half.class_scores, [[2.7 / 3.26, 0.56 / 3.26]], rtol=1e-6)
    # the similarity to the nearest reference does not change
    assert full.similarity.tolist() == plain.similarity.tolist()


@pytest.mark.parametrize("weighting", ["similarity", "softmax"])
def test_class_balance_zero_is_todays_vote_bit_for_bit(weighting):
    rng = np.random.default_rng(5)
    sims = -np.sort(-rng.uniform(-0.2, 1.0, (200, 7)), axis=1).astype(np.float32)
    labels = rng.integers(-1, 4, (200, 7))
    today = knn_vote(sims, labels, 4, weighting)
    assert balance_weights(np.array([3, 300, 40, 1]), 0.0) is None
    ones = knn_vote(sims, labels, 4, weighting, class_weights=np.ones(4))
    for field in ("label_ids", "scores", "margins", "similarity", "class_scores", "topk_classes"):
        assert getattr(ones, field).tobytes() == getattr(today, field).tobytes(), field


def test_balance_weights_counts_an_empty_class_as_one_and_checks_the_power():
    np.testing.assert_allclose(balance_weights(np.array([0, 4, 16]), 0.5), [1.0, 0.5, 0.25])
    with pytest.raises(ConfigError, match="class_balance: got 1.5"):
        balance_weights(np.array([1, 2]), 1.5)
    with pytest.raises(ConfigError, match="class_weights"):
        knn_vote(np.ones((1, 2)), np.zeros((1, 2), int), 2, class_weights=np.array([1.0, 0.0]))


def test_calibrated_thresholds_by_hand():
    nearest = np.array([0.1, 0.5, 0.9, 0.7, 0.3, 0.6, 0.8])
    labels = np.array([0, 0, 0, 1, 2, 2, 2])
    # recall 2/3: class 0 keeps 0.5 and 0.9; class 1 (one reference) is never unknown;
    # class 2 keeps 0.6 and 0.8
    np.testing.assert_allclose(
        calibrate_thresholds(nearest, labels, 4, 2 / 3), [0.5, -1.0, 0.6, -1.0]
    )
    # recall 1 keeps every reference: the least similarity of each class
    np.testing.assert_allclose(calibrate_thresholds(nearest, labels, 3, 1.0), [0.1, -1.0, 0.3])
    with pytest.raises(ConfigError, match="recall"):
        calibrate_thresholds(nearest, labels, 3, 0.0)


def test_apply_unknown_per_class_thresholds():
    vote = knn_vote(np.array([[0.5], [0.5], [0.2]]), np.array([[0], [1], [1]]), 2)
    unknown = apply_unknown(vote, np.array([0.6, 0.4]))
    # class 0 needs 0.6 (0.5 is below), class 1 needs 0.4 (0.5 passes, 0.2 does not)
    assert unknown.label_ids.tolist() == [UNKNOWN_LABEL, 1, UNKNOWN_LABEL]
