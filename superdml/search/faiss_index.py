"""Parts of a reference index: checking they fit, their FAISS index, where to search it."""

from __future__ import annotations

import logging
from typing import Any, cast

import faiss
import numpy as np
import torch

from superdml.core.devices import resolve_device

logger = logging.getLogger(__name__)

#: Largest accepted deviation of an embedding's L2 norm from 1.
NORM_TOLERANCE = 1e-3


def make_faiss_index(
    embeddings: np.ndarray, ivf_threshold: int, nlist: int | None, nprobe: int
) -> faiss.Index:
    """Return an exact IndexFlatIP, or a trained IndexIVFFlat above `ivf_threshold` rows."""
    n, d = embeddings.shape
    index: faiss.Index
    if n <= ivf_threshold:
        index = faiss.IndexFlatIP(d)
    else:
        lists = int(np.clip(nlist or round(4 * np.sqrt(n)), 1, n))
        # faiss returns the factory's index downcast: "IVF...,Flat" gives an IndexIVFFlat
        ivf = cast(
            faiss.IndexIVFFlat,
            faiss.index_factory(d, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT),
        )
        ivf.train(embeddings)
        ivf.nprobe = min(nprobe, lists)
        index = ivf
    index.add(embeddings)
    return index


def gpu_faiss_index(
    index: faiss.Index, device: torch.device, probe: np.ndarray
) -> tuple[Any, faiss.Index] | None:
    """Return (resources, index on `device`) when FAISS GPU search works there, else None.

    The FAISS GPU wheels are compiled for a range of compute capabilities; on a GPU
    outside it the copy or the first search fails, which a one-row probe search finds.
    """
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    gpu = torch.cuda.current_device() if device.index is None else device.index
    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, gpu, index)
        gpu_index.search(probe, 1)
    except RuntimeError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        logger.info("FAISS GPU search unusable on %s (%s): searching with torch", device, reason)
        return None
    return resources, gpu_index


def reference_problem(
    embeddings: np.ndarray, labels: np.ndarray, class_names: list[str], files: list[str]
) -> str | None:
    """Return what is wrong with a reference's parts, or None when they fit together."""
    if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
        return (
            f"got {embeddings.dtype} embeddings of shape {embeddings.shape}, expected (N, D) float"
        )
    n = len(embeddings)
    if n == 0 or embeddings.shape[1] == 0:
        return f"no references (embeddings of shape {embeddings.shape}): add labeled crops"
    if not np.isfinite(embeddings).all():
        return "embeddings hold NaN or infinite values"
    norms = np.linalg.norm(embeddings, axis=1)
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        return (
            f"embeddings are not L2-normalized (norms from {norms.min():.4g} to {norms.max():.4g})"
        )
    if (
        not class_names
        or not all(isinstance(c, str) and c for c in class_names)
        or len(set(class_names)) != len(class_names)
    ):
        return f"class names must be distinct non-empty strings, got {class_names!r}"
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        return f"got {labels.dtype} labels of shape {labels.shape}, expected ({n},) integers"
    if labels.min() < 0 or labels.max() >= len(class_names):
        return f"labels must lie in [0, {len(class_names)}) (the class names)"
    if len(files) != n or not all(isinstance(f, str) for f in files):
        return f"expected {n} file names (str), got {len(files)}"
    return None


def search_device(device: str | torch.device | None) -> torch.device:
    """Return where to search: the CPU for None, else the device `device` names."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return resolve_device(device)
