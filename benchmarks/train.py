"""Training throughput: the whole training step against a bare forward/backward loop.

What it measures
----------------
``pipeline``: crops per second of :func:`superdml.train._train_epoch`, the loop that
``superdml train`` runs: the PK batch sampler, the DataLoader gathering preloaded crops,
the batched training augmentation (random resized crop, flips, 90-degree rotations,
color jitter, normalization), the forward pass, the loss, backward, the AdamW step
(network and proxy groups) and the per-step schedule. The crops are PNG files written
by this script (``--size`` px squares cut from scikit-image's textures and photos, in
``--classes`` class folders) and loaded the way training loads them
(:func:`superdml.train._load_data`: decoded and resized once into a uint8 tensor).

``bare``: the same network, loss and optimizer stepped on random tensors of the same
shape (``(P*K, 3, size, size)`` float32 images, labels of P classes x K samples) that
are made once before the loop, so it measures the model alone.

``data only``: the pipeline's batches (sampler, gather, augmentation) without the
model, for scale.

All run in the same process, on the CPU, after warm-up steps, alternating ``--rounds``
times (the machine is shared: only figures of one run compare); the table shows the
median crops/second of each and their ratio. The data pipeline is not the bottleneck
when ``pipeline / bare`` is close to 1 (the target is >= 0.8).

Run ``python benchmarks/train.py --help`` for the options; results are in
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from superdml.config import TrainConfig
from superdml.data import PKSampler
from superdml.embed import autocast, resolve_device
from superdml.losses import get_loss
from superdml.models import build_model
from superdml.train import (
    _load_data,
    _seed_worker,
    _train_epoch,
    build_optimizer,
    build_scheduler,
)

SOURCES = {
    "brick": skdata.brick,
    "grass": skdata.grass,
    "gravel": skdata.gravel,
    "camera": skdata.camera,
    "astronaut": skdata.astronaut,
    "coffee": skdata.coffee,
    "chelsea": skdata.chelsea,
    "rocket": skdata.rocket,
    "hubble": skdata.hubble_deep_field,
    "moon": skdata.moon,
}


def write_crops(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """Write ``per_class`` random ``size`` px RGB PNG crops of `classes` sources."""
    if classes > len(SOURCES):
        sys.exit(f"--classes: at most {len(SOURCES)}")
    rng = np.random.default_rng(seed)
    for name, load in list(SOURCES.items())[:classes]:
        image = load()
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        folder = root / name
        folder.mkdir(parents=True)
        rows = rng.integers(0, image.shape[0] - size + 1, per_class)
        cols = rng.integers(0, image.shape[1] - size + 1, per_class)
        for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
            crop = np.ascontiguousarray(image[r : r + size, c : c + size, :3])
            Image.fromarray(crop).save(folder / f"{name}_{i:04d}.png")
    return root


def bare_steps(model, loss_fn, optimizer, images, labels, steps: int, device) -> float:
    """Seconds for `steps` forward/backward/AdamW steps on the same random batch."""
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(device):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per timing")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timings of each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--classes", type=int, default=8, help="P, classes per batch")
    parser.add_argument("--samples", type=int, default=8, help="K, samples per class")
    parser.add_argument("--size", type=int, default=64, help="crop and input side, px")
    parser.add_argument("--loss", default="proxy_anchor")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device("cpu")
    config = TrainConfig(
        input_size=args.size,
        classes_per_batch=args.classes,
        samples_per_class=args.samples,
        loss=args.loss,
        val_fraction=0.0,
        num_workers=args.workers,
        warmup_epochs=0,
        epochs=1,
    )
    batch = args.classes * args.samples
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = write_crops(Path(tmp), args.classes, args.samples * args.steps, args.size)
        written = time.perf_counter() - start
        start = time.perf_counter()
        data = _load_data(folder, None, config)
        loaded = time.perf_counter() - start
    torch.manual_seed(0)
    model = build_model(config, data.bands)
    loss_fn = get_loss(config.loss, len(data.class_names), config.embedding_size)
    optimizer = build_optimizer(model, loss_fn, config)
    sampler = PKSampler(data.train_labels, args.classes, args.samples, config.seed)
    loader = torch.utils.data.DataLoader(
        data.train,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(0),
    )
    scheduler = build_scheduler(optimizer, config, len(sampler))
    images = torch.randn(batch, data.bands, args.size, args.size)
    labels = torch.arange(args.classes).repeat_interleave(args.samples)
    bare_steps(model, loss_fn, optimizer, images, labels, args.warmup, device)

    bare, pipeline, data_only = [], [], []
    for epoch in range(args.rounds):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        crops = sum(len(labels_) for _, labels_ in loader)
        data_only.append(crops / (time.perf_counter() - start))
        bare.append(args.steps * batch / bare_steps(
            model, loss_fn, optimizer, images, labels, args.steps, device
        ))  # fmt: skip
        steps = len(sampler)
        start = time.perf_counter()
        _train_epoch(model, loss_fn, loader, optimizer, scheduler, device, "pipeline")
        pipeline.append(steps * batch / (time.perf_counter() - start))

    bare_rate, pipeline_rate = statistics.median(bare), statistics.median(pipeline)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, ResNet-18 at {args.size} px, batch {batch} "
        f"({args.classes} x {args.samples}), loss {args.loss}, {args.workers} workers"
    )
    print(
        f"# {len(data.train_labels)} crops: written in {written:.1f} s, decoded and "
        f"preloaded in {loaded:.1f} s"
    )
    print(f"{'loop':<10} {'crops/s (median)':>17} {'per round':>24}")
    print(f"{'bare':<10} {bare_rate:>17.1f} {' '.join(f'{r:.1f}' for r in bare):>24}")
    print(f"{'pipeline':<10} {pipeline_rate:>17.1f} {' '.join(f'{r:.1f}' for r in pipeline):>24}")
    print(
        f"{'data only':<10} {statistics.median(data_only):>17.1f} "
        f"{' '.join(f'{r:.0f}' for r in data_only):>24}"
    )
    print(f"{'ratio':<10} {pipeline_rate / bare_rate:>17.2f}   (pipeline / bare)")


if __name__ == "__main__":
    main()
