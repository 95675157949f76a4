import dataclasses
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image
from processes import child_env
from rasterio.transform import from_origin
from rasters import texture_mosaic, write_raster

from superdml.cli.commands import cli
from superdml.config.schema import CropsConfig, SegmentConfig
from superdml.core.errors import InputError, MissingInputError
from superdml.crops.cut import crop_tile, crop_tile_with_previews, make_rule
from superdml.crops.folder import CROPS_SCHEMA
from superdml.crops.rule import CropRule, extract_crops, read_crop_rule, to_uint8
from superdml.crops.stage import export_crops, majority_labels
from superdml.segment.run import load_segment_runs
from superdml.segment.stage import segment_raster


def superpixel_rows(path):
    return {row["segment_id"]: row for row in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosaic")
    rgb, truth = texture_mosaic(384)
    source = write_raster(root / "mosaic.tif", rgb)
    truth_tif = write_raster(root / "truth.tif", truth[None], nodata=0)
    segments = segment_raster(source, root / "seg", SegmentConfig(region_size=16, tile_size=128))
    return {"root": root, "rgb": rgb, "truth": truth, "truth_tif": truth_tif, "seg": segments}


def test_label_raster_sorts_crops_into_majority_class_folders(mosaic, tmp_path):
    config = CropsConfig(crop_size=24, per_class=15, min_purity=0.9)
    result = export_crops(mosaic["seg"].out_dir, tmp_path / "crops", config, mosaic["truth_tif"])
    assert result.per_class == {f"class_{k}": 15 for k in (1, 2, 3, 4)}
    table = pq.read_table(result.table_path).to_pylist()
    with rasterio.open(mosaic["seg"].segments_path) as src:
        segments = src.read(1)
    for row in table[::6]:
        inside = mosaic["truth"][segments == row["segment_id"]]
        values, counts = np.unique(inside, return_counts=True)
        assert row["label"] == f"class_{values[counts.argmax()]}"
        assert row["purity"] == pytest.approx(counts.max() / inside.size) and row["purity"] >= 0.9
        assert (tmp_path / "crops" / row["file"]).exists()
        assert row["file"] == f"{row['label']}/mosaic_{row['segment_id']}.png"


def test_crop_pixels_come_from_the_source_window(mosaic, tmp_path):
    result = export_crops(
        mosaic["seg"].out_dir, tmp_path / "c", CropsConfig(crop_size=16, mask="none", sample=5)
    )
    sp = superpixel_rows(mosaic["seg"].table_path)
    for row in pq.read_table(result.table_path).to_pylist():
        crop = np.asarray(Image.open(tmp_path / "c" / row["file"]))
        r, c = int(sp[row["segment_id"]]["row"]), int(sp[row["segment_id"]]["col"])
        expected = np.zeros((16, 16, 3), np.uint8)
        r0, c0 = r - 8, c - 8
        rr0, cc0 = max(r0, 0), max(c0, 0)
        window = mosaic["rgb"][:, rr0 : r0 + 16, cc0 : c0 + 16].transpose(1, 2, 0)
        expected[rr0 - r0 : rr0 - r0 + window.shape[0], cc0 - c0 : cc0 - c0 + window.shape[1]] = (
            window
        )
        np.testing.assert_array_equal(crop, expected)
        assert row["label"] == "unlabeled" and row["purity"] is None


@pytest.mark.parametrize("mask", ["none", "outside", "alpha"])
def test_mask_modes(mosaic, tmp_path, mask):
    result = export_crops(
        mosaic["seg"].out_dir,
        tmp_path / mask,
        CropsConfig(crop_size=32, mask=mask, sample=4, seed=3),
    )
    with rasterio.open(mosaic["seg"].segments_path) as src:
        segments = src.read(1)
    sp = superpixel_rows(mosaic["seg"].table_path)
    for row in pq.read_table(result.table_path).to_pylist():
        img = Image.open(tmp_path / mask / row["file"])
        assert img.mode == ("RGBA" if mask == "alpha" else "RGB")
        crop = np.asarray(img)
        r, c = int(sp[row["segment_id"]]["row"]), int(sp[row["segment_id"]]["col"])
        padded = np.pad(segments, 16)
        inside = padded[r : r + 32, c : c + 32] == row["segment_id"]
        if mask == "outside":
            assert (crop[~inside] == 0).all() and crop[inside].any()
        elif mask == "alpha":
            np.testing.assert_array_equal(crop[..., 3], inside * 255)
            assert crop[~inside, :3].any()  # context kept
    rule = read_crop_rule(tmp_path / mask)
    assert rule == CropRule(crop_size=32, mask=mask, source_bands=3)
    meta = json.loads(pq.read_schema(result.table_path).metadata[b"superdml"])
    assert meta["crop_rule"]["mask"] == mask


def test_sample_is_seeded_and_sized(mosaic, tmp_path):
    a = export_crops(
        mosaic["seg"].out_dir, tmp_path / "a", CropsConfig(crop_size=16, sample=20, seed=1)
    )
    b = export_crops(
        mosaic["seg"].out_dir, tmp_path / "b", CropsConfig(crop_size=16, sample=20, seed=1)
    )
    c = export_crops(
        mosaic["seg"].out_dir, tmp_path / "c", CropsConfig(crop_size=16, sample=20, seed=2)
    )
    ids = [pq.read_table(r.table_path).column("segment_id").to_pylist() for r in (a, b, c)]
    assert len(ids[0]) == 20 and ids[0] == ids[1] and ids[0] != ids[2]
    assert len(list((tmp_path / "a" / "unlabeled").glob("*.png"))) == 20


def test_per_class_keeps_rare_classes_whole(tmp_path):
    rgb, _ = texture_mosaic(256)
    truth = np.ones((256, 256), np.uint8)
    truth[:40, :40] = 2  # a rare class: a few superpixels
    source = write_raster(tmp_path / "m.tif", rgb)
    labels = write_raster(tmp_path / "t.tif", truth[None])
    seg = segment_raster(source, tmp_path / "seg", SegmentConfig(region_size=16, tile_size=128))
    names = tmp_path / "classes.yaml"
    names.write_text("1: field\n2: pond\n")
    config = CropsConfig(crop_size=16, per_class=30, min_purity=0.99)
    result = export_crops(seg.out_dir, tmp_path / "c", config, labels, classes=names)
    assert result.per_class["field"] == 30
    assert 1 <= result.per_class["pond"] < 30


def test_label_raster_on_another_grid_is_reprojected(mosaic, tmp_path):
    fine = np.repeat(np.repeat(mosaic["truth"], 2, axis=0), 2, axis=1)  # 1 m pixels, same extent
    fine_tif = write_raster(
        tmp_path / "fine.tif", fine[None], transform_=from_origin(500_000.0, 4_000_000.0, 1.0, 1.0)
    )
    config = CropsConfig(crop_size=16, per_class=5, min_purity=0.9)
    a = export_crops(mosaic["seg"].out_dir, tmp_path / "a", config, fine_tif)
    b = export_crops(mosaic["seg"].out_dir, tmp_path / "b", config, mosaic["truth_tif"])
    assert (
        pq.read_table(a.table_path).column("label").to_pylist()
        == pq.read_table(b.table_path).column("label").to_pylist()
    )


def test_label_raster_that_does_not_overlap(mosaic, tmp_path):
    far = write_raster(
        tmp_path / "far.tif",
        mosaic["truth"][None],
        transform_=from_origin(900_000.0, 100_000.0, 2.0, 2.0),
    )
    with pytest.raises(InputError, match="far.tif: does not overlap"):
        export_crops(mosaic["seg"].out_dir, tmp_path / "c", CropsConfig(), far)
    assert not (tmp_path / "c" / "crops.parquet").exists()


def test_bad_inputs(mosaic, tmp_path):
    with pytest.raises(InputError, match="--per-class needs --label-raster"):
        export_crops(mosaic["seg"].out_dir, tmp_path / "c", CropsConfig(per_class=3))
    with pytest.raises(MissingInputError, match="nowhere: no such folder"):
        export_crops(tmp_path / "nowhere", tmp_path / "c")
    with pytest.raises(InputError, match="not a segment folder"):
        export_crops(tmp_path, tmp_path / "c")
    with pytest.raises(InputError, match="band 4 was not segmented|has 3 band"):
        export_crops(mosaic["seg"].out_dir, tmp_path / "c", CropsConfig(bands=(4,)))


# ------------------------------------------------- class names and label rasters


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def crops_cli(seg_dir, out, *options):
    args = ["-q", "crops", str(seg_dir), "--out", str(out), "--workers", "0", *map(str, options)]
    return CliRunner().invoke(cli, args)


def assert_one_line_error(result, message):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.output


NOT_A_FOLDER = "is not a folder name"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("1: a\n3: ../../x\n", f"class name '../../x' for code 3 {NOT_A_FOLDER} (it contains '/'"),
        ("3: /abs/path\n", f"class name '/abs/path' for code 3 {NOT_A_FOLDER} (it contains '/'"),
        ("2: a/b\n", f"class name 'a/b' for code 2 {NOT_A_FOLDER} (it contains '/'"),
        ("2: 'a\\b'\n", f"class name 'a\\\\b' for code 2 {NOT_A_FOLDER} (it contains '/'"),
        ("1: '.'\n", f"class name '.' for code 1 {NOT_A_FOLDER} (it starts with '.')"),
        ("1: '..'\n", f"class name '..' for code 1 {NOT_A_FOLDER} (it starts with '.')"),
        ("1: ''\n", f"class name '' for code 1 {NOT_A_FOLDER} (it is empty)"),
        ("1: ' field'\n", f"class name ' field' for code 1 {NOT_A_FOLDER} (it has leading"),
        ('1: "a\\tb"\n', f"class name 'a\\tb' for code 1 {NOT_A_FOLDER} (it contains a control"),
        ("4: Unknown\n", f"class name 'Unknown' for code 4 {NOT_A_FOLDER} ('unknown' and"),
        ("4: unlabeled\n", f"class name 'unlabeled' for code 4 {NOT_A_FOLDER} ('unknown' and"),
        (f"1: {'x' * 256}\n", f"class name '{'x' * 256}' for code 1 {NOT_A_FOLDER} (it is longer"),
        ("1: water\n2: Water\n", "codes 1 and 2 have the same class name ('water', 'Water')"),
        ("1: 2020\n", "class name 2020 for code 1 is not a string (got int)"),
        ("1: null\n", "class name None for code 1 is not a string (got NoneType)"),
        ("1: class_2\n", "class name 'class_2' for code 1 is the default name of code 2"),
        ("- field\n", "expected a YAML mapping of class code -> name"),
        ("1: [field\n", "not valid YAML (while parsing"),
    ],
)  # fmt: skip
def test_bad_class_names_from_yaml_write_nothing(mosaic, tmp_path, yaml_text, message):
    classes = tmp_path / "classes.yaml"
    classes.write_text(yaml_text)
    out = tmp_path / "a" / "crops"
    result = crops_cli(
        mosaic["seg"].out_dir, out, "--label-raster", mosaic["truth_tif"], "--classes", classes
    )
    assert_one_line_error(result, f"error: {classes}: {message}")
    assert files_under(tmp_path) == ["classes.yaml"]


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ('["brick", "../x"]', f"class name '../x' for code 2 {NOT_A_FOLDER} (it contains '/'"),
        ('["brick", "brick"]', "codes 1 and 2 have the same class name ('brick', 'brick')"),
        ('["brick", 7]', "class name 7 for code 2 is not a string (got int)"),
        ("brick,grass", "class_names tag 'brick,grass' is not a JSON object of code -> name"),
        ('{"a": "brick"}', 'class_names tag \'{"a": "brick"}\' is not a JSON object of code'),
    ],
)
def test_bad_class_names_tag_of_the_label_raster_writes_nothing(mosaic, tmp_path, tag, message):
    labels = write_raster(tmp_path / "labels.tif", mosaic["truth"][None], nodata=0)
    with rasterio.open(labels, "r+") as dst:
        dst.update_tags(1, class_names=tag)
    result = crops_cli(mosaic["seg"].out_dir, tmp_path / "crops", "--label-raster", labels)
    assert_one_line_error(result, f"error: {labels}: {message}")
    assert files_under(tmp_path) == ["labels.tif"]


def test_class_names_tag_names_the_folders(mosaic, tmp_path):
    labels = write_raster(tmp_path / "labels.tif", mosaic["truth"][None], nodata=0)
    with rasterio.open(labels, "r+") as dst:
        dst.update_tags(1, class_names='["brick", "grass", "gravel", "coffee"]')
    result = crops_cli(
        mosaic["seg"].out_dir, tmp_path / "crops", "--label-raster", labels, "--per-class", 2,
        "--crop-size", 16,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in (tmp_path / "crops").iterdir() if p.is_dir())
    assert folders == ["brick", "coffee", "grass", "gravel"]


def test_float_label_raster_with_nan_nodata_writes_nothing(mosaic, tmp_path):
    labels = write_raster(
        tmp_path / "labels.tif", mosaic["truth"][None].astype(np.float32), nodata=float("nan")
    )
    result = crops_cli(mosaic["seg"].out_dir, tmp_path / "crops", "--label-raster", labels)
    assert_one_line_error(
        result, f"error: {labels}: label raster must be of an integer type (class values), got"
    )
    assert files_under(tmp_path) == ["labels.tif"]


def test_a_crops_tile_without_superpixels(tmp_path):
    """Crops tiles are 2048 px: the second tile of this strip is all nodata."""
    rgb, _ = texture_mosaic(256)
    strip = np.zeros((3, 32, 2100), np.uint8)
    strip[:, :, :2048] = np.tile(rgb[:, :32, :], (1, 1, 8))
    strip[:, :, :2048] = np.maximum(strip[:, :, :2048], 1)  # 0 is nodata
    source = write_raster(tmp_path / "strip.tif", strip, nodata=0)
    truth = np.ones((1, 32, 2100), np.uint8)
    truth[:, :, 1024:] = 2
    labels = write_raster(tmp_path / "truth.tif", truth)
    seg = segment_raster(source, tmp_path / "seg", SegmentConfig(region_size=16, tile_size=512))
    cols = pq.read_table(seg.table_path).column("col").to_numpy()
    assert len(cols) > 0 and cols.max() < 2048
    result = crops_cli(
        seg.out_dir, tmp_path / "crops", "--label-raster", labels, "--crop-size", 16,
        "--per-class", 3,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "crops" / "crops.parquet")
    assert table.schema.remove_metadata() == CROPS_SCHEMA  # review's schema too
    assert table.column("score").null_count == table.column("margin").null_count == 6
    assert sorted(table.column("label").to_pylist()) == ["class_1"] * 3 + ["class_2"] * 3
    pngs = sorted(
        str(p.relative_to(tmp_path / "crops")) for p in (tmp_path / "crops").rglob("*.png")
    )
    assert pngs == sorted(table.column("file").to_pylist())


CRASH = """
import os, sys
import superdml.crops.stage as stage
from superdml.config.schema import CropsConfig

stage.TILE_SIZE = 64  # four batches
real, renamed = os.replace, []

def replace(src, dst):  # dies like a killed process after `limit` crop files: no cleanup
    if ".sdml-tmp-" in str(src) and str(dst).endswith((".tif", ".png")):
        if len(renamed) == int(sys.argv[3]):
            os._exit(9)
        renamed.append(dst)
    real(src, dst)

os.replace = replace
stage.export_crops(sys.argv[1], sys.argv[2], CropsConfig(crop_size=16))
"""


def file_bytes(root):
    """Every file under `root` but the lock (relative path -> bytes)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".superdml.lock"
    }


@pytest.fixture(scope="module")
def four_bands(tmp_path_factory):
    """The segment run of a 4-band uint16 mosaic (lossless crops)."""
    root = tmp_path_factory.mktemp("four")
    rgb, _ = texture_mosaic(128)
    nir = 65535 - 257 * rgb.mean(axis=0, keepdims=True)
    pixels = np.concatenate([rgb.astype(np.uint16) * 257, nir.astype(np.uint16)])
    source = write_raster(root / "four.tif", pixels)
    return segment_raster(source, root / "seg", SegmentConfig(region_size=16)).out_dir


@pytest.mark.parametrize("mask", ["none", "outside", "alpha"])
def test_previews_are_the_crops_preview_bands_and_black_where_masked(four_bands, mask):
    run = load_segment_runs(four_bands)[0]
    rule = make_rule([run], CropsConfig(crop_size=16, mask=mask))
    table = run.superpixels_in(0, 0, 128, 128)
    crops, previews = crop_tile_with_previews(run, rule, table)
    np.testing.assert_array_equal(crops, crop_tile(run, rule, table)[0])
    unmasked = crop_tile(run, dataclasses.replace(rule, mask="none"), table)[0]
    expected = np.stack([rule.preview_bands(crop) for crop in unmasked])
    if mask == "outside":
        expected *= (crops > 0).any(axis=1, keepdims=True)  # no pixel of the texture is 0
    if mask == "alpha":
        expected = np.concatenate([expected, crops[:, -1:].astype(np.uint8)], axis=1)
    assert previews.dtype == np.uint8 and previews.shape == (
        len(crops),
        3 + (mask == "alpha"),
        16,
        16,
    )
    np.testing.assert_array_equal(previews, expected)


def test_a_run_killed_mid_tile_leaves_no_table_and_whole_files_and_a_rerun_finishes(
    four_bands, tmp_path
):
    seg = four_bands
    clean = export_crops(seg, tmp_path / "clean", CropsConfig(crop_size=16))
    expected = file_bytes(tmp_path / "clean")
    n_files = 2 * clean.n_crops  # chips and previews
    assert n_files == sum(name.endswith((".tif", ".png")) for name in expected) > 40
    out = tmp_path / "out"
    limit = 2 * (clean.n_crops // 2) + 1  # halfway, in a later batch: after a chip
    command = [sys.executable, "-c", CRASH, str(seg), str(out), str(limit)]
    killed = subprocess.run(command, env=child_env())
    assert killed.returncode == 9
    found = file_bytes(out)
    assert "crops.parquet" not in found
    named = {name: data for name, data in found.items() if name.endswith((".tif", ".png"))}
    assert len(named) == limit  # and the rest of the batch waits in temporaries:
    assert any(".sdml-tmp-" in name for name in found)
    for name, data in named.items():  # every file under its name is whole
        assert data == expected[name], name
    rerun = export_crops(seg, out, CropsConfig(crop_size=16))
    assert rerun.n_crops == clean.n_crops
    assert file_bytes(out) == expected  # every file the table names, no leftover


# --------------------------------------------------------------- pure functions


def test_extract_crops_gathers_and_masks():
    window = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6)
    segments = np.zeros((6, 6), np.uint32)
    segments[1:3, 1:3] = 7
    crops = extract_crops(window, segments, np.array([7]), np.array([[2, 2]]), 4, "outside")
    assert crops.shape == (1, 2, 4, 4)
    expected = window[:, 0:4, 0:4] * (segments[0:4, 0:4] == 7)
    np.testing.assert_array_equal(crops[0], expected)
    alpha = extract_crops(window, segments, np.array([7]), np.array([[2, 2]]), 4, "alpha")
    np.testing.assert_array_equal(alpha[0, :2], window[:, 0:4, 0:4])
    np.testing.assert_array_equal(alpha[0, 2], (segments[0:4, 0:4] == 7) * 255)
    with pytest.raises(ValueError, match="window edge"):
        extract_crops(window, segments, np.array([7]), np.array([[1, 1]]), 4, "none")


def test_to_uint8_scales_by_percentile_range_and_zeroes_nodata():
    pixels = np.array([[[100, 600, 1100, 5000]]], dtype=np.uint16)
    valid = np.array([[True, True, True, False]])
    out = to_uint8(pixels, [100.0], [1100.0], valid)
    np.testing.assert_array_equal(out, [[[0, 128, 255, 0]]])
    same = to_uint8(np.array([[[3, 250]]], np.uint8), [0.0], [255.0])
    np.testing.assert_array_equal(same, [[[3, 250]]])


def test_majority_labels_by_hand():
    segments = np.array([[1, 1, 2, 2], [1, 1, 2, 3]], np.uint32)
    classes = np.array([[5, 5, 6, 0], [5, 6, 0, 0]])
    majority, purity = majority_labels(segments, classes, np.array([2, 1, 3]), class_nodata=0)
    np.testing.assert_array_equal(majority, [6, 5, -1])
    np.testing.assert_allclose(purity, [1 / 3, 3 / 4, 0])
