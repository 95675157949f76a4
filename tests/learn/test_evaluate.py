import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_crop_folders
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score

from superdml.cli.commands import cli
from superdml.core.errors import InputError
from superdml.learn.calibration import expected_calibration_error, reliability_bins
from superdml.learn.evaluate import (
    _classification_report,
    confusion_matrix,
    evaluate,
    sample_examples,
    tsne_2d,
)

METRIC_KEYS = {
    "map_at_r", "r_precision", "precision_at_1", "precision_at_5", "recall_at_1",
    "recall_at_5", "top1_accuracy", "top5_accuracy", "nmi", "accuracy", "macro_f1", "ece",
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(untrained_checkpoints):
    """An untrained ResNet-18 checkpoint at 32 px (evaluation needs no good model)."""
    return untrained_checkpoints[0]


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    root = tmp_path_factory.mktemp("queries")
    return make_crop_folders(root, classes=("brick", "grass", "gravel"), per_class=8, size=32)


def test_confusion_matrix_by_hand_and_as_scikit_learn():
    true = np.array([0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    matrix = confusion_matrix(true, predicted, 4)
    expected = [[0.5, 0.5, 0, 0], [1 / 3, 2 / 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(matrix, expected)
    np.testing.assert_allclose(matrix.sum(axis=1), [1, 1, 1, 0])  # class 3 has no samples
    reference = sk_confusion_matrix(true, predicted, labels=[0, 1, 2], normalize="true")
    np.testing.assert_allclose(matrix[:3, :3], reference)
    with pytest.raises(ValueError, match="predicted: class ids must lie in"):
        confusion_matrix(true, predicted + 2, 4)


def test_unknown_predictions_are_wrong_in_the_matrix_and_the_scores():
    true = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, -1, 1, 1, 1, -1])
    matrix = confusion_matrix(true, predicted, 3)
    np.testing.assert_allclose(matrix, [[1 / 3, 1 / 3, 0], [0, 1, 0], [0, 0, 0]])
    scores, accuracy, f1, same = _classification_report(true, predicted, ["a", "b", "c"])
    np.testing.assert_array_equal(same, matrix)
    assert accuracy == {"a": pytest.approx(1 / 3), "b": 1.0, "c": 0.0}
    # by hand: a: precision 1, recall 1/3; b: precision 2/3, recall 1; c: 0
    assert f1 == {"a": pytest.approx(0.5), "b": pytest.approx(0.8), "c": 0.0}
    assert scores == {"accuracy": pytest.approx(0.5), "macro_f1": pytest.approx(1.3 / 3)}
    assert scores["macro_f1"] == pytest.approx(
        f1_score(true, predicted, labels=[0, 1, 2], average="macro", zero_division=0.0)
    )


def test_sample_examples_groups_a_few_crops_of_spread_classes():
    labels = np.repeat(np.arange(10), 5)
    rows = sample_examples(labels, max_classes=3, per_class=2, seed=0)
    assert labels[rows].tolist() == [0, 0, 4, 4, 9, 9]  # classes spread evenly
    assert len(set(rows.tolist())) == 6
    np.testing.assert_array_equal(rows, sample_examples(labels, 3, 2, seed=0))
    few = np.array([0, 1, 1])
    assert few[sample_examples(few, 6, 3)].tolist() == [0, 1, 1]


def test_tsne_is_seeded_and_subsamples():
    emb = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    points, chosen = tsne_2d(emb, max_points=25, seed=0)
    assert points.shape == (25, 2) and np.all(np.diff(chosen) > 0)
    again, _ = tsne_2d(emb, max_points=25, seed=0)
    np.testing.assert_array_equal(points, again)


def test_evaluate_writes_metrics_and_figures(checkpoint, queries, tmp_path):
    result = evaluate(checkpoint, queries, tmp_path, device="cpu")
    paths = (result.confusion_path, result.tsne_path, result.similarity_path)
    for path in (*paths, result.reliability_path):
        assert path.parent == tmp_path
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
    report = json.loads(result.metrics_path.read_text())
    assert set(report) == {"metrics", "per_class_accuracy", "per_class_f1", "counts", "inputs"}
    assert set(report["metrics"]) == METRIC_KEYS
    predictions = pq.read_table(result.predictions_path).to_pydict()
    correct = np.array(predictions["label"]) == np.array(predictions["true_label"])
    expected = expected_calibration_error(np.array(predictions["score"]), correct)
    assert report["metrics"]["ece"] == pytest.approx(expected, abs=1e-6)
    assert report["counts"]["query"] == report["counts"]["reference"] == 24
    assert report["inputs"]["exclude_self"] is True and len(report["inputs"]["checkpoint_sha256"])
    # the confusion matrix is the kNN classifier behind top1_accuracy: 8 queries per class
    per_class = np.array(list(report["per_class_accuracy"].values()))
    assert per_class.mean() == pytest.approx(report["metrics"]["top1_accuracy"])
    assert report["metrics"]["accuracy"] == pytest.approx(report["metrics"]["top1_accuracy"])
    assert report["inputs"]["rule"] == {"batch_size": 256, "precision": "auto", "k": 10,
        "weighting": "similarity", "temperature": 0.1, "unknown_threshold": None, "tta": "none",
        "vote": "knn", "class_balance": 0.0, "unknown": "threshold"}  # fmt: skip
    assert result.n_query == 24 and result.metrics == report["metrics"]


def test_evaluate_against_references_of_other_classes(checkpoint, queries, tmp_path):
    refs = make_crop_folders(tmp_path / "refs", classes=("brick", "coffee"), per_class=5, size=32)
    result = evaluate(checkpoint, queries, tmp_path / "out", reference_dir=refs, device="cpu")
    report = json.loads(result.metrics_path.read_text())
    assert report["inputs"]["class_names"] == ["brick", "coffee", "grass", "gravel"]
    assert result.n_reference == 10 and report["inputs"]["exclude_self"] is False
    # grass and gravel have no reference: never predicted right
    assert report["per_class_accuracy"]["grass"] == report["per_class_accuracy"]["gravel"] == 0
    assert result.metrics["precision_at_1"] <= 8 / 24


def test_cli_evaluate(checkpoint, queries, tmp_path):
    args = ["-q", "evaluate", "--checkpoint", str(checkpoint), "--query-dir", str(queries)]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "24 queries, 24 references" in result.output and (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [("rgba", "has an alpha band"), ("text", "text.pt: "), ("missing", "no such folder")],
)
def test_evaluate_bad_input(checkpoint, queries, tmp_path, case, message):
    rgba = make_crop_folders(tmp_path / "rgba", classes=("brick", "grass"), per_class=2, bands=4)
    (tmp_path / "text.pt").write_text("hello")
    query = {"rgba": rgba, "missing": tmp_path / "missing"}.get(case, queries)
    ckpt = tmp_path / "text.pt" if case == "text" else checkpoint
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["-q", "evaluate", "--checkpoint", str(ckpt), "--query-dir", str(query),
              "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()


def test_expected_calibration_error_by_hand():
    scores = np.array([0.05, 0.15, 0.55, 0.58, 0.95, 0.97])
    correct = np.array([False, True, True, False, True, True])
    # bins of 0.1: [0, 0.1] holds 0.05 (right 0 of 1), (0.1, 0.2] 0.15 (1 of 1),
    # (0.5, 0.6] 0.55 and 0.58 (1 of 2, mean 0.565), (0.9, 1] 0.95 and 0.97 (2 of 2, 0.96)
    rel = reliability_bins(scores, correct)
    assert rel.counts.tolist() == [1, 1, 0, 0, 0, 2, 0, 0, 0, 2]
    np.testing.assert_allclose(rel.mean_score[[0, 1, 5, 9]], [0.05, 0.15, 0.565, 0.96])
    np.testing.assert_allclose(rel.accuracy[[0, 1, 5, 9]], [0.0, 1.0, 0.5, 1.0])
    ece = (1 * 0.05 + 1 * 0.85 + 2 * 0.065 + 2 * 0.04) / 6
    assert expected_calibration_error(scores, correct) == pytest.approx(ece)
    assert ece == pytest.approx(0.185)
    # 0 goes to the first bin, 1 to the last; a perfectly calibrated set scores 0
    edge = reliability_bins(np.array([0.0, 1.0]), np.array([False, True]))
    assert (edge.counts[0], edge.counts[-1]) == (1, 1)
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([False, True])) == 0.0
    with pytest.raises(InputError, match="scores must lie in"):
        reliability_bins(np.array([1.5]), np.array([True]))
