"""Stage benchmarks of superdml in one command, each against a baseline of the same run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--json FILE] [--stages ...]

Prints one table: stage, workload, throughput and unit, the baseline measured in the
same run, their ratio, and the peak RSS of the stage's largest process. Every figure
comes from a fresh process (``harness.run_case``); this driver imports neither numpy
nor torch, since the kernel carries a parent's peak RSS over into its children.

=======  ==========================================  ========================================
stage    measured                                    baseline
=======  ==========================================  ========================================
segment  ``segment_raster`` in the default shape     one ``skimage.segmentation.slic`` call on
         (``make_client()``: in process unless a     the same image, same parameters
         cluster pays; ``benchmarks/segment.py``)
train    the training loop (``benchmarks/train.py``)  bare forward+backward+step of the same
                                                     model and batch at the same precision
label    ``superdml label`` with its defaults (in    the fastest bare forward of the same
         process), ``--precision auto``              model on the device: fp32, fp32
         (``benchmarks/label.py``)                   channels_last, bf16 channels_last
knn      ``ReferenceIndex.search`` over 100k         ``torch.mm`` + ``topk`` of the same
         references (``benchmarks/knn.py``)          shapes
export   label + score rasters (COG), MP/s, the      GDAL writing the same two rasters
         median of 5 calls after the first;          from memory as COGs, same options
         superpixel polygons (GeoPackage), sp/s      (target >= 50 MP/s); polygons: none
         (``export.py``)
=======  ==========================================  ========================================

The input is the demo mosaic (:func:`superdml.cli.demo.write_demo_data`): 2048^2 with
``--quick`` (about 4k superpixels at region size 32; under 3 minutes on 2 cores), 4096^2
otherwise. The machine may be shared: only ratios of one run compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import run_case

HERE = Path(__file__).resolve().parent
STAGES = ("segment", "train", "label", "knn", "export")
KEYS = ("stage", "workload", "throughput", "unit", "baseline", "ratio", "peak_rss_mb")
#: Images of each bare forward (a rate: 16 batches of 256 measure it as well as the 16378
#: superpixels of the full mosaic, which took 9 minutes per variant on a loaded machine)
BARE_IMAGES = 4096


def write_data(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the demo mosaic and its truth rasters (a case: run in a child process)."""
    from superdml.cli.demo import write_demo_data

    data = write_demo_data(Path(spec["root"]), spec["size"])
    return {"mosaic": str(data.mosaic), "truth_left": str(data.truth_left)}


def segment_case(spec: dict[str, Any]) -> dict[str, Any]:
    """``benchmarks/segment.py``'s cases, by name: ``superdml`` or ``skimage``."""
    import segment

    if spec["case"] == "skimage":
        return segment.child_skimage(spec["mosaic"])
    return segment.child_superdml(
        spec["mosaic"], spec["out"], spec["workers"], "auto", spec["device"]
    )


def _row(stage: str, workload: str, measured: dict[str, Any], unit: str, baseline: float | None):
    throughput = measured["throughput"]
    return {
        "stage": stage,
        "workload": workload,
        "throughput": round(throughput, 2),
        "unit": unit,
        "baseline": None if baseline is None else round(baseline, 2),
        "ratio": None if baseline is None else round(throughput / baseline, 3),
        "peak_rss_mb": round(measured["peak_rss_mb"], 1),
    }


def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Run the benchmarks of ``args.stages`` (with what they need) under `root`; the rows.

    The segment row is always there (labeling needs the segments); its baseline only
    when ``segment`` is among the stages.
    """
    stages, device = args.stages, args.device
    size = args.size or (2048 if args.quick else 4096)
    cores = len(os.sched_getaffinity(0))
    rows = []
    data = run_case(HERE / "run.py", "write_data", {"root": str(root / "data"), "size": size})
    mp = size * size / 1e6
    segments = str(root / "seg")
    seg_spec = {"mosaic": data["mosaic"], "out": segments, "workers": None, "device": device}
    ours = run_case(HERE / "run.py", "segment_case", {**seg_spec, "case": "superdml"})
    n_sp = ours["n_superpixels"]
    base = None
    if "segment" in stages:
        base = run_case(HERE / "run.py", "segment_case", {**seg_spec, "case": "skimage"})
    measured = {"throughput": mp / ours["seconds"], "peak_rss_mb": ours["peak_rss_mb"]}
    workload = f"{size}^2 RGB, region 32, {n_sp} superpixels, default shape, {cores} cores"
    rows.append(_row("segment", workload, measured, "MP/s", base and mp / base["seconds"]))
    if not {"train", "label", "export"} & set(stages):
        return rows + _knn(args)
    backbone = args.backbone
    prep = run_case(
        HERE / "label.py",
        "prepare",
        {"root": str(root), "segments": segments, "truth_left": data["truth_left"],
         "per_class": 60 if args.quick else 200, "backbone": backbone, "device": device},
    )  # fmt: skip
    if "train" in stages:
        spec = {"crops": prep["crops"], "backbone": backbone, "device": device, "rounds": 2}
        measured = run_case(HERE / "train.py", "measure", spec)
        workload = (
            f"{backbone} 128-d 64 px, batch {measured['batch']}, {measured['crops']} crops, "
            f"{measured['dtype'].removeprefix('torch.')}"
        )
        rows.append(_row("train", workload, measured, "crops/s", measured["baseline"]))
    labels = root / "labels"
    if "label" in stages or "export" in stages:  # export exports this label run
        spec = {**prep, "segments": segments, "out": str(labels), "device": device,
                "batch_size": args.batch_size, "tile_size": args.tile_size}  # fmt: skip
        measured = run_case(HERE / "label.py", "label_cli", spec)
    if "label" in stages:
        variants = ["fp32", "fp32 channels_last"] + ["bf16 channels_last"] * prep["bf16"]
        bare_n = min(n_sp, BARE_IMAGES)
        bare = {
            v: run_case(HERE / "label.py", "bare_forward", {**spec, "variant": v, "n": bare_n})
            for v in variants
        }
        fastest = max(bare, key=lambda v: bare[v]["throughput"])
        workload = f"{backbone} 128-d 64 px, {n_sp} superpixels, vs bare {fastest}"
        if "gpu_util" in measured:
            workload += f", GPU {measured['gpu_util']:.0f}% busy"
        rows.append(_row("label", workload, measured, "sp/s", bare[fastest]["throughput"]))
        for v in variants:
            workload = f"bare forward {v}, batch {args.batch_size or 256}"
            rows.append(_row("label", workload, bare[v], "img/s", bare[fastest]["throughput"]))
    if "export" in stages:
        spec = {"labels": str(labels), "segments": segments, "megapixels": mp}
        measured = run_case(HERE / "export.py", "measure", spec)
        base = run_case(HERE / "export.py", "write_only", spec)
        first = measured["first_call_seconds"]
        workload = f"{size}^2 labels + scores, COG, vs GDAL; 1st call {first:.2f} s"
        rows.append(_row("export", workload, measured, "MP/s", base["throughput"]))
        measured = run_case(HERE / "export.py", "polygons", {**spec, "superpixels": n_sp})
        workload = f"{n_sp} superpixel polygons, GeoPackage"
        rows.append(_row("export", workload, measured, "sp/s", None))
    return rows + _knn(args)


def _knn(args: argparse.Namespace) -> list[dict[str, Any]]:
    if "knn" not in args.stages:
        return []
    queries = 8192 if args.quick else 32768
    spec = {"refs": args.refs, "queries": queries, "tile": 1024, "device": args.device}
    measured = run_case(HERE / "knn.py", "search", spec)
    base = run_case(HERE / "knn.py", "gemm", spec)
    workload = f"{queries} x {args.refs} refs, 128-d, k=10, {measured['kind']} index"
    return [_row("knn", workload, measured, "queries/s", base["throughput"])]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as one aligned text table."""
    header = f"{'stage':<8} {'workload':<58} {'throughput':>16} {'baseline':>10} {'ratio':>6} "
    header += f"{'peak RSS MB':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        base = "-" if r["baseline"] is None else f"{r['baseline']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        rate = f"{r['throughput']:.1f} {r['unit']}"
        lines.append(
            f"{r['stage']:<8} {r['workload']:<58} {rate:>16} {base:>10} {ratio:>6} "
            f"{r['peak_rss_mb']:>11.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2048^2 mosaic, fewer queries")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--workdir", type=Path, help="keep the inputs and outputs here")
    parser.add_argument("--size", type=int, help="mosaic side in pixels [2048 quick, 4096]")
    parser.add_argument("--backbone", default="resnet18", help="model of train and label")
    parser.add_argument("--batch-size", type=int, help="label --batch-size (and bare forward)")
    parser.add_argument("--tile-size", type=int, help="label --tile-size")
    parser.add_argument("--refs", type=int, default=100_000, help="kNN reference count")
    args = parser.parse_args(argv)
    repo = str(HERE.parent)  # the children import this checkout's superdml
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, device {args.device}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="superdml-bench-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = run(args, root)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([{k: r[k] for k in KEYS} for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
