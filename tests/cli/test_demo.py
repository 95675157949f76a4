"""The demo at a reduced size (the same code path as `superdml demo`) and the retrain loop."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from click.testing import CliRunner

import superdml.cli.demo
from superdml.cli.commands import cli
from superdml.cli.demo import CLASS_NAMES, demo_mosaic, unseen_half_scores, voronoi_regions
from superdml.cli.pipeline import run_pipeline
from superdml.config.shipped import pipeline_path
from superdml.crops.stage import majority_labels

#: Training epochs of the reduced demo: unseen-half pixel accuracy 0.53 after 2, 0.64
#: after 3 and 0.66 after 4 (chance 0.2, the test asks for 0.55).
EPOCHS = 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    runner = CliRunner()
    result = runner.invoke(
        cli, ["-q", "demo", "--out", str(out), "--size", "384", "--epochs", str(EPOCHS),
              "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_demo_report_and_accuracy_well_above_chance(demo_run):
    out, output = demo_run
    assert "unseen-half pixel accuracy" in output and str(out / "report.md") in output
    report = (out / "report.md").read_text()
    assert "Pixel accuracy" in report and (out / "overview.png").stat().st_size > 10_000
    scores = json.loads((out / "report.json").read_text())
    assert scores["pixel_accuracy"] > 0.55  # chance is 0.2
    assert set(scores["per_class"]) == set(CLASS_NAMES)
    for name in (
        "labels/labels.tif",
        "labels/scores.tif",
        "labels/superpixels.gpkg",
        "review/crops.parquet",
    ):
        assert (out / name).exists(), name


@pytest.mark.slow
def test_rerunning_the_demo_pipeline_skips_every_stage(demo_run):
    out, _ = demo_run
    sets = [
        f"mosaic={out / 'data' / 'mosaic.tif'}",
        f"truth_left={out / 'data' / 'truth_left.tif'}",
        f"epochs={EPOCHS}",
    ]
    result = run_pipeline(pipeline_path("demo"), sets, out, device="cpu")
    assert {s.status for s in result.stages} == {"skipped"}


@pytest.mark.slow
def test_review_relabel_retrain_loop(demo_run, tmp_path):
    """Review -> move crops into the right class folders -> retrain --init -> labeled as moved."""
    demo_out, _ = demo_run
    out = tmp_path / "run"
    shutil.copytree(demo_out, out, ignore=shutil.ignore_patterns(".superdml"))
    with rasterio.open(out / "segments" / "mosaic" / "segments.tif") as src:
        segments = src.read(1)
    with rasterio.open(out / "data" / "truth.tif") as src:
        truth = src.read(1)
    reviewed = pq.read_table(out / "review" / "crops.parquet").to_pylist()
    ids = np.array([r["segment_id"] for r in reviewed])
    value, _ = majority_labels(segments, truth, ids, 0)
    moved = {}
    for row, v in zip(reviewed, value, strict=True):
        target = out / "crops" / CLASS_NAMES[v - 1] / (row["file"].split("/")[-1])
        shutil.move(out / "review" / row["file"], target)
        moved[row["segment_id"]] = CLASS_NAMES[v - 1]
    before = pq.read_table(out / "labels" / "predictions").to_pylist()
    as_moved_before = np.mean(
        [r["label"] == moved[r["segment_id"]] for r in before if r["segment_id"] in moved]
    )

    # one epoch: the sorted crops reach the labels through the new reference and model
    # (30 moved superpixels: 43% labeled as moved before, all of them after)
    sets = [f"segments={out / 'segments'}", "epochs=1"]
    result = run_pipeline(pipeline_path("retrain"), sets, out, device="cpu")
    assert [s.status for s in result.stages] == ["ran"] * 6
    after = {
        r["segment_id"]: r["label"]
        for r in pq.read_table(out / "retrain" / "labels" / "predictions").to_pylist()
    }
    as_moved = np.mean([after[i] == c for i, c in moved.items()])
    # review picked uncertain superpixels, many of them mislabeled; their own crops now
    # sit in the right class folders, as references and as training data
    assert as_moved >= as_moved_before + 0.2 and as_moved >= 0.7, (as_moved_before, as_moved)
    comparison = json.loads((out / "retrain" / "comparison" / "comparison.json").read_text())
    assert {"map_at_r", "precision_at_1"} <= set(comparison)


def test_unseen_half_scores_by_hand():
    truth = np.array([[1, 1, 2, 2], [1, 1, 2, 1]])
    predicted = np.array([[0, 0, 2, 1], [0, 0, 2, 1]])
    scores = unseen_half_scores(predicted, truth, ["a", "b"])
    assert scores["pixel_accuracy"] == pytest.approx(3 / 4)
    assert scores["per_class"]["b"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "pixels": 3}
    )
    assert scores["per_class"]["a"]["precision"] == pytest.approx(0.5)


def test_demo_mosaic_has_every_class_in_both_halves():
    rgb, truth = demo_mosaic(256)
    assert rgb.shape == (3, 256, 256) and rgb.dtype == np.uint8
    for half in (truth[:, :128], truth[:, 128:]):
        assert set(np.unique(half)) == {1, 2, 3, 4, 5}


def test_voronoi_bands_give_the_whole_raster_bit_for_bit(monkeypatch):
    """The regions computed in bands of rows on threads equal one pass over the raster."""
    size, n_classes, seed, per_half = 300, 4, 3, 2
    rng = np.random.default_rng(seed)  # the cells' seeds, drawn as voronoi_regions draws them
    classes = np.repeat(np.arange(1, n_classes + 1), 2 * per_half)
    half = np.tile([0, 1], n_classes * per_half)
    seeds = np.stack(
        [rng.uniform(0.05, 0.95, classes.size), (half + rng.uniform(0.1, 0.9, classes.size)) / 2],
        axis=1,
    )
    rows, cols = np.mgrid[0:size, 0:size] / size
    rows, cols = rows + 0.04 * np.sin(cols * 17), cols + 0.04 * np.cos(rows * 13)
    dist = (rows[None] - seeds[:, 0, None, None]) ** 2 + (cols[None] - seeds[:, 1, None, None]) ** 2
    expected = classes[np.argmin(dist, axis=0)]  # the first of equally near seeds, as there
    monkeypatch.setattr(superdml.cli.demo, "BAND_ROWS", 64)  # 5 bands, the last of 44 rows
    np.testing.assert_array_equal(voronoi_regions(size, n_classes, seed, per_half), expected)
