"""One embedder and one labeling rule: every stage gives a crop the same vector and label.

The world's reference crops are crops of the labeled raster (what ``superdml crops``
cut from it), so the same pixels reach the model as PNG files (``index``, ``infer``,
``evaluate``, training's validation) and cut from the raster (``label``, ``review``).
Everything runs in float32, and every batch holds at least 16 crops: on the CPU a
smaller batch runs the model's linear head through another matrix-multiply kernel,
whose rows differ in the last bits (see :class:`superdml.learn.embed.Embedder`).
"""

import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import superdml.label.review as review_module
import superdml.label.stage as label_module
import superdml.learn.evaluate as evaluate_module
import superdml.learn.train as train_module
from superdml.cli.commands import cli
from superdml.config.schema import (
    CropsConfig,
    IndexConfig,
    LabelConfig,
    ReviewConfig,
    TrainConfig,
)
from superdml.crops.stage import export_crops
from superdml.label.index import build_index
from superdml.label.infer import infer
from superdml.label.review import review
from superdml.label.stage import label
from superdml.learn.data import ImageFolderDataset
from superdml.learn.evaluate import evaluate
from superdml.learn.sampling import stratified_split
from superdml.learn.train import train
from superdml.search.reference import ReferenceIndex

#: One tile and one batch per labeled raster: every superpixel is embedded together.
LABEL = LabelConfig(k=10, tile_size=256, batch_size=512, precision="fp32")
VAL_FRACTION = 0.25


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the module's fixtures and tests alike (sums split by thread
    count round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spy(monkeypatch, module, name, seen):
    """Replace ``module.name`` by a wrapper that records its arguments and result."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append((args, result))
        return result

    monkeypatch.setattr(module, name, spy)


@pytest.fixture(scope="module")
def world(shared_world, tmp_path_factory):
    """Cut 20 crops per class of the shared world's segments, train one epoch (fp32) and
    index them.

    Returns a dict: ``root``, ``seg`` (the segment run), ``checkpoint`` (``best.pt``),
    ``validation`` (what training's validation embedded), ``vectors`` (file -> the
    reference's embedding) and ``segment_of`` (file -> segment id of its superpixel).
    """
    root = tmp_path_factory.mktemp("identity")
    seg = shared_world.seg
    crops = CropsConfig(crop_size=32, per_class=20)
    export_crops(seg.out_dir, root / "crops", crops, shared_world.truth_tif)
    config = TrainConfig(
        input_size=32, embedding_size=16, epochs=1, loss="proxy_nca", classes_per_batch=4,
        samples_per_class=8, warmup_epochs=0, val_fraction=VAL_FRACTION,
    )  # fmt: skip
    seen: list = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _spy(monkeypatch, train_module, "retrieval_metrics", seen)
        trained = train(root / "crops", root / "model", config, device="cpu", precision="fp32")
    ((args, _),) = seen
    checkpoint = trained.best_path
    build_index(checkpoint, root / "crops", root / "ref", IndexConfig(precision="fp32"), "cpu")
    files = json.loads((root / "ref" / "files.json").read_text())
    table = pq.read_table(root / "crops" / "crops.parquet").to_pydict()
    return {
        "root": root,
        "seg": seg,
        "checkpoint": checkpoint,
        "config": config,
        "validation": {"val": args[0], "refs": args[2]},
        "vectors": dict(zip(files, np.load(root / "ref" / "embeddings.npy"), strict=True)),
        "segment_of": dict(zip(table["file"], table["segment_id"], strict=True)),
    }


@pytest.fixture(scope="module")
def halves(world, tmp_path_factory):
    """The even crops of each class as a reference (indexed), all crops as queries."""
    root = tmp_path_factory.mktemp("halves")
    crops = world["root"] / "crops"
    for folder in sorted(p for p in crops.iterdir() if p.is_dir()):
        (root / "ref_crops" / folder.name).mkdir(parents=True)
        for png in sorted(folder.glob("*.png"))[::2]:
            shutil.copy2(png, root / "ref_crops" / folder.name / png.name)
    build_index(
        world["checkpoint"], root / "ref_crops", root / "ref", IndexConfig(precision="fp32"), "cpu"
    )
    return {"root": root, "ref_crops": root / "ref_crops", "ref": root / "ref"}


@pytest.fixture(scope="module")
def evaluated(world, halves, tmp_path_factory):
    """``evaluate`` of every crop against the even half; what it embedded and wrote."""
    seen: list = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _spy(monkeypatch, evaluate_module, "retrieval_metrics", seen)
        result = evaluate(
            world["checkpoint"], world["root"] / "crops", tmp_path_factory.mktemp("eval"),
            halves["ref_crops"], LABEL, device="cpu",
        )  # fmt: skip
    ((args, _),) = seen
    return {"embeddings": (args[0], args[2]), "result": result}


def _reference(world, files):
    """The reference's embeddings of `files`, an (N, D) array."""
    return np.stack([world["vectors"][f] for f in files])


def _files(folder):
    """Crop files of a labeled folder in dataset order, relative to it."""
    dataset = ImageFolderDataset(folder)
    return [path.relative_to(folder).as_posix() for path, _ in dataset.samples]


# ------------------------------------------------------------------- one embedder


def test_the_world_gives_every_path_the_same_crops(world):
    # 80 crops, each of one superpixel: the crops label and review cut are these files
    assert len(world["vectors"]) == 80
    assert set(world["segment_of"]) == set(world["vectors"])
    assert len(set(world["segment_of"].values())) == 80


def test_label_embeds_superpixels_like_index_embeds_their_crops(world, tmp_path, monkeypatch):
    seen: list = []
    _spy(monkeypatch, label_module, "_tile_embeddings", seen)
    config = dataclasses.replace(LABEL, keep_embeddings=True)
    out = tmp_path / "out"
    label(
        world["seg"].out_dir, world["checkpoint"], world["root"] / "ref", out, config, device="cpu"
    )
    ((args, embeddings),) = seen  # one tile
    row = {int(s): i for i, s in enumerate(args[3])}
    files = sorted(world["vectors"])
    rows = [row[world["segment_of"][f]] for f in files]
    np.testing.assert_array_equal(embeddings[rows], _reference(world, files))
    (kept_path,) = (out / "embeddings").rglob("*.npz")
    with np.load(kept_path) as kept:  # stored as float32: the very vectors label voted on
        np.testing.assert_array_equal(kept["segment_id"], args[3])
        assert kept["embeddings"].dtype == np.float32
        np.testing.assert_array_equal(kept["embeddings"][rows], _reference(world, files))


def test_review_embeds_its_pool_like_index(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    label(
        world["seg"].out_dir, world["checkpoint"], world["root"] / "ref", out, LABEL, device="cpu"
    )
    seen: list = []
    _spy(monkeypatch, review_module, "_pool_embeddings", seen)
    config = ReviewConfig(max_score=1.0, limit=1000, diverse=True)  # every superpixel
    review(out, world["seg"].out_dir, tmp_path / "review", config, device="cpu")
    ((args, embeddings),) = seen
    pool = args[1]
    row = {int(s): i for i, s in enumerate(pool.segment_id)}
    assert len(row) == world["seg"].n_superpixels  # computed, none kept
    files = sorted(world["vectors"])
    rows = [row[world["segment_of"][f]] for f in files]
    np.testing.assert_array_equal(embeddings[rows], _reference(world, files))


def test_infer_embeds_images_like_index(world, monkeypatch):
    seen: list = []
    _spy(monkeypatch, ReferenceIndex, "search", seen)
    files = sorted(world["vectors"])
    images = [world["root"] / "crops" / f for f in files]
    infer(images, world["checkpoint"], world["root"] / "ref", config=LABEL, device="cpu")
    ((args, _),) = seen
    np.testing.assert_array_equal(args[1], _reference(world, files))


def test_a_batch_of_a_few_crops_differs_only_in_the_last_bits(world, monkeypatch):
    seen: list = []
    _spy(monkeypatch, ReferenceIndex, "search", seen)
    files = sorted(world["vectors"])[:3]
    images = [world["root"] / "crops" / f for f in files]
    infer(images, world["checkpoint"], world["root"] / "ref", config=LABEL, device="cpu")
    ((args, _),) = seen
    # another matrix-multiply kernel for the linear head of a batch of 3 rows
    np.testing.assert_allclose(args[1], _reference(world, files), rtol=0, atol=1e-6)


def test_evaluate_embeds_queries_and_references_like_index(world, halves, evaluated):
    query, reference = evaluated["embeddings"]
    np.testing.assert_array_equal(query, _reference(world, _files(world["root"] / "crops")))
    np.testing.assert_array_equal(reference, _reference(world, _files(halves["ref_crops"])))


def test_training_validation_embeds_like_index_with_the_saved_checkpoint(world):
    files = _files(world["root"] / "crops")
    labels = ImageFolderDataset(world["root"] / "crops").labels
    train_idx, val_idx = stratified_split(labels, VAL_FRACTION, world["config"].seed)
    assert len(val_idx) >= 16  # one batch the CPU embeds row by row alike
    validation = world["validation"]
    np.testing.assert_array_equal(
        validation["refs"], _reference(world, [files[i] for i in train_idx])
    )
    np.testing.assert_array_equal(validation["val"], _reference(world, [files[i] for i in val_idx]))


# ------------------------------------------------------------- one labeling rule


def test_label_infer_and_evaluate_give_a_crop_the_same_class_and_score(
    world, halves, evaluated, tmp_path
):
    out = tmp_path / "labeled"
    result = CliRunner().invoke(
        cli,
        ["-q", "label", str(world["seg"].out_dir), "--checkpoint", str(world["checkpoint"]),
         "--reference", str(halves["ref"]), "--out", str(out), "--k", "10",
         "--tile-size", "256", "--batch-size", "512", "--precision", "fp32",
         "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    predictions = pq.read_table(out / "predictions").to_pydict()
    by_segment = {
        s: (name, score)
        for s, name, score in zip(
            predictions["segment_id"], predictions["label"], predictions["score"], strict=True
        )
    }
    crops = world["root"] / "crops"
    files = _files(crops)
    labeled = [by_segment[world["segment_of"][f]] for f in files]

    inferred = infer(
        [crops / f for f in files], world["checkpoint"], halves["ref"], config=LABEL,
        device="cpu",
    )  # fmt: skip
    table = pq.read_table(evaluated["result"].predictions_path).to_pydict()
    assert table["file"] == files

    assert [r.label for r in inferred] == [name for name, _ in labeled] == table["label"]
    scores = np.array([score for _, score in labeled], np.float32)
    np.testing.assert_array_equal(np.array([r.score for r in inferred], np.float32), scores)
    np.testing.assert_array_equal(np.array(table["score"], np.float32), scores)
    # references keep their class with score 1 (the exact-match rule); the others vote
    is_reference = np.array([(halves["ref_crops"] / f).exists() for f in files])
    assert is_reference.sum() == 40
    assert (scores[is_reference] == 1).all()
    assert [table["label"][i] for i in np.flatnonzero(is_reference)] == [
        table["true_label"][i] for i in np.flatnonzero(is_reference)
    ]
    assert (scores[~is_reference] < 1).any()


def test_one_label_config_gives_a_crop_one_label_in_label_infer_and_evaluate(
    world, halves, evaluated, tmp_path
):
    """label, infer and evaluate read the same label.yaml, with a rule far from the defaults."""
    crops, files = world["root"] / "crops", _files(world["root"] / "crops")
    nearest = pq.read_table(evaluated["result"].predictions_path)["similarity"].to_numpy()
    threshold = float(np.median(nearest[nearest < 0.999]))  # about half the non-references
    rule = tmp_path / "label.yaml"
    rule.write_text(
        f"k: 4\nweighting: softmax\ntemperature: 0.02\nunknown_threshold: {threshold}\n"
        "tile_size: 256\nbatch_size: 512\nprecision: fp32\n"
    )
    common = ["--checkpoint", str(world["checkpoint"]), "--config", str(rule), "--device", "cpu"]
    runner = CliRunner()
    out = tmp_path / "labeled"
    result = runner.invoke(
        cli, ["-q", "label", str(world["seg"].out_dir), "--reference", str(halves["ref"]),
              "--out", str(out), "--workers", "0", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    predictions = pq.read_table(out / "predictions").to_pydict()
    by_segment = dict(zip(predictions["segment_id"], predictions["label"], strict=True))
    labeled = [by_segment[world["segment_of"][f]] for f in files]

    result = runner.invoke(
        cli, ["-q", "infer", *[str(crops / f) for f in files], "--reference", str(halves["ref"]),
              *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    inferred = [line.split(": ")[1].split(" (score")[0] for line in result.output.splitlines()
                if not line.startswith("  ")]  # fmt: skip

    result = runner.invoke(
        cli, ["-q", "evaluate", "--query-dir", str(crops), "--reference-dir",
              str(halves["ref_crops"]), "--out", str(tmp_path / "eval"), *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated_labels = pq.read_table(tmp_path / "eval" / "predictions.parquet")["label"].to_pylist()

    assert inferred == labeled == evaluated_labels
    assert 5 <= labeled.count("unknown") <= 35  # the threshold is applied by all three
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["inputs"]["rule"]["k"] == 4 and report["inputs"]["rule"]["weighting"] == "softmax"
