"""The index stage: build_index and ``superdml index``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_crop_folders
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from superdml.cli.commands import cli
from superdml.config.schema import IndexConfig
from superdml.core.provenance import combine
from superdml.label.index import build_index
from superdml.learn.checkpoint import (
    build_model_from_checkpoint,
    checkpoint_sha256,
    load_checkpoint,
)
from superdml.search.reference import ReferenceIndex, content_sha256

CLASSES = ("brick", "grass", "coffee")
PER_CLASS = 6


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """Three classes x 6 RGB crops of 24-40 px (read-only: copy before changing it)."""
    return make_crop_folders(
        tmp_path_factory.mktemp("ref_crops"), classes=CLASSES, per_class=PER_CLASS, size=(24, 40)
    )


@pytest.fixture(scope="module")
def checkpoints(untrained_checkpoints) -> tuple[Path, Path]:
    """Two untrained checkpoints with different weights (the session's)."""
    return untrained_checkpoints


@pytest.fixture
def crop_copy(crops, tmp_path) -> Path:
    return Path(shutil.copytree(crops, tmp_path / "crops"))


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
                                       "nprobe": 32, "precision": "fp32",
                                       "calibration_recall": 0.95, "tta": "none"}  # fmt: skip
    assert meta["tta"] == "none" and meta["calibration"]["recall"] == 0.95
    assert len(meta["calibration"]["thresholds"]) == len(ref.class_names)
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
