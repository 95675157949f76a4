"""The torch SLIC backend: same labels as the numpy path, quality against scikit-image."""

import subprocess
import sys

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from processes import child_env
from rasters import write_raster
from scipy import ndimage
from skimage.segmentation import slic as skimage_slic

import superdml.segment.slic_numpy as numpy_slic
from superdml.cli.commands import cli
from superdml.cli.demo import demo_mosaic
from superdml.config.schema import SegmentConfig, load_config
from superdml.core.errors import ConfigError
from superdml.segment import backend as backend_module
from superdml.segment import slic_numba
from superdml.segment import slic_torch as slic
from superdml.segment.backend import resolve_backend
from superdml.segment.stage import segment_raster

STEP = 16


def window(n_bands, size=128, seed=0):
    """Features of a demo-mosaic window with `n_bands` bands and a nodata corner."""
    rgb, _ = demo_mosaic(256, seed=seed)
    rng = np.random.default_rng(seed)
    bands = [rgb[b % 3] * (0.5 + 0.5 * rng.random()) for b in range(n_bands)]
    features = (np.stack(bands)[:, :size, :size] / 255 / 0.2).astype(np.float32)
    valid = np.ones((size, size), dtype=bool)
    valid[:40, :24] = False  # a nodata corner: a whole cell and parts of others
    features[:, ~valid] = 0
    return features, valid


def ring_centers(features, valid):
    """Centers of the cells plus a ring, as the assignment phase gathers them."""
    centers, active = numpy_slic.slic_centers(features, valid, STEP, 3)
    return np.pad(centers, ((1, 1), (1, 1), (0, 0))), np.pad(active, 1)


@pytest.mark.parametrize("n_bands", [1, 3, 5])
@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_assignment_equals_numpy_for_the_same_centers(n_bands, kernel):
    features, valid = window(n_bands)
    centers, active = ring_centers(features, valid)
    expected = numpy_slic.assign_pixels(features, valid, centers, active, STEP)
    got = slic.assign_pixels(features, valid, centers, active, STEP, "cpu", kernel)
    assert got.dtype == np.int64 and got.shape == valid.shape
    np.testing.assert_array_equal(got, expected)
    assert (got[~valid] == -1).all() and (got[valid] >= 0).all()


@pytest.mark.parametrize("n_bands", [1, 3, 5])
@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_centers_match_numpy(n_bands, kernel):
    features, valid = window(n_bands)
    expected, expected_active = numpy_slic.slic_centers(features, valid, STEP, 10)
    got, active = slic.slic_centers(features, valid, STEP, 10, "cpu", kernel)
    np.testing.assert_array_equal(active, expected_active)
    assert not active[0, 0]  # the all-nodata cell seeds no center
    assert got.dtype == np.float32 and got.shape == expected.shape
    # summation order differs (float64 vs float32 sums): equal up to rounding, unless a
    # tie flips a pixel, which moves a center by a fraction of a pixel
    diff = np.abs(got - expected)[active]
    assert np.quantile(diff, 0.99) < 1e-3 and diff.max() < 1.0


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_sums_equal_reference_sums(threads):
    """One thread: the serial kernel, which tile threads run at once; two: numba's pool."""
    features, valid = window(3)
    centers, active = ring_centers(features, valid)
    tensors = [torch.from_numpy(a) for a in (features, valid, centers, active)]
    labels, sums = slic_numba.sweep(features, valid, centers, active, STEP, True, threads)
    ref_labels, ref_sums = slic.reference_sweep(*tensors, STEP, True)
    np.testing.assert_array_equal(labels, ref_labels.numpy())
    assert sums.shape == ref_sums.shape == (*active.shape, 6)
    np.testing.assert_allclose(sums, ref_sums.numpy(), rtol=1e-5, atol=1e-2)
    assert sums[..., 0].sum() == valid.sum()  # every valid pixel counted once


@pytest.mark.slow
def test_compiled_reference_equals_eager(monkeypatch):
    """The graphs ``torch.compile`` captures for CUDA (dynamic shapes): whole, and equal.

    Dynamo captures them as on CUDA, without a graph break, and runs the captured graphs
    eagerly: inductor's C++ code for the CPU is not CUDA's triton code and takes over a
    minute to build cold; ``benchmarks/gpu.sh`` compiles and runs the real thing on a GPU.
    """
    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", fullgraph=True, **kw)
    )
    slic._reference_kernels.cache_clear()
    features, valid = window(3, size=96)
    centers, active = ring_centers(features, valid)
    tensors = [torch.from_numpy(a) for a in (features, valid, centers, active)]
    try:
        labels, sums = slic.reference_sweep(*tensors, STEP, True, compiled=True)
    finally:
        slic._reference_kernels.cache_clear()
    eager_labels, eager_sums = slic.reference_sweep(*tensors, STEP, True)
    torch.testing.assert_close(labels, eager_labels, rtol=0, atol=0)
    torch.testing.assert_close(sums, eager_sums, rtol=1e-5, atol=1e-2)


# ------------------------------------------------------------- whole rasters, quality


@pytest.fixture(scope="module")
def demo_tif(tmp_path_factory):
    rgb, truth = demo_mosaic(384)
    path = write_raster(tmp_path_factory.mktemp("src") / "demo.tif", rgb)
    return path, rgb, truth


@pytest.fixture(scope="module")
def segments(demo_tif, tmp_path_factory):
    """Segments of the demo mosaic by each backend, 128 px tiles (9 tiles)."""
    out = {}
    for backend in ("numpy", "torch"):
        config = SegmentConfig(region_size=STEP, tile_size=128, backend=backend, device="cpu")
        result = segment_raster(demo_tif[0], tmp_path_factory.mktemp(backend), config)
        with rasterio.open(result.segments_path) as src:
            out[backend] = src.read(1)
    return out


@pytest.fixture(scope="module")
def skimage_segments(demo_tif):
    _, rgb, _ = demo_tif
    size = rgb.shape[1]
    return skimage_slic(
        rgb.transpose(1, 2, 0).astype(np.float32) / 255,
        n_segments=(size // STEP) ** 2,
        compactness=0.2,
        max_num_iter=10,
        convert2lab=False,
        enforce_connectivity=True,
        start_label=1,
        channel_axis=-1,
    )


def boundaries(labels):
    """(H, W) bool: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def boundary_recall(labels, truth, tolerance=2):
    """Fraction of true boundary pixels within `tolerance` px of a superpixel boundary."""
    near = ndimage.binary_dilation(
        boundaries(labels), iterations=tolerance, structure=np.ones((3, 3))
    )
    true_edge = boundaries(truth)
    return near[true_edge].mean()


def undersegmentation_error(labels, truth):
    """Neubert and Protzel's: sum over overlaps of min(inside, outside) / pixel count."""
    _, s = np.unique(labels, return_inverse=True)
    _, g = np.unique(truth, return_inverse=True)
    table = np.zeros((s.max() + 1, g.max() + 1), dtype=np.int64)
    np.add.at(table, (s.ravel(), g.ravel()), 1)
    size = table.sum(axis=1, keepdims=True)
    return np.minimum(table, size - table)[table > 0].sum() / labels.size


def test_backends_agree(segments):
    a, b = segments["numpy"], segments["torch"]
    assert (a == b).mean() >= 0.99
    ids_a, ids_b = set(np.unique(a).tolist()), set(np.unique(b).tolist())
    assert len(ids_a ^ ids_b) <= 0.01 * len(ids_a)  # the same global grid ids


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_quality_against_skimage(segments, skimage_segments, demo_tif, backend):
    truth = demo_tif[2]
    ours = segments[backend]
    assert boundary_recall(ours, truth) >= boundary_recall(skimage_segments, truth) - 0.02
    reference_error = undersegmentation_error(skimage_segments, truth)
    assert undersegmentation_error(ours, truth) <= 1.1 * reference_error
    # more superpixels would buy recall: allow skimage's merging of small ones (576 vs 461)
    assert 0.8 < len(np.unique(ours)) / len(np.unique(skimage_segments)) < 1.5


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_every_superpixel_is_one_connected_region(segments, backend):
    labels = segments[backend]
    ids = np.unique(labels)
    components = [ndimage.label(labels == i)[1] for i in ids]
    assert ids.min() >= 1 and components == [1] * len(ids)


def test_nodata_and_band_count_with_torch(tmp_path):
    rgb, _ = demo_mosaic(192)
    pixels = np.concatenate([rgb, rgb[:1] // 2]).astype(np.uint16)  # 4 bands, uint16
    pixels[:, 60:100, 30:90] = 9999
    path = write_raster(tmp_path / "nd.tif", pixels, nodata=9999)
    runs = {}
    for backend in ("numpy", "torch"):
        config = SegmentConfig(region_size=STEP, tile_size=64, backend=backend)
        result = segment_raster(path, tmp_path / backend, config)
        with rasterio.open(result.segments_path) as src:
            runs[backend] = src.read(1)
    nodata = (pixels == 9999).all(axis=0)
    assert (runs["torch"][nodata] == 0).all() and (runs["torch"][~nodata] > 0).all()
    assert (runs["torch"] == runs["numpy"]).mean() >= 0.99


# ----------------------------------------------------------------- settings and errors


def test_auto_resolves_to_torch_on_the_device_at_hand():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_backend("auto", "auto") == ("torch", device)
    assert resolve_backend("numpy", "auto") == ("numpy", "cpu")
    assert resolve_backend("torch", "cpu") == ("torch", "cpu")


def test_without_a_cuda_driver_auto_is_the_cpu_and_torch_is_never_asked(monkeypatch):
    monkeypatch.setattr(backend_module, "CUDA_DRIVER_PATHS", ("/nonexistent/nvidia",))
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh CLI process
    try:
        if sys.platform.startswith("linux"):
            assert not backend_module.cuda_driver_possible()
            assert resolve_backend("auto", "auto") == ("torch", "cpu")
            assert "torch" not in sys.modules
    finally:
        sys.modules["torch"] = torch


def test_a_cpu_segment_run_imports_no_torch(small_tif, tmp_path):
    """A fresh CLI process on the CPU: the torch backend runs numba kernels, without torch."""
    code = (
        "import sys; from superdml.cli.commands import cli; "
        "cli.main(['-q', 'segment', sys.argv[1], '--out', sys.argv[2], '--device', 'cpu', "
        "'--region-size', '16'], standalone_mode=False); "
        "print('torch' in sys.modules)"
    )
    env = child_env()
    done = subprocess.run(
        [sys.executable, "-c", code, str(small_tif), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "out" / "small" / "segments.tif").exists()


def test_bad_backend_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="backend: got 'cupy', expected one of auto, numpy"):
        SegmentConfig(backend="cupy")
    (tmp_path / "seg.yaml").write_text("device: gpu\n")
    with pytest.raises(ConfigError, match="seg.yaml.*device.*'gpu'"):
        load_config(tmp_path / "seg.yaml", SegmentConfig)


@pytest.fixture
def small_tif(tmp_path):
    rgb, _ = demo_mosaic(64)
    return write_raster(tmp_path / "small.tif", rgb)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "cupy"], "backend: got 'cupy', expected one of auto, numpy, torch"),
        (["--device", "tpu"], "device: got 'tpu', expected one of auto, cpu, cuda"),
        (["--backend", "numpy", "--device", "cuda"], "device: got 'cuda'"),
    ],
)
def test_cli_bad_backend_or_device_is_one_line_and_exit_code_2(small_tif, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["-q", "segment", str(small_tif), "--out", str(tmp_path / "o"), "--workers", "0"]
    result = CliRunner().invoke(cli, [*argv, *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_without_cuda_says_so(small_tif, tmp_path):
    argv = ["segment", str(small_tif), "--out", str(tmp_path / "o"), "--device", "cuda"]
    result = CliRunner().invoke(cli, [*argv, "--workers", "0"])
    assert result.exit_code == 2
    assert result.output.startswith("error: device: got 'cuda', but torch sees no CUDA device")


def test_cli_backend_option_reaches_the_run(small_tif, tmp_path):
    argv = ["-q", "segment", str(small_tif), "--out", str(tmp_path / "o"), "--workers", "0"]
    result = CliRunner().invoke(cli, [*argv, "--backend", "numpy", "--region-size", "16"])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "o" / "small" / "segment.yaml").read_text()
    assert "backend: numpy" in written


def test_read_ahead_gives_the_same_segments(demo_tif, segments, tmp_path, monkeypatch):
    """On a GPU tile tasks read the next tile on a reader thread; forced here on the CPU."""
    from superdml.segment import read_ahead
    from superdml.segment import tasks as segment_tasks

    hits = []
    claim = read_ahead.claim
    monkeypatch.setattr(read_ahead, "claim", lambda key: hits.append(claim(key)) or hits[-1])
    # the GPU shape: one task thread fed by the reader thread
    monkeypatch.setattr(segment_tasks, "reads_ahead_on", lambda device: True)
    config = SegmentConfig(region_size=STEP, tile_size=128, backend="torch", device="cpu")
    result = segment_raster(demo_tif[0], tmp_path, config)
    with rasterio.open(result.segments_path) as src:
        np.testing.assert_array_equal(src.read(1), segments["torch"])
    # 9 tiles per phase: all but the first of each come from the read-ahead
    assert len(hits) == 18 and sum(h is not None for h in hits) == 16
