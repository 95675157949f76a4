"""STAC items as one mosaic (superdml.raster.stac): read, segmented and labeled as the raster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.windows import Window
from worlds import LABEL, SEGMENT

from superdml.cli.commands import cli
from superdml.core import storage
from superdml.core.errors import InputError
from superdml.label.stage import label
from superdml.raster.io import open_raster, raster_info, read_window
from superdml.segment.stage import segment_raster


def write_cog(path: Path, mosaic: Path, cols: slice, **profile: object) -> dict:
    """Write columns `cols` of `mosaic` as a COG; return its STAC projection fields."""
    with rasterio.open(mosaic) as src:
        window = Window(cols.start, 0, cols.stop - cols.start, src.height)
        pixels = src.read(window=window)
        transform = src.window_transform(window)
        crs = src.crs
    meta = {"driver": "COG", "count": pixels.shape[0], "dtype": pixels.dtype.name,
            "height": pixels.shape[1], "width": pixels.shape[2], "crs": crs,
            "transform": transform, "blocksize": 128}  # fmt: skip
    meta.update(profile)
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(pixels)
    return {
        "proj:epsg": crs.to_epsg(),
        "proj:shape": [pixels.shape[1], pixels.shape[2]],
        "proj:transform": list(meta["transform"])[:6],
    }


def item(item_id: str, assets: dict, properties: dict | None = None) -> dict:
    """A STAC item with these assets."""
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id,
        "properties": {"datetime": "2026-01-01T00:00:00Z", **(properties or {})},
        "geometry": None, "links": [], "assets": assets,
    }  # fmt: skip


def cog_asset(href: str, **extra: object) -> dict:
    return {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"], **extra}  # fmt: skip


@pytest.fixture(scope="module")
def halves(shared_world, tmp_path_factory) -> Path:
    """The shared world's mosaic as an item collection of two COGs (left and right halves).

    The left item carries the projection extension, the right one does not (its grid
    comes from its header); hrefs are relative to the collection file.
    """
    root = tmp_path_factory.mktemp("stac")
    (root / "cogs").mkdir()
    left = write_cog(root / "cogs" / "left.tif", shared_world.mosaic, slice(0, 128))
    write_cog(root / "cogs" / "right.tif", shared_world.mosaic, slice(128, 256))
    thumb = {"href": "cogs/left.png", "type": "image/png", "roles": ["thumbnail"]}
    features = [
        item("left", {"data": cog_asset("cogs/left.tif"), "thumbnail": thumb}, left),
        item("right", {"data": cog_asset("./cogs/right.tif")}),
    ]
    path = root / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_items(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_item_collection_reads_as_the_mosaic(shared_world, halves):
    expected = raster_info(shared_world.mosaic)
    got = raster_info(halves)
    assert (got.height, got.width, got.count, got.dtype) == (256, 256, 3, "uint8")
    assert got.crs == expected.crs and np.allclose(got.transform, expected.transform)
    with open_raster(halves) as src, open_raster(shared_world.mosaic) as ref:
        # a window across the seam between the two items
        pixels, valid = read_window(src, [1, 2, 3], 100, 100, 60, 60)
        want, _ = read_window(ref, [1, 2, 3], 100, 100, 60, 60)
        np.testing.assert_array_equal(pixels, want)
        assert valid.all()
        # beyond the edge: padded and invalid
        pixels, valid = read_window(src, [1], 200, 200, 100, 100)
        assert valid[:56, :56].all() and not valid[56:].any() and not valid[:, 56:].any()


def upload_tree(folder: Path, prefix: str) -> None:
    """Put every file under `folder` at the same relative key under `prefix`."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload(path, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_item_collection_in_a_bucket_reads_as_the_mosaic(shared_world, halves, bucket):
    upload_tree(halves.parent, bucket)
    uri = f"{bucket}/items.json"
    info = raster_info(uri)
    assert info.path == uri and (info.height, info.width) == (256, 256)
    with open_raster(uri) as src, open_raster(shared_world.mosaic) as ref:
        pixels, valid = read_window(src, [1, 2, 3], 100, 100, 60, 60)
        want, _ = read_window(ref, [1, 2, 3], 100, 100, 60, 60)
    np.testing.assert_array_equal(pixels, want)
    assert valid.all()


@pytest.mark.slow
def test_item_collection_of_two_cogs_in_the_bucket_labels_as_one_mosaic(
    shared_world, shared_label_run, halves, bucket, tmp_path
):
    upload_tree(halves.parent, bucket)
    seg = segment_raster(f"{bucket}/items.json", tmp_path / "seg", SEGMENT)
    assert seg.raster == "items"
    with rasterio.open(seg.segments_path) as got:
        with rasterio.open(shared_world.seg.segments_path) as want:
            np.testing.assert_array_equal(got.read(1), want.read(1))
    label(seg.out_dir.parent, shared_world.checkpoint, shared_world.ref, tmp_path / "out", LABEL,
          device="cpu")  # fmt: skip
    got = pq.read_table(tmp_path / "out" / "predictions").sort_by("segment_id")
    want = pq.read_table(shared_label_run.out / "predictions").sort_by("segment_id")
    assert set(got["raster"].to_pylist()) == {"items"}
    assert got.drop(["raster"]).equals(want.drop(["raster"]))


def test_a_single_item_with_an_asset_key_and_nodata(shared_world, tmp_path):
    proj = write_cog(tmp_path / "b.tif", shared_world.mosaic, slice(0, 64), nodata=0)
    feature = item("only", {"red": cog_asset("b.tif"), "green": cog_asset("b.tif")}, proj)
    path = tmp_path / "item.json"
    path.write_text(json.dumps(feature))
    with pytest.raises(
        InputError, match=r"item\.json: item 'only': no single image asset .*red, green"
    ):
        raster_info(path)
    info = raster_info(f"{path}#asset=green")
    assert (info.width, info.height, info.nodata) == (64, 256, 0.0)


def test_overlapping_items_later_on_top_and_gaps_invalid(shared_world, tmp_path):
    write_cog(tmp_path / "a.tif", shared_world.mosaic, slice(0, 64))
    write_cog(tmp_path / "b.tif", shared_world.mosaic, slice(32, 96))
    write_cog(tmp_path / "c.tif", shared_world.mosaic, slice(160, 192))
    features = [item(n, {"data": cog_asset(f"{n}.tif")}) for n in "abc"]
    path = write_items(tmp_path / "items.json", features)
    with open_raster(path) as src, open_raster(shared_world.mosaic) as ref:
        assert src.width == 192
        pixels, valid = read_window(src, [1], 0, 0, 256, 192)
        want, _ = read_window(ref, [1], 0, 0, 256, 192)
    covered = np.zeros(192, bool)
    covered[:96] = covered[160:] = True
    assert (valid == covered).all()
    np.testing.assert_array_equal(pixels[0][:, covered], want[0][:, covered])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"crs": "EPSG:32634"},
            r"item 'b' is in EPSG:32634, item 'a' in EPSG:32633: a mosaic needs one CRS",
        ),
        (
            {"res": 1.0},
            r"item 'b' has pixels of 1 x 1, item 'a' of 2 x 2: a mosaic needs one resolution",
        ),
        ({"shift": 0.5}, r"item 'b' is off the pixel grid of item 'a' by 0\.250 px"),
        ({"asset": "visual"}, r"item 'b' has no asset 'visual' \(it has: data\)"),
    ],
)
def test_a_bad_item_is_one_line_naming_it(shared_world, tmp_path, change, message):
    proj = write_cog(tmp_path / "a.tif", shared_world.mosaic, slice(0, 64))
    other = dict(proj)
    t = list(proj["proj:transform"])
    t[2] += 128 + change.get("shift", 0)
    if "res" in change:
        t[0], t[4] = change["res"], -change["res"]
    other["proj:transform"] = t
    if "crs" in change:
        other["proj:epsg"] = int(change["crs"].split(":")[1])
    key = change.get("asset")
    features = [
        item("a", {(key or "data"): cog_asset("a.tif")}, proj),
        item("b", {"data": cog_asset("a.tif")}, other),
    ]
    path = write_items(tmp_path / "items.json", features)
    spec = f"{path}#asset={key}" if key else path
    with pytest.raises(InputError, match=rf"^{path}: {message}"):
        raster_info(spec)


def test_cli_refuses_a_document_that_is_not_stac(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"type": "Catalog", "id": "x", "links": []}))
    result = CliRunner().invoke(cli, ["segment", str(path), "--out", str(tmp_path / "seg")])
    assert result.exit_code == 2, result.output
    assert f"error: {path}: not a STAC item or item collection (type 'Catalog'" in result.output
    assert not (tmp_path / "seg" / "catalog").exists()


def test_a_pipeline_input_follows_the_document_and_the_asset_key(tmp_path):
    from superdml.cli.pipeline import _fingerprint

    path = write_items(tmp_path / "items.json", [item("a", {"data": cog_asset("a.tif")})])
    first = _fingerprint(f"{path}#asset=data", tmp_path / "state", False)
    assert first != _fingerprint(f"{path}#asset=other", tmp_path / "state", False)
    write_items(path, [item("b", {"data": cog_asset("b.tif")})])
    assert _fingerprint(f"{path}#asset=data", tmp_path / "state", False) != first
