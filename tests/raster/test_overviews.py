from collections import Counter

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling

from superdml.raster.overviews import (
    downsample_mean,
    downsample_mode,
    halved_shape,
    overview_factors,
)


def blocks(src):
    """The 2x2 blocks of `src`, each as its values in raster order (cut blocks shorter)."""
    h, w = src.shape
    return [
        [[src[r, c] for r in range(i, min(i + 2, h)) for c in range(j, min(j + 2, w))]
         for j in range(0, w, 2)]
        for i in range(0, h, 2)
    ]  # fmt: skip


def reference_mode(src, nodata):
    """Most frequent non-nodata value of each block; ties: the first met; all nodata: nodata."""
    out = np.empty(halved_shape(src.shape), src.dtype)
    for i, row in enumerate(blocks(src)):
        for j, values in enumerate(row):
            counts = Counter(v for v in values if v != nodata)
            best = max(counts.values(), default=0)
            out[i, j] = next((v for v in values if v != nodata and counts[v] == best), nodata)
    return out


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (1, 5), (33, 2)])
def test_mode_equals_counting_each_block(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    for values in (3, 5):  # few values: many ties, pairs and all-nodata blocks
        src = rng.integers(0, values, shape).astype(dtype)
        np.testing.assert_array_equal(downsample_mode(src, 0), reference_mode(src, 0))
        nodata = values - 1  # a nodata that is not 0
        np.testing.assert_array_equal(downsample_mode(src, nodata), reference_mode(src, nodata))


def test_mode_ties_and_nodata_by_hand():
    src = np.array(
        [[1, 2, 0, 0, 3, 3, 0, 5],
         [2, 1, 0, 0, 4, 4, 5, 0]], np.uint8,
    )  # fmt: skip
    # 1 and 2 tie (first met: 1); all nodata; 3 and 4 tie (3); 5 twice beside two nodata
    np.testing.assert_array_equal(downsample_mode(src, 0), [[1, 0, 3, 5]])


def test_mode_agrees_with_gdal_where_each_block_has_a_majority(tmp_path):
    rng = np.random.default_rng(0)
    src = np.repeat(np.repeat(rng.integers(1, 6, (40, 30)), 2, 0), 2, 1).astype(np.uint8)
    flip = rng.random(src.shape) < 0.2  # one pixel in five changed: most blocks keep 3 of 4
    src[flip] = rng.integers(1, 6, int(flip.sum()))
    ours = downsample_mode(src, 0)
    gdal = gdal_overview(tmp_path / "modes.tif", src, Resampling.mode, nodata=0)
    counts = [[Counter(values).most_common(2) for values in row] for row in blocks(src)]
    unique = np.array([[len(c) == 1 or c[0][1] > c[1][1] for c in row] for row in counts])
    assert unique.mean() > 0.5
    np.testing.assert_array_equal(ours[unique], gdal[unique])


def test_mean_leaves_nan_out_and_matches_nanmean():
    rng = np.random.default_rng(1)
    src = rng.random((9, 7)).astype(np.float32)
    src[rng.random(src.shape) < 0.3] = np.nan
    src[:2, :2] = np.nan  # a block with nothing to average
    expected = np.array(
        [[np.nanmean(values) if not np.isnan(values).all() else np.nan for values in row]
         for row in blocks(src)],
        np.float32,
    )  # fmt: skip
    got = downsample_mean(src)
    assert got.dtype == np.float32 and np.isnan(got[0, 0])
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)


def test_mean_agrees_with_gdal_average(tmp_path):
    src = np.random.default_rng(2).random((64, 48)).astype(np.float32)
    gdal = gdal_overview(tmp_path / "scores.tif", src, Resampling.average, nodata=None)
    np.testing.assert_allclose(downsample_mean(src), gdal, rtol=1e-6)


def test_out_is_written_in_place_and_checked():
    src = np.arange(16, dtype=np.uint8).reshape(4, 4)
    level = np.zeros((4, 4), np.uint8)
    view = level[1:3, 1:3]
    assert downsample_mode(src, 0, view) is view
    # four different values in each block: the first that is not nodata
    np.testing.assert_array_equal(level[1:3, 1:3], [[1, 2], [8, 10]])
    with pytest.raises(ValueError, match="expected uint8"):
        downsample_mode(src, 0, np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="expected a"):
        downsample_mean(np.zeros(4, np.float32))


@pytest.mark.parametrize("shape", [(4096, 4096), (1100, 700), (513, 20), (512, 512), (100, 90)])
def test_factors_are_those_gdal_cog_makes(tmp_path, shape):
    src = tmp_path / "plain.tif"
    with rasterio.open(
        src, "w", driver="GTiff", height=shape[0], width=shape[1], count=1, dtype="uint8"
    ) as dst:
        dst.write(np.zeros(shape, np.uint8), 1)
    rasterio.shutil.copy(src, tmp_path / "cog.tif", driver="COG", BLOCKSIZE=512)
    with rasterio.open(tmp_path / "cog.tif") as cog:
        assert overview_factors(*shape, 512) == cog.overviews(1)


def gdal_overview(path, src, resampling, nodata):
    """GDAL's own first overview of `src` (``build_overviews``)."""
    profile = {"driver": "GTiff", "height": src.shape[0], "width": src.shape[1], "count": 1,
               "dtype": src.dtype.name, "nodata": nodata}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(src, 1)
        dst.build_overviews([2], resampling)
    with rasterio.open(path, overview_level=0) as ovr:
        return ovr.read(1)
