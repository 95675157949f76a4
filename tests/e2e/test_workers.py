"""Workers that share no disk with the client: the model and reference come from a bucket."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from isolated_workers import can_unshare, isolated_cluster, local_paths
from worlds import LABEL, SEGMENT

import superdml.learn.embed as embed_module
import superdml.search.reference as reference_module
from superdml.core import storage
from superdml.core.errors import CheckpointError
from superdml.label.stage import label
from superdml.learn.checkpoint import checkpoint_sha256
from superdml.learn.embed import load_embedder
from superdml.search.reference import ReferenceIndex, load_reference

# The functions this file runs on the workers travel by value: a worker cannot import
# this file (only tests/ is on its path).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def upload_tree(folder: Path, prefix: str) -> str:
    """Put every file under `folder` at its relative key under `prefix`; return `prefix`."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return prefix


def try_to_read(path: str) -> str:
    """On a worker: read a file of the client with Python and with GDAL; say what happened."""
    outcomes = []
    for reader in (lambda: Path(path).read_bytes(), lambda: rasterio.open(path).close()):
        try:
            reader()
            outcomes.append("read")
        except (OSError, rasterio.errors.RasterioIOError) as err:
            outcomes.append(type(err).__name__)
    return " ".join(outcomes)


def where_am_i(uri: str) -> dict[str, str]:
    """On a worker: its folders, and an object of the bucket read through storage."""
    return {"cwd": os.getcwd(), "cache": str(storage.cache_dir()), "object": storage.read_text(uri)}


@pytest.fixture(scope="module")
def isolated(tmp_path_factory, s3_endpoint):
    """Two workers denied this session's temporary root (every test file lives there)."""
    with isolated_cluster(tmp_path_factory.getbasetemp()) as cluster:
        yield cluster


@pytest.mark.slow
def test_isolated_workers_reach_the_bucket_and_none_of_the_client_files(
    shared_world, isolated, bucket
):
    from distributed import Client

    address, specs = isolated
    storage.write_text(f"{bucket}/hello.txt", "from the client")
    with Client(address) as client:
        got = client.run(where_am_i, f"{bucket}/hello.txt")
        denied = client.run(try_to_read, str(shared_world.mosaic))
    for worker in got.values():
        assert worker["object"] == "from the client"
        assert Path(worker["cache"]).parent.parent.name.startswith("superdml-worker-")
    # Python's open is refused by the audit hook (or finds nothing in the namespace);
    # GDAL's C-level open only where the namespace hides the client's files
    python, gdal = zip(*(outcome.split() for outcome in denied.values()), strict=True)
    assert set(python) <= {"PermissionError", "FileNotFoundError"}
    if can_unshare():
        assert set(gdal) == {"RasterioIOError"}
    assert local_paths(specs.specs, shared_world.root) == []


def test_model_and_reference_are_fetched_once_per_process_and_checked(
    shared_world, bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("SUPERDML_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embed_module, "_EMBEDDERS", type(embed_module._EMBEDDERS)(2))
    monkeypatch.setattr(reference_module, "_REFERENCES", type(reference_module._REFERENCES)(2))
    checkpoint, reference = f"{bucket}/model.pt", f"{bucket}/ref"
    storage.upload(shared_world.checkpoint, checkpoint)
    upload_tree(shared_world.ref, reference)
    sha = checkpoint_sha256(shared_world.checkpoint)
    ref_sha = ReferenceIndex.load(shared_world.ref).sha256
    reads: list[str] = []
    read_bytes = storage.read_bytes
    monkeypatch.setattr(
        storage, "read_bytes", lambda loc, *a: reads.append(str(loc)) or read_bytes(loc, *a)
    )
    first = load_embedder(checkpoint, sha, "cpu")
    assert load_embedder(checkpoint, sha, "cpu") is first
    ref = load_reference(reference, ref_sha)
    assert load_reference(reference, ref_sha) is ref and ref.size > 0
    assert reads.count(checkpoint) == 1
    assert len([r for r in reads if r.startswith(reference + "/")]) == len(
        storage.list_files(reference)
    )
    # a checkpoint replaced after the run began is refused, not mixed in
    storage.write_bytes(checkpoint, b"PK" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=rf"^{checkpoint}: replaced since the run began"):
        load_embedder(checkpoint, "0" * 64, "cpu")
    shutil.rmtree(tmp_path / "cache")


def predictions_of(out: str) -> pa.Table:
    """Every row of a label run's predictions (a path or a URI), by segment id."""
    where, filesystem = storage.arrow_source(storage.join(out, "predictions"))
    return pq.read_table(where, filesystem=filesystem).sort_by("segment_id")


@pytest.mark.slow
def test_label_mosaic_on_workers_that_share_nothing_equals_a_local_run(
    shared_world, isolated, bucket, tmp_path, tmp_path_factory, monkeypatch
):
    """The shipped pipeline, inputs and outputs in the bucket, its tasks on isolated workers."""
    import faiss
    import torch
    from click.testing import CliRunner

    from superdml.cli.commands import cli
    from superdml.core.cluster import default_workers, make_client

    address, specs = isolated
    monkeypatch.setenv("SUPERDML_CACHE", str(tmp_path / "client-cache"))
    mosaic, checkpoint = f"{bucket}/mosaic.tif", f"{bucket}/model.pt"
    storage.upload(shared_world.mosaic, mosaic)
    storage.upload(shared_world.checkpoint, checkpoint)
    reference = upload_tree(shared_world.ref, f"{bucket}/ref")
    specs.specs.clear()
    sets = [f"mosaic={mosaic}", f"checkpoint={checkpoint}", f"reference={reference}",
            f"segment.region_size={SEGMENT.region_size}", f"segment.tile_size={SEGMENT.tile_size}",
            f"label.tile_size={LABEL.tile_size}", f"label.k={LABEL.k}",
            f"label.batch_size={LABEL.batch_size}"]  # fmt: skip
    args = ["run", "label_mosaic", "--workdir", f"{bucket}/run", "--scheduler", address]
    args += ["--device", "cpu", *(a for s in sets for a in ("--set", s))]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "label: ran" in result.output and "export: ran" in result.output
    with make_client(scheduler=address) as client:
        cached = client.run(lambda: sorted(p.name for p in storage.cache_dir().glob("*/*")))
    assert len(specs.specs) >= 2 * 4 + 4  # both segment phases and labeling, 4 tiles each
    assert local_paths(specs.specs, tmp_path_factory.getbasetemp()) == []  # URIs, no test file
    # each worker that labeled fetched the model and the reference once
    assert ["model.pt", "ref"] in cached.values()
    assert all(names in ([], ["model.pt", "ref"]) for names in cached.values())
    run = f"{bucket}/run"
    with rasterio.open(storage.gdal_path(f"{run}/segments/mosaic/segments.tif")) as got:
        with rasterio.open(shared_world.seg.segments_path) as want:
            np.testing.assert_array_equal(got.read(1), want.read(1))
    # the same labels bit for bit as a local run with the workers' torch and FAISS threads
    threads = torch.get_num_threads()
    workers_threads = max(1, default_workers() // len(cached))
    torch.set_num_threads(workers_threads)
    faiss.omp_set_num_threads(workers_threads)
    try:
        local = tmp_path / "local"
        label(shared_world.seg.out_dir, shared_world.checkpoint, shared_world.ref, local, LABEL,
              device="cpu")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    got, want = predictions_of(f"{run}/labels"), predictions_of(str(local))
    assert got.num_rows == shared_world.seg.n_superpixels
    assert got.equals(want)
    exported = CliRunner().invoke(
        cli, ["-q", "export", str(local), "--segments", str(shared_world.seg.out_dir.parent)]
    )
    assert exported.exit_code == 0, exported.output
    for name in ("labels.tif", "scores.tif"):
        with rasterio.open(storage.gdal_path(f"{run}/labels/{name}")) as a:
            with rasterio.open(local / name) as b:
                assert np.array_equal(a.read(), b.read(), equal_nan=True), name
