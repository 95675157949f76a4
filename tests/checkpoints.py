"""Tiny untrained checkpoints for tests that need a model's mechanics, not its accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from superdml.checkpoint import save_checkpoint
from superdml.data import imagenet_statistics
from superdml.models import EmbeddingNet


def save_untrained_checkpoint(
    path: Path,
    class_names: Sequence[str],
    seed: int = 0,
    input_size: int = 32,
    embedding_size: int = 16,
    bands: int = 3,
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
    )
