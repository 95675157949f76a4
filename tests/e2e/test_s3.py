"""The stages against a bucket (an S3 emulator): same results as on a disk, same ownership rules.

The shared world's mosaic, checkpoint and reference are uploaded to the emulator
(``tests/s3.py``); the shipped ``label_mosaic`` pipeline runs with its working folder in
the bucket, and again on a local folder, and the outputs must agree. Labeling is killed
with SIGKILL midway and rerun; a second writer into the same prefix is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from click.testing import CliRunner
from processes import child_env
from s3 import ACCESS_KEY, BUCKET, SECRET_KEY

from superdml.cli.commands import cli
from superdml.core import storage
from superdml.core.errors import InputError, OutputLockedError
from superdml.core.ownership import LOCK, MARKER, claim_output

#: The world's options (worlds.SEGMENT, worlds.LABEL) as pipeline overrides.
SETS = ["segment.region_size=16", "segment.tile_size=128", "label.tile_size=128", "label.k=5",
        "label.batch_size=64"]  # fmt: skip


def _pipeline(workdir: object, mosaic: object, checkpoint: object, reference: object) -> list[str]:
    sets = [f"mosaic={mosaic}", f"checkpoint={checkpoint}", f"reference={reference}", *SETS]
    args = ["--debug", "run", "label_mosaic", "--workdir", str(workdir), "--workers", "0"]
    return [*args, "--device", "cpu", *(a for s in sets for a in ("--set", s))]


def _objects(prefix: str) -> dict[str, bytes]:
    return {
        rel: storage.read_bytes(storage.join(prefix, rel)) for rel in storage.list_files(prefix)
    }


@pytest.fixture(scope="module")
def inputs(shared_world, s3_endpoint) -> dict[str, str]:
    """The shared world's mosaic, checkpoint and reference in the bucket."""
    root = f"s3://{BUCKET}/world-{uuid.uuid4().hex[:8]}"
    storage.upload(shared_world.mosaic, f"{root}/mosaic.tif")
    storage.upload(shared_world.checkpoint, f"{root}/model.pt")
    for rel in storage.list_files(shared_world.ref):
        storage.upload(shared_world.ref / rel, f"{root}/ref/{rel}")
    return {"mosaic": f"{root}/mosaic.tif", "checkpoint": f"{root}/model.pt",
            "reference": f"{root}/ref", "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def runs(shared_world, shared_label_run, inputs, tmp_path_factory):
    """label_mosaic run in the bucket; the same stages run locally: (bucket workdir, local, log).

    The local side is the shared world's segments and label run (the same options as
    :data:`SETS`), exported from a copy: ``local/segments/mosaic`` and ``local/labels``.
    """
    runner = CliRunner()
    workdir = f"{inputs['root']}/run"
    remote = runner.invoke(
        cli, _pipeline(workdir, inputs["mosaic"], inputs["checkpoint"], inputs["reference"])
    )
    assert remote.exit_code == 0, remote.output
    local = tmp_path_factory.mktemp("local_run")
    shutil.copytree(shared_world.seg.out_dir.parent, local / "segments")
    shutil.copytree(shared_label_run.out, local / "labels")
    exported = runner.invoke(
        cli, ["-q", "export", str(local / "labels"), "--segments", str(local / "segments")]
    )
    assert exported.exit_code == 0, exported.output
    return workdir, local, remote.output


@pytest.mark.slow
def test_label_mosaic_in_a_bucket_equals_a_local_run(runs):
    workdir, local, log = runs
    assert "segment: ran" in log and "label: ran" in log and "export: ran" in log
    parts = storage.list_files(f"{workdir}/labels/predictions")
    assert parts == ["mosaic/t0000_0000.parquet", "mosaic/t0000_0001.parquet",
                     "mosaic/t0001_0000.parquet", "mosaic/t0001_0001.parquet"]  # fmt: skip
    for rel in parts:
        with storage.open_input(f"{workdir}/labels/predictions/{rel}") as stream:
            remote = pq.read_table(stream)
        mine = pq.read_table(local / "labels/predictions" / rel)
        assert remote.num_rows > 0 and remote.equals(mine)  # every value, bit for bit
        # provenance: the same but for the segment run's, which covers the source's location
        meta = [json.loads(t.schema.metadata[b"superdml"]) for t in (remote, mine)]
        assert meta[0].pop("segments") != meta[1].pop("segments") and meta[0] == meta[1]
    for rel in ("segments/mosaic/segments.tif", "labels/labels.tif", "labels/scores.tif"):
        with (
            rasterio.open(storage.gdal_path(f"{workdir}/{rel}")) as a,
            rasterio.open(local / rel) as b,
        ):
            assert (a.crs, a.transform, a.dtypes) == (b.crs, b.transform, b.dtypes)
            assert np.array_equal([a.nodata], [b.nodata], equal_nan=True)
            assert a.overviews(1) == b.overviews(1)
            if not rel.startswith("segments"):  # segments.tif's tags name its source
                assert a.tags() == b.tags()
            assert np.array_equal(a.read(), b.read(), equal_nan=True)
            if rel.endswith("labels.tif"):
                assert a.colormap(1) == b.colormap(1)
    summary = json.loads(storage.read_text(f"{workdir}/labels/summary.json"))
    assert summary == json.loads((local / "labels/summary.json").read_text())
    style = (local / "labels/labels.qml").read_bytes()
    assert storage.read_bytes(f"{workdir}/labels/labels.qml") == style
    table = pq.read_table(local / "segments/mosaic/superpixels.parquet")
    with storage.open_input(f"{workdir}/segments/mosaic/superpixels.parquet") as stream:
        assert pq.read_table(stream).equals(table)


@pytest.mark.slow
def test_a_bucket_run_holds_no_credentials_and_leaves_no_lock(runs, inputs):
    workdir, _, log = runs
    objects = _objects(workdir)
    assert not [k for k in objects if k.endswith(LOCK)]
    assert f"{workdir}/.superdml/segment.json".endswith("segment.json")
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert secret not in log
        leaked = [k for k, data in objects.items() if secret.encode() in data]
        assert leaked == [], f"{secret} in {leaked}"
    label = json.loads(objects["labels/label.json"])
    assert label["checkpoint"] == inputs["checkpoint"] and label["reference"] == inputs["reference"]


@pytest.mark.slow
def test_a_bucket_rerun_skips_every_stage_and_rewrites_nothing(runs, inputs):
    workdir = runs[0]
    before = {rel: storage.info(f"{workdir}/{rel}") for rel in storage.list_files(workdir)}
    result = CliRunner().invoke(
        cli, _pipeline(workdir, inputs["mosaic"], inputs["checkpoint"], inputs["reference"])
    )
    assert result.exit_code == 0, result.output
    assert "segment: skipped" in result.output and "export: skipped" in result.output
    after = {rel: storage.info(f"{workdir}/{rel}") for rel in storage.list_files(workdir)}
    assert after == before


def _label_command(segments: str, inputs: dict[str, str], out: str) -> list[str]:
    return ["label", segments, "--checkpoint", inputs["checkpoint"], "--reference",
            inputs["reference"], "--out", out, "--tile-size", "128", "--batch-size", "64",
            "--k", "5", "--workers", "0", "--device", "cpu"]  # fmt: skip


@pytest.mark.slow
def test_killed_labeling_reruns_to_the_same_objects_and_refuses_a_second_writer(runs, inputs):
    segments, killed = f"{runs[0]}/segments", f"{inputs['root']}/killed"
    code = "from superdml.cli.commands import main; main()"
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-q", *_label_command(segments, inputs, killed)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not storage.list_files(f"{killed}/predictions") and proc.poll() is None:
            assert time.monotonic() < deadline, "no predictions part after 120 s"
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        second = CliRunner().invoke(cli, ["-q", *_label_command(segments, inputs, killed)])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert second.exit_code == 2, second.output
    assert second.output.count("\n") == 1 and "in use by another superdml run" in second.output
    assert f"pid {proc.pid}" in second.output
    written = storage.list_files(f"{killed}/predictions")
    assert 0 < len(written) < 4, "the kill came after the last part: nothing was tested"
    for rel in written:  # every object there is a whole part
        with storage.open_input(f"{killed}/predictions/{rel}") as stream:
            assert pq.read_metadata(stream).num_rows >= 0
    assert storage.exists(f"{killed}/{LOCK}")  # the killed run's: taken over below
    rerun = CliRunner().invoke(cli, ["-q", *_label_command(segments, inputs, killed)])
    assert rerun.exit_code == 0, rerun.output
    # the pipeline's label stage labeled the same segments with the same options, unhurt
    parts = [_objects(f"{prefix}/predictions") for prefix in (killed, f"{runs[0]}/labels")]
    assert len(parts[0]) == 4 and parts[0] == parts[1]
    assert not storage.exists(f"{killed}/{LOCK}")


# ------------------------------------------------------------ prefixes: ownership


def test_a_prefix_holding_foreign_objects_is_refused(bucket, shared_world):
    storage.write_text(f"{bucket}/notes/field.txt", "mine")
    result = CliRunner().invoke(
        cli, ["-q", "segment", str(shared_world.mosaic), "--out", bucket, "--workers", "0"]
    )
    assert result.exit_code == 2, result.output
    assert f"error: {bucket}: holds notes/field.txt and was not made by superdml segment" in (
        result.output
    )
    assert storage.list_files(bucket) == ["notes/field.txt"]


def test_a_prefix_lock_is_one_create_only_object(bucket):
    with claim_output(bucket, "label") as prefix:
        assert prefix == bucket
        holder = json.loads(storage.read_text(f"{bucket}/{LOCK}"))
        assert holder["pid"] == os.getpid() and "secret" not in json.dumps(holder).lower()
        with (
            pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on "),
            claim_output(bucket, "label"),
        ):
            pass
        storage.write_text(f"{bucket}/predictions/x/t0000_0000.parquet", "part")
    assert storage.list_files(bucket) == [MARKER, "predictions/x/t0000_0000.parquet"]
    with pytest.raises(InputError, match="is the output of superdml label, not export"):
        with claim_output(bucket, "export"):
            pass
    with claim_output(bucket, "export", accept=("label",)):
        pass


def test_a_lock_of_another_host_is_refused_and_a_dead_process_lock_taken_over(bucket):
    other = {"host": "worker-7.example", "pid": 4242, "started": 0.0, "token": "x"}
    storage.write_text(f"{bucket}/{LOCK}", json.dumps(other))
    with pytest.raises(OutputLockedError, match=r"pid 4242 on worker-7.example\): wait"):
        with claim_output(bucket, "label"):
            pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    import socket

    killed = {**other, "host": socket.gethostname(), "pid": int(dead.stdout)}
    storage.write_text(f"{bucket}/{LOCK}", json.dumps(killed))
    with claim_output(bucket, "label"):
        assert json.loads(storage.read_text(f"{bucket}/{LOCK}"))["pid"] == os.getpid()
    assert not storage.exists(f"{bucket}/{LOCK}")


def test_a_run_that_fails_before_writing_leaves_no_object(bucket):
    with pytest.raises(RuntimeError), claim_output(bucket, "segment"):
        raise RuntimeError("bad input")
    assert storage.list_files(bucket) == []


def test_outputs_overlapping_inputs_in_a_bucket_are_refused(bucket):
    from superdml.core.ownership import check_apart

    with pytest.raises(InputError, match="overlaps the input"):
        check_apart(f"{bucket}/ref/out", [f"{bucket}/ref"])
    check_apart(f"{bucket}/refined", [f"{bucket}/ref"])  # a longer name is another prefix
    check_apart("/tmp/out", [f"{bucket}/ref"])


@pytest.mark.slow
def test_index_reads_crops_from_a_bucket_and_writes_its_reference_there(
    shared_world, bucket, tmp_path, monkeypatch
):
    from superdml.search.reference import ReferenceIndex

    monkeypatch.setenv("SUPERDML_CACHE", str(tmp_path / "cache"))
    for rel in storage.list_files(shared_world.crops):
        storage.upload(shared_world.crops / rel, f"{bucket}/crops/{rel}")
    args = ["index", "--checkpoint", str(shared_world.checkpoint), "--reference-dir",
            f"{bucket}/crops", "--out", f"{bucket}/ref", "--batch-size", "32",
            "--device", "cpu"]  # fmt: skip
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    remote, local = ReferenceIndex.load(f"{bucket}/ref"), ReferenceIndex.load(shared_world.ref)
    assert remote.files == local.files and remote.class_names == local.class_names
    assert np.array_equal(remote.labels, local.labels)
    assert np.array_equal(remote.embeddings, local.embeddings)
    written = set(storage.list_files(f"{bucket}/ref"))
    assert written == {MARKER} | {p.name for p in shared_world.ref.iterdir()} - {MARKER}
    again = CliRunner().invoke(cli, args)  # the same crops: every embedding reused
    assert again.exit_code == 0, again.output
    assert f"0 embedded, {remote.size} reused, 0 removed" in again.output


def test_stages_on_local_folders_only_refuse_uris(tmp_path):
    result = CliRunner().invoke(
        cli, ["train", "--train-dir", "s3://b/crops", "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 2, result.output
    assert "error: s3://b/crops: superdml train takes local paths only as its inputs" in (
        result.output
    )
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_crops_from_a_bucket_equal_the_local_crops(runs, inputs, shared_world, tmp_path):
    truth, classes = f"{inputs['root']}/truth.tif", f"{inputs['root']}/classes.yaml"
    storage.upload(shared_world.truth_tif, truth)
    storage.upload(shared_world.crops / "classes.yaml", classes)
    out = tmp_path / "crops"
    result = CliRunner().invoke(cli, [
        "-q", "crops", f"{runs[0]}/segments/mosaic", "--out", str(out), "--label-raster", truth,
        "--classes", classes, "--crop-size", "32", "--per-class", "8", "--workers", "0",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    mine = pq.read_table(shared_world.crops / "crops.parquet")
    assert pq.read_table(out / "crops.parquet").equals(mine)
    for name in mine.column("file").to_pylist():
        assert (out / name).read_bytes() == (shared_world.crops / name).read_bytes()
    assert (out / "classes.yaml").read_text() == (shared_world.crops / "classes.yaml").read_text()
