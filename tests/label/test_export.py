import errno
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import rasterio
import worlds
from click.testing import CliRunner

import superdml.label.export
import superdml.raster.staged as staged
from superdml.cli.commands import cli
from superdml.core.errors import InputError
from superdml.core.ownership import mark_output
from superdml.crops.stage import majority_labels
from superdml.label.export import export, qgis_style
from superdml.label.predictions import MANIFEST, IdTable, load_label_run, lookup
from superdml.label.stage import label
from superdml.raster.classes import make_scheme, palette
from superdml.raster.overviews import downsample_mean, downsample_mode
from superdml.segment.run import load_segment_runs

CLASSES = worlds.CLASSES


def fake_label_run(labeled, out, seg_dir=None):
    """A label run whose predictions are each superpixel's majority class in the truth.

    The run is real (``superdml label`` with the world's untrained model; for the world's
    own segments, a copy of the shared label run): ``label.json`` and each part's
    metadata are the provenance label wrote. Then each part's prediction columns are
    replaced by the truth's, its metadata kept. Returns the segment run and its segments.
    """
    if seg_dir is None:
        shutil.copytree(labeled["label_run"].out, out)
    else:
        world = labeled["world"]
        label(seg_dir, world.checkpoint, world.ref, out, worlds.LABEL, device="cpu")
    run = load_segment_runs(seg_dir or labeled["seg"].out_dir)[0]
    with rasterio.open(run.segments_path) as src:
        segments = src.read(1)
    label_run = load_label_run(out)
    codes = label_run.scheme.codes
    for part in sorted((out / "predictions" / run.name).glob("*.parquet")):
        table = pq.read_table(part)
        ids = table.column("segment_id").to_numpy()
        value, purity = majority_labels(segments, labeled["truth"], ids, None)
        names = [CLASSES[v - 1] for v in value]
        n = len(ids)
        predicted = {
            "label": pa.array(names, pa.string()),
            "label_code": pa.array([codes[name] for name in names], pa.uint16()),
            "score": pa.array(purity, pa.float32()),
            "margin": pa.array(purity / 2, pa.float32()),
            "similarity": pa.array(np.ones(n), pa.float32()),
            "topk_labels": pa.array([[name] for name in names], pa.list_(pa.string())),
            "topk_similarities": pa.array([[1.0]] * n, pa.list_(pa.float32())),
        }
        for name, column in predicted.items():
            table = table.set_column(table.schema.get_field_index(name), name, column)
        assert table.schema.metadata[b"superdml"]  # label's provenance of the part, kept
        pq.write_table(table, part)
    return run, segments


@pytest.fixture(scope="module")
def labeled(shared_world, shared_label_run, tmp_path_factory):
    """The shared world's label run, copied, with the truth's classes as predictions."""
    root = tmp_path_factory.mktemp("export")
    world = shared_world
    info = {"world": world, "label_run": shared_label_run, "seg": world.seg, "truth": world.truth}
    out = root / "out"
    run, segments = fake_label_run(info, out)
    return {**info, "root": root, "out": out, "segments": segments, "run": run}


@pytest.fixture(scope="module")
def exported(labeled):
    return export(labeled["out"], labeled["seg"].out_dir, "cog", "gpkg")


def test_label_raster_matches_predictions_on_the_source_grid(labeled, exported):
    files = exported.outputs["mosaic"]
    with rasterio.open(files["labels"]) as src, rasterio.open(labeled["seg"].segments_path) as seg:
        labels = src.read(1)
        assert (src.crs, src.transform, src.shape) == (seg.crs, seg.transform, seg.shape)
        assert src.dtypes[0] == "uint8" and src.nodata == 0
        assert json.loads(src.tags(1)["class_names"]) == {
            str(i): n for i, n in enumerate(CLASSES, 1)
        }
        assert src.colormap(1)[1][:3] == palette(4)[0]
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    expected = np.zeros_like(labels)
    for row in pq.read_table(labeled["out"] / "predictions").to_pylist():
        expected[labeled["segments"] == row["segment_id"]] = row["label_code"]
    np.testing.assert_array_equal(labels, expected)
    assert (labels == labeled["truth"]).mean() > 0.9


def renumber_segments(seg_dir, spread):
    """Give the run's superpixels the ids ``id * spread + 7`` (segments.tif and table)."""
    run = load_segment_runs(seg_dir)[0]
    with rasterio.open(run.segments_path) as src:
        profile, segments = src.profile, src.read(1)
    segments = np.where(segments > 0, segments * np.uint32(spread) + np.uint32(7), 0)
    with rasterio.open(run.segments_path, "w", **profile) as dst:
        dst.write(segments.astype(np.uint32), 1)
    table = pq.read_table(run.table_path)
    ids = pc.add(pc.multiply(table.column("segment_id"), spread), 7).cast(pa.uint32())
    table = table.set_column(table.schema.get_field_index("segment_id"), "segment_id", ids)
    pq.write_table(table, run.table_path)


@pytest.mark.parametrize("spread", [1, 2**20], ids=["grid-ids", "sparse-ids"])
def test_label_and_score_rasters_equal_a_direct_computation_across_windows(
    labeled, tmp_path, monkeypatch, spread
):
    seg_dir = tmp_path / "mosaic"  # a copy of the raster's segment folder
    shutil.copytree(labeled["seg"].out_dir, seg_dir)
    renumber_segments(seg_dir, spread)
    out = tmp_path / "out"
    _, segments = fake_label_run(labeled, out, seg_dir)
    part = out / "predictions" / "mosaic" / "t0000_0001.parquet"
    kept = pq.read_table(part)
    pq.write_table(kept.slice(0, kept.num_rows // 2), part)  # half a tile's superpixels unlabeled
    # 96 px windows: each straddles label tiles (128 px) and needs parts of its neighbours
    monkeypatch.setattr(superdml.label.export, "WINDOW", 96)
    result = export(out, seg_dir, "gtiff", "none")
    predictions = pq.read_table(out / "predictions")
    assert int(pc.min(predictions.column("segment_id")).as_py()) >= 7
    expected_labels = np.zeros(segments.shape, np.uint8)
    expected_scores = np.full(segments.shape, np.nan, np.float32)
    for row in predictions.to_pylist():
        expected_labels[segments == row["segment_id"]] = row["label_code"]
        expected_scores[segments == row["segment_id"]] = row["score"]
    with rasterio.open(result.outputs["mosaic"]["labels"]) as src:
        labels = src.read(1)
    with rasterio.open(result.outputs["mosaic"]["scores"]) as src:
        scores = src.read(1)
    assert 0.8 < (labels > 0).mean() < 0.95  # an eighth of the raster unlabeled
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(scores, expected_scores)


def test_cog_overviews_are_modes_and_means_of_the_level_below(labeled, tmp_path, monkeypatch):
    # 64 px blocks: overviews at 2 and 4 on the 256 px raster; 96 px windows, on threads
    monkeypatch.setattr(superdml.label.export, "BLOCK_SIZE", 64)
    monkeypatch.setattr(superdml.label.export, "WINDOW", 96)
    out = tmp_path / "out"
    fake_label_run(labeled, out)
    files = export(out, labeled["seg"].out_dir, "cog", "none").outputs["mosaic"]
    written = {p.name for p in out.iterdir()} - {".superdml-stage", ".superdml.lock"}
    expected = {"label.json", "label.yaml", "predictions", "labels.tif", "scores.tif", "labels.qml"}
    assert written == {*expected, "summary.json"}  # the staging files never had a name
    for name, downsample in (
        ("labels", lambda level: downsample_mode(level, 0)),
        ("scores", downsample_mean),
    ):
        with rasterio.open(files[name]) as src:
            assert src.overviews(1) == [2, 4]
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            level = src.read(1)
        assert level.shape == labeled["segments"].shape
        for overview in range(2):
            level = downsample(level)
            with rasterio.open(files[name], overview_level=overview) as ovr:
                np.testing.assert_array_equal(ovr.read(1), level)


def test_no_room_to_stage_is_one_line_and_keeps_the_old_rasters(labeled, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fake_label_run(labeled, out)
    export(out, labeled["seg"].out_dir, "gtiff", "none")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "notes.txt").write_text("mine")

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    monkeypatch.setattr(staged, "IN_MEMORY_BYTES", 0)  # staged on disk, as large rasters are
    result = CliRunner().invoke(
        cli, ["export", str(out), "--segments", str(labeled["seg"].out_dir), "--vector", "none"]
    )
    assert result.exit_code == 2
    assert f"{out}: no room on its disk to stage a uint8 raster of 256 x 256" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == {**before, "notes.txt": b"mine"}  # nothing new, nothing changed


def test_a_failing_window_ends_the_export_with_no_window_left_running(
    labeled, tmp_path, monkeypatch
):
    # the window threads outlive a call (export_threads): a failure must not leave
    # windows writing into staging arrays that the call has already closed
    monkeypatch.setattr(superdml.label.export, "BLOCK_SIZE", 64)
    monkeypatch.setattr(superdml.label.export, "WINDOW", 64)  # 16 windows, 2 levels each
    out = tmp_path / "out"
    fake_label_run(labeled, out)
    export(out, labeled["seg"].out_dir, "cog", "none")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls, running = [], []

    def slow_mean(below, level):
        running.append(1)
        calls.append(1)
        time.sleep(0.02)
        running.pop()
        if len(calls) == 3:
            raise RuntimeError("window failed")
        downsample_mean(below, level)

    monkeypatch.setattr(superdml.label.export, "downsample_mean", slow_mean)
    with pytest.raises(RuntimeError, match="window failed"):
        export(out, labeled["seg"].out_dir, "cog", "none")
    assert not running
    ended = len(calls)
    time.sleep(0.2)
    assert len(calls) == ended < 32  # windows not started were cancelled, none runs after
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


def _submit_on_export_threads() -> None:
    assert superdml.label.export.export_threads(2).submit(int, "7").result(timeout=10) == 7


def test_a_forked_child_gets_export_threads_of_its_own():
    # a forked child has none of its parent's threads: the parent's pool would never run
    # the child's windows (dask's and multiprocessing's fork start method)
    _submit_on_export_threads()
    child = multiprocessing.get_context("fork").Process(target=_submit_on_export_threads)
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0


def test_score_raster_is_float_with_nan_nodata(labeled, exported):
    with rasterio.open(exported.outputs["mosaic"]["scores"]) as src:
        scores = src.read(1)
        assert src.dtypes[0] == "float32" and np.isnan(src.nodata)
    assert np.isfinite(scores).all() and (scores > 0).all() and (scores <= 1).all()


def test_polygons_open_with_pyogrio_and_cover_each_superpixel(labeled, exported):
    import pyogrio
    import shapely

    path = exported.outputs["mosaic"]["polygons"]
    info = pyogrio.read_info(path)
    assert info["crs"].endswith("32633") and info["features"] == labeled["seg"].n_superpixels
    _, _, geometry, fields = pyogrio.raw.read(path)
    areas = shapely.area(shapely.from_wkb(geometry))
    table = pq.read_table(labeled["seg"].table_path)
    expected = dict(
        zip(
            table.column("segment_id").to_pylist(), table.column("area_px").to_pylist(), strict=True
        )
    )
    ids = fields[0]
    np.testing.assert_allclose(areas, [expected[i] * 4.0 for i in ids])  # 2 m pixels


def test_summary_and_qgis_style(labeled, exported):
    summary = json.loads(exported.outputs["mosaic"]["summary"].read_text())
    assert summary["superpixels"] == labeled["seg"].n_superpixels
    assert sum(c["area_px"] for c in summary["classes"].values()) == 256 * 256
    style = exported.outputs["mosaic"]["style"].read_text()
    gravel = "#{:02x}{:02x}{:02x}".format(*palette(4)[2])
    assert f'value="3" color="{gravel}" alpha="255" label="gravel"' in style
    assert 'value="255" color="#808080" alpha="255" label="unknown"' in style
    assert style.count("<paletteEntry") == 5
    for name, stats in summary["classes"].items():
        assert summary["codes"][str(stats["code"])]["name"] == name
    assert [summary["classes"][n]["code"] for n in CLASSES] == [1, 2, 3, 4]


def test_geoparquet_and_plain_gtiff(labeled, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(labeled["out"], out)
    result = export(out, labeled["seg"].out_dir, "gtiff", "parquet")
    table = pq.read_table(result.outputs["mosaic"]["polygons"])
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["crs"]["id"]["code"] == 32633
    assert table.num_rows == labeled["seg"].n_superpixels
    with rasterio.open(result.outputs["mosaic"]["labels"]) as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG"
    assert not list(out.glob("*.sdml-tmp-*"))


def test_export_refuses_a_folder_without_label_run(labeled, tmp_path):
    with pytest.raises(InputError, match="not a label output"):
        export(tmp_path, labeled["seg"].out_dir)
    with pytest.raises(InputError, match="--vector 'shp'"):
        export(labeled["out"], labeled["seg"].out_dir, "cog", "shp")


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def interrupted(labeled, tmp_path):
    """A copy of the label run (no exports) whose last tile's predictions part is missing."""
    out = tmp_path / "out"
    shutil.copytree(labeled["out"] / "predictions", out / "predictions")
    shutil.copy(labeled["out"] / MANIFEST, out)
    mark_output(out, "label")
    part = sorted((out / "predictions" / "mosaic").glob("*.parquet"))[-1]
    lost = pq.read_table(part).column("segment_id").to_numpy()
    part.unlink()
    assert len(lost) > 0
    return out, lost


def test_export_refuses_a_label_run_with_missing_parts(labeled, interrupted):
    out, _ = interrupted
    before = files_under(out)
    result = CliRunner().invoke(
        cli, ["-q", "export", str(out), "--segments", str(labeled["seg"].out_dir)]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: {out}: 1 of 4 tiles of 'mosaic' have no predictions (interrupted label run?): "
        "rerun superdml label, or pass --allow-incomplete"
    ]
    assert files_under(out) == before


def test_allow_incomplete_exports_and_says_so(labeled, interrupted):
    out, lost = interrupted
    before = files_under(out)
    result = CliRunner().invoke(
        cli,
        ["-q", "export", str(out), "--segments", str(labeled["seg"].out_dir), "--vector", "none",
         "--allow-incomplete"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        f"WARNING superdml.label.export: {out}: 1 of 4 tiles of 'mosaic' have no predictions"
        in (result.output)
    )
    written = [".superdml.lock", "labels.qml", "labels.tif", "scores.tif", "summary.json"]
    assert files_under(out) == sorted([*before, *written])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["incomplete"] == {"missing_tiles": 1, "tiles": 4}
    assert summary["superpixels"] == labeled["seg"].n_superpixels - len(lost)
    with rasterio.open(out / "labels.tif") as src:
        labels = src.read(1)
    unlabeled = np.isin(labeled["segments"], lost)
    assert (labels[unlabeled] == 0).all() and (labels[~unlabeled] > 0).all()


def test_allow_incomplete_leaves_tiles_of_stale_parts_as_nodata(labeled, tmp_path):
    # a part made before a re-segmentation (its provenance names other segments) is as
    # good as missing: its tile is nodata in labels.tif and out of summary.json
    out = tmp_path / "out"
    shutil.copytree(labeled["out"] / "predictions", out / "predictions")
    shutil.copy(labeled["out"] / MANIFEST, out)
    mark_output(out, "label")
    part = sorted((out / "predictions" / "mosaic").glob("*.parquet"))[0]
    stale = pq.read_table(part)
    provenance = json.loads(stale.schema.metadata[b"superdml"])
    provenance["segments"] = "older segments"  # as made before a re-segmentation
    pq.write_table(stale.replace_schema_metadata({"superdml": json.dumps(provenance)}), part)
    lost = stale.column("segment_id").to_numpy()
    result = export(out, labeled["seg"].out_dir, "gtiff", "parquet", allow_incomplete=True)
    files = result.outputs["mosaic"]
    summary = json.loads(files["summary"].read_text())
    assert summary["incomplete"] == {"missing_tiles": 1, "tiles": 4}
    assert summary["superpixels"] == labeled["seg"].n_superpixels - len(lost)
    assert sum(c["superpixels"] for c in summary["classes"].values()) == summary["superpixels"]
    with rasterio.open(files["labels"]) as src:
        labels = src.read(1)
    with rasterio.open(files["scores"]) as src:
        scores = src.read(1)
    unlabeled = np.isin(labeled["segments"], lost)
    assert (labels[unlabeled] == 0).all() and (labels[~unlabeled] > 0).all()
    assert np.isnan(scores[unlabeled]).all() and not np.isnan(scores[~unlabeled]).any()
    polygons = pq.read_table(files["polygons"]).column("segment_id").to_numpy()
    assert not np.isin(polygons, lost).any()
    assert len(polygons) == summary["superpixels"]


def test_a_label_run_without_part_provenance_is_refused(labeled, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(labeled["out"] / "predictions", out / "predictions")
    manifest = json.loads((labeled["out"] / MANIFEST).read_text())
    del manifest["part_meta"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="label.json: made by an older superdml"):
        export(out, labeled["seg"].out_dir)


def test_export_uses_the_core_count_of_the_cluster_module(labeled, tmp_path, monkeypatch):
    # os.sched_getaffinity does not exist on macOS: export asks core.cluster
    out = tmp_path / "out"
    shutil.copytree(labeled["out"] / "predictions", out / "predictions")
    shutil.copy(labeled["out"] / MANIFEST, out)
    mark_output(out, "label")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    result = export(out, labeled["seg"].out_dir, "gtiff", "none")
    assert result.outputs["mosaic"]["labels"].exists()


def test_complete_export_has_no_incomplete_entry(exported):
    assert "incomplete" not in json.loads(exported.outputs["mosaic"]["summary"].read_text())


def test_helpers():
    assert len(set(palette(60))) == 60
    assert "&quot;" in qgis_style(make_scheme({1: {"name": 'a "b"'}}, "test"))
    np.testing.assert_array_equal(
        lookup(np.array([[5, 0], [9, 7]]), np.array([7, 5]), np.array([2, 1]), 0), [[1, 0], [0, 2]]
    )


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64", "int32", "int64"])
@pytest.mark.parametrize("far", [False, True], ids=["dense-keys", "one-far-key"])
def test_lookup_matches_a_dictionary(dtype, far):
    rng = np.random.default_rng(3)
    keys = rng.choice(np.arange(5, 200), 60, replace=False)
    if far:  # keys spanning more values than there are ids: binary search (but in uint8)
        keys = np.append(keys, min(np.iinfo(dtype).max, 2**31))
    values = rng.random(keys.size).astype(np.float32)
    absent = [0, 1, 4, 200, min(np.iinfo(dtype).max, 2**31 - 1)]
    ids = rng.choice(np.concatenate([keys, absent]), (30, 40)).astype(dtype)
    table = dict(zip(keys.tolist(), values.tolist(), strict=True))
    expected = [[table.get(i, -1.0) for i in row] for row in ids.tolist()]
    got = lookup(ids, keys, values, -1)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(expected, np.float32))
    assert (got == -1).any() and (got >= 0).any()


@pytest.mark.parametrize("dense_up_to", [10**6, 10], ids=["dense", "binary-search"])
def test_id_table_writes_windows_of_a_larger_array_from_threads(dense_up_to):
    rng = np.random.default_rng(4)
    keys = rng.choice(np.arange(100, 5000), 700, replace=False).astype(np.uint32)
    values = rng.integers(1, 250, keys.size).astype(np.uint8)
    table = IdTable(keys, values, 0, dense_up_to)
    assert (table.table is not None) == (dense_up_to == 10**6)
    ids = rng.choice(np.concatenate([keys, [0, 7, 99, 5000, 2**32 - 1]]), (64, 96))
    ids = ids.astype(np.uint32)
    level = np.full((80, 120), 255, np.uint8)
    windows = [(r, c) for r in (0, 32) for c in (0, 48)]  # four 32 x 48 windows at (8, 12)
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(
            lambda rc: table.take(
                ids[rc[0] : rc[0] + 32, rc[1] : rc[1] + 48],
                out=level[8 + rc[0] : 40 + rc[0], 12 + rc[1] : 60 + rc[1]],
            ),
            windows,
        )
        list(done)
    lookup_of = dict(zip(keys.tolist(), values.tolist(), strict=True))
    expected = np.array([[lookup_of.get(i, 0) for i in row] for row in ids.tolist()], np.uint8)
    np.testing.assert_array_equal(level[8:72, 12:108], expected)
    level[8:72, 12:108] = 255
    assert (level == 255).all()  # nothing written outside the windows


def test_lookup_ignores_keys_beyond_the_ids_dtype():
    ids = np.array([0, 3, 255], np.uint8)
    keys = np.array([3, 255, 256 + 3], np.int64)  # 259 would wrap to 3 in uint8
    np.testing.assert_array_equal(lookup(ids, keys, np.array([1, 2, 9]), 0), [0, 1, 2])
