"""Labeling throughput: ``superdml label`` (the CLI's default path) and bare forwards.

Parts of ``benchmarks/run.py``; each function runs in a fresh process
(``harness.run_case``) and returns a JSON object.

``prepare``: the labeled crops of the demo mosaic's left half (``export_crops`` with
the truth as label raster), an untrained checkpoint of the benchmark's model (weights do
not change the speed) carrying the 64 px crop rule, and its reference index.

``label_cli``: ``superdml label SEGMENTS --checkpoint --reference --out`` in a
subprocess, with the defaults a user gets (``superdml.core.cluster.SHAPES["label"]``: in
process; ``--precision auto``); the rate is the one the command prints (the whole
:func:`superdml.label.stage.label` call: loading the checkpoint and index, reading, cropping,
embedding, kNN vote, writing every part; the cluster's start is not counted).

``bare_forward``: the same model on one random ``(batch, 3, 64, 64)`` tensor made
before the loop (batch 256 unless ``batch_size``), under ``torch.inference_mode``, for
``ceil(n / batch)`` batches (``run.py``: the mosaic's superpixels, at most 4096), after
one untimed batch: float32, float32 channels_last, and (where the device computes bf16)
bf16 autocast channels_last. The fastest is the label row's baseline.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CROP_SIZE = 64
EMBEDDING_SIZE = 128
BATCH_SIZE = 256
#: Bare-forward variants: name -> (channels_last, autocast dtype name or None)
VARIANTS = {"fp32": (False, None), "fp32 channels_last": (True, None),
            "bf16 channels_last": (True, "bfloat16")}  # fmt: skip


def save_checkpoint(path: Path, backbone: str, class_names: list[str]) -> Path:
    """Save an untrained embedding net of `backbone` with the 64 px crop rule."""
    import torch

    from superdml.crops.rule import CropRule
    from superdml.learn.checkpoint import save_checkpoint as save
    from superdml.learn.models import EmbeddingNet
    from superdml.learn.normalization import imagenet_statistics

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
        crop_rule=CropRule(crop_size=CROP_SIZE, mask="none", source_bands=3).to_dict(),
    )


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the reference crops, the checkpoint and the index under ``spec["root"]``.

    ``bf16`` in the result says whether the device computes bf16 (the variants to try).
    """
    import torch

    from superdml.config.schema import CropsConfig
    from superdml.crops.stage import export_crops
    from superdml.label.index import build_index
    from superdml.learn.embed import resolve_precision

    root = Path(spec["root"])
    crops = root / "crops"
    config = CropsConfig(crop_size=CROP_SIZE, mask="none", per_class=spec["per_class"])
    export_crops(spec["segments"], crops, config, label_raster=spec["truth_left"])
    class_names = sorted(p.name for p in crops.iterdir() if p.is_dir())
    checkpoint = save_checkpoint(root / "checkpoint.pt", spec["backbone"], class_names)
    index = build_index(checkpoint, crops, root / "reference", device=spec["device"])
    bf16 = resolve_precision("auto", torch.device(spec["device"])) == torch.bfloat16
    return {"crops": str(crops), "checkpoint": str(checkpoint), "bf16": bf16,
            "reference": str(root / "reference"), "n_references": index.n_references}  # fmt: skip


def label_cli(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``superdml label``; return superpixels/s as it prints them.

    Options are the defaults but ``--batch-size`` and ``--tile-size`` where `spec` has
    them. On CUDA ``gpu_util`` is the mean GPU utilisation (%) that ``nvidia-smi``
    sampled every 200 ms while the command ran.
    """
    cmd = [sys.executable, "-c", "from superdml.cli.commands import main; main()", "label",
           spec["segments"], "--checkpoint", spec["checkpoint"], "--reference",
           spec["reference"], "--out", spec["out"], "--device", spec["device"]]  # fmt: skip
    for option in ("batch_size", "tile_size"):
        if spec.get(option):
            cmd += [f"--{option.replace('_', '-')}", str(spec[option])]
    sampler = None
    if spec["device"] == "cuda":
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        sampler = subprocess.Popen([*query, "-lms", "200"], stdout=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    result: dict[str, Any] = {}
    if sampler is not None:
        sampler.terminate()
        samples = [float(v) for v in sampler.communicate()[0].split() if v.strip()]
        result["gpu_util"] = sum(samples) / max(len(samples), 1)
    if done.returncode != 0:
        raise RuntimeError(f"superdml label failed:\n{done.stderr}")
    found = re.search(r"(\d+) superpixels in \d+ tiles .*?, (\d+) superpixels/s", done.stdout)
    if found is None:
        raise RuntimeError(f"unexpected output of superdml label:\n{done.stdout}")
    return {**result, "n": int(found[1]), "throughput": float(found[2])}


def bare_forward(spec: dict[str, Any]) -> dict[str, Any]:
    """Images/s of the checkpoint's model on one random batch (variant ``spec["variant"]``)."""
    import torch

    from superdml.learn.checkpoint import build_model_from_checkpoint, load_checkpoint

    channels_last, dtype = VARIANTS[spec["variant"]]
    device = torch.device(spec["device"])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model_from_checkpoint(load_checkpoint(spec["checkpoint"]))
    model = model.to(device, memory_format=fmt).eval()
    batch = spec.get("batch_size") or BATCH_SIZE
    shape = (batch, 3, CROP_SIZE, CROP_SIZE)
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    images = images.to(device, memory_format=fmt)

    def forward(batches: int) -> None:
        amp = torch.autocast(device.type, getattr(torch, dtype or "float32"), dtype is not None)
        with torch.inference_mode(), amp:
            for _ in range(batches):
                model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward(1)
    batches = math.ceil(spec["n"] / batch)
    start = time.perf_counter()
    forward(batches)
    return {"throughput": batches * batch / (time.perf_counter() - start)}
