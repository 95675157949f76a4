"""The reference index: torch kNN, ReferenceIndex, build_index and ``superdml index``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from checkpoints import save_untrained_checkpoint
from click.testing import CliRunner
from conftest import make_crop_folders
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from superdml.checkpoint import build_model_from_checkpoint, checkpoint_sha256, load_checkpoint
from superdml.cli import cli
from superdml.config import IndexConfig
from superdml.errors import ConfigError, InputError, MissingInputError
from superdml.index import (
    UNKNOWN_LABEL,
    ReferenceIndex,
    build_index,
    content_sha256,
    knn_search,
    knn_search_torch,
)
from superdml.provenance import combine

CLASSES = ("brick", "grass", "coffee")
PER_CLASS = 6


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def circle(degrees: list[float]) -> np.ndarray:
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def cos(degrees: float) -> float:
    return math.cos(math.radians(degrees))


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """Three classes x 6 RGB crops of 24-40 px (read-only: copy before changing it)."""
    return make_crop_folders(
        tmp_path_factory.mktemp("ref_crops"), classes=CLASSES, per_class=PER_CLASS, size=(24, 40)
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two untrained checkpoints with different weights."""
    root = tmp_path_factory.mktemp("ckpt")
    return (
        save_untrained_checkpoint(root / "a.pt", CLASSES, seed=0),
        save_untrained_checkpoint(root / "b.pt", CLASSES, seed=1),
    )


@pytest.fixture
def crop_copy(crops, tmp_path) -> Path:
    return Path(shutil.copytree(crops, tmp_path / "crops"))


# ---------------------------------------------------------------------- torch search


@pytest.mark.parametrize(("k", "chunk_size"), [(1, 4096), (5, 7), (60, 16)])
def test_knn_search_torch_matches_faiss_on_cpu(k, chunk_size):
    rng = np.random.default_rng(0)
    ref, query = unit_rows(rng, 50, 8), unit_rows(rng, 33, 8)
    sims, ids = knn_search_torch(query, torch.from_numpy(ref), k, chunk_size=chunk_size)
    expected_sims, expected_ids = knn_search(query, ref, k)
    np.testing.assert_array_equal(ids, expected_ids)  # random floats: no ties
    np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-6)
    assert sims.dtype == np.float32 and ids.dtype == np.int64
    if k > 50:  # padded past the 50 references, like knn_search
        assert (ids[:, 50:] == -1).all() and np.isneginf(sims[:, 50:]).all()


def test_knn_search_torch_rejects_mismatched_sizes_and_bad_k():
    with pytest.raises(InputError, match="size 3, the references have size 2"):
        knn_search_torch(np.ones((1, 3), np.float32), np.ones((2, 2), np.float32), 1)
    with pytest.raises(InputError, match="expected an \\(N, D\\) float"):
        knn_search_torch(torch.ones(3, dtype=torch.int64), np.ones((2, 2), np.float32), 1)
    with pytest.raises(ConfigError, match="k: got 0"):
        knn_search_torch(np.ones((1, 2), np.float32), np.ones((2, 2), np.float32), 0)


# ------------------------------------------------------------------- ReferenceIndex


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
    vote = ref.classify(circle([6.0, 68.0]), k=3)
    # 6 degrees: a at 4 and 6 degrees, b at 34 degrees
    total = cos(4) + cos(6) + cos(34)
    np.testing.assert_allclose(vote.class_scores[0], [(cos(4) + cos(6)) / total, cos(34) / total],
                               rtol=1e-5)  # fmt: skip
    # 68 degrees: b at 28 and 32 degrees, a at 58 degrees
    assert vote.label_ids.tolist() == [0, 1]
    np.testing.assert_allclose(vote.similarity, [cos(4), cos(28)], rtol=1e-6)
    unknown = ref.classify(circle([6.0, 68.0]), k=3, unknown_threshold=0.99)
    assert unknown.label_ids.tolist() == [0, UNKNOWN_LABEL]
    softmax = ref.classify(circle([6.0]), k=3, weighting="softmax", temperature=0.1)
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
    assert ivf.classify(query, 5).label_ids.tolist() == query_labels.tolist()
    loaded = ReferenceIndex.load(ivf.save(tmp_path / "ivf"), nprobe=80)
    assert (loaded.index_type, loaded.nprobe) == ("ivf", 80)
    np.testing.assert_array_equal(loaded.search(query, 5)[1], exact_ids)  # all lists: exact


# ------------------------------------------------------------------------ the stage


def direct_embeddings(checkpoint: Path, files: list[Path]) -> np.ndarray:
    """Embed crops one by one, resized and normalized by hand."""
    ckpt = load_checkpoint(checkpoint)
    model = build_model_from_checkpoint(ckpt)
    mean = torch.tensor(ckpt.mean).view(-1, 1, 1)
    std = torch.tensor(ckpt.std).view(-1, 1, 1)
    rows = []
    with torch.no_grad():
        for path in files:
            pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
            pixels = TF.resize(pixels.permute(2, 0, 1), [ckpt.input_size] * 2, antialias=True)
            rows.append(model(((pixels.float() / 255 - mean) / std)[None])[0].numpy())
    return np.stack(rows)


def test_build_index_writes_a_reference_of_the_models_embeddings(crops, checkpoints, tmp_path):
    config = IndexConfig(precision="fp32")  # the direct computation below is float32
    result = build_index(checkpoints[0], crops, tmp_path / "ref", config, device="cpu")
    n = len(CLASSES) * PER_CLASS
    assert (result.n_references, result.n_embedded, result.n_reused) == (n, n, 0)
    assert result.per_class == {c: PER_CLASS for c in sorted(CLASSES)}
    assert result.index_type == "flat"
    ref = ReferenceIndex.load(tmp_path / "ref")
    assert ref.class_names == sorted(CLASSES)  # the reference's folders define the labels
    assert ref.files[0] == "brick/brick_000.png" and ref.root == crops.absolute()
    assert ref.labels.tolist() == [ref.class_names.index(f.split("/")[0]) for f in ref.files]
    expected = direct_embeddings(checkpoints[0], [crops / f for f in ref.files])
    np.testing.assert_allclose(ref.embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ref.embeddings, axis=1), 1.0, rtol=1e-6)
    meta = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert meta["checkpoint_sha256"] == checkpoint_sha256(checkpoints[0])
    index_bytes = (tmp_path / "ref" / "index.faiss").read_bytes()
    assert meta["index_sha256"] == hashlib.sha256(index_bytes).hexdigest()
    content = content_sha256(ref.embeddings, ref.labels, ref.class_names)
    assert meta["sha256"] == combine(content, meta["index_sha256"], json.dumps(ref.files))
    assert meta["build"]["config"] == {"batch_size": 256, "ivf_threshold": 100000, "nlist": None,
                                       "nprobe": 32, "precision": "fp32"}  # fmt: skip
    assert not list(tmp_path.glob("*.sdml-tmp-*"))


def test_rebuild_embeds_only_added_and_changed_crops(crop_copy, checkpoints, tmp_path):
    out = tmp_path / "ref"
    build_index(checkpoints[0], crop_copy, out, IndexConfig(batch_size=4), device="cpu")
    before = ReferenceIndex.load(out)
    shutil.copy(crop_copy / "grass" / "grass_000.png", crop_copy / "grass" / "grass_new.png")
    (crop_copy / "coffee" / "coffee_002.png").unlink()
    stat = os.stat(crop_copy / "brick" / "brick_001.png")
    os.utime(crop_copy / "brick" / "brick_001.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    result = build_index(checkpoints[0], crop_copy, out, IndexConfig(batch_size=4), device="cpu")
    n = len(CLASSES) * PER_CLASS
    assert (result.n_references, result.n_embedded, result.n_reused, result.n_removed) == (
        n, 2, n - 2, 2)  # fmt: skip
    after = ReferenceIndex.load(out)
    old = dict(zip(before.files, before.embeddings, strict=True))
    unchanged = [f for f in after.files if f not in ("grass/grass_new.png", "brick/brick_001.png")]
    rows = [after.files.index(f) for f in unchanged]
    assert after.embeddings[rows].tobytes() == np.stack([old[f] for f in unchanged]).tobytes()
    new = after.embeddings[after.files.index("grass/grass_new.png")]
    np.testing.assert_allclose(new, old["grass/grass_000.png"], atol=1e-5)  # same pixels
    assert "coffee/coffee_002.png" not in after.files
    again = build_index(checkpoints[0], crop_copy, out, device="cpu")
    assert (again.n_embedded, again.n_reused, again.n_removed) == (0, n, 0)


def test_another_checkpoint_embeds_everything_again(crops, checkpoints, tmp_path):
    out = tmp_path / "ref"
    build_index(checkpoints[0], crops, out, device="cpu")
    result = build_index(checkpoints[1], crops, out, device="cpu")
    n = len(CLASSES) * PER_CLASS
    assert (result.n_embedded, result.n_reused, result.n_removed) == (n, 0, n)
    assert ReferenceIndex.load(out).checkpoint_sha256 == checkpoint_sha256(checkpoints[1])


def test_a_damaged_previous_reference_is_rebuilt_from_scratch(crops, checkpoints, tmp_path, caplog):
    out = tmp_path / "ref"
    build_index(checkpoints[0], crops, out, device="cpu")
    (out / "index.faiss").write_bytes(b"\x00" * 7)
    result = build_index(checkpoints[0], crops, out, device="cpu")
    assert (result.n_embedded, result.n_reused) == (len(CLASSES) * PER_CLASS, 0)
    assert "previous reference unusable, embedding every crop" in caplog.text
    assert ReferenceIndex.load(out).size == result.n_references


def test_cli_index_prints_counts(crops, checkpoints, tmp_path):
    out = tmp_path / "ref"
    args = ["-q", "index", "--checkpoint", str(checkpoints[0]), "--reference-dir", str(crops),
            "--out", str(out), "--ivf-threshold", "10", "--nprobe", "2"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    n = len(CLASSES) * PER_CLASS
    assert (
        f"{n} references (brick: 6, coffee: 6, grass: 6); {n} embedded, 0 reused" in result.output
    )
    assert "(ivf index)" in result.output
    assert ReferenceIndex.load(out).nprobe == 2


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_dir", "missing: no such folder"),
        ("empty_class", "empty: class folder has no readable images"),
        ("not_a_checkpoint", "notes.pt: not a torch checkpoint file"),
        ("foreign_out", "out: is not empty and was not made by superdml index"),
        ("bad_config", "index.yaml: unknown key 'nprobes' (did you mean 'nprobe'?)"),
    ],
)
def test_cli_index_bad_input_is_one_line_and_exit_code_2(
    crop_copy, checkpoints, tmp_path, case, message
):
    checkpoint, reference, out = checkpoints[0], crop_copy, tmp_path / "out"
    extra: list[str] = []
    if case == "missing_dir":
        reference = tmp_path / "missing"
    elif case == "empty_class":
        (crop_copy / "empty").mkdir()
    elif case == "not_a_checkpoint":
        checkpoint = tmp_path / "notes.pt"
        checkpoint.write_text("hello")
    elif case == "foreign_out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        (tmp_path / "index.yaml").write_text("nprobes: 4\n")
        extra = ["--config", str(tmp_path / "index.yaml")]
    args = ["-q", "index", "--checkpoint", str(checkpoint), "--reference-dir", str(reference),
            "--out", str(out), "--device", "cpu", *extra]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (out / "reference.json").exists() and not list(tmp_path.glob("out.sdml-tmp-*"))
    if case == "foreign_out":
        assert (out / "keep.txt").read_text() == "mine"
