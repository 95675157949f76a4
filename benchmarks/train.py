"""Training throughput: the training loop against a bare forward/backward loop.

A part of ``benchmarks/run.py``, run in a fresh process (``harness.run_case``).

``pipeline``: crops per second of :func:`superdml.learn.train._train_epoch`, the loop that
``superdml train`` runs: the PK batch sampler, the DataLoader gathering the preloaded
crops, the batched training augmentation, forward, loss, backward, the AdamW step and
the per-step schedule, on the labeled crops of the demo mosaic (``label.prepare``),
loaded as training loads them (:func:`superdml.learn.training_data.load_training_data`).

``bare``: the same network, loss and optimizer stepped on one random batch of the same
shape made before the loop (the model alone). Both at the precision training uses by
default on the device (:func:`superdml.learn.train.training_precision`), channels_last,
alternating ``rounds`` times after warm-up steps; each rate is the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Return ``throughput`` (pipeline crops/s), ``baseline`` (bare crops/s), ``batch``."""
    import torch

    from superdml.config.schema import TrainConfig
    from superdml.core.devices import resolve_device
    from superdml.learn.embed import autocast, prepare_model, to_device
    from superdml.learn.losses import get_loss
    from superdml.learn.models import build_model
    from superdml.learn.rng import seed_worker
    from superdml.learn.sampling import PKSampler
    from superdml.learn.train import (
        _train_epoch,
        build_optimizer,
        build_scheduler,
        training_precision,
    )
    from superdml.learn.training_data import load_training_data

    device = resolve_device(spec["device"])
    dtype = training_precision(spec.get("precision", "auto"), device)
    config = TrainConfig(backbone=spec["backbone"], val_fraction=0.0, warmup_epochs=0, epochs=1)
    data = load_training_data(spec["crops"], None, config)
    torch.manual_seed(0)
    model = prepare_model(build_model(config, data.bands), device)
    loss_fn = get_loss(config.loss, len(data.class_names), config.embedding_size).to(device)
    optimizer = build_optimizer(model, loss_fn, config)
    p = min(config.classes_per_batch, len(data.class_names))  # all classes when fewer
    k = config.samples_per_class
    sampler = PKSampler(data.train_labels, p, k, config.seed)
    loader = torch.utils.data.DataLoader(
        data.train, batch_sampler=sampler, worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    scheduler = build_scheduler(optimizer, config, len(sampler))
    side = config.input_size
    images = to_device(torch.randn(p * k, data.bands, side, side), device)
    labels = torch.arange(p).repeat_interleave(k).to(device)

    def bare(steps: int) -> float:
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            with autocast(device, dtype):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * p * k / (time.perf_counter() - start)

    bare(3)  # warm-up
    pipeline, baseline = [], []
    for epoch in range(spec["rounds"]):
        sampler.set_epoch(epoch)
        steps = len(sampler)
        start = time.perf_counter()
        _train_epoch(model, loss_fn, loader, optimizer, scheduler, device, dtype, "train")
        pipeline.append(steps * p * k / (time.perf_counter() - start))
        baseline.append(bare(steps))
    return {"throughput": statistics.median(pipeline), "baseline": statistics.median(baseline),
            "batch": p * k, "crops": len(data.train_labels), "dtype": str(dtype)}  # fmt: skip
