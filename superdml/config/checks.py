"""Argument checks shared by the kNN search and the reference index."""

from __future__ import annotations

import numpy as np


def is_count(value: object) -> bool:
    """Whether `value` is an integer >= 1 (Python or NumPy, not bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and bool(value >= 1)
