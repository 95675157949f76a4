"""``superdml infer``: kNN labels of single images and the neighbour plot."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_crop_folders

from superdml.cli.commands import cli
from superdml.config.schema import VoteConfig
from superdml.core.errors import ConfigError, InputError, MissingInputError
from superdml.label.index import build_index
from superdml.label.infer import infer, plot_neighbours

CLASSES = ("brick", "grass", "coffee")


@pytest.fixture(scope="module")
def setup(untrained_checkpoints, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(crop folder, checkpoint, reference folder of that checkpoint, other checkpoint)."""
    root = tmp_path_factory.mktemp("infer")
    crops = make_crop_folders(root / "crops", classes=CLASSES, per_class=5, size=32)
    checkpoint, other = untrained_checkpoints
    build_index(checkpoint, crops, root / "ref", device="cpu")
    return crops, checkpoint, root / "ref", other


def test_a_reference_crop_finds_itself_first(setup):
    crops, checkpoint, ref, _ = setup
    images = [crops / "grass" / "grass_003.png", crops / "coffee" / "coffee_001.png"]
    results = infer(images, checkpoint, reference=ref, config=VoteConfig(k=1), device="cpu")
    assert [r.label for r in results] == ["grass", "coffee"]
    for result, image in zip(results, images, strict=True):
        (nearest,) = result.neighbours
        assert nearest.file == image.relative_to(crops).as_posix()
        assert nearest.path == image.absolute() and nearest.similarity == pytest.approx(1, abs=1e-5)
        assert result.score == 1.0 and result.image == image


def test_a_crop_folder_gives_the_same_neighbours_as_its_saved_reference(setup):
    crops, checkpoint, ref, _ = setup
    image = [crops / "brick" / "brick_002.png"]
    saved = infer(image, checkpoint, reference=ref, config=VoteConfig(k=4), device="cpu")[0]
    fresh = infer(image, checkpoint, reference_dir=crops, config=VoteConfig(k=4), device="cpu")[0]
    assert [n.file for n in fresh.neighbours] == [n.file for n in saved.neighbours]
    np.testing.assert_allclose(
        [n.similarity for n in fresh.neighbours],
        [n.similarity for n in saved.neighbours],
        atol=1e-5,
    )
    assert (fresh.label, fresh.label_id) == (saved.label, saved.label_id)
    assert len(saved.neighbours) == 4 and saved.neighbours[0].file == "brick/brick_002.png"


def test_bad_inputs_are_clear_errors(setup, tmp_path):
    crops, checkpoint, ref, other = setup
    image = crops / "brick" / "brick_000.png"
    with pytest.raises(InputError, match="ref: reference built with another checkpoint"):
        infer([image], other, reference=ref, device="cpu")
    with pytest.raises(ConfigError, match="exactly one"):
        infer([image], checkpoint, reference=ref, reference_dir=crops, device="cpu")
    (tmp_path / "broken.png").write_text("not a png")
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        infer([tmp_path / "broken.png"], checkpoint, reference=ref, device="cpu")
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(InputError, match="notes.txt: not an image file"):
        infer([tmp_path / "notes.txt"], checkpoint, reference=ref, device="cpu")
    with pytest.raises(MissingInputError, match="gone.png: no such file"):
        infer([tmp_path / "gone.png"], checkpoint, reference=ref, device="cpu")
    with pytest.raises(InputError, match="k: got 16, but .*ref holds only 15 crops"):
        infer([image], checkpoint, reference=ref, config=VoteConfig(k=16), device="cpu")


def test_cli_infer_prints_labels_and_neighbours_and_plots(setup, tmp_path):
    crops, checkpoint, ref, _ = setup
    images = [crops / "grass" / "grass_000.png", crops / "brick" / "brick_004.png"]
    plot = tmp_path / "figs" / "neighbours.png"
    args = ["infer", *map(str, images), "--checkpoint", str(checkpoint), "--reference", str(ref),
            "--k", "3", "--plot", str(plot), "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(cli, ["-q", *args])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{images[0]}: ") and "(score " in lines[0]
    assert lines[1].startswith("  1. grass/grass_000.png  grass  ")  # itself, nearest
    assert lines[4].startswith(f"{images[1]}: ") and lines[5].startswith("  1. brick/brick_004.png")
    assert len(lines) == 9 and lines[8] == f"-> {plot}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_infer_needs_one_reference_and_reports_bad_images(setup, tmp_path):
    crops, checkpoint, ref, _ = setup
    image = str(crops / "brick" / "brick_000.png")
    runner = CliRunner()
    result = runner.invoke(cli, ["infer", image, "--checkpoint", str(checkpoint)])
    assert (
        result.exit_code == 2 and "exactly one of --reference and --reference-dir" in result.output
    )
    (tmp_path / "bad.tif").write_bytes(b"not an image")
    args = ["-q", "infer", str(tmp_path / "bad.tif"), "--checkpoint", str(checkpoint),
            "--reference", str(ref), "--device", "cpu"]  # fmt: skip
    result = runner.invoke(cli, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and "bad.tif: not a readable" in lines[0]
    )


def test_plot_marks_references_that_are_gone(setup, tmp_path):
    crops, checkpoint, _, _ = setup
    moved = Path(shutil.copytree(crops, tmp_path / "crops"))
    results = infer([moved / "grass" / "grass_001.png"], checkpoint, reference_dir=moved,
                    config=VoteConfig(k=2), device="cpu")  # fmt: skip
    shutil.rmtree(moved / "grass")
    path = plot_neighbours(results, tmp_path / "plot.svg")
    assert "missing" in path.read_text()
    with pytest.raises(InputError, match="plot.xyz: unsupported figure format"):
        plot_neighbours(results, tmp_path / "plot.xyz")
