"""Embedding crops with a model: device, precision and batched inference.

The one inference path of every stage: training's validation, ``evaluate``, ``infer``
and ``index`` embed datasets with :func:`embed_folder`, ``label`` and ``review`` embed
uint8 crops with :class:`Embedder`. Both run the model with channels_last tensors and,
where the hardware computes bf16 (CUDA, or a CPU with AVX-512 BF16 or AMX), under bf16
autocast; elsewhere in float32 (:func:`resolve_precision`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from superdml._private.progress import progress
from superdml.config import Precision
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


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX-512 BF16 or AMX-BF16 instructions.

    Read from the cpuinfo library torch is built with (the ``avx512_bf16``/``amx_bf16``
    flags of ``/proc/cpuinfo`` on Linux). Without them oneDNN emulates bf16, slower than
    float32.
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: Precision | str, device: torch.device) -> torch.dtype:
    """Return the autocast dtype of inference on `device`: ``torch.bfloat16`` or ``float32``.

    ``auto`` is bf16 where the hardware computes it (a CUDA device with bf16 support,
    a CPU with :func:`cpu_has_bf16`), float32 elsewhere; ``fp32`` and ``bf16`` force one.

    Raises
    ------
    ConfigError
        On another name, or ``bf16`` where the device has no bf16 arithmetic.
    """
    if precision not in get_args(Precision):
        expected = ", ".join(get_args(Precision))
        raise ConfigError(f"precision: got {precision!r}, expected one of {expected}")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
        where = f"{torch.cuda.get_device_name(device)} has no bf16 arithmetic"
    else:
        supported = cpu_has_bf16()
        where = "this CPU has no bf16 instructions (AVX-512 BF16 or AMX)"
    if precision == "fp32" or (precision == "auto" and not supported):
        return torch.float32
    if not supported:
        raise ConfigError(f"precision: got 'bf16', but {where}: use --precision auto or fp32")
    return torch.bfloat16


def autocast(
    device: torch.device, dtype: torch.dtype = torch.float32
) -> contextlib.AbstractContextManager[None]:
    """Return the mixed-precision context: autocast to `dtype`, a no-op for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def to_device(images: Tensor, device: torch.device) -> Tensor:
    """Move an ``(N, C, H, W)`` batch to `device` as channels_last (faster convolutions)."""
    return images.to(device, non_blocking=True, memory_format=torch.channels_last)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move `model` to `device` in place with channels_last weights and return it."""
    return model.to(device).to(memory_format=torch.channels_last)


def embed_folder(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    desc: str = "embed",
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every item of a labeled dataset, in order, in batches.

    The model runs in eval mode under ``torch.inference_mode`` (its previous mode is
    restored); the DataLoader draws from a private generator, so embedding never
    advances torch's global RNG. Outputs are L2-normalized again in float32, since under
    bf16 autocast the model's own normalization leaves norms off by up to about 1e-2.

    Parameters
    ----------
    model : nn.Module
        Maps ``(N, C, S, S)`` float images to ``(N, D)`` embeddings; already on `device`
        (:func:`prepare_model`).
    dataset : Dataset
        Yields ``(image, label)`` with ``(C, S, S)`` float images (the evaluation
        transform applied), e.g. :class:`~superdml.data.ImageFolderDataset`; not empty.
    batch_size : int
        Images per forward pass.
    device : torch.device or str
        Where `model` lives.
    desc : str
        Label of the progress bar.
    dtype : torch.dtype
        Autocast dtype (:func:`resolve_precision`).

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
        with torch.inference_mode(), autocast(device, dtype):
            for images, batch_labels in progress(loader, len(loader), desc, "batch"):
                output = model(to_device(images, device)).float()
                embeddings.append(F.normalize(output, dim=1).cpu())
                labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    finally:
        model.train(was_training)
    return torch.cat(embeddings).numpy(), torch.cat(labels).numpy()


class Embedder:
    """A checkpoint's model ready for inference on uint8 crops.

    Threads of one process share it: one forward runs at a time (a lock), so a second
    thread reads and crops the next tile while the model embeds the current one, and
    the forwards never compete for the cores.

    Parameters
    ----------
    checkpoint : path
    device : str
        ``cpu`` or ``cuda``.
    precision : {"auto", "fp32", "bf16"}
        See :func:`resolve_precision`.
    """

    def __init__(
        self, checkpoint: str | Path, device: str, precision: Precision | str = "auto"
    ) -> None:
        from superdml.checkpoint import build_model_from_checkpoint, load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        self.device = torch.device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.model = prepare_model(build_model_from_checkpoint(ckpt), self.device).eval()
        self.input_size = ckpt.input_size
        self.bands = ckpt.bands
        self.mean = torch.tensor(ckpt.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(ckpt.std, device=self.device).view(1, -1, 1, 1)
        self._lock = threading.Lock()

    def __call__(self, crops: np.ndarray, batch_size: int) -> np.ndarray:
        """Embed crops in batches of `batch_size` (on CUDA the last one padded to it).

        Parameters
        ----------
        crops : (N, C, H, W) uint8 ndarray
        batch_size : int

        Returns
        -------
        (N, D) float32 ndarray, L2-normalized
        """
        from torchvision.transforms.v2 import functional as TF

        cuda = self.device.type == "cuda"
        out = []
        with self._lock, torch.inference_mode(), autocast(self.device, self.dtype):
            for start in range(0, len(crops), batch_size):
                batch = torch.from_numpy(crops[start : start + batch_size])
                n = batch.shape[0]
                if cuda and n < batch_size:  # fixed shapes for cuDNN; on the CPU padding only costs
                    pad = batch.new_zeros((batch_size - n, *batch.shape[1:]))
                    batch = torch.cat([batch, pad])
                if cuda:
                    batch = batch.pin_memory()
                x = batch.to(self.device, non_blocking=True)
                if x.shape[-1] != self.input_size:
                    x = TF.resize(x, [self.input_size] * 2, antialias=True)
                x = ((x.float() / 255.0 - self.mean) / self.std).contiguous(
                    memory_format=torch.channels_last
                )
                out.append(F.normalize(self.model(x)[:n].float(), dim=1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
