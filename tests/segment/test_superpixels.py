"""The per-window SLIC functions and their compiled kernels (superdml.segment.slic_numpy)."""

import numpy as np
import pytest
from skimage.measure import label as skimage_label

from superdml.segment.regions_numba import label_components
from superdml.segment.slic_numpy import (
    assign_pixels,
    enforce_connectivity,
    slic_centers,
    superpixel_stats,
)


def test_slic_centers_follow_a_two_region_image():
    image = np.zeros((1, 32, 64), np.float32)
    image[:, :, 32:] = 10.0
    valid = np.ones((32, 64), bool)
    centers, active = slic_centers(image, valid, step=16, max_iter=5)
    assert active.all()
    left = centers[:, :2, 2]
    right = centers[:, 2:, 2]
    np.testing.assert_allclose(left, 0.0)
    np.testing.assert_allclose(right, 10.0)


def test_assign_pixels_picks_nearest_center():
    features = np.zeros((1, 4, 8), np.float32)
    features[:, :, 4:] = 5.0
    centers = np.zeros((3, 4, 3), np.float32)  # 1 x 2 cells plus a one-cell ring
    active = np.zeros((3, 4), bool)
    centers[1, 1] = (1.5, 1.5, 0.0)
    centers[1, 2] = (1.5, 5.5, 5.0)
    active[1, 1] = active[1, 2] = True
    index = assign_pixels(features, np.ones((4, 8), bool), centers, active, step=4)
    assert (index[:, :4] == 1 * 4 + 1).all() and (index[:, 4:] == 1 * 4 + 2).all()


def test_enforce_connectivity_merges_fragment_into_longest_border():
    labels = np.array(
        [
            [1, 1, 1, 2, 2],
            [1, 1, 1, 2, 2],
            [3, 3, 3, 3, 1],
            [3, 3, 3, 3, 3],
        ]
    )
    fixed = enforce_connectivity(labels)
    assert fixed[2, 4] == 3  # the lone 1 borders 3 twice and 2 once
    assert (fixed[:2, :3] == 1).all()


@pytest.mark.parametrize("seed", range(4))
def test_components_are_numbered_as_skimage_numbers_them(seed):
    labels = np.random.default_rng(seed).integers(0, 4, (37, 53))
    comp, comp_label, size = label_components(labels)
    expected = skimage_label(labels, background=0, connectivity=1)
    np.testing.assert_array_equal(comp, expected)
    assert comp.dtype == np.int32
    np.testing.assert_array_equal(size, np.bincount(expected.ravel()) * (np.arange(size.size) > 0))
    for k in (1, size.size // 2, size.size - 1):
        assert (labels[expected == k] == comp_label[k]).all()


@pytest.mark.parametrize("dtype", [np.uint32, np.int64])
def test_enforce_connectivity_keeps_the_largest_part_of_each_id(dtype):
    labels = np.array(
        [
            [5, 5, 0, 7, 7],
            [5, 0, 7, 7, 5],  # the right 5 is cut off from its larger part by 7
            [0, 7, 7, 7, 7],
        ],
        dtype=dtype,
    )
    fixed = enforce_connectivity(labels)
    assert fixed.dtype == dtype
    assert fixed[1, 4] == 7
    assert (fixed[:2, :2][labels[:2, :2] == 5] == 5).all() and (fixed[labels == 0] == 0).all()
    components = skimage_label(fixed, background=0, connectivity=1)
    assert components.max() == len(np.unique(fixed[fixed > 0]))


def test_enforce_connectivity_keeps_an_isolated_fragment():
    labels = np.array([[3, 3, 0, 3], [3, 3, 0, 0]])  # the lone 3 touches only nodata
    np.testing.assert_array_equal(enforce_connectivity(labels), labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_superpixel_stats_by_hand(dtype):
    labels = np.array([[10, 10, 11], [0, 11, 11]], dtype=np.uint32)
    pixels = np.array([[[1, 3, 5], [99, 7, 9]], [[2, 2, 2], [99, 4, 6]]], dtype=dtype)
    stats = superpixel_stats(labels, pixels, row0=100, col0=200)
    np.testing.assert_array_equal(stats["segment_id"], [10, 11])
    np.testing.assert_array_equal(stats["area_px"], [2, 3])
    np.testing.assert_allclose(stats["row"], [100.0, 100 + 2 / 3])
    np.testing.assert_allclose(stats["col"], [200.5, 200 + 5 / 3])
    np.testing.assert_array_equal(stats["row_start"], [100, 100])
    np.testing.assert_array_equal(stats["row_stop"], [101, 102])
    np.testing.assert_array_equal(stats["col_start"], [200, 201])
    np.testing.assert_array_equal(stats["col_stop"], [202, 203])
    np.testing.assert_allclose(stats["mean"], [[2.0, 2.0], [7.0, 4.0]])
    assert stats["mean"].dtype == np.float64


def test_superpixel_stats_of_an_all_nodata_window():
    stats = superpixel_stats(np.zeros((4, 4), np.uint32), np.ones((2, 4, 4), np.uint8), 0, 0)
    assert stats["segment_id"].size == 0 and stats["mean"].shape == (0, 2)
