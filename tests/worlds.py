"""A small labeled world on disk for tests of the stages' mechanics (not of accuracy)."""

from __future__ import annotations

from pathlib import Path

from checkpoints import save_untrained_checkpoint
from rasters import texture_mosaic, write_raster

from superdml.config.schema import CropsConfig, IndexConfig, SegmentConfig
from superdml.crops.stage import export_crops
from superdml.label.index import build_index
from superdml.segment.stage import segment_raster

CLASSES = ["class_1", "class_2", "class_3", "class_4"]


def untrained_world(root: Path, size: int = 256, per_class: int = 8) -> Path:
    """Write a mosaic and its truth, segment it, crop it, and index an untrained model.

    Returns `root`, holding ``mosaic.tif``, ``truth.tif``, ``seg/`` (region size 16,
    128 px tiles), ``crops/`` (32 px, `per_class` per class of the truth),
    ``model.pt`` (untrained, :data:`CLASSES`) and ``ref/`` (its reference of the crops).
    """
    rgb, truth = texture_mosaic(size)
    write_raster(root / "mosaic.tif", rgb)
    write_raster(root / "truth.tif", truth[None])
    seg = segment_raster(root / "mosaic.tif", root / "seg", SegmentConfig(16, tile_size=128))
    crops = CropsConfig(crop_size=32, per_class=per_class)
    export_crops(seg.out_dir, root / "crops", crops, root / "truth.tif")
    save_untrained_checkpoint(root / "model.pt", CLASSES)
    build_index(root / "model.pt", root / "crops", root / "ref", IndexConfig(batch_size=32), "cpu")
    return root
