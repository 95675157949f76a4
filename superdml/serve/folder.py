"""What the review page serves: a crop folder, its classes, and where its crops came from.

A ``superdml review`` folder names its label run (predictions, class scheme, the model
for retraining and "more like this") and segment runs (the map) in ``crops.parquet``'s
metadata; a ``superdml crops`` folder names its segment runs only. The classes are the
label run's scheme, plus the class folders already in the training folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from superdml.core.errors import InputError, input_error, require_dir
from superdml.crops.folder import CROPS_TABLE, read_crops_meta
from superdml.crops.rule import CropRule
from superdml.label.predictions import LabelRun, load_label_run
from superdml.raster.class_names import RESERVED
from superdml.raster.classes import ClassScheme, folder_scheme
from superdml.segment.run import SegmentRun, load_segment_runs
from superdml.serve.queue import CropQueue, read_queue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedFolder:
    """A crop folder opened for the review page.

    Attributes
    ----------
    folder : Path
        The crop folder (absolute).
    train_dir : Path
        Where decisions move crops: ``train_dir/<class>/``.
    queue : CropQueue
    scheme : ClassScheme
        Names and colors; the sortable classes are its names.
    label_run : LabelRun or None
        The label run a review folder was cut from.
    runs : dict of str to SegmentRun
        Segment runs by raster name (the map's rasters); empty when they are gone.
    rule : CropRule or None
    """

    folder: Path
    train_dir: Path
    queue: CropQueue
    scheme: ClassScheme
    label_run: LabelRun | None
    runs: dict[str, SegmentRun]
    rule: CropRule | None

    @property
    def classes(self) -> list[str]:
        """Sortable classes, in the scheme's code order (key 1 is the first)."""
        return self.scheme.names

    def labels_raster(self, raster: str) -> Path | None:
        """Return the exported ``labels.tif`` of `raster` in the label run, if there is one."""
        if self.label_run is None:
            return None
        out = Path(self.label_run.out_dir)  # the page serves local folders
        for path in (out / "labels.tif", out / raster / "labels.tif"):
            if path.is_file() and (len(self.runs) == 1) == (path.parent == out):
                return path
        return None

    def previous_model(self) -> Path | None:
        """Return the training folder of the label run's checkpoint (what a retrain starts from)."""
        if self.label_run is None:
            return None
        folder = Path(str(self.label_run.meta.get("checkpoint", ""))).parent
        return folder if (folder / "train.yaml").is_file() else None

    def segment_dir(self) -> Path | None:
        """Return the segment run folder holding every served raster (for relabeling)."""
        folders = {
            Path(run.folder).parent if len(self.runs) > 1 else Path(run.folder)
            for run in self.runs.values()
        }
        return folders.pop() if len(folders) == 1 else None

    def describe(self) -> dict[str, Any]:
        """Return what the page needs at start: classes (name, color, key), counts, rasters."""
        colors = {e.name: "#{:02x}{:02x}{:02x}".format(*e.color) for e in self.scheme.entries}
        return {
            "folder": str(self.folder),
            "train_dir": str(self.train_dir),
            "classes": [
                {"name": n, "color": colors[n], "key": str(k + 1) if k < 9 else ""}
                for k, n in enumerate(self.classes)
            ],
            "n_crops": len(self.queue),
            "counts": self.queue.counts(),
            "rasters": {
                name: {
                    "height": run.source.height,
                    "width": run.source.width,
                    "labels": self.labels_raster(name) is not None,
                }
                for name, run in self.runs.items()
            },
            "label_run": None if self.label_run is None else str(self.label_run.out_dir),
            "can_retrain": self.previous_model() is not None and self.segment_dir() is not None,
        }


def _segment_runs(folder: Path, meta: dict[str, Any]) -> dict[str, SegmentRun]:
    runs: dict[str, SegmentRun] = {}
    for path in meta.get("segments", []):
        try:
            for run in load_segment_runs(path):
                runs[run.name] = run
        except (InputError, FileNotFoundError) as err:
            logger.warning("%s: no map (%s)", folder, err)
    return runs


def open_folder(folder: str | Path, train_dir: str | Path) -> ServedFolder:
    """Open a crop folder for sorting into `train_dir`.

    Raises
    ------
    MissingInputError
        `folder` does not exist.
    InputError
        `folder` is not a crop folder, `train_dir` lies inside it, or no class is known
        (neither a label run nor class folders in `train_dir`).
    """
    folder = Path(folder).resolve()
    require_dir(folder, "crop folder")
    queue = read_queue(folder)
    train_dir = Path(train_dir).resolve()
    if train_dir != folder and train_dir.is_relative_to(folder):
        raise input_error(train_dir, f"lies inside the crop folder {folder}: choose another")
    meta = read_crops_meta(folder / CROPS_TABLE)
    label_run = None
    if meta.get("label_run"):
        try:
            label_run = load_label_run(meta["label_run"])
        except (InputError, FileNotFoundError) as err:
            logger.warning("%s: no predictions scheme (%s)", folder, err)
    names = set() if label_run is None else set(label_run.class_names)
    if train_dir.is_dir():
        names |= {p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    names |= {str(p) for p in queue.predicted if p is not None}
    names -= RESERVED
    if not names:
        raise input_error(
            folder,
            f"no classes to sort into: give a review folder, or make class folders in {train_dir}",
        )
    base = None if label_run is None else label_run.scheme
    scheme = folder_scheme(train_dir, sorted(names), base)
    rule = CropRule.from_dict(meta["crop_rule"]) if "crop_rule" in meta else None
    return ServedFolder(
        folder, train_dir, queue, scheme, label_run, _segment_runs(folder, meta), rule
    )
