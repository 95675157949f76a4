"""Embedding crops with a model: device choice, mixed precision and batched inference.

Shared by training (validation every epoch), ``evaluate`` and ``index``. One code path
for both devices: on CUDA the model runs under bf16 autocast with channels_last inputs,
on the CPU in float32.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from superdml._private.progress import progress
from superdml.errors import ConfigError

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(device: DeviceName | str = "auto") -> torch.device:
    """Return the torch device for ``auto``, ``cpu`` or ``cuda``.

    ``auto`` is the first CUDA device when one is available, else the CPU.

    Raises
    ------
    ConfigError
        When `device` is another name, or ``cuda`` is asked for without CUDA.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                f"device: got 'cuda', but no CUDA device is available (torch {torch.__version__}"
                f", {build}): use --device cpu or --device auto"
            )
        return torch.device("cuda")
    raise ConfigError(f"device: got {device!r}, expected one of auto, cpu, cuda")


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Return the mixed-precision context: bf16 autocast on CUDA, a no-op on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(images: Tensor, device: torch.device) -> Tensor:
    """Move an ``(N, C, H, W)`` batch to `device` (channels_last on CUDA)."""
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=memory_format)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move `model` to `device` in place (channels_last weights on CUDA) and return it."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def embed_folder(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    desc: str = "embed",
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every item of a labeled dataset, in order, in batches.

    The model runs in eval mode under ``torch.inference_mode`` (its previous mode is
    restored); the DataLoader draws from a private generator, so embedding never
    advances torch's global RNG. Outputs are L2-normalized again in float32, since under
    bf16 autocast the model's own normalization leaves norms off by up to about 1e-2.

    Parameters
    ----------
    model : nn.Module
        Maps ``(N, C, S, S)`` float images to ``(N, D)`` embeddings; already on `device`.
    dataset : Dataset
        Yields ``(image, label)`` with ``(C, S, S)`` float images (the evaluation
        transform applied), e.g. :class:`~superdml.data.ImageFolderDataset`; not empty.
    batch_size : int
        Images per forward pass.
    device : torch.device or str
        Where `model` lives.
    desc : str
        Label of the progress bar.

    Returns
    -------
    embeddings : (N, D) float32 ndarray
        Unit-length rows.
    labels : (N,) int64 ndarray
    """
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    was_training = model.training
    model.eval()
    embeddings: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        with torch.inference_mode(), autocast(device):
            for images, batch_labels in progress(loader, len(loader), desc, "batch"):
                output = model(to_device(images, device)).float()
                embeddings.append(F.normalize(output, dim=1).cpu())
                labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    finally:
        model.train(was_training)
    return torch.cat(embeddings).numpy(), torch.cat(labels).numpy()
