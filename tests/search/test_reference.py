"""superdml.search.reference: ReferenceIndex (build, search, vote, save, load), its format."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest
import torch
from vectors import circle, cos, unit_rows

from superdml.config.schema import VoteConfig
from superdml.core.errors import InputError, MissingInputError
from superdml.search.reference import ReferenceIndex
from superdml.search.reference_files import check_replaceable, reference_scheme
from superdml.search.vote import UNKNOWN_LABEL


def hand_made() -> ReferenceIndex:
    # references at 0, 10 (class a) and 40, 100 degrees (class b)
    return ReferenceIndex.build(
        circle([0.0, 10.0, 40.0, 100.0]),
        np.array([0, 0, 1, 1]),
        ["a", "b"],
        ["a/0.png", "a/10.png", "b/40.png", "b/100.png"],
        "c" * 64,
    )


def test_classify_a_hand_made_reference():
    ref = hand_made()
    vote = ref.classify(circle([6.0, 68.0]), VoteConfig(k=3))
    # 6 degrees: a at 4 and 6 degrees, b at 34 degrees
    total = cos(4) + cos(6) + cos(34)
    np.testing.assert_allclose(vote.class_scores[0], [(cos(4) + cos(6)) / total, cos(34) / total],
                               rtol=1e-5)  # fmt: skip
    # 68 degrees: b at 28 and 32 degrees, a at 58 degrees
    assert vote.label_ids.tolist() == [0, 1]
    np.testing.assert_allclose(vote.similarity, [cos(4), cos(28)], rtol=1e-6)
    unknown = ref.classify(circle([6.0, 68.0]), VoteConfig(k=3, unknown_threshold=0.99))
    assert unknown.label_ids.tolist() == [0, UNKNOWN_LABEL]
    softmax = ref.classify(circle([6.0]), VoteConfig(k=3, weighting="softmax", temperature=0.1))
    weights = np.exp(np.array([cos(4), cos(6), cos(34)]) / 0.1)
    np.testing.assert_allclose(softmax.scores, [weights[:2].sum() / weights.sum()], rtol=1e-5)


def test_search_matches_brute_force_numpy():
    rng = np.random.default_rng(1)
    emb = unit_rows(rng, 40, 6)
    ref = ReferenceIndex.build(emb, rng.integers(0, 3, 40), ["x", "y", "z"], list("f" * 40), "0")
    query = unit_rows(rng, 9, 6)
    sims, ids = ref.search(query, 5)
    expected = np.argsort(-(query @ emb.T), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(query @ emb.T, expected, 1), rtol=1e-5)
    assert (ref.size, ref.dim, ref.index_type) == (40, 6, "flat")


def test_k_larger_than_the_reference_and_empty_or_unnormalized_references_are_errors():
    with pytest.raises(InputError, match="k: got 5, but in-memory reference holds only 4"):
        hand_made().search(circle([1.0]), 5)
    with pytest.raises(InputError, match="no references"):
        ReferenceIndex.build(np.empty((0, 4), np.float32), np.empty(0, np.int64), ["a"], [], "0")
    with pytest.raises(InputError, match="not L2-normalized"):
        ReferenceIndex.build(np.full((2, 2), 3.0), np.array([0, 0]), ["a"], ["p", "q"], "0")
    with pytest.raises(InputError, match="labels must lie in"):
        ReferenceIndex.build(circle([0.0, 1.0]), np.array([0, 2]), ["a", "b"], ["p", "q"], "0")


def test_save_and_load_round_trip(tmp_path):
    ref = hand_made()
    out = ref.save(tmp_path / "ref")
    names = {p.name for p in out.iterdir()}
    assert {"embeddings.npy", "labels.npy", "classes.json", "files.json", "index.faiss",
            "reference.json"} <= names  # fmt: skip
    loaded = ReferenceIndex.load(out)
    assert (loaded.class_names, loaded.files) == (ref.class_names, ref.files)
    assert loaded.checkpoint_sha256 == "c" * 64 and loaded.sha256 == ref.sha256
    np.testing.assert_array_equal(loaded.embeddings, ref.embeddings)
    np.testing.assert_array_equal(loaded.labels, ref.labels)
    meta = json.loads((out / "reference.json").read_text())
    assert meta["per_class"] == {"a": 2, "b": 2} and meta["index"]["type"] == "flat"
    assert isinstance(faiss.read_index(os.fspath(out / "index.faiss")), faiss.IndexFlatIP)
    with pytest.raises(InputError, match="holds only 4"):  # the message names the folder
        loaded.search(circle([1.0]), 9)


def test_load_refuses_missing_foreign_and_damaged_folders(tmp_path):
    with pytest.raises(MissingInputError, match="nope: no such folder"):
        ReferenceIndex.load(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(InputError, match="other: not a reference folder"):
        ReferenceIndex.load(tmp_path / "other")
    out = hand_made().save(tmp_path / "ref")
    np.save(out / "embeddings.npy", circle([0.0, 10.0, 40.0, 101.0]))
    with pytest.raises(InputError, match="ref: damaged reference folder .*sha256"):
        ReferenceIndex.load(out)
    (out / "index.faiss").write_bytes(b"\x00" * 7)
    with pytest.raises(InputError, match="ref: damaged reference folder") as err:
        ReferenceIndex.load(out)
    assert "\n" not in str(err.value)


def test_ivf_index_above_the_threshold_is_close_to_exact(tmp_path):
    rng = np.random.default_rng(2)
    centers = unit_rows(rng, 4, 16)
    labels = np.repeat(np.arange(4), 100)
    emb = centers[labels] + 0.15 * rng.standard_normal((400, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    files = [f"{i}.png" for i in range(400)]
    ivf = ReferenceIndex.build(emb, labels, list("abcd"), files, "0", ivf_threshold=100, nprobe=8)
    exact = ReferenceIndex.build(emb, labels, list("abcd"), files, "0")
    assert (ivf.index_type, ivf.nlist, ivf.nprobe) == ("ivf", 80, 8)  # round(4 * sqrt(400))
    query_labels = np.arange(40) % 4
    query = centers[query_labels] + 0.15 * rng.standard_normal((40, 16)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    approx_ids = ivf.search(query, 5)[1]
    exact_ids = exact.search(query, 5)[1]
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx_ids, exact_ids, strict=True)])
    assert recall >= 0.8
    assert ivf.classify(query, VoteConfig(k=5)).label_ids.tolist() == query_labels.tolist()
    loaded = ReferenceIndex.load(ivf.save(tmp_path / "ivf"), nprobe=80)
    assert (loaded.index_type, loaded.nprobe) == ("ivf", 80)
    np.testing.assert_array_equal(loaded.search(query, 5)[1], exact_ids)  # all lists: exact


def test_label_and_infer_label_alike():
    from superdml.config.schema import LabelConfig
    from superdml.label.stage import predict

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ref = ReferenceIndex.build(
        emb, rng.integers(0, 3, 60), ["a", "b", "c"], [f"{i}.png" for i in range(60)], "0" * 64
    )
    queries = np.vstack([emb[:10], np.roll(emb[10:30], 1, axis=1)])
    columns = predict(queries, ref, LabelConfig(k=5), ref.class_names, [1, 2, 3, 255])
    vote = ref.classify(queries, VoteConfig(k=5))  # what infer and evaluate apply
    names = np.array([*ref.class_names, "unknown"])[vote.label_ids]
    assert columns["label"].to_pylist() == names.tolist()
    np.testing.assert_array_equal(columns["score"].to_numpy(), vote.scores)
    assert (vote.scores[:10] == 1.0).all()  # the references themselves keep their class


def test_save_replaces_its_own_folder_and_never_a_users_files(tmp_path):
    out = hand_made().save(tmp_path / "ref")
    check_replaceable(out)  # a reference folder may be replaced
    smaller = ReferenceIndex.build(
        circle([0.0, 90.0]), np.array([0, 1]), ["a", "b"], ["p", "q"], "d"
    )
    smaller.save(out)
    assert ReferenceIndex.load(out).size == 2 and smaller.path == out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="ref: holds notes.txt, which superdml index did not"):
        hand_made().save(out)
    assert (out / "notes.txt").read_text() == "mine" and ReferenceIndex.load(out).size == 2


def test_reference_scheme_is_the_recorded_one_or_codes_by_name(tmp_path):
    out = hand_made().save(tmp_path / "ref")
    assert reference_scheme(out, ["b", "a"]).codes == {"a": 1, "b": 2}  # none recorded
    recorded = {"classes": [{"code": 7, "name": "a"}, {"code": 3, "name": "b"}], "unknown": 255}
    hand_made().save(out, {"class_scheme": recorded})
    assert reference_scheme(out, ["a", "b"]).codes == {"b": 3, "a": 7}
    with pytest.raises(InputError, match="class folder 'c' is not in the class scheme"):
        reference_scheme(out, ["a", "b", "c"])


def test_threads_searching_at_once_make_one_device_copy(monkeypatch):
    ref = hand_made()
    made = []
    as_tensor = torch.as_tensor

    def slow_copy(data, *args, **kwargs):
        if data is ref.embeddings:
            made.append(threading.get_ident())
            time.sleep(0.05)  # every thread arrives while the first one copies
        return as_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", slow_copy)
    queries = circle([6.0, 68.0])
    barrier = threading.Barrier(8)

    def search(_):
        barrier.wait()
        return ref.search(queries, 3, "cpu")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(search, range(8)))
    assert len(made) == 1
    for sims, ids in results:
        np.testing.assert_array_equal(ids, results[0][1])
        np.testing.assert_array_equal(sims, results[0][0])


# ------------------------------------------------- class-aware vote, calibrated unknowns


def test_nearest_class_mean_vote_by_hand():
    # class a at 0 and 40 degrees (mean 20), class b at 50 degrees
    ref = ReferenceIndex.build(circle([0.0, 40.0, 50.0]), np.array([0, 0, 1]), ["a", "b"],
                               ["a/0.png", "a/40.png", "b/50.png"], "c" * 64)  # fmt: skip
    query = circle([38.0])
    sims, ids = ref.search(query, 1)
    assert ref.vote(sims, ids, VoteConfig(k=1), query).label_ids.tolist() == [0]  # 40 degrees
    # means at 20 and 50 degrees: 18 and 12 degrees away, b wins
    rule = VoteConfig(k=1, vote="class_mean")
    vote = ref.vote(sims, ids, rule, query)
    assert vote.label_ids.tolist() == [1]
    total = cos(18) + cos(12)
    np.testing.assert_allclose(vote.class_scores, [[cos(18) / total, cos(12) / total]], rtol=1e-5)
    np.testing.assert_allclose(vote.similarity, [cos(2)], rtol=1e-6)  # nearest reference
    # a labeled crop keeps its class, whatever the means say
    own = circle([40.0])
    assert ref.classify(own, rule).label_ids.tolist() == [0]
    with pytest.raises(InputError, match="class_mean vote needs the query embeddings"):
        ref.vote(sims, ids, rule)


def test_class_balance_flips_a_rare_class_in_a_reference():
    # 3 references of a rare class at 0 degrees, 300 of a common one spread from 10 to 40
    emb = np.vstack([circle([0.0] * 3), circle(np.linspace(10, 40, 300).tolist())])
    labels = np.repeat([0, 1], [3, 300])
    ref = ReferenceIndex.build(emb, labels, ["rare", "common"], [f"{i}" for i in range(303)], "0")
    assert ref.class_counts.tolist() == [3, 300]
    query = circle([4.0])
    assert ref.classify(query, VoteConfig(k=10)).label_ids.tolist() == [1]
    assert ref.classify(query, VoteConfig(k=10, class_balance=1.0)).label_ids.tolist() == [0]


def clusters(rng, per_class, spreads, dim=16):
    centers = unit_rows(np.random.default_rng(0), len(spreads), dim)  # the same every call
    labels = np.repeat(np.arange(len(spreads)), per_class)
    x = centers[labels] + np.asarray(spreads)[labels, None] * rng.standard_normal(
        (len(labels), dim)
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("recall", [0.8, 0.95])
def test_calibrated_thresholds_reach_the_asked_recall_on_held_out_crops(tmp_path, recall):
    rng = np.random.default_rng(11)
    spreads = [0.1, 0.25, 0.4]  # one tight class, two loose ones: thresholds differ
    emb, labels = clusters(rng, 300, spreads)
    ref = ReferenceIndex.build(emb, labels, ["a", "b", "c"], [f"{i}" for i in range(900)], "0",
                               calibration_recall=recall)  # fmt: skip
    thresholds = ref.calibration.thresholds
    assert thresholds[0] > thresholds[1] > thresholds[2]
    ref = ReferenceIndex.load(ref.save(tmp_path / "ref"))  # stored in the reference
    np.testing.assert_array_equal(ref.calibration.thresholds, thresholds)
    rng = np.random.default_rng(12)  # held-out crops of the same classes
    held, held_labels = clusters(rng, 2000, spreads)
    plain = ref.classify(held, VoteConfig(k=10))
    calibrated = ref.classify(held, VoteConfig(k=10, unknown="calibrated"))
    for c in range(3):
        right = (held_labels == c) & (plain.label_ids == c)
        kept = np.mean(calibrated.label_ids[right] == c)
        assert recall - 0.03 <= kept <= recall + 0.03, (c, kept)


def test_an_old_reference_votes_as_today_and_says_so_once(tmp_path, caplog):
    rng = np.random.default_rng(2)
    emb, labels = clusters(rng, 20, [0.3, 0.3])
    folder = ReferenceIndex.build(emb, labels, ["a", "b"], [f"{i}" for i in range(40)], "0",
                                  calibration_recall=0.9).save(tmp_path / "ref")  # fmt: skip
    meta = json.loads((folder / "reference.json").read_text())
    del meta["calibration"], meta["tta"]  # as an older superdml wrote it
    (folder / "reference.json").write_text(json.dumps(meta))
    old = ReferenceIndex.load(folder)
    assert (old.calibration, old.tta) == (None, "none")
    query = unit_rows(rng, 30, 16)
    today = old.classify(query, VoteConfig(k=5))
    with caplog.at_level("WARNING", logger="superdml.search.reference"):
        for _ in range(3):
            vote = old.classify(query, VoteConfig(k=5, unknown="calibrated"))
            assert vote.label_ids.tolist() == today.label_ids.tolist()
    warnings = [r for r in caplog.records if "no calibrated unknown thresholds" in r.message]
    assert len(warnings) == 1
