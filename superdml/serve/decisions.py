"""Decisions on crops: move into ``<train_dir>/<class>/``, skip, undo; journaled first.

:class:`Sorter` is what the page's keys call. Every decision is appended to the
journal (:mod:`superdml.serve.journal`) and fsynced before any file moves; the file
moves with :func:`move_no_replace` (never over an existing file, never deleting one);
then the call returns and the page shows it done. Opening a :class:`Sorter` again
rolls the files forward to the journal, so whatever a killed server had journaled is
on disk, and undo reverts it as if the server had never stopped.

The journal's fsync is the one a decision waits for: the folders a crop moves between
are not fsynced after the move (two more fsyncs, most of a decision's server time). A
move lost to a power cut is one the journal names, and the next start redoes it: the
file is at its source, or at both names (the link made, the unlink lost), never at
neither, since the link precedes the unlink and journaling file systems keep that
order.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from superdml.core.errors import InputError, input_error
from superdml.crops.folder import preview_file
from superdml.raster.class_names import check_class_name
from superdml.serve.journal import JOURNAL, Decision, Journal, Op, fsync_dir, live_batches, now
from superdml.serve.queue import MORE, PENDING, SKIPPED, SORTED, CropQueue, append_more

logger = logging.getLogger(__name__)


def move_no_replace(source: Path, target: Path) -> None:
    """Move a file to `target`, which must not exist; never overwrite nor lose a file.

    On one file system a hard link then an unlink (a crash in between leaves two names
    of one file, which :meth:`Sorter.recover` resolves); across file systems a copy
    under a temporary name, fsynced, linked to `target`, then the source unlinked.

    Raises
    ------
    FileExistsError
        `target` exists (nothing moved).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
            raise
        tmp = target.with_name(f".superdml-tmp-{os.getpid()}-{target.name}")
        shutil.copy2(source, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
        finally:
            tmp.unlink()
    os.unlink(source)


def _preview(crop: Path) -> Path:
    return crop.with_name(preview_file(crop.name))


def move_crop(source: Path, target: Path) -> None:
    """Move a crop (:func:`move_no_replace`) and, for a TIFF chip, its preview PNG with it.

    The chip is the crop that training reads; its preview only follows it. A preview that
    cannot follow (a file of that name is at the target) stays where it is, with a warning.
    """
    move_no_replace(source, target)
    preview = _preview(source)
    if preview != source and preview.exists():
        try:
            move_no_replace(preview, _preview(target))
        except FileExistsError:
            logger.warning(
                "%s: exists, the preview %s stays where it is", _preview(target), preview
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Sorter:
    """Sorting decisions on the crops of one folder, durable and undoable.

    Parameters
    ----------
    folder : Path
        The crop folder; its journal is ``folder/decisions.jsonl``.
    queue : CropQueue
        Its crops (states are set from the journal here).
    train_dir : Path
        Where sorted crops go: ``train_dir/<class>/<file name>``.
    classes : sequence of str
        The classes a crop may be sorted into.
    """

    def __init__(
        self, folder: Path, queue: CropQueue, train_dir: Path, classes: Sequence[str]
    ) -> None:
        self.folder = folder.resolve()
        self.queue = queue
        self.train_dir = train_dir.resolve()
        self.classes = list(classes)
        for name in self.classes:
            check_class_name(name, self.train_dir, "class")
        self.journal = Journal(self.folder / JOURNAL)
        self._lock = threading.Lock()
        self.recover()

    # ---------------------------------------------------------------- state

    def origin(self, i: int) -> Path:
        """Where crop `i` lies before it is sorted."""
        return self.folder / self.queue.file[i]

    def target(self, i: int, cls: str) -> Path:
        """Where crop `i` goes when sorted into `cls`."""
        return self.train_dir / cls / Path(self.queue.file[i]).name

    def location(self, i: int) -> Path:
        """Where crop `i`'s file is now."""
        placed = self._placed.get(i)
        return placed if placed is not None else self.origin(i)

    def recover(self) -> None:
        """Set the crop states from the journal and move files where it says they are.

        Only crops the journal names are looked at; a crop found at neither end of its
        records stays where it is, with a warning.
        """
        self.queue.state[:] = PENDING
        self._placed: dict[int, Path] = {}
        seen: dict[int, set[Path]] = {}
        for record in self.journal:
            i = self._index(record.crop)
            seen.setdefault(i, set()).update({Path(record.source), Path(record.target)})
        for batch in live_batches(self.journal):
            for record in batch:
                i = self._index(record.crop)
                self.queue.state[i] = SORTED if record.op == "sort" else SKIPPED
                if record.op == "sort":
                    self._placed[i] = Path(record.target)
        for i, places in seen.items():
            self._settle(self.location(i), places)

    def _index(self, crop: str) -> int:
        try:
            return self.queue.index_of(crop)
        except KeyError:
            raise input_error(
                self.journal.path, f"names crop {crop}, which crops.parquet does not list"
            ) from None

    @staticmethod
    def _settle(want: Path, places: set[Path]) -> None:
        """Move a crop's file to `want` from wherever else the journal put it."""
        others = [p for p in places if p != want and p.exists()]
        if want.exists():
            for other in others:
                if _same_file(other, want):
                    other.unlink()  # a move cut between its link and its unlink
            return
        if not others:
            logger.warning("%s: missing, and nowhere else the journal names", want)
            return
        move_crop(others[0], want)

    # ------------------------------------------------------------- decisions

    def _check_pending(self, indexes: Sequence[int]) -> list[int]:
        out = [int(i) for i in indexes]
        if not out:
            raise InputError("no crop given")
        for i in out:
            if not 0 <= i < len(self.queue):
                raise InputError(f"no crop {i} in {self.folder}")
            if self.queue.state[i] != PENDING:
                raise InputError(f"{self.queue.file[i]}: already decided")
        return out

    def sort(self, indexes: Sequence[int], cls: str, accept: bool = False) -> list[Decision]:
        """Move crops into ``train_dir/<cls>/`` (with `accept`, each into its predicted class).

        Raises
        ------
        InputError
            Unknown class, a crop already decided, or a target file that exists.
        """
        with self._lock:
            indexes = self._check_pending(indexes)
            classes = [str(self.queue.predicted[i]) if accept else cls for i in indexes]
            for c in classes:
                if c not in self.classes:
                    raise InputError(f"no class {c!r} (classes: {', '.join(self.classes)})")
            records = self._records(indexes, "sort", classes)
            for record in records:
                if Path(record.target).exists() and record.target != record.source:
                    raise input_error(record.target, "exists: a crop is never overwritten")
            self.journal.append(records)
            for i, record in zip(indexes, records, strict=True):
                if record.target != record.source:
                    move_crop(Path(record.source), Path(record.target))
                self.queue.state[i] = SORTED
                self._placed[i] = Path(record.target)
            return records

    def skip(self, indexes: Sequence[int]) -> list[Decision]:
        """Take crops off the queue without sorting them ("not sure")."""
        with self._lock:
            indexes = self._check_pending(indexes)
            records = self._records(indexes, "skip", [None] * len(indexes))
            self.journal.append(records)
            self.queue.state[indexes] = SKIPPED
            return records

    def undo(self) -> list[int]:
        """Revert the latest batch in force; return its crops' indexes (empty: nothing to undo)."""
        with self._lock:
            batches = live_batches(self.journal)
            if not batches:
                return []
            batch = batches[-1]
            first = batch[0]
            self.journal.append(
                [
                    Decision(
                        self.journal.next_seq,
                        self.journal.next_batch,
                        "undo",
                        first.crop,
                        first.source,
                        first.target,
                        first.cls,
                        first.predicted,
                        first.score,
                        now(),
                        undoes=first.batch,
                    )  # fmt: skip
                ]
            )
            indexes = []
            for record in reversed(batch):
                i = self.queue.index_of(record.crop)
                if record.op == "sort" and record.target != record.source:
                    move_crop(Path(record.target), Path(record.source))
                self.queue.state[i] = PENDING
                self._placed.pop(i, None)
                indexes.append(i)
            return indexes[::-1]

    def _records(self, indexes: list[int], op: Op, classes: Sequence[str | None]) -> list[Decision]:
        seq, batch, time = self.journal.next_seq, self.journal.next_batch, now()
        records = []
        for k, (i, cls) in enumerate(zip(indexes, classes, strict=True)):
            source = self.origin(i)
            target = source if cls is None else self.target(i, cls)
            score = float(self.queue.score[i])
            records.append(
                Decision(
                    seq + k,
                    batch,
                    op,
                    str(self.queue.file[i]),
                    str(source),
                    str(target),
                    cls,
                    self.queue.predicted[i],
                    None if np.isnan(score) else round(score, 6),
                    time,
                )  # fmt: skip
            )
        return records

    def add(
        self, rows: list[dict[str, Any]], write: Callable[[Path, list[dict[str, Any]]], None]
    ) -> list[int]:
        """Add crops to the folder ("more like this"); return their indexes (-1: not added).

        A row whose ``file`` the folder lists already gets its index. For the others,
        `write` ``(folder, rows)`` writes their files, which must not exist yet (a file
        in the way is never overwritten: that row is not added); then they are listed in
        ``more.jsonl`` (fsynced) and queued. Listed last, so a listed crop has its file.
        """
        with self._lock:
            out: list[int | None] = []  # None: to be added, its index known once queued
            new: list[dict[str, Any]] = []
            for row in rows:
                try:
                    out.append(self.queue.index_of(row["file"]))
                except KeyError:
                    path = self.folder / row["file"]
                    if path.exists() or any(r["file"] == row["file"] for r in new):
                        logger.warning("%s: exists, not listed in %s: left alone", path, MORE)
                        out.append(-1)
                    else:
                        out.append(None)
                        new.append(row)
            added: Iterator[int] = iter(())
            if new:
                write(self.folder, new)
                for folder in {(self.folder / r["file"]).parent for r in new}:
                    fsync_dir(folder)
                append_more(self.folder / MORE, new)
                added = iter(int(i) for i in self.queue.extend(new))
            return [next(added) if i is None else i for i in out]

    def decided(self) -> list[Decision]:
        """Return the ``sort`` records in force, oldest first (what a retrain now includes)."""
        return [r for b in live_batches(self.journal) for r in b if r.op == "sort"]
