import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from rasters import write_raster
from skimage import data

from superdml import __version__
from superdml.cli import cli
from superdml.errors import MissingInputError


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def small_tif(tmp_path):
    return write_raster(tmp_path / "small.tif", data.astronaut()[:96, :128].transpose(2, 0, 1))


def test_version_and_help(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("segment", "crops"):
        assert command in result.output


def test_segment_and_crops_on_a_local_dask_cluster(runner, small_tif, tmp_path):
    out = tmp_path / "seg"
    result = runner.invoke(
        cli,
        ["--quiet", "segment", str(small_tif), "--out", str(out), "--region-size", "16",
         "--tile-size", "64", "--workers", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "small" / "segments.tif").exists()
    n = pq.read_metadata(out / "small" / "superpixels.parquet").num_rows
    assert f"{n} superpixels in 4 tiles" in result.output
    crops = tmp_path / "crops"
    result = runner.invoke(
        cli, ["-q", "crops", str(out), "--out", str(crops), "--crop-size", "16", "--sample", "7",
              "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((crops / "unlabeled").glob("small_*.png"))) == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["segment", "{tmp}/missing.tif", "--out", "{tmp}/o"], "missing.tif: no such file"),
        (["segment", "{tmp}/notes.tif", "--out", "{tmp}/o"], "notes.tif: not a raster"),
        (["segment", "{small}", "--out", "{tmp}/o", "--bands", "5"], "small.tif: has 3 band"),
        (["segment", "{small}", "--out", "{tmp}/o", "--tile-size", "0"], "tile_size: got 0"),
        (["segment", "{small}", "--out", "{tmp}/o", "--config", "{tmp}/bad.yaml"],
         "bad.yaml: unknown key 'region_sise' (did you mean 'region_size'?)"),
        (["crops", "{tmp}", "--out", "{tmp}/c"], "not a segment folder"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(runner, tmp_path, small_tif, args, message):
    (tmp_path / "notes.tif").write_text("hello")
    (tmp_path / "bad.yaml").write_text("region_sise: 16\n")
    argv = [a.format(tmp=tmp_path, small=small_tif) for a in ["--quiet", *args]]
    result = runner.invoke(cli, [*argv[:2], *argv[2:], "--workers", "0"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "o" / "small" / "segments.tif").exists()


def test_debug_shows_the_traceback(runner, tmp_path):
    result = runner.invoke(
        cli, ["--debug", "segment", str(tmp_path / "x.tif"), "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and isinstance(result.exception, FileNotFoundError)


def test_bad_bands_option_is_a_usage_error(runner, small_tif, tmp_path):
    result = runner.invoke(
        cli, ["segment", str(small_tif), "--out", str(tmp_path), "--bands", "a,b"]
    )
    assert result.exit_code == 2 and "1-based band numbers" in result.output


def test_all_nodata_raster_exits_2(runner, tmp_path):
    path = write_raster(tmp_path / "void.tif", np.zeros((1, 32, 32), np.uint8), nodata=0)
    result = runner.invoke(
        cli, ["-q", "segment", str(path), "--out", str(tmp_path / "o"), "--workers", "0"]
    )
    assert result.exit_code == 2 and "void.tif: has no valid pixel" in result.output


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_debug_go_before_or_after_the_command(tmp_path, where):
    args = ["segment", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o")]

    def run(flag):
        return CliRunner().invoke(cli, [flag, *args] if where == "before" else [*args, flag])

    debug = run("--debug")
    assert isinstance(debug.exception, MissingInputError)  # --debug: raised, with traceback
    quiet = run("-q")
    assert quiet.exit_code == 2 and logging.getLogger().level == logging.WARNING
