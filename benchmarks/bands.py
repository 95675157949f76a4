"""A 4-band uint16 raster against its RGB twin: crops written per second, label superpixels/s.

    python benchmarks/bands.py [--size 1024] [--repeats 3] [--json FILE]

The RGB case is the demo mosaic (:func:`superdml.cli.demo.write_demo_data`, uint8). The
4-band case is the same mosaic as uint16 (each value times 257) plus a near-infrared band,
described ``B04, B03, B02, B08`` as a Sentinel-2 subset would be. Both are segmented with
the default parameters (on every band: crops take only segmented bands, whose statistics
segmentation records), so they have about the same number of superpixels.

Measured, each in a fresh process (``harness.run_case``), in the same run:

``crops``: :func:`superdml.crops.stage.export_crops` of every superpixel (64 px, mask
``none``, no label raster, in process); crops written per second as the stage reports
them (``n_crops / seconds``). RGB: one PNG per crop; 4 bands: a lossless TIFF chip and
a PNG preview per crop.

``label``: :func:`superdml.label.stage.label` as ``superdml label`` runs it by default (in
process, ``--precision auto``), with an untrained ResNet-18 (128-d, 64 px; weights do not
change the speed) whose first convolution takes the crop rule's bands, against a
reference index of the crops of the mosaic's left half; superpixels per second as the
stage reports them.

Each repeat runs both cases of both stages, alternating which goes first; the table gives
every repeat's ratio (4 bands / RGB) and their median and spread. Target: >= 0.9x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import run_case

HERE = Path(__file__).resolve().parent
KINDS = ("rgb", "4-band")
CROP_SIZE = 64
EMBEDDING_SIZE = 128
S2_NAMES = ("B04", "B03", "B02", "B08")


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write both rasters, segment them, and build each case's checkpoint and reference."""
    import numpy as np
    import rasterio

    from superdml.cli.demo import write_demo_data
    from superdml.config.schema import SegmentConfig

    root = Path(spec["root"])
    data = write_demo_data(root / "rgb", spec["size"])
    with rasterio.open(data.mosaic) as src:
        rgb, profile = src.read(), src.profile
    nir = (65535 - 257 * rgb.mean(axis=0)).astype(np.uint16)  # any fourth band will do
    four = root / "4-band" / "mosaic.tif"
    four.parent.mkdir()
    profile.update(count=4, dtype="uint16")
    with rasterio.open(four, "w", **profile) as dst:
        dst.write(np.concatenate([rgb.astype(np.uint16) * 257, nir[None]]))
        for i, name in enumerate(S2_NAMES, 1):
            dst.set_band_description(i, name)
    config = SegmentConfig()
    out: dict[str, Any] = {}
    for kind, raster in zip(KINDS, (data.mosaic, four), strict=True):
        out[kind] = _prepare_case(root / kind, raster, data.truth_left, config)
    return out


def _prepare_case(folder: Path, raster: Path, truth: Path, config: Any) -> dict[str, Any]:
    from superdml.config.schema import CropsConfig
    from superdml.crops.rule import read_crop_rule
    from superdml.crops.stage import export_crops
    from superdml.label.index import build_index
    from superdml.segment.stage import segment_raster

    seg = segment_raster(raster, folder / "seg", config).out_dir
    crops = folder / "reference_crops"
    export_crops(seg, crops, CropsConfig(crop_size=CROP_SIZE, per_class=100), truth)
    rule = read_crop_rule(crops)
    assert rule is not None  # export_crops wrote it
    names = sorted(p.name for p in crops.iterdir() if p.is_dir())
    checkpoint = _save_checkpoint(folder / "checkpoint.pt", rule.to_dict(), rule.channels, names)
    build_index(checkpoint, crops, folder / "reference", device="cpu")
    return {"seg": str(seg), "checkpoint": str(checkpoint), "reference": str(folder / "reference"),
            "channels": rule.channels, "lossless": rule.lossless}  # fmt: skip


def _save_checkpoint(path: Path, rule: dict[str, Any], channels: int, names: list[str]) -> Path:
    """Save an untrained ResNet-18 embedding net taking `channels` bands, with `rule`."""
    import torch

    from superdml.learn.checkpoint import save_checkpoint
    from superdml.learn.models import EmbeddingNet
    from superdml.learn.normalization import imagenet_statistics

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = EmbeddingNet("resnet18", EMBEDDING_SIZE, channels)
    mean, std = imagenet_statistics(channels)
    return save_checkpoint(
        path, model=model, input_size=CROP_SIZE, class_names=names, normalization="imagenet",
        mean=mean, std=std, loss_name="proxy_anchor", crop_rule=rule,
    )  # fmt: skip


def crops_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Crops of every superpixel of ``spec["seg"]`` into ``spec["out"]``, in process."""
    from superdml.config.schema import CropsConfig
    from superdml.crops.stage import export_crops

    result = export_crops(spec["seg"], spec["out"], CropsConfig(crop_size=CROP_SIZE))
    return {"n": result.n_crops, "throughput": result.n_crops / result.seconds}


def label_case(spec: dict[str, Any]) -> dict[str, Any]:
    """``label`` with its defaults (in process, precision auto) into ``spec["out"]``."""
    from superdml.label.stage import label

    result = label(spec["seg"], spec["checkpoint"], spec["reference"], spec["out"], device="cpu")
    return {"n": result.n_superpixels, "throughput": result.superpixels_per_second}


def measure(cases: dict[str, Any], root: Path, repeats: int) -> list[dict[str, Any]]:
    """Run both stages of both cases `repeats` times; return one record per run."""
    records = []
    for repeat in range(repeats):
        for stage, function in (("crops", "crops_case"), ("label", "label_case")):
            order = KINDS if repeat % 2 == 0 else KINDS[::-1]
            for kind in order:
                out = root / f"{stage}-{kind}-{repeat}"
                result = run_case(Path(__file__), function, {**cases[kind], "out": str(out)})
                records.append({"repeat": repeat, "stage": stage, "kind": kind, **result})
                print(f"  {stage:5} {kind:6} repeat {repeat}: {result['throughput']:8.1f}/s "
                      f"({result['n']})", file=sys.stderr, flush=True)  # fmt: skip
    return records


def table(records: list[dict[str, Any]]) -> str:
    """Each stage's throughputs per repeat, the ratios 4-band / RGB, median and spread."""
    lines = [f"{'stage':6} {'unit':14} {'rgb':>24} {'4-band':>24} {'ratio':>18} median"]
    for stage, unit in (("crops", "crops/s"), ("label", "superpixels/s")):
        by = {kind: [r["throughput"] for r in records if (r["stage"], r["kind"]) == (stage, kind)]
              for kind in KINDS}  # fmt: skip
        ratios = [b / a for a, b in zip(by["rgb"], by["4-band"], strict=True)]
        cells = [" ".join(f"{v:7.1f}" for v in by[kind]) for kind in KINDS]
        spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f} to {max(ratios):.2f})"
        each = " ".join(f"{r:5.2f}" for r in ratios)
        lines.append(f"{stage:6} {unit:14} {cells[0]:>24} {cells[1]:>24} {each:>18} {spread}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prepare the data, measure, print the table (and write the records with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="side of the demo mosaic")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every run's record here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="superdml-bands-") as tmp:
        cases = run_case(Path(__file__), "prepare", {"root": tmp, "size": args.size})
        records = measure(cases, Path(tmp), args.repeats)
    print(table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
