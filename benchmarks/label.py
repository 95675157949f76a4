"""Labeling throughput: ``superdml label`` against a bare forward loop of the same model.

What it measures
----------------
``label N^2``: superpixels per second of :func:`superdml.label.label`, the whole stage
as ``superdml label`` runs it (``client=None``: the tiles one after another in one
process): loading the checkpoint and the reference index, reading each tile's source
and segment windows, cutting the 64 px crops (:func:`superdml.crops.crop_tile`),
embedding them in fixed-size batches (:class:`superdml.label.Embedder`, the last batch
of each tile padded), the kNN search and vote, and writing one Parquet part per tile.
The time is :attr:`LabelResult.seconds` (the whole call after its imports, model
loading included; with ``--warm`` a small raster is labeled first in the same process,
untimed, so the model is loaded and CUDA initialized before the timed call); the
segmentation, the reference crops and the index are made beforehand and not timed.

``bare forward``: the same model (rebuilt from the same checkpoint, eval mode, under
``torch.inference_mode``; on CUDA bf16 autocast and channels_last, as the pipeline)
run on random float tensors of the pipeline's batch shape ``(batch, 3, 64, 64)``, made
once before the loop, for as many batches as that many superpixels need, after one
untimed warm-up batch; the rate counts the superpixels, so a padded last batch costs
both loops alike. It runs with the superpixel count of the smallest raster at the start
of a round and with that of the largest at its end; there are ``--rounds`` rounds, each
case's time is its median, and the ratios divide by the mean rate of the bare cases (the
machine is shared: only figures of one run compare). The target is ``label / bare
forward >= 0.85``.

The rasters are synthetic RGB mosaics (irregular, warped Voronoi regions of
scikit-image textures and photos), tiled and compressed GeoTIFFs written window by
window, with a truth raster of their regions. They are segmented with
``SegmentConfig(region_size=32)``; the reference folder is ``--per-class`` crops per
class of the first raster (``export_crops`` with the truth raster as label raster), and
the index is built with an untrained checkpoint (weights do not change the speed) that
carries the crop rule ``CropRule(crop_size=64, mask="outside", source_bands=3)``.

Every case runs in a fresh subprocess with ``torch.set_num_threads(--threads)``;
``peak RSS`` is the kernel's peak resident set of the case's largest process (its
``os.wait4`` rusage, which covers the descendants it waited for, dask workers
included). It must not grow with the raster size. On CUDA the table also shows the
peak of ``torch.cuda.max_memory_allocated``.

Run ``python benchmarks/label.py --help`` for the options; results are in
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
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the functions: the driver stays light (see run_case)
    import numpy as np

MiB = 2**20
REGION_CELL = 192  # mean side, in pixels, of a synthetic texture region
WRITE_BLOCK = 1024  # side of the windows the synthetic rasters are written by
CROP_SIZE = 64
WARMUP_SIZE = 256  # side of the raster labeled untimed first with --warm
EMBEDDING_SIZE = 128


# ------------------------------------------------------------------ synthetic rasters


def load_textures() -> list[np.ndarray]:
    """Return scikit-image textures and photos as (H, W, 3) uint8 arrays, one per class.

    Grey textures are tinted so that classes differ in colour as well as in texture.
    """
    import numpy as np
    from skimage import data

    tints = {"brick": (1.0, 0.55, 0.4), "grass": (0.45, 0.9, 0.35), "gravel": (0.8, 0.8, 0.9)}
    images = [
        (getattr(data, name)().astype(np.float32)[..., None] * np.float32(tint)).astype(np.uint8)
        for name, tint in tints.items()
    ]
    images += [getattr(data, name)()[..., :3] for name in ("coffee", "chelsea", "rocket")]
    return images


def render_window(
    textures: list[np.ndarray], seed: int, row: int, col: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render pixels ``[row, row + height) x [col, col + width)`` of the mosaic.

    Regions are the Voronoi cells of one jittered seed per ``REGION_CELL`` square, in
    sine-warped coordinates; each region takes the texture of its cell (a hash of the
    cell and `seed`), mirror-tiled. Any window renders on its own, the same way.

    Returns
    -------
    rgb : (3, H, W) uint8 ndarray
    truth : (H, W) uint8 ndarray
        The region's class, 1 to ``len(textures)``.
    """
    import numpy as np

    r = np.arange(row, row + height, dtype=np.float64)[:, None]
    c = np.arange(col, col + width, dtype=np.float64)[None, :]
    u = (r + 40 * np.sin(c / 97.0) + 25 * np.sin((r + c) / 151.0)) / REGION_CELL
    v = (c + 40 * np.sin(r / 113.0) + 25 * np.sin((r - c) / 89.0)) / REGION_CELL
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)

    def cell_hash(cr: np.ndarray, cc: np.ndarray, salt: int) -> np.ndarray:
        h = (cr * 73856093) ^ (cc * 19349663) ^ ((seed + salt) * 83492791)
        return (h * 2654435761) % 4294967296

    best = np.full(u.shape, np.inf)
    cls = np.zeros(u.shape, dtype=np.int64)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            cr, cc = iu + dr, iv + dc
            sr = 0.1 + 0.8 * cell_hash(cr, cc, 1) / 4294967296
            sc = 0.1 + 0.8 * cell_hash(cr, cc, 2) / 4294967296
            d = (u - cr - sr) ** 2 + (v - cc - sc) ** 2
            closer = d < best
            best = np.where(closer, d, best)
            cls = np.where(closer, cell_hash(cr, cc, 3) % len(textures), cls)
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rows, cols = np.arange(row, row + height), np.arange(col, col + width)
    for k, texture in enumerate(textures):
        where = cls == k
        if not where.any():
            continue
        h, w = texture.shape[:2]
        tr = np.where((rows // h) % 2 == 0, rows % h, h - 1 - rows % h)
        tc = np.where((cols // w) % 2 == 0, cols % w, w - 1 - cols % w)
        rgb[where] = texture[tr[:, None], tc[None, :]][where]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)), (cls + 1).astype(np.uint8)


def write_mosaic(folder: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """Write a `size` x `size` RGB mosaic and its truth raster, window by window.

    Returns the paths of ``mosaic_<size>.tif`` and ``truth_<size>.tif`` in `folder`.
    """
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    textures = load_textures()
    profile = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500_000.0, 5_000_000.0, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    mosaic, truth = folder / f"mosaic_{size}.tif", folder / f"truth_{size}.tif"
    parts = mosaic.with_suffix(".part"), truth.with_suffix(".part")
    # a small block cache: blocks are compressed and flushed as they are evicted, so the
    # writer holds about one window whatever the raster size
    with (
        rasterio.Env(GDAL_CACHEMAX=64 * MiB),
        rasterio.open(parts[0], "w", count=3, photometric="RGB", **profile) as rgb_dst,
        rasterio.open(parts[1], "w", count=1, **profile) as truth_dst,
    ):
        for row in range(0, size, WRITE_BLOCK):
            for col in range(0, size, WRITE_BLOCK):
                h, w = min(WRITE_BLOCK, size - row), min(WRITE_BLOCK, size - col)
                rgb, cls = render_window(textures, seed, row, col, h, w)
                window = Window(col, row, w, h)
                rgb_dst.write(rgb, window=window)
                truth_dst.write(cls[None], window=window)
    parts[0].rename(mosaic)
    parts[1].rename(truth)
    return mosaic, truth


# ------------------------------------------------------------------------- setup


def save_checkpoint(path: Path, backbone: str, class_names: list[str]) -> Path:
    """Save an untrained embedding net with the 64 px ``outside`` crop rule."""
    import torch

    from superdml.checkpoint import save_checkpoint as save
    from superdml.crops import CropRule
    from superdml.data import imagenet_statistics
    from superdml.models import EmbeddingNet

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = EmbeddingNet(backbone, EMBEDDING_SIZE, 3)
    mean, std = imagenet_statistics(3)
    return save(
        path,
        model=model,
        input_size=CROP_SIZE,
        class_names=class_names,
        normalization="imagenet",
        mean=mean,
        std=std,
        loss_name="proxy_anchor",
        crop_rule=CropRule(crop_size=CROP_SIZE, mask="outside", source_bands=3).to_dict(),
    )


def prepare(spec: dict) -> dict[str, object]:
    """Rasters, segments, reference crops, checkpoint and index (none of it timed).

    Returns ``{"segments": {size: [folder, n_superpixels]}, "warmup": folder or None,
    "checkpoint": path, "reference": path}``.
    """
    import torch

    from superdml.cluster import make_client
    from superdml.config import CropsConfig, SegmentConfig
    from superdml.crops import export_crops
    from superdml.index import build_index
    from superdml.segment import segment_raster

    root, sizes = Path(spec["root"]), spec["sizes"]
    gpu = torch.cuda.get_device_name() if spec["device"] == "cuda" else "no GPU used"
    print(f"# {gpu}, torch {torch.__version__}", flush=True)

    def segment(folder: Path, size: int, client: object) -> tuple[object, Path]:
        start = time.perf_counter()
        folder.mkdir(exist_ok=True)
        mosaic, truth = folder / f"mosaic_{size}.tif", folder / f"truth_{size}.tif"
        if not (mosaic.exists() and truth.exists()):  # kept from an earlier run with --out
            write_mosaic(folder, size)
        written = time.perf_counter() - start
        start = time.perf_counter()
        seg = segment_raster(mosaic, folder / "seg", SegmentConfig(region_size=32), client=client)
        print(
            f"# {folder.name}: {size}^2 written in {written:.0f} s, {seg.n_superpixels} "
            f"superpixels segmented in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        return seg, truth

    segments: dict[int, list] = {}
    truth_rasters = {}
    warmup = None
    with make_client(workers=spec["segment_workers"]) as client:
        if spec["warm"]:
            warmup = str(segment(root / "warmup", WARMUP_SIZE, client)[0].out_dir)
        for size in sizes:
            seg, truth_rasters[size] = segment(root / f"raster_{size}", size, client)
            segments[size] = [str(seg.out_dir), seg.n_superpixels]
    crops = root / "reference_crops"
    shutil.rmtree(crops, ignore_errors=True)
    export_crops(
        segments[sizes[0]][0],
        crops,
        CropsConfig(crop_size=CROP_SIZE, mask="outside", per_class=spec["per_class"]),
        label_raster=truth_rasters[sizes[0]],
    )
    class_names = sorted(p.name for p in crops.iterdir() if p.is_dir())
    checkpoint = save_checkpoint(root / "checkpoint.pt", spec["backbone"], class_names)
    start = time.perf_counter()
    index = build_index(checkpoint, crops, root / "reference", device=spec["device"])
    print(
        f"# reference: {index.n_references} crops of {len(class_names)} classes, "
        f"indexed in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return {
        "segments": segments,
        "warmup": warmup,
        "checkpoint": str(checkpoint),
        "reference": str(root / "reference"),
    }


# ---------------------------------------------------------------- cases (subprocess)


def child_label(spec: dict) -> dict[str, object]:
    """Run :func:`superdml.label.label` once; return its count and time."""
    from superdml.config import LabelConfig
    from superdml.label import label

    config = LabelConfig(k=spec["k"], batch_size=spec["batch_size"], tile_size=spec["tile_size"])
    if spec["warmup"]:  # loads the model and index into this process's caches, inits CUDA
        warmup_out = Path(spec["out"]).with_name("warmup_labels")
        shutil.rmtree(warmup_out, ignore_errors=True)
        label(
            spec["warmup"],
            spec["checkpoint"],
            spec["reference"],
            warmup_out,
            config,
            device=spec["device"],
            client=None,
            overwrite=True,
        )
    result = label(
        spec["segments"],
        spec["checkpoint"],
        spec["reference"],
        spec["out"],
        config,
        device=spec["device"],
        client=None,
    )
    if result.n_skipped:
        raise RuntimeError(f"{spec['out']}: {result.n_skipped} tiles were already labeled")
    return {"n": result.n_superpixels, "seconds": result.seconds, "tiles": result.n_tiles}


def child_bare(spec: dict) -> dict[str, object]:
    """Run the checkpoint's model forward on random batches; return the count and time."""
    import torch

    from superdml.checkpoint import build_model_from_checkpoint, load_checkpoint
    from superdml.embed import autocast, prepare_model, to_device

    device = torch.device(spec["device"])
    ckpt = load_checkpoint(spec["checkpoint"])
    model = prepare_model(build_model_from_checkpoint(ckpt), device).eval()
    batch, n = spec["batch_size"], spec["n"]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, ckpt.bands, ckpt.input_size, ckpt.input_size, generator=generator)
    images = to_device(images, device)  # channels_last on CUDA, as the pipeline's batches

    def forward(batches: int) -> None:
        with torch.inference_mode(), autocast(device):
            for _ in range(batches):
                model(images).float().cpu()  # the pipeline copies every batch back too

    forward(1)  # warm-up
    start = time.perf_counter()
    forward(math.ceil(n / batch))
    return {"n": n, "seconds": time.perf_counter() - start, "tiles": 0}


def run_child(spec: dict) -> None:
    """One case (or the setup), in this fresh process: write its JSON result."""
    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "setup":
        Path(spec["result"]).write_text(json.dumps(prepare(spec)))
        return
    result = child_bare(spec) if spec["kind"] == "bare" else child_label(spec)
    result["threads"] = torch.get_num_threads()
    if spec["device"] == "cuda":
        result["gpu_mib"] = torch.cuda.max_memory_allocated() / MiB
    Path(spec["result"]).write_text(json.dumps(result))


def run_case(spec: dict, folder: Path) -> dict[str, object]:
    """Run one case in a fresh subprocess; return its result plus ``rss_mib``.

    The peak RSS that ``wait4`` reports for a child includes the peak of the process
    that started it (the kernel carries it over the fork and the ``exec``): this driver
    therefore imports neither numpy nor torch, and the setup runs in a child too.
    """
    spec = {**spec, "result": str(folder / "result.json")}
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", spec_path])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec['kind']} failed with exit code {proc.returncode}")
    result = json.loads(Path(spec["result"]).read_text())
    result["rss_mib"] = usage.ru_maxrss * 1024 / MiB  # KiB on Linux
    return result


# ------------------------------------------------------------------------- driver


def format_table(rows: list[dict], bare_rate: float, cuda: bool) -> str:
    """One table: case, superpixels, seconds, superpixels/s, ratio, peak RSS."""
    header = (
        f"{'case':<28} {'superpixels':>11} {'seconds':>8} {'superpixels/s':>13} "
        f"{'vs bare':>7} {'peak RSS MiB':>12}" + (f" {'GPU MiB':>8}" if cuda else "")
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        rate = row["n"] / row["seconds"]
        lines.append(
            f"{row['case']:<28} {row['n']:>11} {row['seconds']:>8.1f} {rate:>13.1f} "
            f"{rate / bare_rate:>7.2f} {row['rss_mib']:>12.0f}"
            + (f" {row['gpu_mib']:>8.0f}" if cuda else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="raster sides")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--backbone", choices=["resnet18", "resnet34", "resnet50"], default="resnet18"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="LabelConfig.batch_size")
    parser.add_argument("--tile-size", type=int, default=1024, help="LabelConfig.tile_size")
    parser.add_argument("--k", type=int, default=10, help="LabelConfig.k")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every case")
    parser.add_argument("--per-class", type=int, default=50, help="reference crops per class")
    parser.add_argument(
        "--segment-workers",
        type=int,
        default=0,
        help="dask workers for the (untimed) segmentation; 0: in process",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="working folder, kept; default: a temporary folder, removed",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of every case, alternating; median time"
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="label a small raster first in each label case, untimed (model load, CUDA init)",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        run_child(json.loads(args.child.read_text()))
        return 0

    sizes = sorted(args.sizes)
    root = args.out or Path(tempfile.mkdtemp(prefix="superdml-bench-label-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  "
        f"{platform.machine()}  {os.cpu_count()} cores  python {platform.python_version()}  "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(
        f"# {args.backbone} at {CROP_SIZE} px on {args.device}"
        f"{' (bf16 autocast, channels_last)' if args.device == 'cuda' else ' (float32)'}, "
        f"batch {args.batch_size}, tile {args.tile_size}, k {args.k}, "
        f"{args.threads} torch threads in every case, client=None, "
        f"{'warm (a 256^2 raster labeled first, untimed)' if args.warm else 'cold start'}",
        flush=True,
    )
    common = {"device": args.device, "threads": args.threads}
    try:
        setup = run_case(
            {
                **common,
                "kind": "setup",
                "root": str(root),
                "sizes": sizes,
                "warm": args.warm,
                "backbone": args.backbone,
                "per_class": args.per_class,
                "segment_workers": args.segment_workers,
            },
            root,
        )
        common.update(batch_size=args.batch_size, checkpoint=setup["checkpoint"])
        plan = [("bare", sizes[0])] + [("label", s) for s in sizes] + [("bare", sizes[-1])]
        runs: dict[str, list[dict]] = {}
        for round_ in range(1, args.rounds + 1):
            for kind, size in plan:
                folder, n = setup["segments"][str(size)]
                spec = {**common, "kind": kind, "n": n}
                if kind == "label":
                    out = root / f"labels_{size}"
                    shutil.rmtree(out, ignore_errors=True)
                    spec.update(
                        segments=folder,
                        warmup=setup["warmup"],
                        reference=setup["reference"],
                        out=str(out),
                        k=args.k,
                        tile_size=args.tile_size,
                    )
                    case = f"label {size}^2 ({math.ceil(size / args.tile_size) ** 2} tiles)"
                else:
                    case = f"bare forward ({size}^2 count)"
                run = run_case(spec, root)
                runs.setdefault(case, []).append(run)
                print(
                    f"round {round_}: {case}: {run['n']} in {run['seconds']:.1f} s "
                    f"({run['n'] / run['seconds']:.1f}/s), {run['rss_mib']:.0f} MiB, "
                    f"{run['threads']} threads",
                    flush=True,
                )
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)

    rows = [
        {
            "case": case,
            "n": case_runs[0]["n"],
            "seconds": statistics.median(r["seconds"] for r in case_runs),
            "rss_mib": max(r["rss_mib"] for r in case_runs),
            "gpu_mib": max(r.get("gpu_mib", 0.0) for r in case_runs),
        }
        for case, case_runs in runs.items()
    ]
    bare = [r for r in rows if str(r["case"]).startswith("bare")]
    bare_rate = statistics.mean(r["n"] / r["seconds"] for r in bare)
    print()
    print(format_table(rows, bare_rate, args.device == "cuda"))
    print(
        f"\nseconds: median of {args.rounds} round(s); peak RSS: the largest of them\n"
        f"vs bare: superpixels/s over the mean rate of the bare forward cases ({bare_rate:.1f}/s)"
    )
    labels = [r for r in rows if str(r["case"]).startswith("label")]
    if len(labels) > 1:
        print(
            f"peak RSS {sizes[-1]}^2 / {sizes[0]}^2: "
            f"{labels[-1]['rss_mib'] / labels[0]['rss_mib']:.2f}x"
        )
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
