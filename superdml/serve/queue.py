"""The crops of a served folder as arrays, least certain first, and their sorting state.

:func:`read_queue` reads the folder's ``crops.parquet`` once (a folder of 100 000 crops
is a few arrays, and a page of the queue is one masked slice), then ``more.jsonl``: the
crops "more like this" added (:data:`MORE`), which queue after the others.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from superdml.core.errors import input_error
from superdml.crops.folder import CROPS_TABLE

MORE = "more.jsonl"
"""Crops "more like this" added to a folder: one JSON line each (a crops.parquet row)."""
MORE_DIR = "more"
"""Where their files go, inside the crop folder."""

PENDING, SORTED, SKIPPED = 0, 1, 2
"""States of a crop: still to sort, sorted into a class folder, skipped ("not sure")."""

_COLUMNS = ["file", "segment_id", "raster", "x", "y", "label", "score", "margin"]


@dataclass
class CropQueue:
    """Every crop of a folder and its state.

    Attributes
    ----------
    file : (N,) object ndarray of str
        Paths relative to the folder, as ``crops.parquet`` lists them.
    segment_id : (N,) uint32 ndarray
    raster : (N,) object ndarray of str
    x, y : (N,) float64 ndarray
        Map coordinates of the superpixel centroids.
    predicted : (N,) object ndarray of str or None
        The class folder the stage put each crop in (predicted or pre-labeled class).
    score, margin : (N,) float32 ndarray
        The vote (NaN when the folder has none).
    order : (N,) int64 ndarray
        Crops least certain first: by score, then margin (NaN last), then file order.
    state : (N,) int8 ndarray
        :data:`PENDING`, :data:`SORTED` or :data:`SKIPPED`.
    """

    file: np.ndarray
    segment_id: np.ndarray
    raster: np.ndarray
    x: np.ndarray
    y: np.ndarray
    predicted: np.ndarray
    score: np.ndarray
    margin: np.ndarray
    order: np.ndarray = field(init=False)
    state: np.ndarray = field(init=False)
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        score = np.where(np.isnan(self.score), np.inf, self.score)
        margin = np.where(np.isnan(self.margin), np.inf, self.margin)
        self.order = np.lexsort((np.arange(len(score)), margin, score)).astype(np.int64)
        self.state = np.zeros(len(score), np.int8)
        self._index = {f: i for i, f in enumerate(self.file)}

    def __len__(self) -> int:
        return len(self.file)

    def extend(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Add crops (``crops.parquet``-like rows) at the end of the queue; return their indexes.

        Not thread-safe: the caller holds the lock of whoever else writes :attr:`state`.
        """
        start = len(self)

        def grow(attr: str, key: str, dtype: Any, missing: Any = None) -> None:
            values = [missing if r.get(key) is None else r[key] for r in rows]
            setattr(self, attr, np.concatenate([getattr(self, attr), np.asarray(values, dtype)]))

        nan = float("nan")
        for attr, key, dtype, missing in [
            ("file", "file", object, None), ("segment_id", "segment_id", np.uint32, 0),
            ("raster", "raster", object, None), ("x", "x", np.float64, nan),
            ("y", "y", np.float64, nan), ("predicted", "label", object, None),
            ("score", "score", np.float32, nan), ("margin", "margin", np.float32, nan),
        ]:  # fmt: skip
            grow(attr, key, dtype, missing)
        added = np.arange(start, len(self.file), dtype=np.int64)
        self.order = np.concatenate([self.order, added])
        self.state = np.concatenate([self.state, np.zeros(len(rows), np.int8)])
        self._index.update({f: int(i) for f, i in zip(self.file[start:], added, strict=True)})
        return added

    def index_of(self, file: str) -> int:
        """Return the index of the crop listed as `file` (KeyError if none)."""
        return self._index[file]

    def pending(self, start: int = 0, n: int = 60) -> np.ndarray:
        """Return indexes of pending crops ``start`` to ``start + n`` in queue order."""
        waiting = self.order[self.state[self.order] == PENDING]
        return waiting[start : start + n]

    def counts(self) -> dict[str, int]:
        """Return the number of crops pending, sorted and skipped."""
        counts = np.bincount(self.state, minlength=3)
        return {"pending": int(counts[0]), "sorted": int(counts[1]), "skipped": int(counts[2])}


def read_queue(folder: Path) -> CropQueue:
    """Read the crops of a crop folder (``superdml crops`` or ``superdml review`` output).

    Raises
    ------
    InputError
        `folder` has no ``crops.parquet`` (not a crop folder), or it is unreadable.
    """
    path = folder / CROPS_TABLE
    if not path.is_file():
        raise input_error(
            folder, f"not a crop folder (no {CROPS_TABLE}; make one with superdml crops or review)"
        )
    try:
        table = pq.read_table(path, columns=_COLUMNS)
    except Exception as err:  # any read failure of a user's file is the same one line
        raise input_error(path, f"unreadable crops table ({err})") from None

    def floats(name: str, dtype: type) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False).astype(dtype)

    def strings(name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_pylist(), dtype=object)

    queue = CropQueue(
        strings("file"), table.column("segment_id").to_numpy().astype(np.uint32),
        strings("raster"), floats("x", np.float64), floats("y", np.float64),
        strings("label"), floats("score", np.float32), floats("margin", np.float32),
    )  # fmt: skip
    more = read_more(folder / MORE)
    if more:
        queue.extend(more)
    return queue


def read_more(path: Path) -> list[dict[str, Any]]:
    """Return the rows of ``more.jsonl`` (none if absent; a torn last line is ignored).

    Raises
    ------
    InputError
        Any other line is not a JSON object with a ``file``.
    """
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("file"), str):
                raise ValueError("no file")
        except ValueError as err:
            if number == len(lines):
                break  # cut short by a crash before its fsync: never shown
            raise input_error(path, f"line {number}: not a crop row ({err})") from None
        rows.append(row)
    return rows


def append_more(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append crop rows to ``more.jsonl`` and fsync it."""
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
