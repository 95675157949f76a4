"""Training: the metric-learning loop, its checkpoints, logs and resume.

``train(train_dir, out_dir, config)`` writes into `out_dir`:

``train.yaml``
    The effective :class:`~superdml.config.schema.TrainConfig`.
``metrics.csv``
    One row per epoch: ``epoch``, ``train_loss`` (mean over the epoch's batches), ``lr``
    (the network's learning rate at the end of the epoch), every validation metric
    of :func:`~superdml.learn.metrics.retrieval_metrics`, ``seconds``.
``tb/``
    The same values as TensorBoard scalars, when tensorboard is installed.
``last.pt``
    Checkpoint after every epoch, with the resume state (optimizer, scheduler, epoch,
    RNG states).
``best.pt``
    Checkpoint of the epoch with the highest validation ``map_at_r`` (without a
    validation set: the latest epoch); no resume state.

Choices:

- **Validation**: after every epoch the validation crops (``--val-dir``, or a stratified
  ``val_fraction`` of the training folder held out with the config's seed) are queries
  and the training crops are the references, both embedded without augmentation. This
  is how labeling works later (new crops against labeled references), and small
  validation sets still get meaningful precision@1.
- **Optimizer**: AdamW with two parameter groups: the network at ``lr`` and the loss's
  learned proxies / centers at ``proxy_lr`` (both with ``weight_decay``), fused on the
  CPU and CUDA.
- **Schedule**: stepped per batch: linear warm-up over ``warmup_epochs`` epochs, then a
  cosine decay towards 0 at the end of ``epochs``. The steps per epoch are those of the
  first epoch (the PK sampler's batch count can differ by one or two between epochs;
  the factor is clamped at the end).
- **Devices**: one code path, channels_last, with bf16 autocast on CUDA and float32 on
  the CPU by default (:func:`training_precision`).
- **Determinism**: the seed drives the split, the PK sampler (per epoch), the weight and
  proxy initialization and the augmentation (torch's global RNG with ``num_workers=0``;
  worker ``w`` of epoch e is seeded from a generator stored in the resume state). The
  same seed gives the same weights on the same machine (bitwise on the CPU).
- **Resume** restores model, loss parameters, optimizer, scheduler, epoch, every RNG and
  the metrics history, so an interrupted run continued with ``resume=True`` ends with
  the weights of an uninterrupted one. Only ``epochs`` may change on resume (the cosine
  schedule then stretches to the new end from the current step on). Resume and warm
  start live in :mod:`superdml.learn.resume`.
- **Warm start** (``init``): the model weights of another checkpoint (same backbone,
  embedding size and band count); with the same loss, the proxies of classes present in
  both class lists are copied and new classes keep freshly initialized ones.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from superdml.config.schema import Precision, TrainConfig, dump_config
from superdml.config.shipped import loss_config_path
from superdml.core.devices import resolve_device
from superdml.core.errors import CheckpointError, ConfigError, input_error
from superdml.core.ownership import check_apart, claim_output
from superdml.core.progress import progress
from superdml.core.provenance import combine, fingerprint
from superdml.learn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from superdml.learn.embed import Embedder, autocast, prepare_model, resolve_precision, to_device
from superdml.learn.losses import MetricLoss, get_loss
from superdml.learn.metrics import retrieval_metrics
from superdml.learn.models import EmbeddingNet, build_model
from superdml.learn.resume import open_resume, restore, resume_state, warm_start
from superdml.learn.rng import seed_everything, seed_worker
from superdml.learn.sampling import PKSampler
from superdml.learn.train_log import EpochLog
from superdml.learn.training_data import TrainingData, load_training_data
from superdml.raster.classes import folder_scheme

logger = logging.getLogger(__name__)

BEST = "best.pt"
LAST = "last.pt"
METRICS_CSV = "metrics.csv"
CONFIG_YAML = "train.yaml"
TENSORBOARD_DIR = "tb"
TRAIN_FILES = (BEST, LAST, METRICS_CSV, CONFIG_YAML, f"{TENSORBOARD_DIR}/*")
"""What ``train`` writes into its folder (a pipeline rerun replaces only a folder of these)."""
SELECTION_METRIC = "map_at_r"
EMBED_BATCH_SIZE = 256


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` wrote and how the run ended.

    Attributes
    ----------
    out_dir : Path
    best_path, last_path : Path
        ``best.pt`` (highest validation ``map_at_r``) and ``last.pt`` (latest epoch).
    metrics_path : Path
        ``metrics.csv``.
    epochs_run : int
        Epochs trained by this call (fewer than ``config.epochs`` after a resume).
    metrics : dict of str to float
        The last epoch's row of ``metrics.csv``.
    seconds : float
        Wall time of the call.
    """

    out_dir: Path
    best_path: Path
    last_path: Path
    metrics_path: Path
    epochs_run: int
    metrics: dict[str, float]
    seconds: float


def training_config_path(
    config_path: str | os.PathLike[str] | None,
    loss: str | None,
    out_dir: str | os.PathLike[str],
    resume: bool,
) -> Path | None:
    """Return the YAML a ``superdml train`` run starts from, or None for the defaults.

    In order: `config_path`; with `resume`, the run's own ``out_dir/train.yaml``; the
    shipped ``configs/losses/<loss>.yaml``; None (:class:`TrainConfig` defaults).
    """
    if config_path is not None:
        return Path(config_path)
    saved = Path(out_dir) / CONFIG_YAML
    if resume and saved.is_file():
        return saved
    return loss_config_path(loss)


# ------------------------------------------------------------------ pure functions


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Return the learning-rate multiplier of optimizer step `step`.

    Parameters
    ----------
    step : int
        0-based optimizer step.
    warmup_steps : int
        Steps of linear warm-up: step s gets ``(s + 1) / warmup_steps``.
    total_steps : int
        Steps of the whole run; after the warm-up a half cosine goes from 1 down to 0
        at `total_steps` (and stays at 0 beyond).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def build_optimizer(model: nn.Module, loss: MetricLoss, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the network (``lr``) and the loss's proxies / centers (``proxy_lr``).

    Fused (one kernel over every parameter) on the CPU and CUDA: a ResNet-18 step takes
    23 ms instead of 100 ms on one CPU thread.
    """
    groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "lr": config.lr}]
    if loss.has_parameters:
        groups.append({"params": list(loss.parameters()), "lr": config.proxy_lr})
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> LambdaLR:
    """Per-step warm-up + cosine schedule (see :func:`lr_factor`) over ``config.epochs``."""
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


# --------------------------------------------------------------------- the loop


def training_precision(precision: Precision | str, device: torch.device) -> torch.dtype:
    """Return the autocast dtype of training on `device`.

    ``auto`` is bf16 on a CUDA device that computes it and float32 on the CPU, also one
    with bf16 instructions: there bf16 autocast trained several times slower than
    float32 (``benchmarks/README.md``).
    ``fp32`` and ``bf16`` force one (:func:`~superdml.learn.embed.resolve_precision`).
    """
    if precision == "auto" and device.type == "cpu":
        return torch.float32
    return resolve_precision(precision, device)


def _train_epoch(
    model: nn.Module,
    loss_fn: MetricLoss,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    device: torch.device,
    dtype: torch.dtype,
    desc: str,
) -> float:
    """Run one epoch of optimizer steps; return the mean batch loss."""
    model.train()
    total = torch.zeros((), device=device)
    steps = 0
    for images, labels in progress(loader, len(loader), desc, "batch"):
        images = to_device(images, device)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, dtype):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach()
        steps += 1
    return float(total) / max(steps, 1)


def _validate(embedder: Embedder, data: TrainingData) -> dict[str, float]:
    """Return retrieval metrics of the validation crops against the training crops.

    `embedder` wraps the model being trained, so validation embeds crops exactly as
    ``index`` and ``label`` will with the saved checkpoint.
    """
    if data.val is None or data.val_classes is None:
        return {}
    ref_emb, ref_labels = embedder.embed_dataset(data.references, EMBED_BATCH_SIZE, "refs")
    val_emb, val_labels = embedder.embed_dataset(data.val, EMBED_BATCH_SIZE, "val")
    metrics = retrieval_metrics(val_emb, data.val_classes[val_labels], ref_emb, ref_labels)
    return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------- the stage


def train(
    train_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    val_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    init: str | os.PathLike[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> TrainResult:
    """Train an embedding network on labeled crop folders (see the module docstring).

    Parameters
    ----------
    train_dir : path
        ``<class>/<image>`` folders of labeled crops; a ``crops.parquet`` there (or one
        level up) supplies the crop rule stored in the checkpoints.
    out_dir : path
        Folder for checkpoints and logs (created).
    config : TrainConfig
        Every hyper-parameter.
    val_dir : path, optional
        Validation crops (classes: a subset of the training classes); without it a
        stratified ``config.val_fraction`` of `train_dir` is held out.
    resume : bool
        Continue the run in `out_dir` from its ``last.pt``.
    init : path, optional
        Checkpoint to warm-start from (its classes may differ).
    device : {"auto", "cpu", "cuda"}
    precision : {"auto", "fp32", "bf16"}
        Arithmetic of the forward and backward passes (:func:`training_precision`).

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        On an unusable device or precision, an invalid loss, a config that differs from
        the resumed run's, or a run that has already reached ``config.epochs``.
    InputError, MissingInputError
        On unusable crop folders (no images, one class, an empty class folder), an
        `out_dir` that already holds a run (without `resume`), or a missing ``last.pt``.
    CheckpointError
        When `init` or ``last.pt`` is not a superdml checkpoint or does not fit.
    """
    start_time = time.perf_counter()
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    val_dir = Path(val_dir) if val_dir is not None else None
    dev = resolve_device(device)
    dtype = training_precision(precision, dev)
    if resume and init is not None:
        raise ConfigError("--resume and --init: a resumed run keeps its own start; pass one")
    get_loss(config.loss, 2, config.embedding_size, **config.loss_params)  # check early
    check_apart(out_dir, [p for p in (train_dir, val_dir, init) if p is not None])
    with claim_output(out_dir, "train"):
        return _train(train_dir, out_dir, config, val_dir, resume, init, dev, dtype, start_time)


def _train(
    train_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    val_dir: Path | None,
    resume: bool,
    init: str | os.PathLike[str] | None,
    dev: torch.device,
    dtype: torch.dtype,
    start_time: float,
) -> TrainResult:
    """Run :func:`train` in its claimed output folder."""
    last_path, best_path = out_dir / LAST, out_dir / BEST
    crops = combine(fingerprint(train_dir), None if val_dir is None else fingerprint(val_dir))
    ckpt = open_resume(last_path, config, crops, train_dir) if resume else None
    if not resume and last_path.exists():
        raise input_error(
            last_path, "a training run is already here: pass --resume, or choose another --out"
        )
    init_ckpt = load_checkpoint(init) if init is not None else None
    stats = (ckpt.mean, ckpt.std) if ckpt is not None else None
    data = load_training_data(train_dir, val_dir, config, stats)
    if ckpt is not None and ckpt.class_names != data.class_names:
        raise CheckpointError(
            f"{last_path}: trained on classes {ckpt.class_names}, {train_dir} has "
            f"{data.class_names}: resume with the same folder, or start a new run with --init"
        )
    # codes of classes that stay are kept on retraining; classes.yaml in the folder rules
    previous = ckpt or init_ckpt
    scheme = folder_scheme(
        train_dir, data.class_names, None if previous is None else previous.class_scheme
    )
    run = _Run.start(config, data, dev, dtype, init_ckpt)
    start_epoch, best_score = 0, -math.inf
    if ckpt is not None:
        start_epoch, best_score = restore(
            ckpt, run.model, run.loss_fn, run.optimizer, run.scheduler, run.loader_rng
        )
    dump_config(config, out_dir / CONFIG_YAML)
    log = EpochLog(out_dir / METRICS_CSV, out_dir / TENSORBOARD_DIR, start_epoch)
    save = functools.partial(
        save_checkpoint,
        model=run.model,
        input_size=config.input_size,
        class_names=data.class_names,
        normalization=config.normalization,
        mean=data.mean,
        std=data.std,
        loss_name=config.loss,
        loss_params=run.loss_fn.hyperparameters,
        train_config=config,
        crop_rule=data.crop_rule,
        class_scheme=scheme,
    )
    row: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, config.epochs):
            row, metrics = run.epoch(epoch, config.epochs, data)
            log.append(row, metrics)
            ckpt_metrics = {"epoch": epoch + 1, "train_loss": row["train_loss"], **metrics}
            score = metrics.get(SELECTION_METRIC, math.inf)
            if score > best_score or not metrics:
                best_score = score
                save(best_path, metrics=ckpt_metrics, loss_state=run.loss_fn.state_dict())
            resume_info = resume_state(
                epoch + 1, run.optimizer, run.scheduler, run.loader_rng, best_score, crops
            )
            save(last_path, metrics=ckpt_metrics, loss_state=run.loss_fn.state_dict(),
                 resume=resume_info)  # fmt: skip
    finally:
        log.close()
    return TrainResult(
        out_dir=out_dir,
        best_path=best_path,
        last_path=last_path,
        metrics_path=out_dir / METRICS_CSV,
        epochs_run=config.epochs - start_epoch,
        metrics={k: float(v) for k, v in row.items()},
        seconds=time.perf_counter() - start_time,
    )


@dataclass
class _Run:
    """The moving parts of a training run: network, loss, data loader, optimizer."""

    model: EmbeddingNet
    loss_fn: MetricLoss
    embedder: Embedder
    sampler: PKSampler
    loader: DataLoader
    loader_rng: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        data: TrainingData,
        dev: torch.device,
        dtype: torch.dtype,
        init: Checkpoint | None,
    ) -> _Run:
        """Build everything from `config`'s seed, warm-started from `init` when given."""
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        seed_everything(config.seed)
        model = build_model(config, data.bands)
        loss_fn = get_loss(
            config.loss, len(data.class_names), config.embedding_size, **config.loss_params
        )
        if init is not None:
            warm_start(init, model, loss_fn, config, data.bands, data.class_names)
        prepare_model(model, dev)
        loss_fn.to(dev)
        embedder = Embedder(model, config.input_size, data.mean, data.std, dev, dtype)
        sampler = PKSampler(
            data.train_labels, config.classes_per_batch, config.samples_per_class, config.seed
        )
        loader_rng = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(
            data.train,
            batch_sampler=sampler,
            num_workers=config.num_workers,
            worker_init_fn=seed_worker,
            generator=loader_rng,
            pin_memory=dev.type == "cuda",
        )
        optimizer = build_optimizer(model, loss_fn, config)
        scheduler = build_scheduler(optimizer, config, len(sampler))  # epoch 0's batch count
        return cls(
            model, loss_fn, embedder, sampler, loader, loader_rng, optimizer, scheduler, dev, dtype
        )

    def epoch(
        self, epoch: int, epochs: int, data: TrainingData
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Train epoch `epoch` (0-based) and validate; return its log row and the metrics.

        Raises
        ------
        ConfigError
            When the loss is no longer finite (the learning rates are too high).
        """
        epoch_start = time.perf_counter()
        self.sampler.set_epoch(epoch)
        desc = f"epoch {epoch + 1}/{epochs}"
        parts = (self.model, self.loss_fn, self.loader, self.optimizer, self.scheduler)
        train_loss = _train_epoch(*parts, self.device, self.dtype, desc)
        if not math.isfinite(train_loss):
            raise ConfigError(
                f"lr: training diverged in epoch {epoch + 1} (loss {train_loss}): "
                "lower lr or proxy_lr"
            )
        metrics = _validate(self.embedder, data)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            **metrics,
            "seconds": time.perf_counter() - epoch_start,
        }
        logger.info(
            "%s: loss %.4f, %s %.4f (%.1f s)",
            desc,
            train_loss,
            SELECTION_METRIC,
            metrics.get(SELECTION_METRIC, math.nan),
            row["seconds"],
        )
        return row, metrics
