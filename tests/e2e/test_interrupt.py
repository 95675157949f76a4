"""Killing a long stage at random points, then rerunning, gives the uninterrupted outputs.

Each stage runs as people run it, ``superdml ...`` in a process of its own, and is
killed (SIGKILL: no cleanup runs) at random moments. The rerun must finish with outputs
equal to an uninterrupted run's, and no file outside the stage's folder may change.
"""

import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
import yaml

pytestmark = pytest.mark.slow

KILLS = 1
TRAIN_YAML = """\
input_size: 32
embedding_size: 16
loss: proxy_anchor
epochs: 2
warmup_epochs: 0
classes_per_batch: 4
samples_per_class: 4
val_fraction: 0.25
"""


@pytest.fixture(scope="module")
def inputs(shared_world, tmp_path_factory):
    """A copy of the shared untrained world, with a training config."""
    root = shared_world.copy_to(tmp_path_factory.mktemp("interrupt") / "world")
    (root / "train.yaml").write_text(TRAIN_YAML)
    return root


def command(stage: str, root: Path, out: Path) -> list[str]:
    args = {
        "segment": ["segment", root / "mosaic.tif", "--out", out, "--region-size", "16",
                    "--tile-size", "64", "--workers", "0"],
        "index": ["index", "--checkpoint", root / "model.pt", "--reference-dir", root / "crops",
                  "--out", out, "--batch-size", "4", "--device", "cpu"],
        "label": ["label", root / "seg", "--checkpoint", root / "model.pt", "--reference",
                  root / "ref", "--out", out, "--tile-size", "64", "--batch-size", "16",
                  "--workers", "0", "--device", "cpu"],
        "train": ["train", "--train-dir", root / "crops", "--config", root / "train.yaml",
                  "--out", out, "--device", "cpu"]
                 + (["--resume"] if (out / "last.pt").exists() else []),
    }[stage]  # fmt: skip
    code = "from superdml.cli.commands import main; main()"
    return [sys.executable, "-c", code, "-q", *map(str, args)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def startup() -> float:
    """Seconds a process takes to import the CLI (a kill before that tests nothing)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import superdml.cli.commands, torch"], env=ENV, check=True
    )
    return time.perf_counter() - start


def run(stage: str, root: Path, out: Path, kill_after: float | None = None) -> float:
    """Run a stage to its end (return its seconds), or kill it after `kill_after` s."""
    start = time.perf_counter()
    proc = subprocess.Popen(command(stage, root, out), env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else 300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return time.perf_counter() - start
    if kill_after is None or proc.returncode != 0:
        assert proc.returncode == 0, err
    return time.perf_counter() - start


def trained_to_the_end(stage: str, out: Path) -> bool:
    if stage != "train" or not (out / "last.pt").exists():
        return False
    epochs = yaml.safe_load(TRAIN_YAML)["epochs"]
    return torch.load(out / "last.pt", weights_only=True)["resume"]["epoch"] == epochs


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and skip not in p.parents
    }


def outputs(stage: str, out: Path) -> dict[str, object]:
    """What must be equal between runs (not timings)."""
    if stage == "segment":
        with rasterio.open(out / "mosaic" / "segments.tif") as src:
            ids = src.read(1)
        return {"ids": ids, "table": pq.read_table(out / "mosaic" / "superpixels.parquet")}
    if stage == "index":
        return {name: np.load(out / name) for name in ("embeddings.npy", "labels.npy")}
    if stage == "label":
        return {"predictions": pq.read_table(out / "predictions").sort_by("segment_id")}
    found = {}
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        found[name] = dict(ckpt["state_dict"])
    rows = (out / "metrics.csv").read_text().splitlines()
    found["metrics"] = [line.rsplit(",", 1)[0] for line in rows]  # the last column: seconds
    return found


def assert_same(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif hasattr(a, "equals"):
        assert a.equals(b)
    else:
        assert a == b


@pytest.mark.parametrize("stage", ["segment", "index", "label", "train"])
def test_killed_stage_reruns_to_the_uninterrupted_outputs(inputs, startup, tmp_path, stage):
    root = tmp_path / "root"
    shutil.copytree(inputs, root)
    clean = tmp_path / "clean"
    seconds = run(stage, root, clean)
    expected = outputs(stage, clean)
    out = root / "out"
    before = snapshot(root, out)
    rng = random.Random(stage)
    for _ in range(KILLS):  # somewhere in the stage's work, after the imports
        run(stage, root, out, kill_after=startup + rng.uniform(0.1, 1.0) * (seconds - startup))
    if not trained_to_the_end(stage, out):  # --resume of a finished run is refused
        run(stage, root, out)
    assert_same(expected, outputs(stage, out))
    assert snapshot(root, out) == before
    leftovers = [p.name for p in out.rglob("*") if ".sdml-" in p.name or ".work-" in p.name]
    assert leftovers == []
