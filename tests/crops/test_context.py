"""Context views: a wider view of each superpixel, stacked after the crop's bands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import tifffile
from checkpoints import save_untrained_checkpoint
from click.testing import CliRunner
from rasters import write_top_half_labeled

from superdml.cli.commands import cli
from superdml.config.schema import (
    CropsConfig,
    LabelConfig,
    ReviewConfig,
    SegmentConfig,
    TrainConfig,
)
from superdml.core.errors import ConfigError, InputError
from superdml.crops.folder import CROPS_TABLE
from superdml.crops.rule import CropRule, context_views, extract_crops, read_crop_rule
from superdml.crops.stage import export_crops
from superdml.label.export import export
from superdml.label.index import build_index
from superdml.label.infer import infer
from superdml.label.review import review
from superdml.label.stage import label
from superdml.learn.checkpoint import load_checkpoint
from superdml.learn.train import train
from superdml.segment.stage import segment_raster

# ------------------------------------------------------------------ pure functions


def test_context_views_are_block_means_of_the_wider_square():
    rng = np.random.default_rng(0)
    window = rng.integers(0, 65535, (2, 30, 30), dtype=np.uint16)
    centers = np.array([[15, 15], [12, 14]])
    views = context_views(window, centers, 4, 3)  # 12 px around each center, 4 x 4 blocks
    assert views.shape == (2, 2, 4, 4) and views.dtype == np.uint16
    for view, (row, col) in zip(views, centers, strict=True):
        square = window[:, row - 6 : row + 6, col - 6 : col + 6].astype(np.float64)
        expected = np.rint(square.reshape(2, 4, 3, 4, 3).mean(axis=(2, 4)))
        np.testing.assert_array_equal(view, expected)
    floats = context_views(window.astype(np.float32), centers, 4, 3)
    assert floats.dtype == np.float32 and np.abs(floats - views).max() <= 0.5
    with pytest.raises(ValueError, match="window edge"):
        context_views(window, np.array([[5, 15]]), 4, 3)


@pytest.mark.parametrize("mask", ["none", "outside", "alpha"])
def test_extract_crops_stacks_the_unmasked_context_after_the_crop(mask):
    window = np.arange(3 * 24 * 24, dtype=np.uint32).reshape(3, 24, 24).astype(np.uint16)
    segments = np.zeros((24, 24), np.uint32)
    segments[10:14, 10:14] = 7
    ids, centers = np.array([7]), np.array([[12, 12]])
    plain = extract_crops(window, segments, ids, centers, 4, mask)
    wide = extract_crops(window, segments, ids, centers, 4, mask, context=4)
    assert wide.shape == (1, 6 + (mask == "alpha"), 4, 4) and wide.dtype == window.dtype
    np.testing.assert_array_equal(wide[:, :3], plain[:, :3])
    np.testing.assert_array_equal(wide[:, 3:6], context_views(window, centers, 4, 4))
    if mask == "alpha":
        np.testing.assert_array_equal(wide[:, 6], plain[:, 3])


def test_the_rule_records_its_context_and_old_rules_keep_their_keys():
    old = CropRule(32, "outside")
    assert "context" not in old.to_dict()  # earlier predictions' provenance keys hold
    assert CropRule.from_dict(old.to_dict()) == old
    rule = CropRule(32, "alpha", context=3)
    assert rule.to_dict()["context"] == 3
    assert CropRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert (old.chips, rule.chips, rule.chip_dtype, rule.channels) == (False, True, "uint8", 7)
    lossless = CropRule(16, "alpha", (1, 2, 3, 4), dtype="uint16", lo=(0,) * 4, hi=(100,) * 4)
    wide = CropRule.from_dict({**lossless.to_dict(), "context": 2})
    assert (wide.context, wide.channels) == (2, 9)
    unit = wide.to_unit(np.full((9, 2, 2), 50, np.uint16))
    np.testing.assert_allclose(unit[:8], 0.5)  # the context bands scale as the crop's
    np.testing.assert_allclose(unit[8], 50 / 255)


def test_context_must_be_at_least_two():
    with pytest.raises(ConfigError, match="context"):
        CropsConfig(context=1)


# -------------------------------------------------------------- islands end to end

SIZE, CELL, ISLAND = 192, 48, 16


def island_mosaic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gray noise islands (one texture for both classes) on a red or a blue ground.

    Returns
    -------
    rgb : (3, SIZE, SIZE) uint8 ndarray
    truth : (SIZE, SIZE) uint8 ndarray
        1 on islands in red cells, 2 on islands in blue cells, 0 on the ground.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    cell_class = ((rows // CELL + cols // CELL) % 2 + 1).astype(np.uint8)
    offset = (CELL - ISLAND) // 2
    island = (rows % CELL >= offset) & (rows % CELL < offset + ISLAND)
    island &= (cols % CELL >= offset) & (cols % CELL < offset + ISLAND)
    red, blue = np.array([200, 60, 60])[:, None, None], np.array([60, 60, 200])[:, None, None]
    ground = np.where(cell_class == 1, red, blue)
    gray = rng.normal(128, 30, (SIZE, SIZE)).clip(0, 255)
    rgb = np.where(island, gray, ground).astype(np.uint8)
    return rgb, np.where(island, cell_class, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def islands(tmp_path_factory) -> tuple[Path, Path, Path, np.ndarray]:
    """The island mosaic segmented; its top half's islands labeled; the truth."""
    root = tmp_path_factory.mktemp("islands")
    rgb, truth = island_mosaic()
    source, labels = write_top_half_labeled(root, rgb, truth)
    seg = segment_raster(source, root / "seg", SegmentConfig(region_size=8, tile_size=256))
    return root, seg.out_dir, labels, truth


def _train_index_label(root: Path, seg: Path, labels: Path, context: int | None) -> Path:
    crops = root / f"crops{context}"
    export_crops(seg, crops, CropsConfig(crop_size=16, mask="outside", context=context), labels)
    # four epochs: with context 0.967-0.969 of the unseen islands, alone 0.42-0.43 (one or
    # two threads; six epochs: 0.986 and 0.55)
    config = TrainConfig(
        input_size=16, embedding_size=16, epochs=4, loss="proxy_nca", classes_per_batch=2,
        samples_per_class=8, warmup_epochs=0, val_fraction=0.2,
    )  # fmt: skip
    checkpoint = train(crops, root / f"model{context}", config, device="cpu").best_path
    build_index(checkpoint, crops, root / f"ref{context}", device="cpu")
    out = root / f"labels{context}"
    label(seg, checkpoint, root / f"ref{context}", out, LabelConfig(k=5), device="cpu")
    return out


def _island_accuracy(out: Path, seg: Path, truth: np.ndarray) -> float:
    files = export(out, seg, "cog", "none").outputs["mosaic"]
    with rasterio.open(files["labels"]) as src:
        predicted = src.read(1)
    unseen = truth[SIZE // 2 :] > 0
    return float((predicted[SIZE // 2 :][unseen] == truth[SIZE // 2 :][unseen]).mean())


@pytest.mark.slow
def test_context_reaches_the_model(islands):
    root, seg, labels, truth = islands
    with_context = _island_accuracy(_train_index_label(root, seg, labels, 3), seg, truth)
    alone = _island_accuracy(_train_index_label(root, seg, labels, None), seg, truth)
    # the islands are one texture: only what surrounds them tells the classes apart
    assert with_context >= 0.95 and alone <= 0.75, (with_context, alone)


def _crops(seg: Path, labels: Path, out: Path, context: int | None) -> CropRule:
    config = CropsConfig(crop_size=16, mask="outside", per_class=6, context=context)
    export_crops(seg, out, config, labels)
    rule = read_crop_rule(out)
    assert rule is not None
    return rule


def test_train_index_and_label_cut_the_crop_rule_of_the_folder(islands, tmp_path):
    root, seg, labels, _ = islands
    rule = _crops(seg, labels, tmp_path / "wide", 3)
    assert rule == CropRule(16, "outside", source_bands=3, context=3)
    table = pq.read_table(tmp_path / "wide" / CROPS_TABLE)
    chip = tmp_path / "wide" / table.column("file")[0].as_py()
    assert tifffile.imread(chip).shape == (6, 16, 16) and chip.with_suffix(".png").is_file()
    config = TrainConfig(
        input_size=16, embedding_size=8, epochs=1, classes_per_batch=2, samples_per_class=2,
        warmup_epochs=0, val_fraction=0.0,
    )  # fmt: skip
    checkpoint = train(tmp_path / "wide", tmp_path / "model", config, device="cpu").best_path
    assert (load_checkpoint(checkpoint).rule, load_checkpoint(checkpoint).bands) == (rule, 6)
    build_index(checkpoint, tmp_path / "wide", tmp_path / "ref", device="cpu")
    out = tmp_path / "labels"
    label(seg, checkpoint, tmp_path / "ref", out, LabelConfig(k=3), device="cpu")
    assert json.loads((out / "label.json").read_text())["crop_rule"] == rule.to_dict()
    # review cuts the label run's inputs: infer on its chips votes as label did
    review(out, seg, tmp_path / "review", ReviewConfig(max_score=1.0, limit=6), device="cpu")
    assert read_crop_rule(tmp_path / "review") == rule
    chips = sorted((tmp_path / "review").glob("*/*.tif"))
    assert len(chips) == 6 and tifffile.imread(chips[0]).shape == (6, 16, 16)
    results = infer(chips, checkpoint, tmp_path / "ref", config=LabelConfig(k=3), device="cpu")
    assert [r.label for r in results] == [chip.parent.name for chip in chips]


def test_a_model_refuses_crops_of_another_context(islands, tmp_path):
    root, seg, labels, _ = islands
    plain, wide = tmp_path / "plain", tmp_path / "wide"
    models = {
        folder: save_untrained_checkpoint(
            tmp_path / f"{folder.name}.pt",
            ["1", "2"],
            input_size=16,
            bands=rule.channels,
            crop_rule=rule.to_dict(),
        )  # fmt: skip
        for folder, rule in (
            (plain, _crops(seg, labels, plain, None)),
            (wide, _crops(seg, labels, wide, 3)),
        )  # fmt: skip
    }
    commands = [
        ["index", "--checkpoint", str(models[wide]), "--reference-dir", str(plain)],
        ["evaluate", "--checkpoint", str(models[wide]), "--query-dir", str(plain)],
    ]
    for command in commands:
        out = tmp_path / f"out-{command[0]}"
        result = CliRunner().invoke(cli, [*command, "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1
        assert f"{plain}: crops with no context view, the checkpoint wide.pt takes a 3x" in (
            result.output
        )
        assert "cut them with --context 3" in result.output and not out.exists()
    command = ["index", "--checkpoint", str(models[plain]), "--reference-dir", str(wide)]
    result = CliRunner().invoke(cli, [*command, "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert result.exit_code == 2 and "crops with a 3x context view" in result.output
    assert "takes no context view: cut them without --context" in result.output
    config = TrainConfig(input_size=16, embedding_size=8, epochs=1)
    with pytest.raises(InputError, match=f"{plain}: crops with no context view, the training"):
        train(wide, tmp_path / "model", config, val_dir=plain, device="cpu")
