"""Multispectral mosaics end to end: every band of the crop rule reaches the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasters import write_raster, write_top_half_labeled

from superdml.config.schema import (
    CropsConfig,
    LabelConfig,
    ReviewConfig,
    SegmentConfig,
    TrainConfig,
)
from superdml.crops.stage import export_crops
from superdml.label.export import export
from superdml.label.index import build_index
from superdml.label.stage import label
from superdml.learn.train import train
from superdml.segment.stage import segment_raster

SIZE = 128
BLOCK = 32


def nir_mosaic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 4-band uint16 checkerboard of two classes equal in R, G, B, apart in NIR.

    Returns
    -------
    pixels : (4, SIZE, SIZE) uint16 ndarray
    truth : (SIZE, SIZE) uint8 ndarray, classes 1 and 2
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    truth = (((yy // BLOCK) + (xx // BLOCK)) % 2 + 1).astype(np.uint8)
    waves = np.stack([xx / 23, yy / 19, (xx + yy) / 29])  # one smooth texture, both classes
    rgb = 1200 + 150 * np.sin(2 * np.pi * waves) + rng.normal(0, 10, (3, SIZE, SIZE))
    nir = np.where(truth == 1, 3000.0, 1800.0) + rng.normal(0, 10, (SIZE, SIZE))
    pixels = np.concatenate([rgb, nir[None]]).clip(0, 65535).astype(np.uint16)
    return pixels, truth


def run_pipeline(root: Path, bands: tuple[int | str, ...] | None) -> float:
    """Segment, crop (top half labeled), train, index, label, export; pixel accuracy below."""
    root.mkdir()
    pixels, truth = nir_mosaic()
    source, labels = write_top_half_labeled(root, pixels, truth)
    seg = segment_raster(source, root / "seg", SegmentConfig(region_size=8, tile_size=128))
    crops = CropsConfig(crop_size=16, mask="outside", per_class=40, bands=bands)
    export_crops(seg.out_dir, root / "crops", crops, labels)
    # three epochs: every band 0.98 of the unseen half, RGB only 0.50 (two epochs gave
    # 0.945 to 0.977 with the thread count: too close to the 0.95 asked)
    config = TrainConfig(
        input_size=32, embedding_size=16, epochs=3, loss="proxy_nca", classes_per_batch=2,
        samples_per_class=8, warmup_epochs=0, val_fraction=0.2,
    )  # fmt: skip
    checkpoint = train(root / "crops", root / "model", config, device="cpu").best_path
    build_index(checkpoint, root / "crops", root / "ref", device="cpu")
    out = root / "out"
    label(seg.out_dir, checkpoint, root / "ref", out, LabelConfig(k=5), device="cpu")
    files = export(out, seg.out_dir, "cog", "gpkg").outputs["mosaic"]
    with rasterio.open(files["labels"]) as src:
        predicted = src.read(1)
    unseen = slice(SIZE // 2, None)
    return float((predicted[unseen] == truth[unseen]).mean())


@pytest.mark.slow
def test_the_nir_band_reaches_the_model(tmp_path):
    every_band = run_pipeline(tmp_path / "all", None)
    rgb_only = run_pipeline(tmp_path / "rgb", (1, 2, 3))
    assert every_band >= 0.95
    assert 0.3 <= rgb_only <= 0.75


# ---------------------------------------------------------------- refused mixtures


def _segmented(root: Path, pixels: np.ndarray, name: str = "mosaic", **extra: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    source = write_raster(root / f"{name}.tif", pixels, **extra)
    return segment_raster(source, root / "seg", SegmentConfig(16, tile_size=64)).out_dir


def _cli_crops(seg: Path, out: Path, *options: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from superdml.cli.commands import cli

    result = CliRunner().invoke(cli, ["crops", str(seg), "--out", str(out), *options])
    return result.exit_code, result.output


def test_lossless_crops_are_tiff_chips_with_previews_and_statistics(tmp_path):
    import tifffile

    from superdml.crops.rule import read_crop_rule

    pixels, _ = nir_mosaic()
    seg = _segmented(tmp_path, pixels[:, :64, :64])
    export_crops(seg, tmp_path / "crops", CropsConfig(crop_size=16, sample=5))
    rule = read_crop_rule(tmp_path / "crops")
    assert rule is not None and rule.lossless
    assert (rule.bands, rule.dtype, rule.channels) == ((1, 2, 3, 4), "uint16", 4)
    assert rule.lo[3] > 1700 and rule.hi[3] < 3100  # the NIR band's percentiles
    chips = sorted((tmp_path / "crops").rglob("*.tif"))
    assert len(chips) == 5
    chip = tifffile.imread(chips[0])
    assert chip.shape == (4, 16, 16) and chip.dtype == np.uint16
    assert chips[0].with_suffix(".png").exists()


def test_bands_by_description_and_missing_description(tmp_path):
    from superdml.crops.rule import read_crop_rule

    pixels, _ = nir_mosaic()
    path = tmp_path / "s2.tif"
    tmp_path.mkdir(exist_ok=True)
    write_raster(path, pixels[:, :64, :64])
    with rasterio.open(path, "r+") as dst:
        for i, name in enumerate(["B02", "B03", "B04", "B08"], 1):
            dst.set_band_description(i, name)
    seg = segment_raster(path, tmp_path / "seg", SegmentConfig(16, tile_size=64)).out_dir
    export_crops(seg, tmp_path / "crops", CropsConfig(crop_size=16, sample=3, bands=("b04", "B08")))
    rule = read_crop_rule(tmp_path / "crops")
    assert rule is not None and rule.bands == (3, 4) and rule.band_names == ("B04", "B08")
    code, output = _cli_crops(seg, tmp_path / "bad", "--bands", "B04,B13")
    assert code == 2
    assert "s2.tif" in output and "'B13'" in output and "B08" in output
    assert not (tmp_path / "bad" / "crops.parquet").exists()


def test_band_out_of_range_is_refused(tmp_path):
    pixels, _ = nir_mosaic()
    seg = _segmented(tmp_path, pixels[:, :64, :64])
    code, output = _cli_crops(seg, tmp_path / "bad", "--bands", "1,7")
    assert code == 2
    assert "mosaic.tif" in output and "band 7" in output


def test_rasters_of_different_dtypes_are_refused(tmp_path):
    pixels, _ = nir_mosaic()
    _segmented(tmp_path, pixels[:, :64, :64], "a")
    _segmented(tmp_path, (pixels[:, :64, :64] // 16).astype(np.int16), "b")
    code, output = _cli_crops(tmp_path / "seg", tmp_path / "bad")
    assert code == 2
    assert "b.tif" in output and "int16" in output and "uint16" in output


def test_a_four_band_rule_on_a_three_band_raster_is_refused(tmp_path):
    from superdml.core.errors import InputError
    from superdml.crops.cut import color_band_indexes, make_rule
    from superdml.segment.run import load_segment_runs

    pixels, _ = nir_mosaic()
    four = load_segment_runs(_segmented(tmp_path / "4", pixels[:, :64, :64]))
    three = load_segment_runs(_segmented(tmp_path / "3", pixels[:3, :64, :64]))
    rule = make_rule(four, CropsConfig(crop_size=16))
    with pytest.raises(InputError, match=r"mosaic.tif: has 3 band\(s\), .*band 4"):
        color_band_indexes(three[0], rule)


def test_an_eight_bit_rgb_raster_keeps_the_png_rule(tmp_path):
    from superdml.crops.rule import read_crop_rule

    pixels, _ = nir_mosaic()
    seg = _segmented(tmp_path, (pixels[:3, :64, :64] // 16).astype(np.uint8))
    export_crops(seg, tmp_path / "crops", CropsConfig(crop_size=16, sample=3))
    rule = read_crop_rule(tmp_path / "crops")
    assert rule is not None and not rule.lossless
    assert set(rule.to_dict()) == {"crop_size", "mask", "bands", "scaling", "source_bands"}
    assert len(list((tmp_path / "crops").rglob("*.png"))) == 3
    assert not list((tmp_path / "crops").rglob("*.tif"))


# ------------------------------------------------- a Sentinel-2 style stack, end to end

S2_NAMES = tuple(f"B{i:02d}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12))
S2_CHOSEN = "B04,B03,B02,B08"


def s2_stack(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A 12-band uint16 stack: red, green, blue and NIR of :func:`nir_mosaic` as B04,
    B03, B02 and B08, the other bands noise; and its truth (classes 1 and 2)."""
    pixels, truth = nir_mosaic()
    rng = np.random.default_rng(1)
    stack = rng.integers(500, 4000, (12, size, size)).astype(np.uint16)
    for name, band in (("B04", 0), ("B03", 1), ("B02", 2), ("B08", 3)):
        stack[S2_NAMES.index(name)] = pixels[band, :size, :size]
    return stack, truth[:size, :size]


def run_formats(root: Path, pixels: np.ndarray, truth: np.ndarray, *bands: str) -> dict:
    """Segment, crops from a label raster through the CLI (``bands`` its extra options),
    train one epoch, index, label, export, review; return the paths of every output."""
    from superdml.label.review import review

    root.mkdir()
    source = write_raster(root / "mosaic.tif", pixels)
    if len(pixels) == len(S2_NAMES):
        with rasterio.open(source, "r+") as dst:
            for i, name in enumerate(S2_NAMES, 1):
                dst.set_band_description(i, name)
    classes = write_raster(root / "truth.tif", truth[None], nodata=0)
    seg = segment_raster(source, root / "seg", SegmentConfig(region_size=8, tile_size=64)).out_dir
    options = ("--crop-size", "16", "--per-class", "12", "--workers", "0")
    code, output = _cli_crops(seg, root / "crops", *options, "--label-raster", str(classes), *bands)
    assert code == 0, output
    config = TrainConfig(
        input_size=32, embedding_size=8, epochs=1, loss="proxy_nca", classes_per_batch=2,
        samples_per_class=4, warmup_epochs=0, val_fraction=0.2,
    )  # fmt: skip
    checkpoint = train(root / "crops", root / "model", config, device="cpu").best_path
    build_index(checkpoint, root / "crops", root / "ref", device="cpu")
    out = root / "out"
    label(seg, checkpoint, root / "ref", out, LabelConfig(k=3), device="cpu")
    files = export(out, seg, "cog", "gpkg").outputs["mosaic"]
    reviewed = review(out, seg, root / "review", ReviewConfig(max_score=1.0, limit=6))
    assert reviewed.n_crops == 6
    return {**files, "parts": sorted(out.rglob("*.parquet")), "review": reviewed.folder,
            "crops": root / "crops"}  # fmt: skip


def _profile(path: Path) -> dict:
    with rasterio.open(path) as src:
        return {"profile": src.profile, "tags": src.tags(), "colormap": src.colormap(1)}


@pytest.mark.slow
def test_a_twelve_band_stack_runs_end_to_end_in_the_formats_of_rgb(tmp_path):
    import json

    import pyarrow.parquet as pq
    import tifffile

    from superdml.crops.rule import read_crop_rule

    stack, truth = s2_stack()
    s2 = run_formats(tmp_path / "s2", stack, truth, "--bands", S2_CHOSEN)
    rgb = run_formats(tmp_path / "rgb", (stack[[3, 2, 1]] // 16).astype(np.uint8), truth)

    rule = read_crop_rule(s2["crops"])
    assert rule is not None and rule.lossless and rule.dtype == "uint16"
    assert rule.band_names == tuple(S2_CHOSEN.split(",")) and rule.bands == (4, 3, 2, 8)
    assert not read_crop_rule(rgb["crops"]).lossless
    # predictions: one schema, whatever the bands
    assert s2["parts"] and rgb["parts"]
    schemas = {str(pq.read_schema(p).remove_metadata()) for p in s2["parts"] + rgb["parts"]}
    assert len(schemas) == 1
    # labels.tif: the same profile keys and values but the grid, the same tags and colors
    s2_labels, rgb_labels = _profile(s2["labels"]), _profile(rgb["labels"])
    assert s2_labels["profile"].keys() == rgb_labels["profile"].keys()
    for key in ("dtype", "nodata", "count", "tiled", "compress", "crs", "transform"):
        assert s2_labels["profile"][key] == rgb_labels["profile"][key], key
    assert s2_labels["tags"] == rgb_labels["tags"]
    assert s2_labels["colormap"] == rgb_labels["colormap"]
    assert s2["style"].read_text() == rgb["style"].read_text()
    s2_summary, rgb_summary = (json.loads(r["summary"].read_text()) for r in (s2, rgb))
    assert s2_summary.keys() == rgb_summary.keys()
    assert s2_summary["classes"].keys() <= {"1", "2", "unknown"} | rgb_summary["classes"].keys()
    # review crops: 4-band uint16 chips with 8-bit previews, the crops.parquet of RGB
    s2_table = pq.read_table(s2["review"] / "crops.parquet")
    rgb_table = pq.read_table(rgb["review"] / "crops.parquet")
    assert s2_table.schema.remove_metadata() == rgb_table.schema.remove_metadata()
    chips = sorted(s2["review"].rglob("*.tif"))
    assert len(chips) == 6 and not list(rgb["review"].rglob("*.tif"))
    chip = tifffile.imread(chips[0])
    assert chip.shape == (4, 16, 16) and chip.dtype == np.uint16
    assert all(c.with_suffix(".png").exists() for c in chips)
    assert {s2["review"] / f for f in s2_table.column("file").to_pylist()} == set(chips)
