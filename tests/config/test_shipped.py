"""Shipped configs and pipelines: found by name, copied by `superdml init`, in the wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from superdml.cli.commands import cli
from superdml.cli.pipeline import load_pipeline
from superdml.config.schema import LabelConfig, SegmentConfig, load_config
from superdml.config.shipped import configs_dir, pipeline_names, pipeline_path, resolve_pipeline
from superdml.core.errors import MissingInputError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_files_live_in_the_package():
    assert pipeline_names() == ["demo", "export_gis", "label_mosaic", "retrain"]
    package = Path(__import__("superdml").__file__).parent
    # in a wheel: the package's own copy; in a source checkout: configs/ at the root
    assert configs_dir() in (package / "configs", package.parent / "configs")
    load_config(configs_dir() / "segment.yaml", SegmentConfig)
    load_config(configs_dir() / "label.yaml", LabelConfig)


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_pipeline("demo") == pipeline_path("demo")
    Path("demo").write_text("stages: []\n")
    assert resolve_pipeline("demo") == Path("demo")
    with pytest.raises(MissingInputError, match="nope: no such file, nor a shipped pipeline"):
        resolve_pipeline("nope")
    with pytest.raises(MissingInputError, match="shipped: demo, export_gis"):
        resolve_pipeline("sub/demo.yaml")
    with pytest.raises(MissingInputError, match=r"pipeline \(did you mean 'label_mosaic'\?\)"):
        resolve_pipeline("label_mosiac")
    with pytest.raises(MissingInputError, match=r"pipeline \(did you mean 'retrain'\?\)"):
        pipeline_path("retrian")


def test_a_shipped_pipeline_by_name_runs_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("mosaic.tif", "model/best.pt", "reference/x"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    pipeline = load_pipeline("label_mosaic")
    assert pipeline.workdir == tmp_path.resolve()
    assert pipeline.stages[0].options["out"] == str(tmp_path.resolve() / "segments")
    assert pipeline.stages[0].options["config"] == str(configs_dir() / "segment.yaml")


def test_cli_run_names_the_shipped_pipelines_for_an_unknown_one(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml: no such file, nor a shipped pipeline (shipped: demo" in result.output


def test_init_writes_editable_copies_and_never_over_a_users_folder(tmp_path):
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "proj")])
    assert result.exit_code == 0, result.output
    copies = sorted(p.relative_to(tmp_path / "proj").as_posix()
                    for p in (tmp_path / "proj").rglob("*.yaml"))  # fmt: skip
    shipped = sorted(p.relative_to(configs_dir().parent).as_posix()
                     for folder in ("configs", "pipelines")
                     for p in (configs_dir().parent / folder).rglob("*.yaml"))  # fmt: skip
    assert copies == shipped and "pipelines/retrain.yaml" in copies
    copy = yaml.safe_load((tmp_path / "proj" / "configs" / "segment.yaml").read_text())
    assert copy == yaml.safe_load((configs_dir() / "segment.yaml").read_text())
    again = CliRunner().invoke(cli, ["init", str(tmp_path / "proj")])
    assert again.exit_code == 2 and "proj/configs: exists already" in again.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    refused = CliRunner().invoke(cli, ["init", str(tmp_path / "mine")])
    assert refused.exit_code == 2 and "mine: is not empty" in refused.output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["a.txt"]


@pytest.mark.slow
def test_the_wheel_carries_every_shipped_file(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("superdml-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        "superdml/" + p.relative_to(ROOT).as_posix()
        for folder in ("configs", "pipelines")
        for p in (ROOT / folder).rglob("*.yaml")
    }
    assert shipped and shipped <= names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "superdml").rglob("*.py")}
    assert modules <= names, sorted(modules - names)  # every package is listed in pyproject
