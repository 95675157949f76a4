"""What training reports per epoch: rows of ``metrics.csv`` and TensorBoard scalars.

:class:`EpochLog` keeps the rows of the run (those before a resume point are read back
from the file), rewrites the CSV atomically after every epoch and, when tensorboard is
installed, writes the same values as scalars (``val/<metric>``, ``train/<value>``).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from superdml.core.atomic import atomic_write

logger = logging.getLogger("superdml.learn.train")


class EpochLog:
    """The per-epoch log of a training run.

    Parameters
    ----------
    csv_path : Path
        ``metrics.csv``; its rows up to `start_epoch` are kept (a resumed run).
    tensorboard_dir : Path
        Where the TensorBoard events go (nothing without tensorboard).
    start_epoch : int
        Epochs already trained; later rows of the file and events are dropped.
    """

    def __init__(self, csv_path: Path, tensorboard_dir: Path, start_epoch: int) -> None:
        self.csv_path = csv_path
        self.rows = _read_rows(csv_path, start_epoch)
        self._writer = _summary_writer(tensorboard_dir, start_epoch + 1, csv_path.name)

    def append(self, row: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record an epoch's `row` (``epoch`` first); the keys in `metrics` are validation's."""
        self.rows.append(row)
        _write_rows(self.csv_path, self.rows)
        if self._writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    tag = f"val/{key}" if key in metrics else f"train/{key}"
                    self._writer.add_scalar(tag, value, row["epoch"])
            self._writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()


def _read_rows(path: Path, epochs: int) -> list[dict[str, Any]]:
    """Rows of an existing ``metrics.csv`` up to epoch `epochs` (for resume)."""
    if not path.is_file():
        return []
    with path.open(newline="") as stream:
        return [row for row in csv.DictReader(stream) if int(row["epoch"]) <= epochs]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _summary_writer(folder: Path, purge_step: int, csv_name: str) -> Any:
    """Return a TensorBoard SummaryWriter on `folder` (None without tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed: metrics go to %s only", csv_name)
        return None
    return SummaryWriter(folder, purge_step=purge_step)
