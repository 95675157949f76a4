"""superdml.core.storage on local folders and on an S3 emulator (moto), the same calls."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.transform import from_origin

from superdml.core import storage
from superdml.core.errors import InputError, MissingInputError


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh folder: local, or a prefix of the emulator's bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket")


def test_locations_are_paths_or_uris():
    assert storage.is_uri("s3://b/k") and storage.is_uri("HTTPS://host/x.tif")
    assert not storage.is_uri("/data/x.tif") and not storage.is_uri(Path("s3:/b"))
    assert not storage.is_uri("file.s3://x")
    assert storage.location("s3://b/k/") == "s3://b/k"
    assert storage.location("data/x.tif") == Path("data/x.tif")
    assert storage.join("s3://b/run", "segments", "a.tif") == "s3://b/run/segments/a.tif"
    assert storage.join("run", "a.tif") == Path("run/a.tif")
    assert storage.name("s3://b/run/mosaic.tif") == "mosaic.tif"
    assert storage.stem("gs://b/run/mosaic.tif") == "mosaic"
    assert storage.parent("az://c/run/mosaic.tif") == "az://c/run"
    assert storage.resolve("s3://b/k/") == "s3://b/k"
    assert storage.resolve("x") == str(Path("x").resolve())


def test_write_read_list_delete(root: str):
    assert not storage.exists(root) and storage.listdir(root) == []
    assert storage.list_files(root) == []
    storage.write_text(storage.join(root, "a.json"), '{"a": 1}')
    storage.write_bytes(storage.join(root, "sub", "deep", "b.bin"), b"\x00\x01")
    assert storage.exists(root) and storage.isdir(root) and not storage.isfile(root)
    assert storage.isfile(storage.join(root, "a.json"))
    assert storage.isdir(storage.join(root, "sub"))
    assert storage.read_text(storage.join(root, "a.json")) == '{"a": 1}'
    assert storage.read_bytes(storage.join(root, "sub", "deep", "b.bin"), 1, 2) == b"\x01"
    assert storage.listdir(root) == ["a.json", "sub"]
    assert storage.list_files(root) == ["a.json", "sub/deep/b.bin"]
    assert storage.info(storage.join(root, "a.json"))["size"] == 8
    storage.delete(storage.join(root, "a.json"))
    storage.delete(storage.join(root, "a.json"))  # gone already: no error
    assert storage.list_files(root) == ["sub/deep/b.bin"]
    storage.delete_tree(root)
    assert not storage.exists(root)


def test_create_only_refuses_a_second_writer(root: str):
    target = storage.join(root, "part.parquet")
    storage.write_bytes(target, b"first", create_only=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes(target, b"second", create_only=True)
    with pytest.raises(FileExistsError), storage.write_once(target, create_only=True) as tmp:
        tmp.write_bytes(b"third")
    assert storage.read_bytes(target) == b"first"
    storage.write_bytes(target, b"replaced")  # not create-only: one whole replacement
    assert storage.read_bytes(target) == b"replaced"
    assert storage.list_files(root) == ["part.parquet"]  # no temporary left beside it


def test_write_once_leaves_nothing_when_the_body_fails(root: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SUPERDML_SCRATCH", str(tmp_path / "scratch"))
    with pytest.raises(RuntimeError), storage.write_once(storage.join(root, "x.bin")) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert storage.list_files(root) == []
    assert list((tmp_path / "scratch").glob("*")) == []


def test_missing_objects_are_one_line_errors(root: str):
    with pytest.raises(MissingInputError, match="no such"):
        storage.read_bytes(storage.join(root, "nothing.json"))
    with pytest.raises(MissingInputError, match="nothing.json"):
        storage.info(storage.join(root, "nothing.json"))
    with pytest.raises(MissingInputError, match="nothing"):
        storage.local_copy(storage.join(root, "nothing"))


def test_http_is_read_only():
    with pytest.raises(InputError, match="read-only"):
        storage.write_bytes("https://example.invalid/x.bin", b"x")


def test_rasters_and_tables_read_from_their_location(root: str, tmp_path: Path):
    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(1, 64, 48)
    profile = {"driver": "GTiff", "width": 48, "height": 64, "count": 1, "dtype": "uint16",
               "crs": "EPSG:32633", "transform": from_origin(500000, 0, 1, 1)}  # fmt: skip
    with storage.write_once(storage.join(root, "r.tif")) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(pixels)
    with rasterio.open(storage.gdal_path(storage.join(root, "r.tif"))) as src:
        assert np.array_equal(src.read(), pixels) and src.crs.to_epsg() == 32633
    table = pa.table({"segment_id": pa.array([3, 1, 2], pa.uint32())})
    with storage.write_once(storage.join(root, "t.parquet")) as tmp:
        pq.write_table(table, tmp)
    path, fs = storage.arrow_source(storage.join(root, "t.parquet"))
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_local_copy_fetches_once_and_again_when_changed(root: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SUPERDML_CACHE", str(tmp_path / "cache"))
    storage.write_bytes(storage.join(root, "ref", "index.faiss"), b"index")
    storage.write_bytes(storage.join(root, "ref", "sub", "labels.npy"), b"labels")
    storage.write_bytes(storage.join(root, "best.pt"), b"weights")
    folder = storage.local_copy(storage.join(root, "ref"))
    file = storage.local_copy(storage.join(root, "best.pt"))
    if not storage.is_uri(root):  # a local path is its own copy
        assert folder == Path(root) / "ref" and file == Path(root) / "best.pt"
        return
    assert (folder / "sub" / "labels.npy").read_bytes() == b"labels"
    assert file.name == "best.pt" and file.read_bytes() == b"weights"
    assert storage.local_copy(storage.join(root, "best.pt")) == file  # cached
    storage.write_bytes(storage.join(root, "best.pt"), b"retrained")
    again = storage.local_copy(storage.join(root, "best.pt"))
    assert again != file and again.read_bytes() == b"retrained"
    assert hashlib.sha256(file.read_bytes()).hexdigest() != hashlib.sha256(b"retrained").hexdigest()


def test_s3fs_follows_the_endpoint_set_for_gdal(s3_endpoint: dict[str, str]):
    fs, path = storage.filesystem("s3://superdml-test/x")
    assert path == "superdml-test/x"
    assert fs.client_kwargs.get("endpoint_url") or fs.endpoint_url
    assert (fs.endpoint_url or "").endswith(s3_endpoint["AWS_S3_ENDPOINT"])
