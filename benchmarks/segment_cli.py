"""``superdml segment`` as a user runs it, whole command, against one scikit-image call.

    python benchmarks/segment_cli.py [--width 5400] [--height 2700] [--rounds 3] [--out DIR]
                                     [--json FILE] [-- extra segment options]

The raster is real imagery: scikit-image's bundled colour photos (astronaut, coffee,
chelsea, rocket, immunohistochemistry, retina, hubble_deep_field), each mirror-tiled
into one cell of a 6 x 3 grid of cells (900 px at the default 5400 x 2700, 14.6 MP), as
a tiled (512 px), deflate-compressed RGB GeoTIFF, the way rasters come from GIS tools.

Each round runs, each in a fresh process and one after the other:

- ``superdml segment RASTER --out OUT`` with the command's defaults (plus the extra
  options after ``--``), timed as the wall time of the whole CLI process: interpreter
  start, imports, the cluster (if the default starts one), reads, both SLIC phases,
  ``segments.tif`` and ``superpixels.parquet``;
- the baseline: one plain ``skimage.segmentation.slic`` call on the same image with the
  same parameters (``benchmarks/segment.py``'s :func:`child_skimage`: the same number of
  superpixels ``(H / 32) * (W / 32)``, compactness, iterations and connectivity, the
  bands as float32 in [0, 1], ``convert2lab=False``), timed as the call alone: reading
  the GeoTIFF, the imports and the interpreter are not counted for skimage.

The ratio of a round is skimage's seconds over superdml's seconds (higher is better;
target >= 2). The machine may be shared: the ratios of one round compare, and the
spread over rounds is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
)
CELLS = (3, 6)  # rows, columns of photo cells


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    m = index % (2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def photo_mosaic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Return a (3, H, W) uint8 mosaic of scikit-image's photos, one mirror-tiled per cell."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)()[..., :3] for name in PHOTOS]
    out = np.empty((3, height, width), dtype=np.uint8)
    rows = np.linspace(0, height, CELLS[0] + 1).astype(int)
    cols = np.linspace(0, width, CELLS[1] + 1).astype(int)
    k = 0
    for r0, r1 in zip(rows[:-1], rows[1:], strict=True):
        for c0, c1 in zip(cols[:-1], cols[1:], strict=True):
            photo = photos[k % len(photos)]
            k += 1
            h, w = photo.shape[:2]
            rr = _mirror(np.arange(r1 - r0) + rng.integers(0, h), h)
            cc = _mirror(np.arange(c1 - c0) + rng.integers(0, w), w)
            out[:, r0:r1, c0:c1] = photo[rr[:, None], cc[None, :]].transpose(2, 0, 1)
    return out


def write_raster(path: Path, height: int, width: int) -> None:
    """Write the photo mosaic as a tiled, deflate-compressed RGB GeoTIFF."""
    import rasterio
    from rasterio.transform import from_origin

    pixels = photo_mosaic(height, width)
    profile = {
        "driver": "GTiff", "height": height, "width": width, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32633", "transform": from_origin(500_000.0, 5_000_000.0, 0.5, 0.5),
        "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate",
        "predictor": 2, "photometric": "RGB",
    }  # fmt: skip
    tmp = path.with_name(path.name + ".part")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(pixels)
    tmp.rename(path)


def time_cli(raster: Path, out: Path, extra: list[str]) -> float:
    """Wall seconds of ``superdml segment RASTER --out OUT EXTRA`` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    code = "import sys; from superdml.cli.commands import main; sys.argv[0] = 'superdml'; main()"
    cmd = [sys.executable, "-c", code, "--quiet", "segment", str(raster), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run([*cmd, *extra], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def time_skimage(raster: Path) -> float:
    """Seconds of one ``slic`` call on `raster` (``segment.py``'s case, a fresh process)."""
    from harness import run_case

    result = run_case(HERE / "run.py", "segment_case", {"mosaic": str(raster), "case": "skimage"})
    return float(result["seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=5400)
    parser.add_argument("--height", type=int, default=2700)
    parser.add_argument("--rounds", type=int, default=3, help="superdml + skimage pairs")
    parser.add_argument("--out", type=Path, help="keep the raster here (reused when present)")
    parser.add_argument("--json", type=Path, help="also write the rounds to this JSON file")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])
    )  # the CLI and the cases import this checkout
    root = args.out or Path(tempfile.mkdtemp(prefix="superdml-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    raster = root / f"photos_{args.width}x{args.height}.tif"
    if not raster.exists():
        write_raster(raster, args.height, args.width)
    mp = args.width * args.height / 1e6
    print(
        f"# {platform.platform()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        f"{raster.name}: {mp:.1f} MP; superdml segment {' '.join(extra) or '(defaults)'}",
        flush=True,
    )
    rounds = []
    try:
        for k in range(args.rounds):
            ours = time_cli(raster, root / "out", extra)
            base = time_skimage(raster)
            rounds.append({"superdml_s": ours, "skimage_s": base, "ratio": base / ours})
            print(
                f"round {k + 1}: superdml segment {ours:6.2f} s ({mp / ours:.2f} MP/s), "
                f"skimage slic {base:6.2f} s, ratio {base / ours:.2f}",
                flush=True,
            )
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    ratios = [r["ratio"] for r in rounds]
    print(
        f"ratio median {np.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f} "
        f"over {len(ratios)} rounds; load at the end {os.getloadavg()[0]:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
