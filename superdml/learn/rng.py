"""The random generators of a training run: seeding them, saving and restoring their states.

Training draws from torch's, numpy's (legacy global) and Python's generators, and the
DataLoader's workers from seeds derived from torch's. :func:`seed_everything` starts them
from one seed; :func:`capture_rng_state` and :func:`restore_rng_state` carry them through a
checkpoint (as plain values that ``torch.load(weights_only=True)`` reads), so a resumed
run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's (legacy global) and torch's generators with `seed`."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  # the legacy global state third-party code draws from
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:  # noqa: ARG001  # DataLoader's worker_init_fn signature
    """Seed numpy and random in a DataLoader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002  # see seed_everything
    random.seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Return the torch, CUDA, numpy (global) and Python ``random`` RNG states.

    Returns
    -------
    dict
        ``torch``: uint8 tensor; ``cuda``: list of uint8 tensors (empty without CUDA);
        ``numpy``: ``{"name", "keys" (624,) int64 tensor, "pos", "has_gauss",
        "cached_gaussian"}``; ``python``: ``{"version", "state" (list of int),
        "gauss_next"}``. All of it passes ``weights_only`` loading.
    """
    # the legacy global state is what third-party code (and DataLoader workers) draw from
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(state), "gauss_next": gauss_next},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002  # restores the legacy global state saved above
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
