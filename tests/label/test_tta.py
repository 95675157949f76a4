"""Test-time augmentation travels with its embeddings: references and kept embeddings."""

import pytest

from superdml.config.schema import IndexConfig, LabelConfig
from superdml.core.errors import InputError
from superdml.label.index import build_index
from superdml.label.predictions import embeddings_path
from superdml.label.stage import label
from superdml.raster.io import Tile


def test_kept_embeddings_are_keyed_by_tta(tmp_path):
    tile = Tile(0, 0, 0, 0, 64, 64)
    args = (tmp_path, "ab" * 32, {"crop_size": 32}, "seg", "mosaic", tile)
    assert embeddings_path(*args) == embeddings_path(*args, "none")  # keys made before tta
    assert embeddings_path(*args, "d4") != embeddings_path(*args, "none")


def test_label_refuses_a_reference_embedded_with_other_tta(shared_world, tmp_path):
    world, ref = shared_world, tmp_path / "ref_d4"
    build_index(world.checkpoint, world.crops, ref, IndexConfig(tta="d4"), "cpu")
    with pytest.raises(InputError, match="ref_d4: reference embedded with tta 'd4', label asks"):
        label(world.seg.out_dir, world.checkpoint, ref, tmp_path / "out", LabelConfig(k=3))
    assert not (tmp_path / "out").exists()  # refused before any work
