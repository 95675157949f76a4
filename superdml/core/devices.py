"""The one parser of device names (``auto``, ``cpu``, ``cuda``) into torch devices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from superdml.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceName", "resolve_device"]

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(device: DeviceName | str = "auto") -> torch.device:
    """Return the torch device for ``auto``, ``cpu`` or ``cuda``.

    ``auto`` is the first CUDA device when one is available, else the CPU.

    Raises
    ------
    ConfigError
        When `device` is another name, or ``cuda`` is asked for without CUDA.
    """
    import torch  # not at import time: the CLI starts without torch

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
