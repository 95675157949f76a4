"""The review page's speed in the system's Chromium (Playwright), on synthetic folders.

    python benchmarks/serve.py [--crops 100 100000] [--raster-size 8192] [--repeat 20]

Per folder size: server start (open the folder and its journal), time to first grid
(navigation start to the grid drawn, measured in the page), keypress to next crop
(the page's own timer: request, journaled move, next page drawn; median of --repeat).
Then one 256 px map tile of an 8-bit RGB GeoTIFF: at full resolution, and the whole
raster in one tile from its overviews (and, for contrast, without overviews), each
as the function alone and as an HTTP request through the server (medians).
Targets (issue 18): first grid < 1 s at 100 000 crops, keypress < 50 ms, tile < 150 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import rasterio
from PIL import Image

from superdml.crops.folder import write_crops_table
from superdml.raster.io import raster_info
from superdml.segment.run import SegmentRun
from superdml.serve.server import ServeOptions, bind, open_session
from superdml.serve.tiles import image_tile, max_zoom

CLASSES = ["forest", "water", "field", "urban"]


def crop_folder(root: Path, n: int) -> tuple[Path, Path]:
    """A review-like folder of `n` 32 px PNG crops (one image, many names) and class folders."""
    folder, train = root / f"review{n}", root / f"train{n}"
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    labels = [CLASSES[i % 4] for i in range(n)]
    files = [f"{c}/m_{i + 1}.png" for i, c in enumerate(labels)]
    for c in CLASSES:
        (folder / c).mkdir(parents=True)
        (train / c).mkdir(parents=True)
    for f in files:
        (folder / f).write_bytes(png)
    score = rng.random(n).astype(np.float32)
    table = pa.table(
        {
            "file": files,
            "segment_id": pa.array(np.arange(1, n + 1), pa.uint32()),
            "raster": ["m"] * n,
            "x": np.zeros(n),
            "y": np.zeros(n),
            "label": labels,
            "purity": pa.nulls(n, pa.float32()),
            "score": score,
            "margin": score / 2,
        }
    )
    from superdml.crops.folder import CROPS_SCHEMA

    write_crops_table(folder, table.cast(CROPS_SCHEMA), {})
    return folder, train


@contextlib.contextmanager
def serving(session):
    """Serve `session` from a thread; yield its base URL."""
    import uvicorn

    from superdml.serve.app import make_app

    sock = bind(0)
    server = uvicorn.Server(uvicorn.Config(make_app(session), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def page_figures(browser, folder: Path, train: Path, repeat: int) -> dict[str, float]:
    start = time.perf_counter()
    session = open_session(folder, train, ServeOptions(port=0, device="cpu"))
    opened = time.perf_counter() - start
    with serving(session) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        page.goto(f"{base}/?token={session.token}")  # warm: the browser's cache of assets
        page.wait_for_selector("body[data-ready='1']", state="attached")
        ready = []
        for _ in range(3):
            page.reload()
            page.wait_for_selector("body[data-ready='1']", state="attached")
            ready.append(float(page.get_attribute("body", "data-ready-ms")))
        trips = []
        for k in range(repeat):
            page.keyboard.press(str(k % 4 + 1))
            page.wait_for_selector(f"body[data-ack='{k + 1}'][data-busy='0']", state="attached")
            trips.append(float(page.get_attribute("body", "data-round-trip-ms")))
        page.close()
    return {
        "open_s": opened,
        "first_grid_ms": statistics.median(ready),
        "keypress_ms": statistics.median(trips),
    }


def tile_figures(root: Path, size: int, repeat: int) -> dict[str, float]:
    """Median ms of one tile at full resolution and of the whole raster in one tile."""
    path = root / "mosaic.tif"
    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate")  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        block = rng.integers(0, 255, (3, 512, 512), dtype=np.uint8)
        for row in range(0, size, 512):
            for col in range(0, size, 512):
                dst.write(block, window=rasterio.windows.Window(col, row, 512, 512))
    plain = root / "plain.tif"
    plain.write_bytes(path.read_bytes())
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2, 4, 8, 16, 32, 64], rasterio.enums.Resampling.average)
    out: dict[str, float] = {}
    top = max_zoom(size, size)
    for name, raster in (("overviews", path), ("no_overviews", plain)):
        run = SegmentRun(root, "m", raster_info(raster), [1, 2, 3], [0.0] * 3, [255.0] * 3, "")
        for label, (z, x, y) in (("full", (top, 3, 5)), ("whole", (0, 0, 0))):
            if name == "no_overviews" and label == "full":
                continue
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                image_tile(run, [0, 1, 2], z, x, y)
                times.append(time.perf_counter() - t)
            out[f"tile_{label}_{name}_ms"] = 1000 * statistics.median(times)
    return out


def tile_http(root: Path, folder: Path, train: Path, size: int, repeat: int) -> dict[str, float]:
    """The same two tiles as HTTP requests through the server (token, routing, PNG)."""
    session = open_session(folder, train, ServeOptions(port=0, device="cpu"))
    run = SegmentRun(root, "m", raster_info(root / "mosaic.tif"), [1, 2, 3], [0.0] * 3,
                     [255.0] * 3, "")  # fmt: skip
    session.served = dataclasses.replace(session.served, runs={"m": run})
    top = max_zoom(size, size)
    out = {}
    with serving(session) as base:
        for label, (z, x, y) in (("full", (top, 3, 5)), ("whole", (0, 0, 0))):
            times = []
            for k in range(repeat + 1):
                t = time.perf_counter()
                url = f"{base}/map/image/m/{z}/{x}/{y}.png?token={session.token}&k={k}"
                with urllib.request.urlopen(url) as response:
                    response.read()
                times.append(time.perf_counter() - t)
            out[f"http_tile_{label}_ms"] = 1000 * statistics.median(times[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[100, 100_000])
    parser.add_argument("--raster-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="superdml-bench-serve-") as tmp, sync_playwright() as p:
        root = Path(tmp)
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        print("| crops | open folder (s) | first grid (ms) | keypress to next crop (ms) |")
        print("| ---: | ---: | ---: | ---: |")
        folders = {}
        for n in args.crops:
            folders[n] = crop_folder(root, n)
            f = page_figures(browser, *folders[n], args.repeat)
            print(
                f"| {n} | {f['open_s']:.2f} | {f['first_grid_ms']:.0f} | {f['keypress_ms']:.1f} |"
            )
            sys.stdout.flush()
        browser.close()
        tiles = tile_figures(root, args.raster_size, args.repeat)
        tiles |= tile_http(root, *folders[args.crops[0]], args.raster_size, args.repeat)
        print(f"\nmap tile, {args.raster_size}^2 px RGB GeoTIFF, median ms:")
        for name, ms in tiles.items():
            print(f"  {name}: {ms:.1f}")


if __name__ == "__main__":
    main()
