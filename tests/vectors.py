"""Small embedding sets whose similarities are known by hand."""

from __future__ import annotations

import math

import numpy as np


def circle(degrees: list[float]) -> np.ndarray:
    """Unit vectors of the plane at `degrees`: ``(N, 2)`` float32."""
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def cos(degrees: float) -> float:
    """Cosine similarity of two :func:`circle` vectors `degrees` apart."""
    return math.cos(math.radians(degrees))


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """`n` random unit vectors of dimension `d`: ``(n, d)`` float32."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
