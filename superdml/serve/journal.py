"""The decision journal of the review page: one append-only JSON line per decision.

``FOLDER/decisions.jsonl`` (:data:`JOURNAL`) holds, in order, every decision made on
the page over the crop folder ``FOLDER``::

    {"seq": 1, "batch": 1, "op": "sort", "crop": "class_2/m_17_s0.31.png",
     "from": "/abs/FOLDER/class_2/m_17_s0.31.png", "to": "/abs/train/class_3/m_17_s0.31.png",
     "class": "class_3", "predicted": "class_2", "score": 0.31, "time": "2025-...Z"}
    {"seq": 2, "batch": 2, "op": "skip", "crop": "...", "from": "...", "to": "...", ...}
    {"seq": 3, "batch": 3, "op": "undo", "undoes": 2, ...}

``sort`` moves the crop's file from ``from`` to ``to``; ``skip`` ("not sure") moves
nothing (``from`` and ``to`` are the same file) and takes the crop off the queue;
``undo`` names the batch it reverts (the records of one key press share a ``batch``).
The journal is written ahead: a record is appended and fsynced *before* its file
moves, and the page is answered only after both, so a killed server loses nothing it
acknowledged; :func:`superdml.serve.decisions.Sorter` rolls the files forward to the
journal when it starts again (undo keeps working across restarts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from superdml.core.errors import input_error

JOURNAL = "decisions.jsonl"
Op = Literal["sort", "skip", "undo"]
_OPS = ("sort", "skip", "undo")


@dataclass(frozen=True)
class Decision:
    """One journal record.

    Attributes
    ----------
    seq : int
        1, 2, ... in the order written.
    batch : int
        The key press that made it; ``undo`` reverts a whole batch.
    op : {"sort", "skip", "undo"}
    crop : str
        The crop's ``file`` in ``crops.parquet`` (relative to the crop folder).
    source, target : str
        Absolute paths the file moved from and to (equal for ``skip``; for ``undo`` the
        reverted record's, unchanged).
    cls : str or None
        The class sorted into (``sort``).
    predicted : str or None
    score : float or None
        The model's prediction and vote share for the crop, as the page showed them.
    time : str
        UTC, ISO 8601.
    undoes : int or None
        The batch an ``undo`` reverts.
    """

    seq: int
    batch: int
    op: Op
    crop: str
    source: str
    target: str
    cls: str | None = None
    predicted: str | None = None
    score: float | None = None
    time: str = ""
    undoes: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the record as the journal stores it (``from``/``to``/``class`` keys)."""
        out = {
            "seq": self.seq, "batch": self.batch, "op": self.op, "crop": self.crop,
            "from": self.source, "to": self.target, "class": self.cls,
            "predicted": self.predicted, "score": self.score, "time": self.time,
        }  # fmt: skip
        if self.undoes is not None:
            out["undoes"] = self.undoes
        return out

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Decision:
        """Return the record of one parsed journal line (KeyError/ValueError if malformed)."""
        if obj["op"] not in _OPS:
            raise ValueError(f"unknown op {obj['op']!r}")
        return Decision(
            int(obj["seq"]), int(obj["batch"]), obj["op"], str(obj["crop"]), str(obj["from"]),
            str(obj["to"]), obj.get("class"), obj.get("predicted"), obj.get("score"),
            str(obj.get("time", "")), obj.get("undoes"),
        )  # fmt: skip


def now() -> str:
    """Return the current UTC time as ISO 8601 (milliseconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_journal(path: Path) -> list[Decision]:
    """Return every record of a journal, in order (an absent journal is empty).

    A last line cut short by a crash (no newline, not JSON) was never acknowledged and
    is ignored; any other bad line is an error.

    Raises
    ------
    InputError
        A malformed line other than a torn last one: ``<path>: line N: ...``.
    """
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(Decision.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as err:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn by a crash before its fsync: never acknowledged
            raise input_error(path, f"line {number}: not a decision record ({err})") from None
    return records


def live_batches(records: Iterable[Decision]) -> list[list[Decision]]:
    """Return the batches of ``sort``/``skip`` records in force (not undone), oldest first."""
    batches: dict[int, list[Decision]] = {}
    for record in records:
        if record.op == "undo":
            batches.pop(int(record.undoes or 0), None)
        else:
            batches.setdefault(record.batch, []).append(record)
    return list(batches.values())


class Journal:
    """An open decision journal: appends records durably.

    Parameters
    ----------
    path : Path
        ``FOLDER/decisions.jsonl``; created on the first append.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = read_journal(path)
        self._repair_torn_tail()

    def _repair_torn_tail(self) -> None:
        """Cut a torn last line (a crash mid-append, never acknowledged) off the journal."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())

    @property
    def next_seq(self) -> int:
        """The ``seq`` of the next record."""
        return self.records[-1].seq + 1 if self.records else 1

    @property
    def next_batch(self) -> int:
        """The ``batch`` of the next key press."""
        return max((r.batch for r in self.records), default=0) + 1

    def append(self, records: list[Decision]) -> None:
        """Append `records` and fsync the journal (and its folder when it was created)."""
        data = "".join(json.dumps(r.to_json()) + "\n" for r in records).encode()
        self._write(data)
        self.records.extend(records)

    def _write(self, data: bytes) -> None:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)

    def __iter__(self) -> Iterator[Decision]:
        return iter(self.records)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
