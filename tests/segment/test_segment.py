import json
import platform

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasters import CRS, texture_mosaic, write_raster
from skimage import data

import superdml.segment.stage as segment_module
import superdml.segment.tasks as segment_tasks
from superdml.config.schema import SegmentConfig
from superdml.core.errors import ConfigError, InputError, MissingInputError
from superdml.segment.run import load_segment_runs
from superdml.segment.stage import segment_raster


@pytest.fixture(scope="module")
def mosaic_tif(tmp_path_factory):
    rgb, _ = texture_mosaic(512)
    return write_raster(tmp_path_factory.mktemp("src") / "mosaic.tif", rgb)


@pytest.fixture(scope="module")
def mosaic_runs(mosaic_tif, tmp_path_factory):
    out = {}
    for tile_size in (256, 1024):
        folder = tmp_path_factory.mktemp(f"seg{tile_size}")
        config = SegmentConfig(region_size=16, tile_size=tile_size)
        out[tile_size] = segment_raster(mosaic_tif, folder, config)
    return out


def read_segments(result):
    with rasterio.open(result.segments_path) as src:
        return src.read(1), src.profile, src.crs, src.transform


def test_ids_in_table_once_and_areas_add_up(mosaic_runs):
    result = mosaic_runs[256]
    segments, profile, _, _ = read_segments(result)
    table = pq.read_table(result.table_path)
    ids = table.column("segment_id").to_numpy()
    assert len(np.unique(ids)) == len(ids) == result.n_superpixels
    assert set(np.unique(segments[segments > 0]).tolist()) == set(ids.tolist())
    assert table.column("area_px").to_numpy().sum() == (segments > 0).sum() == 512 * 512
    areas = dict(zip(*np.unique(segments, return_counts=True), strict=True))
    assert all(areas[i] == a for i, a in zip(ids, table.column("area_px").to_numpy(), strict=True))
    assert profile["dtype"] == "uint32" and profile["compress"] == "zstd"
    assert (profile["blockysize"], profile["blockxsize"]) == (512, 512)


def test_table_centroids_bbox_means_match_pixels(mosaic_runs, mosaic_tif):
    result = mosaic_runs[256]
    segments, _, _, transform = read_segments(result)
    with rasterio.open(mosaic_tif) as src:
        rgb = src.read()
    table = pq.read_table(result.table_path).to_pylist()
    for row in table[:: max(1, len(table) // 25)]:
        rr, cc = np.nonzero(segments == row["segment_id"])
        assert row["row"] == pytest.approx(rr.mean())
        assert row["col"] == pytest.approx(cc.mean())
        assert (row["row_start"], row["row_stop"]) == (rr.min(), rr.max() + 1)
        assert (row["col_start"], row["col_stop"]) == (cc.min(), cc.max() + 1)
        assert row["mean_b2"] == pytest.approx(rgb[1, rr, cc].mean())
        x, y = transform @ (cc.mean() + 0.5, rr.mean() + 0.5)
        assert (row["x"], row["y"]) == pytest.approx((x, y))
        assert row["raster"] == "mosaic"


def test_grid_and_crs_equal_source(mosaic_runs, mosaic_tif):
    _, profile, crs, transform = read_segments(mosaic_runs[256])
    with rasterio.open(mosaic_tif) as src:
        assert (profile["height"], profile["width"]) == (src.height, src.width)
        assert crs == src.crs and transform == src.transform
    meta = json.loads(pq.read_schema(mosaic_runs[256].table_path).metadata[b"superdml"])
    assert meta["config"]["region_size"] == 16 and meta["bands"] == [1, 2, 3]


def test_tile_sizes_agree_up_to_boundaries(mosaic_runs):
    a, *_ = read_segments(mosaic_runs[256])
    b, *_ = read_segments(mosaic_runs[1024])
    assert (a == b).mean() > 0.95
    assert abs(mosaic_runs[256].n_superpixels - mosaic_runs[1024].n_superpixels) <= 5


def crossing_break_rate(segments, axis, line):
    """Fraction of pixel pairs across `line` (between line-1 and line) with different ids."""
    before = np.take(segments, line - 1, axis=axis)
    after = np.take(segments, line, axis=axis)
    return (before != after).mean()


@pytest.mark.parametrize("axis", [0, 1])
def test_no_seam_along_tile_edges(mosaic_runs, axis):
    segments, *_ = read_segments(mosaic_runs[256])
    at_edge = crossing_break_rate(segments, axis, 256)
    elsewhere = np.mean([crossing_break_rate(segments, axis, r) for r in range(200, 320, 3)])
    # A seam would cut every superpixel along the line: break rate near 1.
    assert at_edge < 2.5 * elsewhere + 0.05
    assert at_edge < 0.4


def test_superpixels_are_connected(mosaic_runs):
    from skimage.measure import label

    segments, *_ = read_segments(mosaic_runs[256])
    # label() numbers the 4-connected regions of equal id: as many regions as ids means
    # each id is exactly one 4-connected component
    components = label(segments, background=0, connectivity=1)
    assert components.max() == len(np.unique(segments[segments > 0]))


def test_rerun_is_skipped_and_identical(mosaic_tif, mosaic_runs):
    first = mosaic_runs[256]
    again = segment_raster(mosaic_tif, first.out_dir.parent, SegmentConfig(16, tile_size=256))
    assert again.skipped and again.n_superpixels == first.n_superpixels


@pytest.mark.slow
def test_resume_after_interruption_gives_identical_output(
    mosaic_tif, mosaic_runs, tmp_path, monkeypatch
):
    real = segment_module.assign_task
    calls = {"n": 0}

    def interrupted(grid, tile):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(grid, tile)

    monkeypatch.setattr(segment_module, "assign_task", interrupted)
    config = SegmentConfig(region_size=16, tile_size=256)
    with pytest.raises(KeyboardInterrupt):
        segment_raster(mosaic_tif, tmp_path, config)
    folder = tmp_path / "mosaic"
    assert not (folder / "segments.tif").exists() and not (folder / "superpixels.parquet").exists()
    assert not list(folder.rglob("*.sdml-tmp-*"))
    done = sorted(p.name for p in folder.glob(".work-*/labels_*.npy"))
    assert len(done) == 2

    computed = []

    def counting(grid, tile):
        if not grid.labels_path(tile).exists():
            computed.append(tile.key)
        return real(grid, tile)

    monkeypatch.setattr(segment_module, "assign_task", counting)
    resumed = segment_raster(mosaic_tif, tmp_path, config)
    assert len(computed) == 2  # 4 tiles, 2 were done
    a, *_ = read_segments(resumed)
    b, *_ = read_segments(mosaic_runs[256])
    np.testing.assert_array_equal(a, b)
    assert pq.read_table(resumed.table_path).equals(pq.read_table(mosaic_runs[256].table_path))
    assert not list(folder.glob(".work-*"))


def test_nodata_pixels_belong_to_no_superpixel(tmp_path):
    rgb = (data.astronaut()[:256, :256].astype(np.uint16) * 200).transpose(2, 0, 1)
    rgb[:, 100:160, 30:200] = 65535
    path = write_raster(tmp_path / "nd.tif", rgb, nodata=65535)
    result = segment_raster(path, tmp_path / "out", SegmentConfig(region_size=16, tile_size=128))
    segments, *_ = read_segments(result)
    assert (segments[100:160, 30:200] == 0).all()
    assert (segments > 0).sum() == 256 * 256 - 60 * 170
    table = pq.read_table(result.table_path)
    assert table.column("area_px").to_numpy().sum() == (segments > 0).sum()
    assert table.column("mean_b1").to_numpy().max() < 65535


def test_tiles_inside_a_nodata_area_have_no_superpixel(tmp_path):
    """A nodata collar wider than a tile and its margin (a mosaic's empty corner)."""
    rgb = data.astronaut()[:128, :384].transpose(2, 0, 1).copy()
    rgb[rgb == 0] = 1
    rgb[:, :, :256] = 0
    path = write_raster(tmp_path / "collar.tif", rgb, nodata=0)
    config = SegmentConfig(region_size=8, tile_size=32)  # 32 px tiles, a 64 px margin
    result = segment_raster(path, tmp_path / "out", config)
    segments, *_ = read_segments(result)
    assert (segments[:, :256] == 0).all() and (segments[:, 256:] > 0).all()
    table = pq.read_table(result.table_path)
    assert table.column("area_px").to_numpy().sum() == 128 * 128


@pytest.mark.parametrize(
    ("dtype", "count"), [("uint16", 1), ("float32", 4), ("int16", 2), ("uint8", 3)]
)
def test_band_counts_and_dtypes(tmp_path, dtype, count):
    rng = np.random.default_rng(0)
    base = data.camera()[:192, :192].astype(np.float64)
    bands = np.stack([np.roll(base, 7 * k, axis=1) for k in range(count)])
    if dtype == "float32":
        bands = bands / 255.0 * 1e-3 + rng.normal(0, 1e-6, bands.shape)
    elif dtype == "uint16":
        bands = bands * 250
    pixels = bands.astype(dtype)
    path = write_raster(tmp_path / f"r_{dtype}.tif", pixels)
    result = segment_raster(path, tmp_path / "out", SegmentConfig(region_size=16, tile_size=64))
    segments, *_ = read_segments(result)
    assert (segments > 0).all()
    # per-band scaling: tiny float values still give image-following superpixels,
    # about one per 16x16 cell
    assert 0.6 * 144 < result.n_superpixels <= 144
    assert pq.read_schema(result.table_path).names[-count:] == [
        f"mean_b{b}" for b in range(1, count + 1)
    ]


def test_png_without_crs_uses_pixel_coordinates(tmp_path):
    path = write_raster(
        tmp_path / "plain.png",
        data.chelsea()[:128, :160].transpose(2, 0, 1),
        crs=None,
        driver="PNG",
    )
    result = segment_raster(path, tmp_path / "out", SegmentConfig(region_size=16, tile_size=64))
    with rasterio.open(result.segments_path) as src:
        assert src.crs is None
    table = pq.read_table(result.table_path)
    np.testing.assert_allclose(table.column("x").to_numpy(), table.column("col").to_numpy() + 0.5)
    np.testing.assert_allclose(table.column("y").to_numpy(), table.column("row").to_numpy() + 0.5)


def test_vrt_mosaic_of_two_files(tmp_path):
    from rasterio.transform import from_origin

    rgb = data.astronaut()[:128].transpose(2, 0, 1)
    left = write_raster(
        tmp_path / "left.tif", rgb[:, :, :256], transform_=from_origin(0, 128, 1, 1)
    )
    right = write_raster(
        tmp_path / "right.tif", rgb[:, :, 256:], transform_=from_origin(256, 128, 1, 1)
    )
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text(_vrt_xml([left, right], 512, 128))
    result = segment_raster(vrt, tmp_path / "out", SegmentConfig(region_size=16, tile_size=128))
    segments, *_ = read_segments(result)
    assert segments.shape == (128, 512) and (segments > 0).all()


def _vrt_xml(files, width, height):
    bands = []
    for b in (1, 2, 3):
        sources = "".join(
            f"<SimpleSource><SourceFilename relativeToVRT='0'>{f}</SourceFilename>"
            f"<SourceBand>{b}</SourceBand><SrcRect xOff='0' yOff='0' xSize='256' ySize='{height}'/>"
            f"<DstRect xOff='{256 * i}' yOff='0' xSize='256' ySize='{height}'/></SimpleSource>"
            for i, f in enumerate(files)
        )
        bands.append(f"<VRTRasterBand dataType='Byte' band='{b}'>{sources}</VRTRasterBand>")
    return (
        f"<VRTDataset rasterXSize='{width}' rasterYSize='{height}'><SRS>{CRS}</SRS>"
        f"<GeoTransform>0, 1, 0, {height}, 0, -1</GeoTransform>{''.join(bands)}</VRTDataset>"
    )


def test_same_stem_inputs_do_not_collide(tmp_path):
    rgb = data.astronaut()[:64, :64].transpose(2, 0, 1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_raster(tmp_path / "a" / "scene.tif", rgb)
    second = write_raster(tmp_path / "b" / "scene.tif", rgb[:, ::-1].copy())
    config = SegmentConfig(region_size=16, tile_size=64)
    r1 = segment_raster(first, tmp_path / "out", config)
    r2 = segment_raster(second, tmp_path / "out", config)
    assert (r1.raster, r2.raster) == ("scene", "scene-2")
    assert segment_raster(first, tmp_path / "out", config).out_dir == r1.out_dir
    runs = load_segment_runs(tmp_path / "out")
    assert [r.name for r in runs] == ["scene", "scene-2"]
    assert runs[1].source.path == str(second.resolve())


# --------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(MissingInputError, match="nope.tif: no such file"):
        segment_raster(tmp_path / "nope.tif", tmp_path / "out")


def test_text_file_named_tif(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("not a raster")
    with pytest.raises(InputError, match="notes.tif: not a raster"):
        segment_raster(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_band_out_of_range(mosaic_tif, tmp_path):
    with pytest.raises(InputError, match="mosaic.tif: has 3 band.*band 5"):
        segment_raster(mosaic_tif, tmp_path / "out", SegmentConfig(bands=(1, 5)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tile_size", 0, "tile_size: got 0"),
        ("region_size", 1, "region_size"),
        ("compactness", -1.0, "compactness"),
    ],
)
def test_bad_config_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        SegmentConfig(**{key: value})


def test_all_nodata_raster_is_a_clear_error(tmp_path):
    path = write_raster(tmp_path / "empty.tif", np.zeros((1, 64, 64), np.uint8), nodata=0)
    with pytest.raises(InputError, match="empty.tif: has no valid pixel"):
        segment_raster(path, tmp_path / "out", SegmentConfig(region_size=8, tile_size=32))
    assert not (tmp_path / "out" / "empty" / "segments.tif").exists()


def test_in_process_threads_follow_the_tiles_and_device(monkeypatch):
    monkeypatch.setattr(segment_tasks, "default_workers", lambda: 4)
    assert segment_tasks.in_process_threads("cpu", 9) == (2, 2)
    assert segment_tasks.in_process_threads("cpu", 1) == (1, 4)  # one tile: every core sweeps
    assert segment_tasks.in_process_threads("cuda", 9) == (1, None)  # fed by the read-ahead


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_threaded_runs_set_the_heap_options():
    from superdml.segment.heap import map_large_allocations

    assert map_large_allocations() is True
