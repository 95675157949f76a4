"""Retrain from the page: the shipped ``retrain`` pipeline in a background process.

Each round ``k`` works in ``RETRAIN_DIR/round-k/``: first ``train/``, a snapshot of the
training folder taken when the button is pressed (hard links, so it costs no space and
never touches the user's files), then the pipeline (``superdml run retrain``) with
``train_dir`` and ``val_dir`` set to that snapshot, ``previous`` the label run's model
folder and ``out`` the round's folder. The snapshot is what makes "this retrain
includes decisions 1..S" exact: sorting goes on meanwhile, into the real folder.
When the run ends, ``before/metrics.json`` and ``after/metrics.json`` are the page's
before/after metrics.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import superdml

LOG_LINES = 200
_MAIN = "from superdml.cli.commands import main; main()"


def snapshot(train_dir: Path, dest: Path) -> dict[str, int]:
    """Hard-link (or copy) the class folders of `train_dir` into the new folder `dest`.

    Returns
    -------
    dict of str to int
        Files per class folder.
    """
    dest.mkdir(parents=True)
    counts: dict[str, int] = {}
    for entry in sorted(train_dir.iterdir()):
        if entry.is_file() and entry.name == "classes.yaml":
            shutil.copy2(entry, dest / entry.name)
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        (dest / entry.name).mkdir()
        counts[entry.name] = 0
        for file in sorted(entry.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                try:
                    os.link(file, dest / entry.name / file.name)
                except OSError:
                    shutil.copy2(file, dest / entry.name / file.name)
                counts[entry.name] += 1
    return counts


def retrain_command(
    workdir: Path, out: str, previous: Path, segments: Path, epochs: int | None,
    device: str, workers: int | None,
) -> list[str]:  # fmt: skip
    """Return the ``superdml run retrain`` command line of one round (run with this Python)."""
    train = str(workdir / out / "train")
    sets = {
        "train_dir": train, "val_dir": train, "previous": str(previous),
        "segments": str(segments), "out": out,
    }  # fmt: skip
    if epochs is not None:
        sets["epochs"] = str(epochs)
    command = [sys.executable, "-c", _MAIN, "run", "retrain", "--workdir", str(workdir)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    command += ["--device", device]
    if workers is not None:
        command += ["--workers", str(workers)]
    return command


def read_metrics(path: Path) -> dict[str, float] | None:
    """Return the ``metrics`` section of an ``evaluate`` ``metrics.json`` (None if absent)."""
    if not path.is_file():
        return None
    metrics: dict[str, float] = json.loads(path.read_text()).get("metrics", {})
    return metrics


@dataclass
class Retrain:
    """The page's retrain rounds: at most one runs at a time.

    Attributes
    ----------
    workdir : Path
        ``RETRAIN_DIR``; round k works in ``round-k/``.
    state : {"idle", "running", "done", "failed"}
    round : int
    includes : dict
        What the running or last round trains on: ``last_seq`` (the last journal record
        it includes), ``decisions`` (the sorts in force then), ``per_class`` (files).
    log : deque of str
        The latest lines the run printed.
    """

    workdir: Path
    state: str = "idle"
    round: int = 0
    includes: dict[str, Any] = field(default_factory=dict)
    log: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    returncode: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0

    def start(
        self, train_dir: Path, includes: dict[str, Any], previous: Path, segments: Path,
        epochs: int | None, device: str, workers: int | None,
    ) -> None:  # fmt: skip
        """Snapshot the training folder and start the pipeline in the background.

        Raises
        ------
        RuntimeError
            A round is running.
        """
        with self._lock:
            if self.state == "running":
                raise RuntimeError(f"round {self.round} is running")
            self.round = 1 + max(
                [
                    0,
                    *(
                        int(p.name[6:])
                        for p in self.workdir.glob("round-*")
                        if p.name[6:].isdigit()
                    ),
                ]
            )
            out = f"round-{self.round}"
            per_class = snapshot(train_dir, self.workdir / out / "train")
            self.includes = {**includes, "per_class": per_class, "folder": out}
            self.state, self.returncode = "running", None
            self.log.clear()
            self.version += 1
        command = retrain_command(self.workdir, out, previous, segments, epochs, device, workers)
        env = {**os.environ, "PYTHONPATH": _package_root(), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
            errors="replace",
        )  # fmt: skip
        threading.Thread(target=self._follow, args=(process,), daemon=True).start()

    def _follow(self, process: subprocess.Popen[str]) -> None:
        for line in process.stdout or ():
            for part in line.rstrip("\n").split("\r"):
                if part.strip():
                    self.log.append(part.strip())
                    self.version += 1
        self.returncode = process.wait()
        self.state = "done" if self.returncode == 0 else "failed"
        self.version += 1

    def status(self) -> dict[str, Any]:
        """Return what the page shows: state, round, includes, log tail, before/after metrics."""
        folder = self.workdir / f"round-{self.round}"
        done = self.state == "done"
        return {
            "state": self.state,
            "round": self.round,
            "includes": self.includes,
            "log": list(self.log)[-30:],
            "before": read_metrics(folder / "before" / "metrics.json") if done else None,
            "after": read_metrics(folder / "after" / "metrics.json") if done else None,
            "labels": str(folder / "labels") if done else None,
            "version": self.version,
        }


def _package_root() -> str:
    """Return the folder holding this superdml package, first on the child's path (same code)."""
    root = str(Path(superdml.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return f"{root}{os.pathsep}{rest}" if rest else root


def review_round(labels: Path, segments: Path, folder: Path, like: Path, device: str) -> Path:
    """Review a round's new label run into `folder`: the next queue of the page.

    With the review options of the served folder `like` (its ``review.yaml``), else the
    defaults; returns `folder`.
    """
    from superdml.config.load import load_config
    from superdml.config.schema import ReviewConfig
    from superdml.label.review import REVIEW_YAML, review

    options = like / REVIEW_YAML
    config = load_config(options if options.is_file() else None, ReviewConfig)
    review(labels, segments, folder, config, device=device)
    return folder
