"""More like this: the crops of the folder nearest a given one in the model's embedding.

The folder's crops are embedded once, on first use, with the label run's checkpoint
(in batches, in a background thread whose progress the page shows), then every query
is one matrix product over the (N, D) embeddings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

BATCH = 256


def nearest(embeddings: np.ndarray, i: int, k: int, allowed: np.ndarray) -> np.ndarray:
    """Indexes of the `k` rows most similar to row `i` (cosine), among `allowed`, `i` excluded.

    Parameters
    ----------
    embeddings : (N, D) float32 ndarray, L2-normalized
    i, k : int
    allowed : (N,) bool ndarray

    Returns
    -------
    (M,) int64 ndarray, M <= k
        Most similar first.
    """
    similarity = embeddings @ embeddings[i]
    candidates = np.flatnonzero(allowed)
    candidates = candidates[candidates != i]
    if len(candidates) > k:
        part = np.argpartition(-similarity[candidates], k - 1)[:k]
        candidates = candidates[part]
    return candidates[np.argsort(-similarity[candidates], kind="stable")].astype(np.int64)


def read_crops(paths: list[Path]) -> np.ndarray:
    """Read crop images (same size) as an (N, C, S, S) uint8 array."""
    return np.stack([np.asarray(Image.open(p)).transpose(2, 0, 1) for p in paths])


class CropEmbeddings:
    """The embeddings of a folder's crops, computed once in the background.

    Parameters
    ----------
    embed : callable
        ``embed(crops) -> (N, D) float32`` (an :class:`~superdml.learn.embed.Embedder`).
    locate : callable
        ``locate(i) -> Path``: where crop `i` is now.
    n : int
        Number of crops.
    """

    def __init__(
        self, embed: Callable[[np.ndarray], np.ndarray], locate: Callable[[int], Path], n: int
    ) -> None:
        self._embed, self._locate, self.n = embed, locate, n
        self.done = 0
        self.error: str | None = None
        self.embeddings: np.ndarray | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start embedding unless it started already."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            parts = []
            for start in range(0, self.n, BATCH):
                index = range(start, min(start + BATCH, self.n))
                parts.append(self._embed(read_crops([self._locate(i) for i in index])))
                self.done = index.stop
            self.embeddings = np.concatenate(parts).astype(np.float32)
        except Exception as err:  # shown on the page: the server keeps serving
            self.error = f"{type(err).__name__}: {err}"

    def progress(self) -> dict[str, object]:
        """``{"ready", "done", "total", "error"}`` for the page."""
        return {
            "ready": self.embeddings is not None,
            "done": self.done,
            "total": self.n,
            "error": self.error,
        }
