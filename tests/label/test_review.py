"""superdml review: the least certain superpixels of a label run, cut for relabeling."""

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from rasters import texture_mosaic, write_raster

import superdml.learn.embed
from superdml.cli.commands import cli
from superdml.config.schema import (
    IndexConfig,
    LabelConfig,
    ReviewConfig,
    SegmentConfig,
)
from superdml.core.errors import ConfigError, InputError, MissingInputError
from superdml.crops.cut import crop_tile
from superdml.crops.folder import CROPS_SCHEMA
from superdml.crops.rule import CropRule, read_crop_rule
from superdml.label.index import build_index
from superdml.label.review import POOL_FACTOR, pick_diverse, pick_lowest, review
from superdml.label.stage import label
from superdml.segment.run import load_segment_runs
from superdml.segment.stage import segment_raster

CLASSES = ["class_1", "class_2", "class_3", "class_4"]


@pytest.fixture(scope="module")
def world(shared_world, tmp_path_factory):
    """The shared world labeled here (untrained model: varied scores), embeddings kept.

    The similarity threshold makes the least similar tenth ``unknown``.
    """
    root = tmp_path_factory.mktemp("review")
    shutil.copy2(shared_world.mosaic, root / "mosaic.tif")
    checkpoint, seg = shared_world.checkpoint, shared_world.seg
    # float32: bf16 rounds this untrained model's near-equal embeddings to exact ties of
    # (score, margin), which the expected picks below would order arbitrarily
    fp32 = IndexConfig(precision="fp32")
    build_index(checkpoint, shared_world.crops, root / "ref", fp32, "cpu")
    config = LabelConfig(
        k=5, tile_size=128, batch_size=64, crop_size=40, keep_embeddings=True, precision="fp32"
    )
    out = root / "out"
    label(seg.out_dir, checkpoint, root / "ref", out, config, device="cpu")
    similarity = pq.read_table(out / "predictions").column("similarity").to_numpy()
    threshold = float(np.quantile(similarity, 0.1))
    label_config = LabelConfig(**{**config.__dict__, "unknown_threshold": threshold})
    label(seg.out_dir, checkpoint, root / "ref", out, label_config, device="cpu", overwrite=True)
    return {"root": root, "seg": seg, "out": out, "checkpoint": checkpoint}


def predictions(world):
    return pq.read_table(world["out"] / "predictions").sort_by("segment_id")


def lowest(table, n=None):
    """The expected picks: by score, then margin, lowest first."""
    order = np.lexsort((table.column("margin").to_numpy(), table.column("score").to_numpy()))
    return table.take(pa.array(order[:n]))


def candidates(world, max_score):
    table = predictions(world)
    keep = pc.and_(
        pc.less_equal(table.column("score"), max_score),
        pc.not_equal(table.column("label"), "unknown"),
    )
    return table.filter(keep)


def kept_embeddings(world, ids):
    files = sorted((world["out"] / "embeddings").rglob("*.npz"))
    stored = [np.load(f) for f in files]
    all_ids = np.concatenate([s["segment_id"] for s in stored])
    emb = np.concatenate([s["embeddings"] for s in stored]).astype(np.float32)
    return emb[[int(np.flatnonzero(all_ids == i)[0]) for i in ids]]


@pytest.fixture(scope="module")
def reviewed(world):
    folder = world["root"] / "review"
    max_score = float(np.quantile(predictions(world).column("score").to_numpy(), 0.5))
    result = review(
        world["out"], world["seg"].out_dir, folder, ReviewConfig(max_score=max_score, limit=20)
    )
    return {"folder": folder, "result": result, "max_score": max_score}


# ------------------------------------------------------------------ pure functions


def test_pick_lowest_orders_by_score_then_margin_and_caps_each_class():
    score = np.array([0.5, 0.2, 0.5, 0.1, 0.3, 0.2], np.float32)
    margin = np.array([0.3, 0.1, 0.1, 0.0, 0.2, 0.05], np.float32)
    classes = np.array([1, 1, 2, 2, 1, 1])
    np.testing.assert_array_equal(pick_lowest(score, margin, classes), [3, 5, 1, 4, 2, 0])
    np.testing.assert_array_equal(pick_lowest(score, margin, classes, limit=3), [3, 5, 1])
    np.testing.assert_array_equal(pick_lowest(score, margin, classes, per_class=1), [3, 5])
    np.testing.assert_array_equal(pick_lowest(score, margin, classes, 3, per_class=2), [3, 5, 1])


def test_pick_diverse_takes_one_member_of_each_blob():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    blob = np.repeat(np.arange(3), [30, 5, 2])  # lopsided: the lowest 3 are all of blob 0
    points = centers[blob] + rng.normal(0, 0.3, (blob.size, 2)).astype(np.float32)
    picks = pick_diverse(points, 3)
    assert sorted(blob[picks]) == [0, 1, 2]
    np.testing.assert_array_equal(pick_diverse(points[:2], 3), [0, 1])


# ---------------------------------------------------------------------------- stage


def test_picks_the_lowest_scores(world, reviewed):
    table = pq.read_table(reviewed["folder"] / "crops.parquet")
    assert table.schema.remove_metadata() == CROPS_SCHEMA  # the schema of crops' tables
    assert table.column("purity").null_count == 20
    expected = lowest(candidates(world, reviewed["max_score"]), 20)
    assert reviewed["result"].n_crops == table.num_rows == 20
    assert table.column("segment_id").to_pylist() == expected.column("segment_id").to_pylist()
    assert table.column("label").to_pylist() == expected.column("label").to_pylist()
    np.testing.assert_array_equal(table.column("score"), expected.column("score"))
    assert max(table.column("score").to_pylist()) <= reviewed["max_score"]
    assert reviewed["result"].per_class == {
        d["values"]: d["counts"] for d in pc.value_counts(table.column("label")).to_pylist()
    }


def test_files_are_the_crops_of_the_label_runs_rule(world, reviewed):
    folder = reviewed["folder"]
    table = pq.read_table(folder / "crops.parquet")
    files = table.column("file").to_pylist()
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")) == sorted(files)
    for file, name, sid, score in zip(
        files, table.column("label").to_pylist(), table.column("segment_id").to_pylist(),
        table.column("score").to_pylist(), strict=True,
    ):  # fmt: skip
        assert file == f"{name}/mosaic_{sid}_s{score:.2f}.png"
    rule = CropRule.from_dict(json.loads((world["out"] / "label.json").read_text())["crop_rule"])
    assert rule.crop_size == 40 and read_crop_rule(folder) == rule
    rows = pq.read_table(world["seg"].table_path)
    rows = rows.filter(
        pc.is_in(rows.column("segment_id"), table.column("segment_id").combine_chunks())
    )
    crops, ids = crop_tile(load_segment_runs(world["seg"].out_dir)[0], rule, rows)
    by_id = dict(zip(ids.tolist(), crops, strict=True))
    for file, sid in zip(files, table.column("segment_id").to_pylist(), strict=True):
        png = np.asarray(Image.open(folder / file)).transpose(2, 0, 1)
        np.testing.assert_array_equal(png, by_id[sid])
    xy = rows.select(["segment_id", "x", "y"]).sort_by("segment_id")
    mine = table.select(["segment_id", "x", "y"]).sort_by("segment_id")
    assert mine.equals(xy)


def test_per_class_keeps_the_lowest_of_each_class(world, tmp_path):
    result = review(
        world["out"], world["seg"].out_dir, tmp_path, ReviewConfig(max_score=1.0, per_class=3)
    )
    table = pq.read_table(tmp_path / "crops.parquet")
    preds = candidates(world, 1.0)
    for name in set(preds.column("label").to_pylist()):
        of_class = preds.filter(pc.equal(preds.column("label"), name))
        expected = lowest(of_class, 3).column("segment_id").to_pylist()
        mine = table.filter(pc.equal(table.column("label"), name)).column("segment_id")
        assert mine.to_pylist() == expected
        assert result.per_class[name] == len(expected)
    assert result.n_crops == table.num_rows


def test_unknown_takes_the_unknown_superpixels(world, tmp_path):
    result = review(
        world["out"], world["seg"].out_dir, tmp_path, ReviewConfig(max_score=0.0, unknown=True)
    )
    preds = predictions(world)
    unknown = lowest(preds.filter(pc.equal(preds.column("label"), "unknown")))
    table = pq.read_table(tmp_path / "crops.parquet")
    assert 0 < result.n_crops == unknown.num_rows
    assert table.column("segment_id").to_pylist() == unknown.column("segment_id").to_pylist()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["unknown"]


def test_diverse_spreads_over_the_embedding_space(world, tmp_path, monkeypatch):
    """Kept embeddings made up: the pool lies in 8 blobs, its 10 lowest all in blob 0."""
    out = tmp_path / "out"
    shutil.copytree(world["out"], out, ignore=shutil.ignore_patterns("embeddings"))
    pool = lowest(candidates(world, 1.0), 8 * POOL_FACTOR).column("segment_id").to_numpy()
    blob_of = dict(zip(pool.tolist(), np.arange(pool.size) // 10, strict=True))
    rng = np.random.default_rng(0)
    for kept in (world["out"] / "embeddings").rglob("*.npz"):
        ids = np.load(kept)["segment_id"]
        blob = np.array([blob_of.get(int(i), rng.integers(8)) for i in ids])
        emb = np.eye(16, dtype=np.float32)[blob] + rng.normal(0, 0.02, (ids.size, 16))
        target = out / kept.relative_to(world["out"])
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, segment_id=ids, embeddings=emb.astype(np.float16))

    def no_model(*args, **kwargs):
        raise AssertionError("kept embeddings cover the pool: the model must not load")

    monkeypatch.setattr(superdml.learn.embed, "load_embedder", no_model)
    config = ReviewConfig(max_score=1.0, limit=8, diverse=True)
    review(out, world["seg"].out_dir, tmp_path / "diverse", config)
    review(out, world["seg"].out_dir, tmp_path / "again", config)
    review(out, world["seg"].out_dir, tmp_path / "lowest", ReviewConfig(max_score=1.0, limit=8))
    diverse = pq.read_table(tmp_path / "diverse" / "crops.parquet")
    assert diverse.equals(pq.read_table(tmp_path / "again" / "crops.parquet"))  # seeded
    low = pq.read_table(tmp_path / "lowest" / "crops.parquet").column("segment_id").to_pylist()
    assert {blob_of[i] for i in low} == {0}
    assert sorted(blob_of[i] for i in diverse.column("segment_id").to_pylist()) == list(range(8))


def test_diverse_embeds_with_the_checkpoint_without_kept_embeddings(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world["out"], out, ignore=shutil.ignore_patterns("embeddings"))
    config = ReviewConfig(max_score=1.0, per_class=2, diverse=True)
    result = review(out, world["seg"].out_dir, tmp_path / "r", config, device="cpu")
    assert 0 < result.n_crops <= 2 * len(result.per_class)
    assert all(n <= 2 for n in result.per_class.values())


def test_diverse_refuses_a_checkpoint_changed_since_labeling(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world["out"], out, ignore=shutil.ignore_patterns("embeddings"))
    checkpoint = shutil.copy(world["checkpoint"], tmp_path / "model.pt")
    with open(checkpoint, "ab") as f:
        f.write(b"changed")
    manifest = json.loads((out / "label.json").read_text())
    (out / "label.json").write_text(json.dumps({**manifest, "checkpoint": str(checkpoint)}))
    config = ReviewConfig(max_score=1.0, limit=4, diverse=True)
    with pytest.raises(InputError, match=r"model.pt: changed since labeling"):
        review(out, world["seg"].out_dir, tmp_path / "r", config, device="cpu")
    assert not (tmp_path / "r").exists()


def test_moved_raster_gives_the_same_crops(world, reviewed, tmp_path):
    moved = shutil.copy(world["root"] / "mosaic.tif", tmp_path / "moved.tif")
    config = ReviewConfig(max_score=reviewed["max_score"], limit=20)
    review(world["out"], world["seg"].out_dir, tmp_path / "r", config, raster=moved)
    for png in reviewed["folder"].rglob("*.png"):
        again = tmp_path / "r" / png.relative_to(reviewed["folder"])
        assert png.read_bytes() == again.read_bytes()


# ------------------------------------------------------------------------ bad input


def test_no_candidates_writes_nothing(world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="superdml"):
        result = review(
            world["out"], world["seg"].out_dir, tmp_path / "r", ReviewConfig(max_score=0.0)
        )
    assert result.n_crops == 0 and result.per_class == {}
    assert not (tmp_path / "r").exists()
    assert "nothing to review" in caplog.text


def make_stale(part):
    """Give a predictions part the provenance of other segments (as before a re-segmentation)."""
    table = pq.read_table(part)
    provenance = json.loads(table.schema.metadata[b"superdml"])
    provenance["segments"] = "the segments before"
    pq.write_table(table.replace_schema_metadata({"superdml": json.dumps(provenance)}), part)


def test_reviews_only_current_parts_and_refuses_a_run_without_any(world, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    parts = sorted((out / "predictions").rglob("*.parquet"))
    current = pq.read_table(parts[0]).column("segment_id").to_numpy()
    for part in parts[1:]:
        make_stale(part)
    config = ReviewConfig(max_score=1.0, unknown=True, limit=10_000)
    with caplog.at_level(logging.WARNING):
        result = review(out, world["seg"].out_dir, tmp_path / "review", config)
    reviewed = pq.read_table(tmp_path / "review" / "crops.parquet").column("segment_id")
    assert sorted(reviewed.to_numpy()) == sorted(current) and result.n_crops == len(current)
    assert "3 of 4 tiles have no current predictions" in caplog.text
    make_stale(parts[0])
    with pytest.raises(InputError, match="none of the 4 tiles has current predictions"):
        review(out, world["seg"].out_dir, tmp_path / "review2", config)
    assert not (tmp_path / "review2").exists()


def test_out_without_label_json(world, tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}: not a label output"):
        review(tmp_path, world["seg"].out_dir, tmp_path / "r")
    with pytest.raises(MissingInputError, match="nowhere: no such folder"):
        review(tmp_path / "nowhere", world["seg"].out_dir, tmp_path / "r")


def test_segments_that_were_not_labeled(world, tmp_path):
    other = write_raster(tmp_path / "other.tif", texture_mosaic(64)[0])
    seg = segment_raster(other, tmp_path / "seg", SegmentConfig(region_size=16, tile_size=64))
    with pytest.raises(InputError, match=r"seg/other: raster 'other' was not labeled in"):
        review(world["out"], seg.out_dir, tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("max_score", [-0.1, 1.5])
def test_max_score_outside_0_1(max_score):
    with pytest.raises(ConfigError, match=r"max_score: got .*expected a number in \[0, 1\]"):
        ReviewConfig(max_score=max_score)


def test_cli_review(world, reviewed, tmp_path):
    runner = CliRunner()
    folder = tmp_path / "r"
    result = runner.invoke(
        cli,
        ["-q", "review", str(world["out"]), "--segments", str(world["seg"].out_dir),
         "--out", str(folder), "--max-score", str(reviewed["max_score"]), "--limit", "20"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "20 crops to review" in result.output
    assert pq.read_table(folder / "crops.parquet").equals(
        pq.read_table(reviewed["folder"] / "crops.parquet")
    )
    bad = runner.invoke(
        cli, ["-q", "review", str(tmp_path), "--segments", str(world["seg"].out_dir),
              "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        f"error: {tmp_path}: not a label output (no label.json): run `superdml label` first"
    ]
    bad = runner.invoke(
        cli, ["-q", "review", str(world["out"]), "--segments", str(world["seg"].out_dir),
              "--out", str(tmp_path / "x"), "--max-score", "2"],
    )  # fmt: skip
    assert bad.exit_code == 2 and "max_score: got 2.0" in bad.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("class_names", "message"),
    [
        (["../../a", "../../b", "../../c", "../../d"],
         "class name '../../a' for class id 1 is not a folder name (it contains '/' or '\\')"),
        (["{tmp}/abs/a", "{tmp}/abs/b", "{tmp}/abs/c", "{tmp}/abs/d"],
         "class name '{tmp}/abs/a' for class id 1 is not a folder name (it contains '/' or '\\')"),
        (["a", "b", "unknown", "d"],
         "class name 'unknown' for class id 3 is not a folder name "
         "('unknown' and 'unlabeled' are reserved)"),
        (["a", "A", "b", "c"],
         "class ids 1 and 2 have the same class name ('a', 'A'): class names must be distinct"),
        ([1, 2, 3, 4], "class name 1 for class id 1 is not a string (got int)"),
    ],
)  # fmt: skip
def test_cli_review_refuses_class_names_that_are_not_folder_names(
    world, reviewed, tmp_path, class_names, message
):
    out = tmp_path / "out"
    shutil.copytree(world["out"] / "predictions", out / "predictions")
    meta = json.loads((world["out"] / "label.json").read_text())
    meta["class_names"] = [n.format(tmp=tmp_path) if isinstance(n, str) else n for n in class_names]
    (out / "label.json").write_text(json.dumps(meta))
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(
        cli,
        ["-q", "review", str(out), "--segments", str(world["seg"].out_dir),
         "--out", str(tmp_path / "r"), "--max-score", str(reviewed["max_score"]), "--limit", "20"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {out / 'label.json'}: {message.format(tmp=tmp_path)}"
    ]
    assert sorted(tmp_path.rglob("*")) == before


def test_a_rerun_may_replace_a_review_of_lossless_chips(tmp_path):
    from superdml.core.ownership import mark_output, remove_output
    from superdml.label.review import REVIEW_FILES

    folder = tmp_path / "review"
    (folder / "brick").mkdir(parents=True)
    mark_output(folder, "review")
    for name in ("mosaic_7_s0.31.tif", "mosaic_7_s0.31.png"):  # a chip and its preview
        (folder / "brick" / name).write_bytes(b"x")
    remove_output(folder, "review", REVIEW_FILES)
    assert list(folder.glob("brick/*")) == []  # before: "matches no pattern", refused
