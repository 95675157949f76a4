"""The crop folder writer shared by ``crops`` and ``review``: PNGs, chips, table rows, schema."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import tifffile
from PIL import Image

from superdml.core.errors import InputError
from superdml.crops import folder as folder_module
from superdml.crops.folder import (
    CROPS_SCHEMA,
    CROPS_TABLE,
    chip_bytes,
    clear_crops,
    count_labels,
    crop_file,
    read_crops_meta,
    write_crops,
    write_crops_table,
)


def superpixels(ids):
    """Superpixel table rows as ``superpixels_in`` returns them (extra columns included)."""
    ids = np.asarray(ids, np.uint32)
    return pa.table(
        {
            "segment_id": pa.array(ids, pa.uint32()),
            "row": ids.astype(np.float64),
            "x": ids * 10.0,
            "y": ids * -10.0,
        }
    )


def random_crops(n, channels=3, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), np.uint8)


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_crop_file_names_the_class_folder_raster_id_and_score():
    assert crop_file("forest", "mosaic", np.uint32(17)) == "forest/mosaic_17.png"
    assert crop_file("water", "m-2", 3, score=np.float32(0.4251)) == "water/m-2_3_s0.43.png"


@pytest.mark.parametrize("channels, mode", [(3, "RGB"), (4, "RGBA")])
def test_write_crops_writes_each_crop_as_a_png_in_its_class_folder(tmp_path, channels, mode):
    crops = random_crops(3, channels)
    table = write_crops(tmp_path, "mosaic", superpixels([5, 2, 9]), crops, ["a", "b", "a"])
    assert files_under(tmp_path) == ["a/mosaic_5.png", "a/mosaic_9.png", "b/mosaic_2.png"]
    for crop, file in zip(crops, table.column("file").to_pylist(), strict=True):
        with Image.open(tmp_path / file) as image:
            assert image.mode == mode
            np.testing.assert_array_equal(np.asarray(image), crop.transpose(1, 2, 0))


def test_write_crops_returns_typed_rows_with_nulls_for_what_is_not_given(tmp_path):
    purity = np.array([0.9, np.nan], np.float32)
    table = write_crops(
        tmp_path, "mosaic", superpixels([4, 7]), random_crops(2), ["a", "b"], purity=purity
    )
    assert table.schema == CROPS_SCHEMA
    assert table.to_pylist() == [
        {
            "file": "a/mosaic_4.png", "segment_id": 4, "raster": "mosaic", "x": 40.0,
            "y": -40.0, "label": "a", "purity": pytest.approx(0.9), "score": None,
            "margin": None,
        },
        {
            "file": "b/mosaic_7.png", "segment_id": 7, "raster": "mosaic", "x": 70.0,
            "y": -70.0, "label": "b", "purity": None, "score": None, "margin": None,
        },
    ]  # fmt: skip


def test_write_crops_with_scores_names_files_by_score_and_records_the_vote(tmp_path):
    score = np.array([0.125, 0.5], np.float32)
    margin = np.array([0.0, 0.25], np.float32)
    table = write_crops(
        tmp_path, "m", superpixels([1, 2]), random_crops(2), ["a", "a"], score=score, margin=margin
    )
    assert table.column("file").to_pylist() == ["a/m_1_s0.12.png", "a/m_2_s0.50.png"]
    assert table.column("score").to_pylist() == [0.125, 0.5]
    assert table.column("margin").to_pylist() == [0.0, 0.25]
    assert table.column("purity").null_count == 2
    assert files_under(tmp_path) == ["a/m_1_s0.12.png", "a/m_2_s0.50.png"]


def test_write_crops_of_no_superpixel_writes_nothing_and_returns_an_empty_typed_table(tmp_path):
    table = write_crops(tmp_path, "m", superpixels([]), random_crops(0), [])
    assert table.num_rows == 0 and table.schema == CROPS_SCHEMA
    assert files_under(tmp_path) == []


def test_write_crops_leaves_the_users_files_in_the_folder_untouched(tmp_path):
    (tmp_path / "a").mkdir()
    mine = {"notes.txt": b"my notes", "a/mine.png": b"not a crop", "a/mosaic_5.png.bak": b"x"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    write_crops(tmp_path, "mosaic", superpixels([5, 6]), random_crops(2), ["a", "b"])
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data
    assert files_under(tmp_path) == sorted([*mine, "a/mosaic_5.png", "b/mosaic_6.png"])


def test_write_crops_refuses_labels_that_do_not_match_the_crops(tmp_path):
    with pytest.raises(ValueError):
        write_crops(tmp_path, "m", superpixels([1, 2]), random_crops(2), ["a"])
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "dtype, bands", [(np.uint16, 4), (np.int16, 12), (np.float32, 5), (np.uint8, 2), (">u2", 4)]
)
def test_a_chip_is_tifffiles_tiff_and_opens_in_gdal_with_every_band(tmp_path, dtype, bands):
    values = np.random.default_rng(1).uniform(-30000, 30000, (bands, 8, 8))
    crop = values.astype(dtype) if dtype != np.uint8 else (values % 256).astype(np.uint8)
    native = crop.astype(crop.dtype.newbyteorder("="))
    expected = io.BytesIO()
    tifffile.imwrite(expected, native, photometric="minisblack", planarconfig="separate")
    assert chip_bytes(crop) == expected.getvalue()
    preview = random_crops(1)
    write_crops(tmp_path, "m", superpixels([1]), crop[None], ["a"], previews=preview)
    assert files_under(tmp_path) == ["a/m_1.png", "a/m_1.tif"]
    with Image.open(tmp_path / "a" / "m_1.png") as image:
        np.testing.assert_array_equal(np.asarray(image), preview[0].transpose(1, 2, 0))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a" / "m_1.tif"), crop)  # lossless
    with rasterio.open(tmp_path / "a" / "m_1.tif") as src:  # one image of every band
        assert src.count == bands
        np.testing.assert_array_equal(src.read(), crop)


def failing_on(monkeypatch, name, call, error=ValueError):
    """Make ``superdml.crops.folder.<name>`` raise `error` on its `call`-th call."""
    real, calls = getattr(folder_module, name), []

    def fail(*args):
        calls.append(1)
        if len(calls) == call:
            raise error("failed on purpose")
        return real(*args)

    monkeypatch.setattr(folder_module, name, fail)


def test_a_crop_failing_mid_batch_leaves_none_of_the_batch_and_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.png").write_bytes(b"a person's file")
    failing_on(monkeypatch, "png_bytes", 3)  # two crops already handed to the writers
    with pytest.raises(ValueError, match="on purpose"):
        write_crops(tmp_path, "m", superpixels([1, 2, 3, 4]), random_crops(4), ["a"] * 4)
    assert files_under(tmp_path) == ["a/mine.png"]
    assert (tmp_path / "a" / "mine.png").read_bytes() == b"a person's file"


def test_a_failed_fsync_renames_nothing_and_leaves_no_temporary(tmp_path, monkeypatch):
    real, synced = os.fsync, []

    def fsync(fd):
        synced.append(fd)
        if len(synced) == 5:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output"):
        write_crops(
            tmp_path, "m", superpixels(range(1, 5)), random_crops(4, 4).astype(np.uint16),
            ["a", "b", "a", "b"], previews=random_crops(4),
        )  # fmt: skip
    assert files_under(tmp_path) == []


def test_a_five_band_png_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises((TypeError, ValueError, KeyError)):
        write_crops(tmp_path, "m", superpixels([1]), random_crops(1, 5), ["a"])
    assert files_under(tmp_path) == []


def test_crops_table_round_trips_with_its_schema_and_metadata(tmp_path):
    table = write_crops(tmp_path, "m", superpixels([3]), random_crops(1), ["a"])
    path = write_crops_table(tmp_path, table, {"crop_rule": {"crop_size": 8}})
    assert path == tmp_path / CROPS_TABLE
    stored = pq.read_table(path)
    assert stored.schema.remove_metadata() == CROPS_SCHEMA
    assert stored.equals(table.replace_schema_metadata(stored.schema.metadata))
    assert read_crops_meta(path) == {"crop_rule": {"crop_size": 8}}
    assert [p.name for p in tmp_path.iterdir() if "sdml-tmp" in p.name] == []


def test_crops_table_refuses_rows_of_another_schema(tmp_path):
    with pytest.raises(ValueError, match="not of CROPS_SCHEMA"):
        write_crops_table(tmp_path, pa.table({"file": ["a.png"]}), {})
    widened = CROPS_SCHEMA.empty_table().cast(
        CROPS_SCHEMA.set(1, pa.field("segment_id", pa.int64()))
    )
    with pytest.raises(ValueError, match="not of CROPS_SCHEMA"):
        write_crops_table(tmp_path, widened, {})
    assert not (tmp_path / CROPS_TABLE).exists()


def test_read_crops_meta_of_a_table_without_ours_is_empty(tmp_path):
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / CROPS_TABLE)
    assert read_crops_meta(tmp_path / CROPS_TABLE) == {}


def test_count_labels_counts_crops_per_class_folder(tmp_path):
    table = write_crops(tmp_path, "m", superpixels([1, 2, 3]), random_crops(3), ["a", "b", "a"])
    assert count_labels(table) == {"a": 2, "b": 1}


def written_folder(folder):
    table = write_crops(folder, "m", superpixels([1, 2]), random_crops(2), ["a", "b"])
    write_crops_table(folder, table, {})
    (folder / "classes.yaml").write_text("1: a\n")
    (folder / ".superdml-stage").write_text("{}")
    return table


def test_clear_crops_removes_what_the_table_lists_and_keeps_hidden_state(tmp_path):
    written_folder(tmp_path)
    clear_crops(tmp_path, "crops", "holds other crops", also=["classes.yaml"])
    assert files_under(tmp_path) == [".superdml-stage"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".superdml-stage"]


def test_clear_crops_refuses_a_folder_people_sorted_and_removes_nothing(tmp_path):
    written_folder(tmp_path)
    (tmp_path / "a" / "m_1.png").rename(tmp_path / "b" / "m_1.png")  # a person moved it
    before = files_under(tmp_path)
    with pytest.raises(InputError, match=r"b/m_1.png is not where superdml review put it"):
        clear_crops(tmp_path, "review", "holds an earlier review", also=["classes.yaml"])
    assert files_under(tmp_path) == before


def test_clear_crops_without_a_table_does_nothing(tmp_path):
    (tmp_path / "mine.png").write_bytes(b"x")
    clear_crops(tmp_path, "crops", "holds other crops")
    assert files_under(tmp_path) == ["mine.png"]
