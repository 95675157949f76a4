"""Labeling quality of the crop rule: mask mode x crop size on the demo mosaic.

What it measures
----------------
For each crop mask mode (``none``, ``outside``, ``alpha``) and crop size (32, 64 px),
the demo pipeline (``pipelines/demo.yaml``: crops pre-labeled from the left half's
truth -> train -> index -> label -> export) runs on the demo mosaic
(:func:`superdml.cli.demo.write_demo_data`, ``--size`` px, 1024 = the full demo), and the
predicted label raster is scored on the unseen right half with
:func:`superdml.cli.demo.unseen_half_scores`: pixel accuracy and per-class F1 (predicted ids
mapped to the truth's by class name, as :func:`superdml.cli.demo.demo` does). The table
shows, per case, the mean over ``--seeds`` seeds (each seed sets both ``crops.seed``,
which draws the training superpixels, and ``train.seed``), the range of the pixel
accuracy over the seeds, the macro F1 and the mean wall and CPU seconds of the train
stage.

Same training budget: every case trains the same network (the demo's ResNet-18,
64-d embedding, Proxy-NCA) for the same epochs on the same batches (5 classes x 12
crops), from the same number of crops; with one seed every case draws the same
superpixels (the draw does not depend on the crop rule), so the cases of a seed are
paired. The network input is the crop at its own size (``--input-size crop``, the
default: a 64 px crop is neither shrunk nor loses detail, but costs about 4 times the
compute of a 32 px one) or one fixed size for every case (``--input-size 32``).

The mosaic is segmented once (the demo pipeline's segment stage, in ``OUT/segments``);
each case and seed runs the other stages of the demo pipeline (without ``review``) in
its own folder ``OUT/<mask>-<crop>-<input>-s<seed>``. Everything runs on the CPU, one
case after the other. Per-run scores go to ``OUT/results.json``.

Run ``python benchmarks/quality.py --help`` for the options; results are in
``benchmarks/README.md``. The labeling rule's settings on a mosaic with a rare class are
measured by ``benchmarks/quality_rare.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import yaml

from superdml.cli import pipeline as pipeline_mod
from superdml.cli.demo import CLASS_NAMES, unseen_half_scores, write_demo_data
from superdml.cli.stages import REGISTRY
from superdml.config.shipped import pipeline_path
from superdml.label.predictions import load_label_run

MASKS = ("none", "outside", "alpha")
CROP_SIZES = (32, 64)


def _derived_pipelines(out: Path, segments: Path) -> tuple[Path, Path]:
    """Write the demo pipeline split in two: its segment stage, and the rest minus review."""
    doc = yaml.safe_load(pipeline_path("demo").read_text())
    stages = doc["stages"]
    segment = {**doc, "stages": [s for s in stages if s["stage"] == "segment"]}
    rest = [dict(s) for s in stages if s["stage"] not in ("segment", "review")]
    for stage in rest:
        if "segments" in stage:
            stage["segments"] = str(segments)
    case = {**doc, "stages": rest}
    paths = out / "segment.yaml", out / "case.yaml"
    for path, content in zip(paths, (segment, case), strict=True):
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    return paths


class _TrainTimer:
    """Wrap the pipeline's train stage to record its wall and CPU (process) seconds."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        spec = REGISTRY["train"]
        self._glue = spec.glue
        REGISTRY["train"] = dataclasses.replace(spec, glue=self)

    def __call__(self, entry: Any, kwargs: dict[str, Any], ctx: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = self._glue(entry, kwargs, ctx)
        self.wall, self.cpu = time.perf_counter() - wall, time.process_time() - cpu
        return result


def score_run(
    workdir: Path, truth: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES
) -> dict[str, Any]:
    """Scores of a pipeline run's labels.tif on the unseen half, by class name.

    `truth` holds ids 1.. in the order of `class_names` (the demo's by default).
    """
    return unseen_half_scores(predicted_ids(workdir, class_names), truth, class_names)


def predicted_ids(workdir: Path, class_names: tuple[str, ...] = CLASS_NAMES) -> np.ndarray:
    """A pipeline run's labels.tif as truth ids: 1.. in the order of `class_names`, else 0."""
    scheme = load_label_run(workdir / "labels").scheme
    with rasterio.open(workdir / "labels" / "labels.tif") as src:
        predicted = src.read(1)
    # predicted values are the class scheme's codes; map them to truth ids (others: 0)
    to_truth = np.zeros(1 << 16, dtype=np.int64)
    for name, code in scheme.codes.items():
        to_truth[code] = class_names.index(name) + 1 if name in class_names else 0
    return to_truth[predicted]


def run_case(
    case_pipeline: Path, workdir: Path, sets: list[str], truth: np.ndarray, timer: _TrainTimer
) -> dict[str, Any]:
    """Run one case (fresh folder) and return its scores and train seconds."""
    if workdir.exists():
        shutil.rmtree(workdir)
    start = time.perf_counter()
    pipeline_mod.run_pipeline(case_pipeline, sets, workdir, device="cpu")
    scores = score_run(workdir, truth)
    f1 = {name: c["f1"] for name, c in scores["per_class"].items()}
    return {
        "pixel_accuracy": scores["pixel_accuracy"],
        "macro_f1": float(np.mean(list(f1.values()))),
        "f1": f1,
        "train_seconds": timer.wall,
        "train_cpu_seconds": timer.cpu,
        "seconds": time.perf_counter() - start,
    }


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per case: mean scores over the seeds, accuracy range, train seconds."""
    head = f"{'mask':<8}{'crop':>5}{'input':>6}{'acc':>8}{'range':>7}{'macroF1':>8}"
    head += "".join(f"{n:>8}" for n in CLASS_NAMES) + f"{'train s':>9}{'cpu s':>7}"
    lines = [head]
    for row in rows:
        runs = row["runs"]
        acc = [r["pixel_accuracy"] for r in runs]
        line = f"{row['mask']:<8}{row['crop_size']:>5}{row['input_size']:>6}"
        line += f"{statistics.fmean(acc):>8.3f}{max(acc) - min(acc):>7.3f}"
        line += f"{_mean(runs, 'macro_f1'):>8.3f}"
        line += "".join(f"{statistics.fmean(r['f1'][n] for r in runs):>8.3f}" for n in CLASS_NAMES)
        line += f"{_mean(runs, 'train_seconds'):>9.1f}{_mean(runs, 'train_cpu_seconds'):>7.1f}"
        lines.append(line)
    return lines


def _comparison(rows: list[dict[str, Any]], seeds: list[int]) -> list[str]:
    """The best case by mean pixel accuracy, and its paired per-seed margin over each other."""
    acc = lambda row: statistics.fmean(r["pixel_accuracy"] for r in row["runs"])  # noqa: E731
    best = max(rows, key=acc)
    name = lambda row: f"{row['mask']}/{row['crop_size']}/{row['input_size']}"  # noqa: E731
    spread = max(
        max(r["pixel_accuracy"] for r in row["runs"])
        - min(r["pixel_accuracy"] for r in row["runs"])
        for row in rows
    )
    lines = [
        f"best: {name(best)} (mask/crop/input), pixel accuracy {acc(best):.3f}; "
        f"largest seed range of any case {spread:.3f}",
        f"{'vs':<16}{'mean diff':>10}   per-seed diff (best - other, seeds {seeds})",
    ]
    for row in sorted(rows, key=acc, reverse=True):
        if row is best:
            continue
        diffs = [
            b["pixel_accuracy"] - o["pixel_accuracy"]
            for b, o in zip(best["runs"], row["runs"], strict=True)
        ]
        lines.append(
            f"{name(row):<16}{statistics.fmean(diffs):>+10.3f}   "
            + " ".join(f"{d:+.3f}" for d in diffs)
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="mosaic side in px (1024: demo)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per case: 0..N-1")
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo pipeline's")
    parser.add_argument(
        "--input-size", default="crop",
        help="network input size: 'crop' (= the crop size) or one size in px for every case",
    )  # fmt: skip
    parser.add_argument("--masks", default=",".join(MASKS), help="comma-separated mask modes")
    parser.add_argument(
        "--crop-sizes", default=",".join(map(str, CROP_SIZES)), help="comma-separated sizes"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/quality"), help="working folder (rewritten)"
    )
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    masks = args.masks.split(",")
    crop_sizes = [int(c) for c in args.crop_sizes.split(",")]

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = write_demo_data(out / "data", args.size)
    with rasterio.open(data.truth) as src:
        truth = src.read(1)
    segment_pipeline, case_pipeline = _derived_pipelines(out, out / "segments")
    common = [f"mosaic={data.mosaic}", f"truth_left={data.truth_left}"]
    if args.epochs is not None:
        common.append(f"epochs={args.epochs}")
    t0 = time.perf_counter()
    pipeline_mod.run_pipeline(segment_pipeline, common, out, device="cpu")
    segment_seconds = time.perf_counter() - t0

    timer = _TrainTimer()
    rows = []
    for mask in masks:
        for crop in crop_sizes:
            input_size = crop if args.input_size == "crop" else int(args.input_size)
            row = {"mask": mask, "crop_size": crop, "input_size": input_size, "runs": []}
            for seed in seeds:
                sets = [*common, f"crops.mask={mask}", f"crops.crop_size={crop}",
                        f"crops.seed={seed}", f"train.seed={seed}",
                        f"train.input_size={input_size}"]  # fmt: skip
                workdir = out / f"{mask}-{crop}-{input_size}-s{seed}"
                result = run_case(case_pipeline, workdir, sets, truth, timer)
                row["runs"].append({"seed": seed, **result})
                print(
                    f"# {workdir.name}: pixel accuracy {result['pixel_accuracy']:.3f}, "
                    f"train {result['train_seconds']:.1f} s (cpu {result['train_cpu_seconds']:.1f}"
                    f" s), case {result['seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append(row)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")

    epochs = args.epochs if args.epochs is not None else "pipeline default"
    print(
        f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cpu; demo mosaic {args.size} px, segmented once in {segment_seconds:.1f} s; "
        f"epochs {epochs}; seeds {seeds}"
    )
    print("# acc: unseen-half pixel accuracy, mean over seeds; range: max - min over seeds;")
    print("# F1 columns: mean over seeds; train s / cpu s: wall / CPU seconds of the train stage")
    print("\n".join(_table(rows)))
    print()
    print("\n".join(_comparison(rows, seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
