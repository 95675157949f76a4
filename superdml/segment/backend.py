"""Which SLIC backend and device a segment run uses, importing torch only where CUDA may be.

``import torch`` takes about 1.5 s (more on a busy machine): a tenth of segmenting a
15 MP raster. The torch backend on the CPU runs numba kernels
(:mod:`superdml.segment.slic_numba`) and needs no torch, so ``auto`` asks torch about
CUDA only on a machine where a CUDA driver can be present.
"""

from __future__ import annotations

import os
import sys
from typing import Literal

from superdml.core.errors import ConfigError

Backend = Literal["numpy", "torch"]

#: Where the NVIDIA driver shows itself on Linux: its proc folder, or WSL2's GPU device.
CUDA_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/dxg")


def cuda_driver_possible() -> bool:
    """Return False where no CUDA device can be: macOS, or Linux without an NVIDIA driver.

    True elsewhere (a driver is loaded, another system, or torch already imported,
    whose answer is then cheap): only torch can tell.
    """
    if "torch" in sys.modules:
        return True
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return any(os.path.exists(p) for p in CUDA_DRIVER_PATHS)
    return True


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (torch imported only if a driver may be there)."""
    if not cuda_driver_possible():
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_backend(backend: str, device: str) -> tuple[Backend, str]:
    """Resolve ``auto`` settings to the backend and device a run uses.

    ``auto`` backend is ``torch``, the fastest on the CPU and the only one on a GPU;
    ``auto`` device is CUDA when torch sees one. The numpy backend runs on the CPU.

    Parameters
    ----------
    backend : {"auto", "numpy", "torch"}
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    backend : {"numpy", "torch"}
    device : {"cpu", "cuda"}

    Raises
    ------
    ConfigError
        For ``cuda`` on a machine where torch sees no CUDA device, or ``cuda`` with the
        numpy backend.
    """
    resolved: Backend = "torch" if backend == "auto" else backend  # type: ignore[assignment]
    if device == "cuda" and not cuda_available():
        raise ConfigError(
            "device: got 'cuda', but torch sees no CUDA device on this machine: "
            "pass --device cpu or auto"
        )
    if device == "cuda" and resolved == "numpy":
        raise ConfigError("device: got 'cuda' with backend 'numpy': pass --backend torch")
    if device == "auto":
        device = "cuda" if resolved == "torch" and cuda_available() else "cpu"
    return resolved, device
