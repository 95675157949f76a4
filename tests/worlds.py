"""The shared test worlds: one mosaic carried through every stage, built once a session.

``conftest.py`` builds them as session fixtures (``shared_world``, ``shared_label_run``,
``shared_trained_world``); tests read them, and copy what they must change into
``tmp_path``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from checkpoints import save_untrained_checkpoint
from rasters import texture_mosaic, write_raster

from superdml.config.schema import (
    CropsConfig,
    IndexConfig,
    LabelConfig,
    SegmentConfig,
    TrainConfig,
)
from superdml.crops.stage import export_crops
from superdml.label.index import build_index
from superdml.label.stage import LabelResult, label
from superdml.learn.train import train
from superdml.segment.stage import SegmentResult, segment_raster

#: The truth's classes, by code 1..4 (not in name order: codes follow the truth's tag).
CLASSES = ["brick", "grass", "gravel", "coffee"]
#: How the world's segments were made: 256 px mosaic in 4 tiles of 128 px.
SEGMENT = SegmentConfig(16, tile_size=128)
#: How the world's label run labeled it.
LABEL = LabelConfig(k=5, tile_size=128, batch_size=64)


@dataclass(frozen=True)
class World:
    """A mosaic carried through segment -> crops -> model -> reference, on disk.

    Attributes
    ----------
    root : Path
        Holds ``mosaic.tif``, ``truth.tif``, ``seg/``, ``crops/``, ``model.pt`` (a trained
        world: ``model/``, its training run) and ``ref/``.
    truth : (H, W) uint8 ndarray
        The class codes 1..4 of :data:`CLASSES` (``truth.tif``, whose ``class_names`` tag
        names them).
    seg : SegmentResult
        The segment run of the mosaic (:data:`SEGMENT`).
    checkpoint : Path
        ``model.pt``.
    """

    root: Path
    truth: np.ndarray
    seg: SegmentResult
    checkpoint: Path

    @property
    def mosaic(self) -> Path:
        return self.root / "mosaic.tif"

    @property
    def truth_tif(self) -> Path:
        return self.root / "truth.tif"

    @property
    def crops(self) -> Path:
        return self.root / "crops"

    @property
    def ref(self) -> Path:
        return self.root / "ref"

    def copy_to(self, folder: Path) -> Path:
        """Copy the world's files into `folder` (for a test that changes them); return it.

        The checkpoint becomes ``folder/model.pt``.
        """
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("mosaic.tif", "truth.tif"):
            shutil.copy2(self.root / name, folder / name)
        shutil.copy2(self.checkpoint, folder / "model.pt")
        for name in ("seg", "crops", "ref"):
            shutil.copytree(self.root / name, folder / name)
        return folder


@dataclass(frozen=True)
class LabelRun:
    """The world labeled with :data:`LABEL`: ``out`` and what :func:`label` returned."""

    out: Path
    result: LabelResult
    config: LabelConfig


def make_world(
    root: Path,
    size: int = 256,
    per_class: int = 8,
    model: Literal["untrained", "trained"] = "untrained",
    crops: CropsConfig | None = None,
    label_raster: np.ndarray | None = None,
) -> World:
    """Write a mosaic and its truth, segment it, crop it, and index a model.

    Parameters
    ----------
    root : Path
        Created; receives the files listed in :class:`World`.
    size : int
        Side of the mosaic (:func:`rasters.texture_mosaic`).
    per_class : int
        Crops per class of the labeled raster (32 px, default mask) unless `crops` says.
    model : {"untrained", "trained"}
        An untrained resnet18 (for mechanics), or one trained 4 epochs on the crops
        (proxy NCA, 32 px: for tests of how well superpixels are labeled).
    crops : CropsConfig, optional
    label_raster : (H, W) uint8 ndarray, optional
        What the crops are labeled from (0: unlabeled; ``labeled.tif``), the truth when
        None.
    """
    root.mkdir(parents=True, exist_ok=True)
    rgb, truth = texture_mosaic(size)
    write_raster(root / "mosaic.tif", rgb)
    names = json.dumps({str(code): name for code, name in enumerate(CLASSES, 1)})
    write_raster(root / "truth.tif", truth[None], tags={"class_names": names})
    label_tif = root / "truth.tif"
    if label_raster is not None:
        label_tif = root / "labeled.tif"
        write_raster(label_tif, label_raster[None], nodata=0, tags={"class_names": names})
    seg = segment_raster(root / "mosaic.tif", root / "seg", SEGMENT)
    crops = crops or CropsConfig(crop_size=32, per_class=per_class)
    export_crops(seg.out_dir, root / "crops", crops, label_tif)
    if model == "untrained":
        checkpoint = save_untrained_checkpoint(root / "model.pt", sorted(CLASSES))
        build_index(checkpoint, root / "crops", root / "ref", IndexConfig(batch_size=32), "cpu")
    else:
        config = TrainConfig(
            input_size=32, embedding_size=32, epochs=4, loss="proxy_nca", classes_per_batch=4,
            samples_per_class=8, warmup_epochs=0, val_fraction=0.2,
        )  # fmt: skip
        checkpoint = train(root / "crops", root / "model", config, device="cpu").best_path
        build_index(checkpoint, root / "crops", root / "ref", device="cpu")
    return World(root, truth, seg, Path(checkpoint))


def label_world(world: World, out: Path, config: LabelConfig = LABEL) -> LabelRun:
    """Label `world` into `out` (``superdml label`` on the CPU)."""
    result = label(world.seg.out_dir, world.checkpoint, world.ref, out, config, device="cpu")
    return LabelRun(out, result, config)
