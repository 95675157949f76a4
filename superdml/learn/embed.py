"""Embedding crops with a model: device, precision and batched inference.

:class:`Embedder` is the one inference path of every stage: ``index``, ``label``,
``infer``, ``evaluate``, ``review`` and training's validation embed uint8 crops through
it (arrays, or datasets of uint8 images), with one preprocessing. It runs the model with
channels_last tensors and, where the hardware computes bf16 (CUDA, or a CPU with AVX-512
BF16 or AMX), under bf16 autocast; elsewhere in float32 (:func:`resolve_precision`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from superdml.config.schema import TTA, Precision
from superdml.core import storage
from superdml.core.cache import ProcessCache
from superdml.core.errors import CheckpointError, ConfigError
from superdml.core.progress import progress
from superdml.core.provenance import sha256_file

if TYPE_CHECKING:
    from superdml.learn.checkpoint import Checkpoint


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


class Embedder:
    """A model ready to embed uint8 crops: the one inference path of every stage.

    ``index``, ``label``, ``infer``, ``evaluate``, ``review`` and training's validation
    all embed through it, so a crop gets the same vector whichever stage embeds it.
    Each batch is resized to the input size when its crops have another size
    (antialiased, on uint8), scaled to [0, 1] as ``x.float() / 255``, normalized per
    band, made channels_last and run through the model in eval mode under
    ``torch.inference_mode`` and autocast to `dtype`; the outputs are L2-normalized
    again in float32 (under bf16 the model's own normalization leaves norms off by up
    to about 1e-2). A model in training mode gets it back afterwards.

    Rows do not depend on the other crops of their batch, only on the batch's size: on
    the CPU a batch of fewer than about 16 crops runs the linear head through another
    matrix-multiply kernel, whose rows differ in the last bits (up to about 1e-6). On
    CUDA every batch is padded to `batch_size`, fixed shapes for cuDNN.

    Threads of one process share an Embedder: one forward runs at a time (a lock), so
    a second thread reads and crops the next tile while the model embeds the current
    one, and the forwards never compete for the cores.

    Parameters
    ----------
    model : nn.Module
        Maps ``(N, C, S, S)`` normalized float images to ``(N, D)`` embeddings; moved to
        `device` as channels_last (:func:`prepare_model`).
    input_size : int
        S.
    mean, std : sequence of float
        Per-band normalization of pixels scaled to [0, 1].
    device : torch.device or str
    dtype : torch.dtype
        Autocast dtype (:func:`resolve_precision`).
    tta : {"none", "d4"}
        Test-time augmentation: ``d4`` embeds each crop as the L2-normalized mean of the
        normalized embeddings of its 8 flips and rotations (8 forwards per batch, one
        after the other, so memory stays that of one batch). The embedding is then the
        same for a crop and any of its flips or rotations (up to float rounding).
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        tta: TTA | str = "none",
    ) -> None:
        if tta not in get_args(TTA):
            raise ConfigError(f"tta: got {tta!r}, expected one of " + ", ".join(get_args(TTA)))
        self.device = torch.device(device)
        self.dtype = dtype
        self.tta = tta
        self.model = prepare_model(model, self.device)
        self.input_size = input_size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | Checkpoint,
        device: torch.device | str,
        precision: Precision | str = "auto",
        tta: TTA | str = "none",
    ) -> Embedder:
        """Return the Embedder of a checkpoint: its model, input size and normalization.

        Parameters
        ----------
        checkpoint : path or Checkpoint
            A ``superdml train`` checkpoint, or one already loaded.
        device : torch.device or str
            ``cpu`` or ``cuda``.
        precision : {"auto", "fp32", "bf16"}
            See :func:`resolve_precision`.
        tta : {"none", "d4"}
            Test-time augmentation (see the class docstring).
        """
        from superdml.learn.checkpoint import (
            Checkpoint,
            build_model_from_checkpoint,
            load_checkpoint,
        )

        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        dev = torch.device(device)
        model = build_model_from_checkpoint(ckpt)
        dtype = resolve_precision(precision, dev)
        return cls(model, ckpt.input_size, ckpt.mean, ckpt.std, dev, dtype, tta)

    def _forward(self, batch: Tensor, batch_size: int) -> Tensor:
        """Embed one ``(n, C, H, W)`` CPU batch (uint8 or rule-scaled float), n <= `batch_size`."""
        from torchvision.transforms.v2 import functional as TF

        n = batch.shape[0]
        if self.device.type == "cuda":
            if n < batch_size:  # fixed shapes for cuDNN; on the CPU padding only costs
                batch = torch.cat([batch, batch.new_zeros((batch_size - n, *batch.shape[1:]))])
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=True)
        if x.dtype != torch.uint8:  # lossless crops, already in [0, 1] units (CropRule.to_unit)
            x = x.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = TF.resize(x, [self.input_size] * 2, antialias=True)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if self.tta == "none":
            return F.normalize(self.model(x)[:n].float(), dim=1).cpu()
        total = torch.zeros((), device=self.device)
        for turns in range(4):  # the 8 elements of D4: 4 rotations, each also mirrored
            turned = torch.rot90(x, turns, dims=(-2, -1))
            for view in (turned, turned.flip(-1)):
                out = self.model(view.contiguous(memory_format=torch.channels_last))
                total = total + F.normalize(out[:n].float(), dim=1)
        return F.normalize(total, dim=1).cpu()

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Hold the lock, with the model in eval mode (its mode restored after)."""
        with self._lock:
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.inference_mode(), autocast(self.device, self.dtype):
                    yield
            finally:
                self.model.train(was_training)

    def __call__(self, crops: np.ndarray | Tensor, batch_size: int) -> np.ndarray:
        """Embed crops in batches of `batch_size`.

        Parameters
        ----------
        crops : (N, C, H, W) uint8 ndarray or Tensor
            Or float32 in the model's units: lossless crops through
            :meth:`CropRule.to_unit <superdml.crops.rule.CropRule.to_unit>`.
        batch_size : int

        Returns
        -------
        (N, D) float32 ndarray, L2-normalized
        """
        pixels = torch.as_tensor(crops)
        out = []
        with self._running():
            for start in range(0, len(pixels), batch_size):
                out.append(self._forward(pixels[start : start + batch_size], batch_size))
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    def embed_dataset(
        self, dataset: Dataset, batch_size: int, desc: str = "embed"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed every item of a labeled dataset, in order, in batches of `batch_size`.

        The DataLoader draws from a private generator, so embedding never advances
        torch's global RNG (training stays reproducible).

        Parameters
        ----------
        dataset : Dataset
            Yields ``(image, label)`` with ``(C, H, W)`` uint8 images of one size, e.g. an
            :class:`~superdml.learn.data.ImageFolderDataset` without a transform; not empty.
        batch_size : int
        desc : str
            Label of the progress bar.

        Returns
        -------
        embeddings : (N, D) float32 ndarray
            Unit-length rows.
        labels : (N,) int64 ndarray
        """
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator()
        )
        embeddings: list[Tensor] = []
        labels: list[Tensor] = []
        with self._running():
            for images, batch_labels in progress(loader, len(loader), desc, "batch"):
                embeddings.append(self._forward(images, batch_size))
                labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
        return torch.cat(embeddings).numpy(), torch.cat(labels).numpy()


_EMBEDDERS: ProcessCache[Embedder] = ProcessCache(size=2)


def load_embedder(
    checkpoint: str,
    sha256: str,
    device: str,
    threads: int | None = None,
    precision: str = "auto",
    tta: str = "none",
) -> Embedder:
    """Return the checkpoint's :class:`Embedder`, loaded once per process (keyed by its hash).

    A checkpoint in object storage is fetched on the first load into this machine's
    cache folder (:func:`~superdml.core.storage.local_copy`), so a worker that shares no
    disk with the client downloads it once, and checked against `sha256`.

    Parameters
    ----------
    checkpoint : str
        Path or URI of the checkpoint.
    sha256 : str
        Its SHA-256: the cache key, so a replaced file is loaded anew.
    device : {"cpu", "cuda"}
    threads : int, optional
        torch and FAISS threads of this process, set before the first load.
    precision, tta : str
        As :meth:`Embedder.from_checkpoint`.

    Raises
    ------
    CheckpointError
        The object at a checkpoint URI no longer has that hash (replaced mid-run).
    """

    def load() -> Embedder:
        if threads is not None:
            import faiss

            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
        local = storage.local_copy(checkpoint)
        if storage.is_uri(checkpoint) and (found := sha256_file(local)) != sha256:
            raise CheckpointError(
                f"{checkpoint}: replaced since the run began (sha256 {found[:12]}, the run "
                f"labels with {sha256[:12]}): rerun with the checkpoint as it is now"
            )
        return Embedder.from_checkpoint(local, device, precision, tta)

    return _EMBEDDERS.get((sha256, device, precision, tta), load)
