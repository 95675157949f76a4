"""Labeling: its mechanics on an untrained model, end to end accuracy on a trained one.

Mechanics (schema, resume, reruns, kept embeddings, bad input) run on the shared
untrained world and its label run (``shared_world``, ``shared_label_run``); only the
tests that assert how well superpixels are labeled use the trained world
(``shared_trained_world``: segment -> crops of a truth raster's left half -> train ->
index), labeled here and exported.
"""

import dataclasses
import json
import shutil
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from checkpoints import save_untrained_checkpoint
from click.testing import CliRunner
from rasters import texture_mosaic, write_raster
from worlds import CLASSES, label_world

import superdml.label.stage as label_module
import superdml.learn.embed as embed_module
from superdml.cli.commands import cli
from superdml.config.schema import IndexConfig, LabelConfig, SegmentConfig
from superdml.core.errors import InputError
from superdml.crops.rule import read_crop_rule
from superdml.label.export import export
from superdml.label.index import build_index
from superdml.label.predictions import predictions_schema
from superdml.label.stage import label
from superdml.learn.embed import cpu_has_bf16
from superdml.segment.stage import segment_raster


@pytest.fixture(scope="module")
def world(shared_world):
    """The shared untrained world: a 256 px mosaic in 4 tiles of 128 px, its crops indexed."""
    return shared_world


@pytest.fixture(scope="module")
def trained(shared_trained_world):
    """The shared trained world: crops of the left half of a mosaic trained on and indexed."""
    return shared_trained_world


@pytest.fixture(scope="module")
def labeled(shared_label_run):
    """The untrained world labeled (the shared label run)."""
    return shared_label_run


@pytest.fixture(scope="module")
def trained_labeled(shared_trained_world, tmp_path_factory):
    """The trained world labeled."""
    return label_world(shared_trained_world, tmp_path_factory.mktemp("trained_labeled") / "out")


def read_predictions(out):
    return pq.read_table(out / "predictions").sort_by("segment_id")


def majority_truth(world):
    with rasterio.open(world.seg.segments_path) as src:
        segments = src.read(1)
    table = pq.read_table(world.seg.table_path)
    ids = table.column("segment_id").to_numpy()
    from superdml.crops.stage import majority_labels

    value, _ = majority_labels(segments, world.truth, ids, None)
    return dict(zip(ids.tolist(), value.tolist(), strict=True)), table


def test_every_superpixel_labeled_once_with_the_schema(world, labeled):
    table = read_predictions(labeled.out)
    assert table.schema.remove_metadata() == predictions_schema()
    ids = table.column("segment_id").to_numpy()
    assert len(ids) == len(np.unique(ids)) == world.seg.n_superpixels
    assert labeled.result.n_tiles == 4 and labeled.result.n_skipped == 0
    topk = table.column("topk_similarities").to_pylist()
    assert all(len(t) == 5 and t == sorted(t, reverse=True) for t in topk)
    sims = table.column("similarity").to_numpy()
    np.testing.assert_allclose(sims, [t[0] for t in topk], rtol=1e-6)
    scores = table.column("score").to_numpy()
    assert ((scores > 0) & (scores <= 1)).all()
    meta = json.loads(
        pq.read_schema(next((labeled.out / "predictions").rglob("*.parquet"))).metadata[b"superdml"]
    )
    assert set(meta) == {
        "segments",
        "crop_rule",
        "checkpoint_sha256",
        "reference_sha256",
        "label_config",
        "label_codes",
    }


def test_most_superpixels_get_their_region_class(trained, trained_labeled):
    truth, table = majority_truth(trained)
    preds = read_predictions(trained_labeled.out)
    cols = dict(
        zip(table.column("segment_id").to_pylist(), table.column("col").to_pylist(), strict=True)
    )
    ids = preds.column("segment_id").to_pylist()
    predicted = preds.column("label_code").to_pylist()
    right = [i for i in range(len(ids)) if cols[ids[i]] >= 192]  # the unseen half
    accuracy = np.mean([predicted[i] == truth[ids[i]] for i in right])
    assert accuracy > 0.55, accuracy  # chance 0.25; 4 epochs on 160 crops: 0.72 (6: 0.70)


def test_export_aligns_with_the_truth_grid(trained, trained_labeled):
    result = export(trained_labeled.out, trained.seg.out_dir, "cog", "gpkg")
    files = result.outputs["mosaic"]
    with (
        rasterio.open(files["labels"]) as src,
        rasterio.open(trained.root / "truth.tif") as truth,
    ):
        assert (src.crs, src.transform, src.shape) == (truth.crs, truth.transform, truth.shape)
        labels = src.read(1)
    right = labels[:, 192:] == trained.truth[:, 192:]
    assert right.mean() > 0.55
    import pyogrio

    assert pyogrio.read_info(files["polygons"])["features"] == trained.seg.n_superpixels


def test_rerun_skips_finished_tiles(world, labeled, tmp_path):
    out = shutil.copytree(labeled.out, tmp_path / "out")  # the shared run stays as it is
    before = read_predictions(out)
    again = label(
        world.seg.out_dir,
        world.checkpoint,
        world.root / "ref",
        out,
        labeled.config,
        device="cpu",
    )
    assert again.n_skipped == again.n_tiles
    assert read_predictions(out).equals(before)


def test_interrupted_run_resumes_to_identical_predictions(world, labeled, tmp_path, monkeypatch):
    real, calls = label_module._label_tile, {"n": 0}

    def interrupted(job, tile):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(job, tile)

    monkeypatch.setattr(label_module, "_label_tile", interrupted)
    args = (
        world.seg.out_dir,
        world.checkpoint,
        world.root / "ref",
        tmp_path / "out",
        labeled.config,
    )
    with pytest.raises(KeyboardInterrupt):
        label(*args, device="cpu")
    assert len(list((tmp_path / "out" / "predictions").rglob("*.parquet"))) == 2
    assert not list((tmp_path / "out").rglob("*.sdml-tmp-*"))
    monkeypatch.setattr(label_module, "_label_tile", real)
    resumed = label(*args, device="cpu")
    assert resumed.n_skipped == 2
    assert read_predictions(tmp_path / "out").equals(read_predictions(labeled.out))


def test_two_tiles_at_once_in_process_give_identical_predictions(
    world, labeled, tmp_path, monkeypatch
):
    # what label does on a GPU (one thread crops the next tile while the other embeds),
    # run here on the CPU: the same predictions, bit for bit
    import superdml.label.stage

    assert (
        superdml.label.stage.task_threads("cuda") == 2
        and superdml.label.stage.task_threads("cpu") == 1
    )
    monkeypatch.setattr(superdml.label.stage, "task_threads", lambda device_type: 2)
    out = tmp_path / "out"
    args = (world.seg.out_dir, world.checkpoint, world.root / "ref", out)
    result = label(*args, labeled.config, device="cpu")
    assert result.n_superpixels == world.seg.n_superpixels
    assert read_predictions(out).equals(read_predictions(labeled.out))


@pytest.mark.slow
def test_dask_cluster_with_a_killed_worker_gives_identical_predictions(world, labeled, tmp_path):
    import os
    import signal

    from superdml.core.cluster import make_client

    out = tmp_path / "out"
    with make_client(workers=2) as client:
        victim = sorted(client.nthreads())[0]
        pid = client.run(os.getpid, workers=[victim])[victim]

        def kill_when_started():
            deadline = time.time() + 60
            while time.time() < deadline and not list(out.rglob("*.parquet")):
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)  # the nanny restarts it; dask reruns its tasks

        killer = threading.Thread(target=kill_when_started)
        killer.start()
        args = (world.seg.out_dir, world.checkpoint, world.root / "ref", out)
        result = label(*args, labeled.config, device="cpu", client=client)
        killer.join()
    assert result.n_superpixels == world.seg.n_superpixels
    assert_same_up_to_float_noise(read_predictions(out), read_predictions(labeled.out))


def assert_same_up_to_float_noise(got, expected, atol=1e-5):
    """Equal predictions but for what the last bits of another batching may change.

    Workers embed other batches on other thread counts than the in-process run, so sums
    differ in the last bits: similarities and scores agree to `atol`, neighbours whose
    similarities are within `atol` of each other may come in either order (their labels
    are compared as a multiset; a tie at the k-th place may bring in another neighbour),
    and a superpixel whose best two classes are within `atol` may take either.
    """
    noisy = ["score", "margin", "similarity", "topk_similarities", "topk_labels", "label",
             "label_code"]  # fmt: skip
    assert got.drop(noisy).equals(expected.drop(noisy))
    for column in ("score", "margin", "similarity"):
        np.testing.assert_allclose(got[column], expected[column], atol=atol)
    g, e = got.to_pydict(), expected.to_pydict()
    for i in range(got.num_rows):
        sims = np.array(e["topk_similarities"][i])
        np.testing.assert_allclose(g["topk_similarities"][i], sims, atol=atol)
        starts = [0, *(np.flatnonzero(np.diff(sims) < -atol) + 1)]
        for start, end in zip(starts, [*starts[1:], len(sims)], strict=True):
            if end < len(sims):  # a tie group at the end may hold another neighbour
                got_labels = sorted(g["topk_labels"][i][start:end])
                assert got_labels == sorted(e["topk_labels"][i][start:end]), (i, sims)
        if e["margin"][i] > atol:
            assert (g["label"][i], g["label_code"][i]) == (e["label"][i], e["label_code"][i])


def test_keep_embeddings_lets_a_new_reference_only_revote(world, labeled, tmp_path, monkeypatch):
    config = LabelConfig(k=5, tile_size=128, batch_size=64, keep_embeddings=True)
    out = tmp_path / "out"
    args = (world.seg.out_dir, world.checkpoint)
    label(*args, world.root / "ref", out, config, device="cpu")
    assert len(list((out / "embeddings").rglob("*.npz"))) == 4
    first = read_predictions(out)
    smaller = tmp_path / "crops"
    shutil.copytree(world.root / "crops", smaller)
    for png in sorted((smaller / CLASSES[0]).glob("*.png"))[::2]:
        png.unlink()
    build_index(world.checkpoint, smaller, tmp_path / "ref2", device="cpu")

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded: embeddings are kept")

    monkeypatch.setattr(label_module, "load_embedder", no_model)
    again = label(*args, tmp_path / "ref2", out, config, device="cpu")
    assert again.n_skipped == 0 and again.n_superpixels == world.seg.n_superpixels
    revoted = read_predictions(out)
    # the first reference again, voted on the kept embeddings: the first run's labels
    label(*args, world.root / "ref", out, config, device="cpu")
    assert read_predictions(out).equals(first)
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    label(*args, tmp_path / "ref2", fresh, labeled.config, device="cpu")
    # kept embeddings are the float32 the first run voted on: the same votes, bit for bit
    assert revoted.equals(read_predictions(fresh))


def test_rerun_with_another_tile_size_reads_as_one_row_per_superpixel(world, labeled, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(labeled.out, out)
    config = dataclasses.replace(labeled.config, tile_size=256)  # 1 tile, not 4
    result = label(
        world.seg.out_dir, world.checkpoint, world.root / "ref", out, config, device="cpu"
    )
    assert result.n_tiles == 1
    table = read_predictions(out)  # the README's pyarrow.parquet.read_table(OUT/predictions)
    ids = table.column("segment_id").to_numpy()
    assert len(ids) == world.seg.n_superpixels == len(np.unique(ids))
    assert len(list((out / "predictions").rglob("*.parquet"))) == 1


def test_interrupted_relabel_leaves_only_current_parts_and_the_user_s_files(
    world, labeled, tmp_path, monkeypatch
):
    import pyarrow.dataset as ds

    from superdml.label.predictions import load_label_run
    from superdml.segment.run import load_segment_runs

    out = tmp_path / "out"
    shutil.copytree(labeled.out, out)
    notes = out / "predictions" / "notes.txt"
    notes.write_text("the user's notes")
    mine = out / "predictions" / "mosaic" / "mine.parquet"  # a Parquet file label did not write
    pq.write_table(pq.read_table(labeled.out / "predictions").slice(0, 3), mine)
    real, calls = label_module._label_tile, {"n": 0}

    def interrupted(job, tile):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(job, tile)

    monkeypatch.setattr(label_module, "_label_tile", interrupted)
    config = dataclasses.replace(labeled.config, k=3)  # a relabel with other options
    args = (world.seg.out_dir, world.checkpoint, world.root / "ref", out, config)
    with pytest.raises(KeyboardInterrupt):
        label(*args, device="cpu")
    assert notes.read_text() == "the user's notes" and mine.exists()
    ours = sorted(p for p in (out / "predictions").rglob("t*.parquet"))
    assert len(ours) == 1  # the k=5 parts are gone: no mix of two runs
    parts = load_label_run(out).parts(load_segment_runs(world.seg.out_dir)[0])
    assert [p for p in parts.paths if p is not None] == ours and len(parts.missing) == 3
    with pytest.raises(InputError, match="3 of 4 tiles of 'mosaic' have no predictions"):
        export(out, world.seg.out_dir)
    monkeypatch.setattr(label_module, "_label_tile", real)
    assert label(*args, device="cpu").n_skipped == 1
    table = ds.dataset(out / "predictions", exclude_invalid_files=True)
    ids = table.to_table(filter=ds.field("segment_id").is_valid()).column("segment_id")
    assert notes.exists() and mine.exists()
    assert len(ids) == world.seg.n_superpixels + 3  # the user's 3 rows stay theirs


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")
def test_bf16_and_fp32_labels_agree(trained, trained_labeled, tmp_path):
    world, labeled = trained, trained_labeled  # agreement needs neighbours a model tells apart
    fp32 = IndexConfig(precision="fp32")
    build_index(world.checkpoint, world.root / "crops", tmp_path / "ref", fp32, device="cpu")
    config = dataclasses.replace(labeled.config, precision="fp32")
    args = (world.seg.out_dir, world.checkpoint, tmp_path / "ref", tmp_path / "out", config)
    label(*args, device="cpu")
    bf16 = dataclasses.replace(labeled.config, precision="bf16")
    label(world.seg.out_dir, world.checkpoint, world.root / "ref", tmp_path / "b", bf16)
    a, b = read_predictions(tmp_path / "out"), read_predictions(tmp_path / "b")
    assert a.column("segment_id").equals(b.column("segment_id"))
    agree = a.column("label_code").to_numpy() == b.column("label_code").to_numpy()
    # This small model's neighbours are within 1e-3 of each other, so bf16 rounding can
    # swap the k-th and (k+1)-th: votes decided by one neighbour (margin <= 1/k) may flip
    # (9 of 576 here); every vote decided by more agrees.
    decided = a.column("margin").to_numpy() > 1.5 / config.k
    assert agree[decided].mean() >= 0.995 and decided.mean() > 0.7, agree[decided].mean()
    assert agree.mean() >= 0.98, agree.mean()
    sims = a.column("similarity").to_numpy() - b.column("similarity").to_numpy()
    assert 0 < np.abs(sims).max() < 0.02  # different arithmetic, nearly the same neighbours


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("precision", "message"),
    [
        ("fp16", "precision: got 'fp16', expected one of auto, fp32, bf16\n"),
        ("bf16", "precision: got 'bf16', but this CPU has no bf16 instructions"),
    ],
)
def test_cli_refuses_an_unusable_precision(world, tmp_path, monkeypatch, precision, message):
    monkeypatch.setattr(embed_module, "cpu_has_bf16", lambda: False)
    result = CliRunner().invoke(
        cli,
        ["-q", "label", str(world.seg.out_dir), "--checkpoint", str(world.checkpoint),
         "--reference", str(world.root / "ref"), "--out", str(tmp_path / "out"),
         "--device", "cpu", "--workers", "0", "--precision", precision],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_reference_of_another_checkpoint_is_refused(world, tmp_path):
    other = save_untrained_checkpoint(tmp_path / "other.pt", CLASSES, seed=1)
    with pytest.raises(InputError, match="ref: reference built with another checkpoint"):
        label(world.seg.out_dir, other, world.root / "ref", tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_k_larger_than_the_reference(world, tmp_path):
    with pytest.raises(InputError, match="k=100000 but the reference holds"):
        label(
            world.seg.out_dir,
            world.checkpoint,
            world.root / "ref",
            tmp_path / "o",
            LabelConfig(k=100_000),
        )


def test_moved_raster_of_another_size(world, tmp_path):
    small = write_raster(tmp_path / "small.tif", np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(InputError, match="small.tif: grid 64x64 does not match"):
        label(
            world.seg.out_dir,
            world.checkpoint,
            world.root / "ref",
            tmp_path / "o",
            raster=small,
        )


def test_one_band_raster_for_an_rgb_model(world, tmp_path):
    # a checkpoint of the crops' rule (bands 1, 2, 3 of an RGB raster), as training records it
    rule = read_crop_rule(world.root / "crops")
    assert rule is not None
    checkpoint = save_untrained_checkpoint(tmp_path / "m.pt", CLASSES, crop_rule=rule.to_dict())
    build_index(checkpoint, world.root / "crops", tmp_path / "ref", device="cpu")
    gray = write_raster(tmp_path / "gray.tif", texture_mosaic(128)[0][:1])
    seg = segment_raster(gray, tmp_path / "seg", SegmentConfig(region_size=16, tile_size=128))
    with pytest.raises(InputError, match="gray.tif: gives crops from 1 band.*expects 3"):
        label(seg.out_dir, checkpoint, tmp_path / "ref", tmp_path / "o")


def test_other_checkpoint_in_out_needs_overwrite(world, labeled, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(labeled.out, out)
    manifest = json.loads((out / "label.json").read_text())
    manifest["checkpoint_sha256"] = "0" * 64
    (out / "label.json").write_text(json.dumps(manifest))
    for part in (out / "predictions").rglob("*.parquet"):  # as another checkpoint made them
        table = pq.read_table(part)
        provenance = json.loads(table.schema.metadata[b"superdml"])
        provenance["checkpoint_sha256"] = "0" * 64
        pq.write_table(table.replace_schema_metadata({"superdml": json.dumps(provenance)}), part)
    args = (
        world.seg.out_dir,
        world.checkpoint,
        world.root / "ref",
        out,
        labeled.config,
    )
    with pytest.raises(InputError, match="holds predictions of another checkpoint.*--overwrite"):
        label(*args, device="cpu")
    notes = out / "predictions" / "notes.txt"
    notes.write_text("the user's notes")
    result = label(*args, device="cpu", overwrite=True)
    assert result.n_skipped == 0 and notes.read_text() == "the user's notes"


def test_cli_label_and_export(world, labeled, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        cli,
        ["-q", "label", str(world.seg.out_dir), "--checkpoint", str(world.checkpoint),
         "--reference", str(world.root / "ref"), "--out", str(out), "--k", "5",
         "--tile-size", "128", "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{world.seg.n_superpixels} superpixels in 4 tiles" in result.output
    result = runner.invoke(
        cli,
        ["-q", "export", str(out), "--segments", str(world.seg.out_dir), "--vector", "parquet"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "labels.tif").exists() and (out / "superpixels.parquet").exists()
    bad = runner.invoke(
        cli,
        ["-q", "label", str(world.seg.out_dir), "--checkpoint", str(world.root / "truth.tif"),
         "--reference", str(world.root / "ref"), "--out", str(tmp_path / "x"), "--workers", "0"],
    )  # fmt: skip
    assert bad.exit_code == 2 and "truth.tif: not a torch checkpoint" in bad.output
