"""Throughput and peak memory of ``superdml.segment.stage.segment_raster`` on large rasters.

What it measures
----------------
For each size in ``--sizes`` (default 4000 and 16000 pixels a side) the script writes a
synthetic RGB raster (irregular regions of scikit-image textures and photos, a tiled and
deflate-compressed GeoTIFF written window by window, so the raster is never whole in
memory), then segments it with :func:`superdml.segment.stage.segment_raster` using the default
:class:`~superdml.config.schema.SegmentConfig` (region size 32, compactness 0.2, 10 iterations,
2048 px tiles), in process (``client=None``) and/or on a dask ``LocalCluster``
(``--workers``), once per SLIC backend (``--backends``: numpy, and torch on ``--device``).
The reference is one plain ``skimage.segmentation.slic`` call on the
whole ``--baseline-size`` image, measured in the same run (at the start and at the end,
the ratio uses the mean of both), because the machine is shared and only ratios between
figures of one run mean anything.

The skimage call solves the same problem as superdml: the uint8 bands scaled to [0, 1]
as float32 (superdml scales uint8 bands by 0..255 and computes in float32),
``convert2lab=False`` (superdml clusters the raw bands; Lab would change the colour
distance, not the speed much), the same ``compactness`` (both minimise
``sum((band difference / m)**2) + (pixel distance / S)**2``), ``n_segments =
(size / region_size)**2`` (grid step S = region_size), the same ``max_num_iter`` and
``enforce_connectivity=True``. Its time is the call alone; superdml's is the whole
stage: reading the GeoTIFF, both SLIC phases, connectivity, writing ``segments.tif``
and ``superpixels.parquet``.

``CPU s`` is the CPU time (all threads of the process, ``time.process_time``) of
the timed call, for in-process cases: on a shared machine it moves far less than the
wall time, and on an idle one the wall time of N busy cores is at least CPU s / N.

Every case runs in a fresh subprocess. ``max RSS`` is the kernel's peak resident set of
the largest process of the case (``os.wait4`` rusage; the case's own process when
in-process); ``tree RSS`` is the peak of the summed RSS of the case's process and all
its descendants (dask workers included), sampled every 50 ms with psutil.

Run ``python benchmarks/segment.py --help`` for the options; results are in
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MiB = 2**20
REGION_CELL = 320  # mean side, in pixels, of a synthetic texture region
WRITE_BLOCK = 1024  # side of the windows the synthetic raster is written by
SAMPLE_SECONDS = 0.05


# ------------------------------------------------------------------ synthetic rasters


def load_textures() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-image textures and photos as one padded RGB stack and their sizes.

    Grey textures (brick, grass, gravel, moon) are tinted so that regions differ in
    colour as well as in texture.

    Returns
    -------
    stack : (N, H, W, 3) uint8 ndarray
    sizes : (N, 2) int64 ndarray
        Height and width of each texture inside the stack.
    """
    from skimage import data

    grey = {
        "brick": (1.0, 0.55, 0.4),
        "grass": (0.45, 0.9, 0.35),
        "gravel": (0.8, 0.8, 0.9),
        "moon": (0.95, 0.85, 0.55),
    }
    images = []
    for name, tint in grey.items():
        img = getattr(data, name)().astype(np.float32)[..., None] * np.asarray(tint, np.float32)
        images.append(img.astype(np.uint8))
    for name in ("coffee", "astronaut", "chelsea", "rocket", "immunohistochemistry"):
        images.append(getattr(data, name)()[..., :3])
    sizes = np.array([img.shape[:2] for img in images], dtype=np.int64)
    stack = np.zeros((len(images), *sizes.max(axis=0), 3), dtype=np.uint8)
    for k, img in enumerate(images):
        stack[k, : img.shape[0], : img.shape[1]] = img
    return stack, sizes


@dataclass(frozen=True)
class Layout:
    """Irregular texture regions: a domain-warped Voronoi diagram of a jittered grid.

    Every array is small (one entry per region cell, ``size / REGION_CELL`` a side), so
    any window of the raster can be rendered on its own.
    """

    seed_row: np.ndarray  # (ny, nx) seed position inside its cell, in cells
    seed_col: np.ndarray
    texture: np.ndarray  # (ny, nx) texture index of the region
    offset_row: np.ndarray  # (ny, nx) texture offset of the region, in pixels
    offset_col: np.ndarray
    warp: np.ndarray  # (4, 3) amplitude, wavelength, phase of 4 sine warps
    pad: int  # cells added on each side (warped coordinates may fall outside)


def make_layout(size: int, n_textures: int, seed: int = 0) -> Layout:
    """Random regions for a `size` x `size` raster (deterministic for `seed`)."""
    rng = np.random.default_rng(seed)
    pad = 2
    n = math.ceil(size / REGION_CELL) + 2 * pad
    warp = np.column_stack(
        [
            rng.uniform(30, 70, 4),  # amplitude (px)
            rng.uniform(250, 900, 4),  # wavelength (px)
            rng.uniform(0, 2 * np.pi, 4),  # phase
        ]
    )
    return Layout(
        seed_row=rng.uniform(0.1, 0.9, (n, n)),
        seed_col=rng.uniform(0.1, 0.9, (n, n)),
        texture=rng.integers(0, n_textures, (n, n)),
        offset_row=rng.integers(0, 4096, (n, n)),
        offset_col=rng.integers(0, 4096, (n, n)),
        warp=warp,
        pad=pad,
    )


def _reflect(index: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Mirror-tile `index` into ``[0, n)`` (no seams where a texture repeats)."""
    m = index % (2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def render_window(
    layout: Layout,
    textures: np.ndarray,
    sizes: np.ndarray,
    row: int,
    col: int,
    height: int,
    width: int,
) -> np.ndarray:
    """Render pixels ``[row, row + height) x [col, col + width)`` as (3, H, W) uint8."""
    r = np.arange(row, row + height, dtype=np.float64)[:, None]
    c = np.arange(col, col + width, dtype=np.float64)[None, :]
    (a0, l0, p0), (a1, l1, p1), (a2, l2, p2), (a3, l3, p3) = layout.warp
    u = r + a0 * np.sin(2 * np.pi * c / l0 + p0) + a1 * np.sin(2 * np.pi * (r + c) / l1 + p1)
    v = c + a2 * np.sin(2 * np.pi * r / l2 + p2) + a3 * np.sin(2 * np.pi * (r - c) / l3 + p3)
    u = u / REGION_CELL + layout.pad
    v = v / REGION_CELL + layout.pad
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    n = layout.texture.shape[0]
    best = np.full(u.shape, np.inf)
    cell_r = np.zeros(u.shape, dtype=np.int64)
    cell_c = np.zeros(u.shape, dtype=np.int64)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            cr, cc = np.clip(iu + dr, 0, n - 1), np.clip(iv + dc, 0, n - 1)
            d = (u - cr - layout.seed_row[cr, cc]) ** 2 + (v - cc - layout.seed_col[cr, cc]) ** 2
            closer = d < best
            best = np.where(closer, d, best)
            cell_r = np.where(closer, cr, cell_r)
            cell_c = np.where(closer, cc, cell_c)
    tex = layout.texture[cell_r, cell_c]
    h, w = sizes[tex, 0], sizes[tex, 1]
    tr = _reflect(np.arange(row, row + height)[:, None] + layout.offset_row[cell_r, cell_c], h)
    tc = _reflect(np.arange(col, col + width)[None, :] + layout.offset_col[cell_r, cell_c], w)
    return np.ascontiguousarray(textures[tex, tr, tc].transpose(2, 0, 1))


def write_texture_raster(path: Path, size: int, seed: int = 0) -> None:
    """Write a `size` x `size` RGB texture mosaic, tiled and compressed, window by window."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    textures, sizes = load_textures()
    layout = make_layout(size, len(textures), seed)
    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500_000.0, 5_000_000.0, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "predictor": 2,
        "photometric": "RGB",
        "BIGTIFF": "IF_SAFER",
    }
    tmp = path.with_name(path.name + ".part")
    # A small block cache (rasterio passes an int GDAL_CACHEMAX in bytes): finished
    # blocks are compressed and flushed as they are evicted, so the writer's memory is
    # one window whatever the raster size.
    with rasterio.Env(GDAL_CACHEMAX=64 * MiB), rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, WRITE_BLOCK):
            for col in range(0, size, WRITE_BLOCK):
                h, w = min(WRITE_BLOCK, size - row), min(WRITE_BLOCK, size - col)
                pixels = render_window(layout, textures, sizes, row, col, h, w)
                dst.write(pixels, window=Window(col, row, w, h))
    tmp.rename(path)


# ---------------------------------------------------------------- cases (subprocess)


def child_superdml(
    raster: str, out: str, workers: int | None, backend: str, device: str
) -> dict[str, object]:
    """Segment `raster` into `out` in process (`workers` 0) or on a local dask cluster.

    `workers` None: the stage's default (:func:`superdml.core.cluster.make_client`, which
    starts a cluster only where it pays), timed from the client's creation.
    """
    from superdml.config.schema import SegmentConfig
    from superdml.core.cluster import make_client
    from superdml.segment.stage import segment_raster

    config = SegmentConfig(backend=backend, device=device if backend == "torch" else "auto")
    cpu = None
    if workers is None:
        start = time.perf_counter()
        with make_client() as client:
            result = segment_raster(raster, out, config, client=client)
        seconds = time.perf_counter() - start
    elif workers == 0:
        start, start_cpu = time.perf_counter(), time.process_time()
        result = segment_raster(raster, out, config, client=None)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    else:
        with make_client(workers=workers) as client:
            client.wait_for_workers(workers)
            start = time.perf_counter()
            result = segment_raster(raster, out, config, client=client)
            seconds = time.perf_counter() - start
    if result.skipped:
        raise RuntimeError(f"{out}: segment_raster skipped an up-to-date run")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "n_superpixels": result.n_superpixels,
        "n_tiles": result.n_tiles,
    }


def child_skimage(raster: str) -> dict[str, object]:
    """One plain ``skimage.segmentation.slic`` call on the whole raster, same parameters."""
    import rasterio
    from skimage.segmentation import slic
    from skimage.util import img_as_float32

    from superdml.config.schema import SegmentConfig

    config = SegmentConfig()
    with rasterio.open(raster) as src:
        image = src.read().transpose(1, 2, 0)
    n_segments = round(image.shape[0] / config.region_size) * round(
        image.shape[1] / config.region_size
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    labels = slic(
        img_as_float32(image),
        n_segments=n_segments,
        compactness=config.compactness,
        max_num_iter=config.max_iter,
        convert2lab=False,
        enforce_connectivity=True,
        start_label=1,
        channel_axis=-1,
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "n_superpixels": int(labels.max()),
        "n_tiles": 1,
    }


def run_case(args: list[str], result_path: Path) -> dict[str, object]:
    """Run ``this_script --child ...`` and measure its peak memory.

    Returns the child's JSON result plus ``max_rss_mib`` (kernel peak of the largest
    process, from ``os.wait4``) and ``tree_rss_mib`` (sampled peak of the summed RSS of
    the child and its descendants).
    """
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(result_path), *args]
    proc = subprocess.Popen(cmd)
    parent = psutil.Process(proc.pid)
    tree_peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        total = 0
        try:
            members = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            members = []
        for p in members:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        tree_peak = max(tree_peak, total)
        time.sleep(SAMPLE_SECONDS)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"case {args} failed with exit code {proc.returncode}")
    result = json.loads(result_path.read_text())
    result["max_rss_mib"] = usage.ru_maxrss * 1024 / MiB  # ru_maxrss is in KiB on Linux
    result["tree_rss_mib"] = max(tree_peak, usage.ru_maxrss * 1024) / MiB
    return result


# ------------------------------------------------------------------------- driver


def format_table(rows: list[dict[str, object]], baseline_mps: float) -> str:
    """One text table: case, megapixels, seconds, CPU seconds, MP/s, ratio, peak RSS."""
    header = (
        f"{'case':<44} {'MP':>7} {'seconds':>9} {'CPU s':>7} {'MP/s':>7} {'vs skimage':>10} "
        f"{'max RSS MiB':>11} {'tree RSS MiB':>12}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        mps = row["mp"] / row["seconds"]
        cpu = "-" if row.get("cpu_seconds") is None else f"{row['cpu_seconds']:.1f}"
        lines.append(
            f"{row['case']:<44} {row['mp']:>7.1f} {row['seconds']:>9.1f} {cpu:>7} {mps:>7.3f} "
            f"{mps / baseline_mps:>10.2f} {row['max_rss_mib']:>11.0f} {row['tree_rss_mib']:>12.0f}"
        )
    return "\n".join(lines)


def mode_name(workers: int, backend: str, device: str) -> str:
    where = "in-process" if workers == 0 else f"dask {workers} worker{'s' * (workers > 1)}"
    return f"{where}, {backend}" + (f" {device}" if backend != "numpy" else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[4000, 16000], help="raster sides in pixels"
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0],
        help="0: in process (client=None); N: a dask LocalCluster of N worker processes\n"
        "(one thread each); several values run each mode (default: 0)",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["numpy", "torch"],
        choices=["numpy", "torch"],
        help="SLIC backends, one row each (default: numpy torch)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="device of the torch backend (default: auto, CUDA when present)",
    )
    parser.add_argument(
        "--baseline-size", type=int, default=4000, help="side of the skimage reference image"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for rasters and outputs, kept (rasters reused when present);\n"
        "default: a temporary folder, removed at the end",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)

    if args.child is not None:  # one measured case, in its own process
        warnings.simplefilter("ignore")
        kind, raster, *extra = rest
        if kind == "skimage":
            result = child_skimage(raster)
        else:
            result = child_superdml(raster, extra[0], int(extra[1]), extra[2], extra[3])
        args.child.write_text(json.dumps(result))
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    root = args.out or Path(tempfile.mkdtemp(prefix="superdml-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  "
        f"{os.cpu_count()} cores  python {platform.python_version()}  "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    try:
        rasters = {}
        for size in sorted({*args.sizes, args.baseline_size}):
            path = root / f"texture_{size}.tif"
            if not path.exists():
                start = time.perf_counter()
                write_texture_raster(path, size)
                print(
                    f"wrote {path.name}: {path.stat().st_size / MiB:.0f} MiB "
                    f"in {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
            rasters[size] = path

        def baseline() -> dict[str, object]:
            size = args.baseline_size
            row = run_case(["skimage", str(rasters[size])], root / "result.json")
            return {**row, "case": f"skimage slic {size}^2", "mp": size * size / 1e6}

        rows = [baseline()]
        print(f"done: {rows[-1]['case']} {rows[-1]['seconds']:.1f} s", flush=True)
        modes = [(w, b) for w in args.workers for b in args.backends]
        for workers, backend in modes:
            for size in args.sizes:
                out = root / f"run_{size}_{workers}_{backend}"
                shutil.rmtree(out, ignore_errors=True)
                row = run_case(
                    ["superdml", str(rasters[size]), str(out), str(workers), backend, args.device],
                    root / "result.json",
                )
                shutil.rmtree(out, ignore_errors=True)
                name = mode_name(workers, backend, args.device)
                rows.append({**row, "case": f"superdml {size}^2 ({name})", "mp": size**2 / 1e6})
                print(f"done: {rows[-1]['case']} {rows[-1]['seconds']:.1f} s", flush=True)
        rows.append(baseline())
        print(f"done: {rows[-1]['case']} {rows[-1]['seconds']:.1f} s", flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)

    refs = [r for r in rows if str(r["case"]).startswith("skimage")]
    baseline_mps = float(np.mean([r["mp"] / r["seconds"] for r in refs]))
    print()
    print(format_table(rows, baseline_mps))
    print(f"\nvs skimage: MP/s over the mean skimage MP/s of both runs ({baseline_mps:.3f} MP/s)")
    sizes = sorted(args.sizes)
    for workers, backend in modes:
        if len(sizes) < 2:
            break
        name = mode_name(workers, backend, args.device)
        by_size = {r["mp"]: r for r in rows if str(r["case"]).endswith(f"({name})")}
        small, large = by_size[sizes[0] ** 2 / 1e6], by_size[sizes[-1] ** 2 / 1e6]
        print(
            f"peak RSS {sizes[-1]}^2 / {sizes[0]}^2, {name}: "
            f"max {large['max_rss_mib'] / small['max_rss_mib']:.2f}x, "
            f"tree {large['tree_rss_mib'] / small['tree_rss_mib']:.2f}x"
        )
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
