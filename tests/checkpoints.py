"""Tiny untrained checkpoints for tests that need a model's mechanics, not its accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from superdml.learn.checkpoint import save_checkpoint
from superdml.learn.models import EmbeddingNet
from superdml.learn.normalization import imagenet_statistics
from superdml.raster.classes import ClassScheme


def save_untrained_checkpoint(
    path: Path,
    class_names: Sequence[str],
    seed: int = 0,
    input_size: int = 32,
    embedding_size: int = 16,
    bands: int = 3,
    crop_rule: Mapping[str, Any] | None = None,
    class_scheme: ClassScheme | None = None,
) -> Path:
    """Save a randomly initialized resnet18 embedding net (ImageNet normalization)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = EmbeddingNet("resnet18", embedding_size, bands)
    mean, std = imagenet_statistics(bands)
    return save_checkpoint(
        path,
        model=model,
        input_size=input_size,
        class_names=class_names,
        normalization="imagenet",
        mean=mean,
        std=std,
        loss_name="proxy_anchor",
        crop_rule=crop_rule,
        class_scheme=class_scheme,
    )
