"""Continuing a training run: ``--resume`` from its ``last.pt``, ``--init`` from another one.

:func:`resume_state` is what every ``last.pt`` records to continue from;
:func:`open_resume` checks that a resumed run is the same run (config, crops) before any
work; :func:`restore` puts model, loss, optimizer, schedule and RNGs back into the saved
state; :func:`warm_start` copies another checkpoint's weights (and the proxies of the
classes both runs share).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from superdml.config.schema import TrainConfig, config_to_dict
from superdml.core.errors import CheckpointError, ConfigError, input_error
from superdml.learn.checkpoint import Checkpoint, load_checkpoint
from superdml.learn.losses import MetricLoss, transfer_proxies
from superdml.learn.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger("superdml.learn.train")


def resume_state(
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    loader_rng: torch.Generator,
    best_score: float,
    crops: str,
) -> dict[str, Any]:
    """Return what resuming after `epoch` needs (:func:`restore` puts it back).

    Parameters
    ----------
    epoch : int
        The last finished epoch.
    optimizer : torch.optim.Optimizer
    scheduler : LambdaLR
    loader_rng : torch.Generator
        The DataLoader's generator.
    best_score : float
        The best validation score so far (that of ``best.pt``).
    crops : str
        Fingerprint of the crop folders, which :func:`open_resume` compares.

    Returns
    -------
    dict
        ``epoch``, ``optimizer``, ``scheduler``, ``rng``
        (:func:`~superdml.learn.rng.capture_rng_state`), ``loader_rng``, ``best_score``,
        ``crops``: plain values a checkpoint stores.
    """
    return {
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "loader_rng": loader_rng.get_state(),
        "best_score": float(best_score),
        "crops": crops,
    }


def open_resume(last_path: Path, config: TrainConfig, crops: str, train_dir: Path) -> Checkpoint:
    """Load ``last.pt`` for ``--resume`` and check that the run continues there.

    Parameters
    ----------
    last_path : Path
        The run's ``last.pt``.
    config : TrainConfig
        May differ from the run's only in ``epochs``, which must exceed those trained.
    crops : str
        Fingerprint of the crop folders now; the run's must be the same.
    train_dir : Path
        The training folder, named when the crops changed.

    Raises
    ------
    MissingInputError, CheckpointError
        Without ``last.pt`` or its resume state.
    ConfigError
        On another config, or a run that has already trained ``config.epochs``.
    InputError
        When the crops changed since the run started.
    """
    if not last_path.is_file():
        raise input_error(last_path, "no such file: nothing to resume (drop --resume)")
    ckpt = load_checkpoint(last_path)
    if ckpt.resume is None:
        raise CheckpointError(f"{last_path}: has no resume state")
    _check_same_run(config, ckpt)
    if ckpt.resume["epoch"] >= config.epochs:
        raise ConfigError(
            f"{last_path}: already trained {ckpt.resume['epoch']} of {config.epochs} "
            "epochs: pass --epochs N with a larger N to train further"
        )
    if ckpt.resume.get("crops") != crops:
        raise input_error(
            train_dir,
            f"crops changed since the run in {last_path.parent} started: resuming would mix "
            "two training sets; start a new run (--init with its last.pt keeps its weights)",
        )
    return ckpt


def _check_same_run(config: TrainConfig, ckpt: Checkpoint) -> None:
    """Refuse to resume with a config that differs in anything but ``epochs``."""
    saved = ckpt.train_config
    for key, value in config_to_dict(config).items():
        if key != "epochs" and saved.get(key) != value:
            raise ConfigError(
                f"{ckpt.path}: the run was trained with {key}={saved.get(key)!r}, got "
                f"{value!r}; --resume continues the same run (only epochs may change): "
                "drop the option, or start a new run with --init"
            )


def _check_init(ckpt: Checkpoint, config: TrainConfig, bands: int) -> None:
    """Refuse a warm start from a checkpoint whose network does not fit `config`."""
    theirs = (ckpt.backbone, ckpt.embedding_size, ckpt.bands)
    ours = (config.backbone, config.embedding_size, bands)
    if theirs != ours:
        raise CheckpointError(
            f"{ckpt.path}: a {theirs[0]} with embedding size {theirs[1]} on {theirs[2]} "
            f"bands cannot warm-start a {ours[0]} with embedding size {ours[1]} on "
            f"{ours[2]} bands: match backbone and embedding_size in the config"
        )


def _load_weights(module: nn.Module, state: dict[str, Tensor], ckpt: Checkpoint) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt.path}: weights do not fit ({detail})") from None


def warm_start(
    ckpt: Checkpoint,
    model: nn.Module,
    loss_fn: MetricLoss,
    config: TrainConfig,
    bands: int,
    class_names: Sequence[str],
) -> None:
    """Start `model` (and, with the same loss, the shared classes' proxies) from `ckpt`.

    Parameters
    ----------
    ckpt : Checkpoint
        The ``--init`` checkpoint: same backbone, embedding size and band count.
    model : nn.Module
        The new run's network, given `ckpt`'s weights.
    loss_fn : MetricLoss
        The new run's loss; with `ckpt`'s loss, proxies of classes in both class lists
        are copied and new classes keep freshly initialized ones.
    config : TrainConfig
    bands : int
        Bands of the new run's crops.
    class_names : sequence of str
        The new run's classes.

    Raises
    ------
    CheckpointError
        When `ckpt`'s network does not fit.
    """
    _check_init(ckpt, config, bands)
    _load_weights(model, ckpt.state_dict, ckpt)
    if ckpt.loss_name != config.loss:
        logger.info("%s: trained with %s, new %s proxies", ckpt.path, ckpt.loss_name, config.loss)
        return
    names = list(class_names)
    shared = transfer_proxies(ckpt.loss_state, ckpt.class_names, loss_fn, names)
    fresh = [c for c in names if c not in shared]
    logger.info("%s: proxies kept for %s; new for %s", ckpt.path, shared, fresh)


def restore(
    ckpt: Checkpoint,
    model: nn.Module,
    loss_fn: MetricLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    loader_rng: torch.Generator,
) -> tuple[int, float]:
    """Put a run back into the state of `ckpt`; return its epoch and best score.

    Restores the weights, the loss's parameters, optimizer, schedule (its learning rate
    on the schedule of the possibly new ``epochs``), every RNG and the DataLoader's
    generator.
    """
    state = ckpt.resume
    if state is None:
        raise CheckpointError(f"{ckpt.path}: has no resume state")
    _load_weights(model, ckpt.state_dict, ckpt)
    _load_weights(loss_fn, ckpt.loss_state, ckpt)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # the learning rate of the next step, on the schedule of the (possibly new) epochs
    for group, base_lr, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    restore_rng_state(state["rng"])
    loader_rng.set_state(state["loader_rng"])
    return int(state["epoch"]), float(state["best_score"])
