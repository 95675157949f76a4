"""What labeling a mosaic in object storage costs: requests and bytes per tile, and the rate.

    python benchmarks/s3_reads.py [--size 1536] [--tile-size 512] [--json FILE]

One run labels the same mosaic (the demo mosaic as a COG, segmented once on the local
disk) from four sources, each in a fresh process (``harness.run_case``), with the same
checkpoint and reference (an untrained ResNet-18, as ``benchmarks/label.py``):

=================  ==================================================================
source             what ``label --raster`` reads
=================  ==================================================================
local disk         the COG on the local disk: the rate's baseline
S3                 the COG in an S3 emulator, with superdml's GDAL read settings
                   (``superdml.core.gdal_settings``)
S3, GDAL defaults  the same object with GDAL's own defaults: a window's blocks fetched
                   by parallel range requests, the prefix listed at each open
S3 STAC            a STAC item collection of the mosaic's two halves as two COGs
                   (``superdml.raster.stac``), with superdml's settings
=================  ==================================================================

The emulator is moto's S3 server in this process behind a WSGI middleware that counts
every request it answers (method, listing or object, response bytes), whoever sends it:
the label process's GDAL and fsspec. Each row's requests are those of its whole
``label`` call (opening the mosaic to check it, then each tile's crops), divided by its
tiles. The predictions of every S3 row are checked equal to the local row's. Rates on
a loopback emulator show the cost of the requests themselves, not a network's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from harness import run_case

HERE = Path(__file__).resolve().parent
BUCKET = "superdml-bench"
#: GDAL's own defaults of the settings superdml changes (the "GDAL defaults" row).
GDAL_DEFAULTS = {"GDAL_HTTP_MULTIRANGE": "YES"}


class RequestCounter:
    """A WSGI middleware that counts the requests and response bytes of an app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def take(self) -> Counter[str]:
        """Return the counts so far and start again from zero."""
        with self.lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        is_key = len(path.strip("/").split("/", 1)) == 2  # /bucket/key, not /bucket
        kind = method if method != "GET" or is_key else "LIST"
        body = self.app(environ, start_response)
        sent = 0
        for chunk in body:
            sent += len(chunk)
            yield chunk
        with self.lock:
            self.counts[kind] += 1
            self.counts["bytes"] += sent


def start_emulator() -> tuple[Any, RequestCounter]:
    """Start moto's S3 server behind a :class:`RequestCounter`; point this process at it."""
    import boto3
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log(self, *args: Any) -> None:  # one line per request: thousands
            pass

    counter = RequestCounter(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counter, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    os.environ.update({
        "AWS_S3_ENDPOINT": f"{host}:{port}", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    })  # fmt: skip
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        os.environ.pop(key, None)
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
    return server, counter


# --------------------------------------------------------------------- the cases


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the mosaic as a COG and as two COG halves with their STAC items; segment it."""
    import rasterio
    import rasterio.shutil
    from rasterio.windows import Window

    from superdml.cli.demo import write_demo_data
    from superdml.config.schema import SegmentConfig
    from superdml.segment.stage import segment_raster

    root = Path(spec["root"])
    data = write_demo_data(root / "data", spec["size"])
    cog = {"driver": "COG", "compress": "deflate", "blocksize": 512}
    mosaic = root / "cog" / "mosaic.tif"
    mosaic.parent.mkdir()
    rasterio.shutil.copy(data.mosaic, mosaic, **cog)
    features = []
    with rasterio.open(mosaic) as src:
        half = src.width // 2
        for name, col, width in (("left", 0, half), ("right", half, src.width - half)):
            window = Window(col, 0, width, src.height)
            transform = src.window_transform(window)
            profile = {**cog, "count": src.count, "dtype": src.dtypes[0], "crs": src.crs,
                       "transform": transform, "width": width, "height": src.height}  # fmt: skip
            with rasterio.open(root / "cog" / f"{name}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
            features.append({
                "type": "Feature", "stac_version": "1.0.0", "id": name, "geometry": None,
                "properties": {"datetime": "2026-01-01T00:00:00Z", "proj:epsg": src.crs.to_epsg(),
                               "proj:shape": [src.height, width],
                               "proj:transform": list(transform)[:6]},
                "links": [], "assets": {"visual": {"href": f"{name}.tif", "type": "image/tiff"}},
            })  # fmt: skip
    items = {"type": "FeatureCollection", "features": features}
    (root / "cog" / "items.json").write_text(json.dumps(items))
    seg = segment_raster(mosaic, root / "seg", SegmentConfig(tile_size=spec["tile_size"]))
    return {"mosaic": str(mosaic), "truth_left": str(data.truth_left),
            "segments": str(seg.out_dir), "n_superpixels": seg.n_superpixels}  # fmt: skip


def label_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Label the segments reading the mosaic from ``spec["raster"]``; the rate and tiles."""
    if spec["gdal_defaults"]:
        os.environ.update(GDAL_DEFAULTS)
        from superdml.core import gdal_settings

        gdal_settings.REMOTE_OPEN_SETTINGS.clear()  # list the prefix at each open, as GDAL does
    from superdml.config.schema import LabelConfig
    from superdml.label.stage import label

    config = LabelConfig(tile_size=spec["tile_size"])
    result = label(spec["segments"], spec["checkpoint"], spec["reference"], spec["out"], config,
                   raster=spec["raster"], device="cpu")  # fmt: skip
    return {"tiles": result.n_tiles, "superpixels": result.n_superpixels,
            "throughput": result.superpixels_per_second}  # fmt: skip


def same_predictions(spec: dict[str, Any]) -> dict[str, Any]:
    """Whether two label runs' predictions are equal (but for the raster's name)."""
    import pyarrow.parquet as pq

    a, b = (pq.read_table(Path(out) / "predictions").sort_by("segment_id") for out in spec["outs"])
    return {"equal": a.drop(["raster"]).equals(b.drop(["raster"]))}


# ------------------------------------------------------------------------ driver


def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Prepare the data, upload it, label from every source; return the table's rows."""
    import boto3

    server, counter = start_emulator()
    try:
        spec = {"root": str(root), "size": args.size, "tile_size": args.tile_size}
        data = run_case(HERE / "s3_reads.py", "prepare", spec)
        prep = run_case(
            HERE / "label.py", "prepare",
            {"root": str(root), "segments": data["segments"], "truth_left": data["truth_left"],
             "per_class": 60, "backbone": "resnet18", "device": "cpu"},
        )  # fmt: skip
        s3 = boto3.client("s3", endpoint_url=f"http://{os.environ['AWS_S3_ENDPOINT']}")
        for path in sorted((root / "cog").iterdir()):
            s3.upload_file(str(path), BUCKET, f"mosaic/{path.name}")
        counter.take()
        sources = {
            "local disk": (data["mosaic"], False),
            "S3": (f"s3://{BUCKET}/mosaic/mosaic.tif", False),
            "S3, GDAL defaults": (f"s3://{BUCKET}/mosaic/mosaic.tif", True),
            "S3 STAC, 2 items": (f"s3://{BUCKET}/mosaic/items.json", False),
        }
        rows, outs = [], {}
        for name, (raster, defaults) in sources.items():
            outs[name] = str(root / f"labels-{len(outs)}")
            spec = {"segments": data["segments"], "checkpoint": prep["checkpoint"],
                    "reference": prep["reference"], "out": outs[name], "raster": raster,
                    "tile_size": args.tile_size, "gdal_defaults": defaults}  # fmt: skip
            measured = run_case(HERE / "s3_reads.py", "label_case", spec)
            counts = counter.take()
            tiles = measured["tiles"]
            equal = name == "local disk" or run_case(
                HERE / "s3_reads.py", "same_predictions", {"outs": [outs["local disk"], outs[name]]}
            )["equal"]  # fmt: skip
            rows.append({
                "source": name, "tiles": tiles,
                "get_per_tile": round(counts["GET"] / tiles, 2),
                "head_per_tile": round(counts["HEAD"] / tiles, 2),
                "list_per_tile": round(counts["LIST"] / tiles, 2),
                "mib_per_tile": round(counts["bytes"] / tiles / 2**20, 3),
                "throughput": round(measured["throughput"], 1),
                "same_predictions": equal,
            })  # fmt: skip
        base = rows[0]["throughput"]
        for row in rows:
            row["ratio"] = round(row["throughput"] / base, 3)
        return rows
    finally:
        server.shutdown()


def format_table(rows: list[dict[str, Any]], size: int, tile: int) -> str:
    """The rows as a Markdown table."""
    lines = [
        f"{size}^2 RGB COG (deflate, 512 px blocks), tiles of {tile} px, label on the CPU",
        "",
        "| source | GET/tile | HEAD/tile | LIST/tile | MiB/tile | label sp/s | ratio | same |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['get_per_tile']} | {r['head_per_tile']} | "
            f"{r['list_per_tile']} | {r['mib_per_tile']} | {r['throughput']} | {r['ratio']} | "
            f"{'yes' if r['same_predictions'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1536, help="mosaic side in pixels")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="superdml-s3-bench-") as tmp:
        rows = run(args, Path(tmp))
    print(format_table(rows, args.size, args.tile_size))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
