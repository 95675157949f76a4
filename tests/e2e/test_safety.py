"""Reruns never lose a user's file nor mix results of other inputs (through the CLI).

Each test puts people's files where a command writes, or changes an input behind a
finished output, and checks the exit code, the one-line message and the files after.
"""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from rasters import texture_mosaic, write_raster
from worlds import CLASSES

from superdml.cli.commands import cli
from superdml.core.ownership import LOCK, claim_output
from superdml.search.reference import ReferenceIndex


@pytest.fixture(scope="module")
def world(shared_world):
    """The shared untrained world's folder (read-only)."""
    return shared_world.root


@pytest.fixture
def work(shared_world, tmp_path):
    """A private copy of the world to change."""
    return shared_world.copy_to(tmp_path)


def invoke(*args):
    result = CliRunner().invoke(cli, ["-q", *map(str, args)])
    lines = result.output.strip().splitlines()
    return result.exit_code, (lines[-1] if lines else ""), result


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK  # the lock records who last held it
    }


def label_args(work, out="labels", *extra):
    return (
        "label", work / "seg", "--checkpoint", work / "model.pt", "--reference", work / "ref",
        "--out", work / out, "--tile-size", "128", "--k", "3", "--workers", "0", *extra,
    )  # fmt: skip


# ------------------------------------------------------------------- data loss


def test_pipeline_train_stage_refuses_a_folder_of_the_users(work):
    precious = work / "precious"
    precious.mkdir()
    (precious / "thesis.docx").write_text("years of work")
    (work / "p.yaml").write_text(
        "stages:\n  - stage: train\n    train_dir: crops\n    out: precious\n    epochs: 1\n"
    )
    code, line, result = invoke("run", work / "p.yaml")
    assert code == 2, result.output
    assert line.startswith("error: ") and "precious: is not empty and was not made by" in line
    assert snapshot(precious) == {"thesis.docx": hashlib.sha256(b"years of work").hexdigest()}


def test_second_retrain_round_into_the_previous_model_is_refused_before_anything(work):
    model = work / "retrain" / "model"
    with claim_output(model, "train"):
        shutil.copy2(work / "model.pt", model / "best.pt")
        (model / "train.yaml").write_text("loss: proxy_anchor\n")
    before = snapshot(work)
    code, line, result = invoke(
        "run", "retrain", "--workdir", work, "--set", "previous=retrain/model",
        "--set", "segments=seg", "--workers", "0",
    )  # fmt: skip
    assert code == 2, result.output
    assert "pipelines/retrain.yaml:" in line and "overlaps" in line and "retrain/model" in line
    assert snapshot(work) == before


def test_demo_refuses_a_folder_of_the_users(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    code, line, _ = invoke("demo", "--out", tmp_path / "mine", "--workers", "0")
    assert code == 2 and "mine: is not empty and was not made by superdml demo" in line
    assert snapshot(tmp_path / "mine") == {"a.txt": hashlib.sha256(b"x").hexdigest()}


def test_train_into_a_folder_with_a_users_tmp_folder_is_refused(work):
    (work / "proj" / "photos.tmp-2023").mkdir(parents=True)
    (work / "proj" / "photos.tmp-2023" / "img.jpg").write_text("jpeg")
    code, line, _ = invoke(
        "train", "--train-dir", work / "crops", "--loss", "proxy_anchor", "--out", work / "proj"
    )
    assert code == 2 and "proj: is not empty" in line
    assert (work / "proj" / "photos.tmp-2023" / "img.jpg").read_text() == "jpeg"


def test_rebuilding_a_reference_keeps_a_users_file_in_it(work):
    (work / "ref" / "notes.txt").write_text("mine")
    (work / "ref" / "photos.tmp-2023").mkdir()
    before = snapshot(work / "ref")
    code, line, _ = invoke(
        "index", "--checkpoint", work / "model.pt", "--reference-dir", work / "crops",
        "--out", work / "ref", "--device", "cpu",
    )  # fmt: skip
    assert code == 2 and "ref: holds notes.txt, which superdml index did not write" in line
    assert snapshot(work / "ref") == before and (work / "ref" / "photos.tmp-2023").is_dir()


# --------------------------------------------------------------- stale results


def test_resegmenting_relabels_every_tile_and_old_predictions_are_not_exported(world, work):
    code, _, result = invoke(*label_args(work))
    assert code == 0, result.output
    source = world / "mosaic.tif"  # what work/seg was made from
    code, _, result = invoke(
        "segment", source, "--out", work / "seg", "--region-size", "24", "--tile-size", "128",
        "--workers", "0",
    )  # fmt: skip
    assert code == 0, result.output
    code, line, _ = invoke("export", work / "labels", "--segments", work / "seg")
    assert code == 2 and "segmented again since" in line and "run superdml label again" in line
    assert not (work / "labels" / "labels.tif").exists()
    code, _, result = invoke(*label_args(work))
    assert code == 0, result.output
    ids = pq.read_table(work / "labels" / "predictions").column("segment_id").to_numpy()
    new = pq.read_table(work / "seg" / "mosaic" / "superpixels.parquet")
    assert np.array_equal(np.sort(ids), np.sort(new.column("segment_id").to_numpy()))
    code, _, result = invoke("export", work / "labels", "--segments", work / "seg")
    assert code == 0, result.output


def test_kept_embeddings_are_not_reused_after_the_crop_rule_changes(work):
    assert invoke(*label_args(work, "labels", "--keep-embeddings"))[0] == 0
    first = pq.read_table(work / "labels" / "predictions").sort_by("segment_id")
    assert invoke(*label_args(work, "labels", "--keep-embeddings", "--crop-size", "48"))[0] == 0
    second = pq.read_table(work / "labels" / "predictions").sort_by("segment_id")
    assert len(list((work / "labels" / "embeddings").iterdir())) == 2  # one per crop rule
    sims = second.column("similarity").to_numpy()
    assert not np.allclose(first.column("similarity").to_numpy(), sims)


def test_segment_redoes_a_source_rewritten_in_place(work):
    args = ("segment", work / "mosaic.tif", "--out", work / "seg2", "--region-size", "16",
            "--tile-size", "128", "--workers", "0")  # fmt: skip
    table = work / "seg2" / "mosaic" / "superpixels.parquet"
    assert invoke(*args)[0] == 0
    before = pq.read_table(table)
    (work / "seg2" / "mosaic" / ".work-mine").mkdir()  # a user's folder beside our work folders
    rgb, _ = texture_mosaic(256)
    write_raster(work / "mosaic.tif", np.ascontiguousarray(rgb[:, ::-1]))  # same size, new pixels
    assert invoke(*args)[0] == 0
    after = pq.read_table(table)
    assert not np.allclose(before.column("mean_b1").to_numpy(), after.column("mean_b1").to_numpy())
    assert (work / "seg2" / "mosaic" / ".work-mine").is_dir()


def test_pipeline_reruns_index_after_crops_are_sorted_into_a_stage_folder(work):
    (work / "p.yaml").write_text(
        "stages:\n"
        "  - stage: crops\n    segments: seg\n    out: sorted\n    label_raster: truth.tif\n"
        "    crop_size: 32\n    per_class: 4\n"
        "  - stage: index\n    checkpoint: model.pt\n    reference_dir: sorted\n    out: ref2\n"
    )
    assert invoke("run", work / "p.yaml", "--workers", "0", "--device", "cpu")[0] == 0
    first, second = CLASSES[:2]
    moved = next((work / "sorted" / first).iterdir())
    shutil.move(moved, work / "sorted" / second / moved.name)  # a person re-sorts a crop
    code, _, result = invoke("run", work / "p.yaml", "--workers", "0", "--device", "cpu")
    assert code == 0, result.output
    ref = ReferenceIndex.load(work / "ref2")
    assert ref.labels[ref.files.index(f"{second}/{moved.name}")] == ref.class_names.index(second)


def test_a_replaced_faiss_file_is_refused(work):
    other = ReferenceIndex.load(work / "ref")
    emb = np.roll(other.embeddings, 1, axis=0)
    swapped = ReferenceIndex.build(emb, other.labels, other.class_names, other.files, "x" * 64)
    swapped.save(work / "other")
    shutil.copy2(work / "other" / "index.faiss", work / "ref" / "index.faiss")
    code, line, _ = invoke(*label_args(work))
    assert code == 2 and "ref: damaged reference folder (index.faiss does not match" in line
    assert not (work / "labels").exists()


# ----------------------------------------------------------------- concurrency


def test_a_second_run_into_the_same_folder_stops_at_once(work):
    assert invoke(*label_args(work))[0] == 0
    before = snapshot(work / "labels")
    with claim_output(work / "labels", "label"):
        code, line, _ = invoke(*label_args(work))
    assert code == 2 and "labels: in use by another superdml run (pid" in line
    assert snapshot(work / "labels") == before


def test_export_refuses_parts_left_by_a_run_with_other_inputs(work, monkeypatch):
    import superdml.label.stage

    assert invoke(*label_args(work))[0] == 0
    calls = []
    original = superdml.label.stage.predict

    def fail_on_the_third_tile(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("power cut")  # in the middle of a rerun with another k
        return original(*args, **kwargs)

    monkeypatch.setattr(superdml.label.stage, "predict", fail_on_the_third_tile)
    with pytest.raises(RuntimeError, match="power cut"):
        CliRunner().invoke(cli, ["-q", *map(str, label_args(work, "labels", "--k", "5"))],
                           catch_exceptions=False)  # fmt: skip
    code, line, _ = invoke("export", work / "labels", "--segments", work / "seg")
    assert code == 2 and "2 of 4 tiles of 'mosaic' have no predictions" in line
    assert not (work / "labels" / "labels.tif").exists()


def test_crops_of_other_options_are_replaced_until_people_sort_them(work):
    args = ["crops", work / "seg", "--out", work / "new", "--crop-size", "32", "--sample", "12",
            "--workers", "0"]  # fmt: skip
    assert invoke(*args)[0] == 0
    assert invoke(*args[:-2], "--seed", "1", "--workers", "0")[0] == 0  # nobody sorted: replaced
    assert len(list((work / "new" / "unlabeled").glob("*.png"))) == 12
    crop = next((work / "new" / "unlabeled").glob("*.png"))
    (work / "new" / "forest").mkdir()
    shutil.move(crop, work / "new" / "forest" / crop.name)  # a person sorts one crop
    before = snapshot(work / "new")
    code, line, _ = invoke(*args)
    assert code == 2 and f"forest/{crop.name} is not where superdml crops put it" in line
    assert snapshot(work / "new") == before


def test_review_replaces_its_own_earlier_crops_but_not_sorted_ones(work):
    assert invoke(*label_args(work))[0] == 0
    args = ["review", work / "labels", "--segments", work / "seg", "--out", work / "rev",
            "--max-score", "1", "--limit", "6"]  # fmt: skip
    assert invoke(*args)[0] == 0
    assert invoke(*args[:-1], "4")[0] == 0
    assert len(list((work / "rev").glob("*/*.png"))) == 4  # the earlier 6 went
    crop = next((work / "rev").glob("*/*.png"))
    (work / "rev" / "sorted").mkdir()
    shutil.move(crop, work / "rev" / "sorted" / crop.name)
    before = snapshot(work / "rev")
    code, line, _ = invoke(*args)
    assert code == 2 and "rev: holds an earlier review, and sorted/" in line
    assert snapshot(work / "rev") == before
