import json

import pytest
from click.testing import CliRunner
from rasters import texture_mosaic, write_raster

from superdml.cli.commands import cli
from superdml.cli.compare import write_comparison
from superdml.cli.pipeline import load_pipeline, run_pipeline
from superdml.core.errors import ConfigError

PIPELINE = """\
vars:
  mosaic: mosaic.tif
stages:
  - stage: segment
    rasters: ${mosaic}
    out: seg
    region_size: 16
    tile_size: 128
  - stage: crops
    segments: seg
    out: crops
    label_raster: truth.tif
    crop_size: 16
    per_class: 5
"""


@pytest.fixture
def workdir(tmp_path):
    rgb, truth = texture_mosaic(256)
    write_raster(tmp_path / "mosaic.tif", rgb)
    write_raster(tmp_path / "truth.tif", truth[None])
    (tmp_path / "p.yaml").write_text(PIPELINE)
    return tmp_path


def statuses(result):
    return {s.name: s.status for s in result.stages}


def test_second_run_skips_every_stage(workdir):
    first = run_pipeline(workdir / "p.yaml")
    assert statuses(first) == {"segment": "ran", "crops": "ran"}
    assert len(list((workdir / "crops").glob("class_*/*.png"))) == 20
    again = run_pipeline(workdir / "p.yaml")
    assert statuses(again) == {"segment": "skipped", "crops": "skipped"}


def test_changing_an_option_reruns_that_stage_and_what_follows(workdir):
    run_pipeline(workdir / "p.yaml")
    result = run_pipeline(workdir / "p.yaml", sets=["crops.per_class=3"])
    assert statuses(result) == {"segment": "skipped", "crops": "ran"}
    assert len(list((workdir / "crops").glob("class_*/*.png"))) >= 12
    result = run_pipeline(workdir / "p.yaml", sets=["segment.region_size=24", "crops.per_class=3"])
    assert statuses(result) == {"segment": "ran", "crops": "ran"}


def test_changed_input_file_reruns(workdir):
    run_pipeline(workdir / "p.yaml")
    rgb, truth = texture_mosaic(256)
    write_raster(workdir / "truth.tif", (5 - truth)[None])
    assert statuses(run_pipeline(workdir / "p.yaml")) == {"segment": "skipped", "crops": "ran"}


def test_force_reruns_the_stage_and_the_following(workdir):
    run_pipeline(workdir / "p.yaml")
    assert statuses(run_pipeline(workdir / "p.yaml", force=["segment"])) == {
        "segment": "ran",
        "crops": "ran",
    }


def test_interrupted_stage_reruns(workdir, monkeypatch):
    import superdml.cli.pipeline as pipeline_module

    run_pipeline(workdir / "p.yaml")
    manifest = workdir / ".superdml" / "crops.json"
    record = json.loads(manifest.read_text())
    record["finished"] = None  # as if killed during the stage
    manifest.write_text(json.dumps(record))
    assert statuses(run_pipeline(workdir / "p.yaml")) == {"segment": "skipped", "crops": "ran"}
    assert pipeline_module.STATE_DIR == ".superdml"


SEG = "stages:\n  - stage: segment\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages:\n  - stage: sgement\n    out: x\n",
         "p.yaml:2: unknown stage 'sgement' (did you mean 'segment'?)"),
        ("var:\n  a: 1\nstages: []\n",
         "p.yaml:1: unknown top-level key 'var' (did you mean 'vars'?)"),
        (SEG + "    rasters: [mosaic.tif]\n    out: s\n    regoin_size: 3\n",
         "p.yaml:2: stage 'segment': unknown option 'regoin_size' (did you mean 'region_size'?)"),
        (SEG + "    out: s\n", "missing option 'rasters'"),
        (SEG + "    rasters: [nope.tif]\n    out: s\n", "nope.tif does not exist"),
        (SEG + "    rasters: ${nothing}\n    out: s\n", "${nothing} has no value"),
        (SEG + "    rasters: [mosaic.tif]\n    out: s\n    tile_size: 0\n",
         "stage 'segment': tile_size: got 0"),
        ("stages:\n  - stage: crops\n    segments: nowhere\n    out: c\n", "segments"),
        ("stages:\n  - stage: train\n    train_dir: c\n    out: m\n    resume: true\n",
         "p.yaml:2: stage 'train': unknown option 'resume'"),
        ("stages:\n  - stage: review\n    out: l\n    segments: s\n    folder: r\n"
         "    per_class: 3\n    limit: 9\n",
         "p.yaml:2: stage 'review': per_class and limit: give one, not both"),
        ("stages:\n  - stage: train\n    train_dir: c\n    out: m\n    augment: {flip: 1}\n",
         "unknown key 'augment.flip'"),
    ],
)  # fmt: skip
def test_validation_names_the_line_before_anything_runs(workdir, text, message):
    (workdir / "p.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(workdir / "p.yaml")
    assert message in str(err.value)
    assert not (workdir / ".superdml").exists()


def test_later_stage_may_use_an_earlier_output(workdir):
    pipeline = load_pipeline(workdir / "p.yaml", workdir=workdir)
    assert [s.name for s in pipeline.stages] == ["segment", "crops"]
    assert pipeline.stages[1].options["segments"] == str(workdir / "seg")


def test_cli_run_and_bad_file(workdir):
    runner = CliRunner()
    result = runner.invoke(cli, ["-q", "run", str(workdir / "p.yaml"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "segment: ran" in result.output and "crops: ran" in result.output
    result = runner.invoke(
        cli, ["-q", "run", str(workdir / "p.yaml"), "--workers", "0", "--force", "nope"]
    )
    assert result.exit_code == 2 and "--force nope: no such stage" in result.output
    (workdir / "bad.yaml").write_text("stages:\n  - stage: label\n")
    result = runner.invoke(cli, ["-q", "run", str(workdir / "bad.yaml"), "--workers", "0"])
    assert result.exit_code == 2 and "bad.yaml:2: stage 'label': missing option" in result.output


def test_write_comparison(tmp_path):
    write_comparison(
        {"metrics": {"map_at_r": 0.5, "nmi": 0.2}},
        {"metrics": {"map_at_r": 0.7, "nmi": 0.1}},
        tmp_path,
    )
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert rows["map_at_r"]["change"] == pytest.approx(0.2)
    assert "| nmi | 0.200 | 0.100 | -0.100 |" in (tmp_path / "comparison.md").read_text()


@pytest.mark.parametrize("name", ["demo", "label_mosaic", "retrain", "export_gis"])
def test_shipped_pipelines_validate(tmp_path, name):
    from superdml.config.shipped import pipeline_path

    for folder in ("segments", "crops", "reference", "labels", "data", "model"):
        (tmp_path / folder).mkdir()
    for file in ("mosaic.tif", "model/best.pt", "data/mosaic.tif", "data/truth_left.tif"):
        (tmp_path / file).write_text("")
    (tmp_path / "model" / "train.yaml").write_text("loss: proxy_nca\n")  # the previous run's
    pipeline = load_pipeline(pipeline_path(name), workdir=tmp_path)
    assert pipeline.stages and all(
        str(tmp_path) in s.options.get("out", str(tmp_path)) for s in pipeline.stages
    )


def test_cli_run_unknown_option_is_one_line_naming_file_stage_and_option(workdir):
    (workdir / "p.yaml").write_text(PIPELINE.replace("per_class: 5", "per_clas: 5"))
    result = CliRunner().invoke(cli, ["run", str(workdir / "p.yaml"), "--workers", "0"])
    assert result.exit_code == 2
    assert result.output == (
        f"error: {workdir / 'p.yaml'}:9: stage 'crops': unknown option 'per_clas' "
        "(did you mean 'per_class'?)\n"
    )
    assert not (workdir / ".superdml").exists() and not (workdir / "seg").exists()


def test_pipeline_options_are_the_registry_s(workdir):
    """A stage accepts exactly its parameters, its config keys and ``config``."""
    from superdml.cli.stages import REGISTRY

    assert REGISTRY["export"].options() == [
        "allow_incomplete", "out", "raster_format", "segments", "vector",
    ]  # fmt: skip
    assert "resume" not in REGISTRY["train"].options()
    assert {"augment", "loss_params", "config", "train_dir"} <= set(REGISTRY["train"].options())


def test_every_stage_declares_its_outputs():
    from superdml.cli.stages import REGISTRY

    assert [name for name, spec in REGISTRY.items() if spec.outputs is None] == []


LABEL_EXPORT = """\
stages:
  - stage: label
    segments: seg
    checkpoint: model.pt
    reference: ref
    out: labels
    k: 5
    tile_size: 128
  - stage: export
    out: labels
    segments: seg
    vector: none
"""


def test_a_deleted_output_reruns_its_stage(shared_world, tmp_path):
    root = shared_world.copy_to(tmp_path / "world")
    (root / "p.yaml").write_text(LABEL_EXPORT)
    assert statuses(run_pipeline(root / "p.yaml", device="cpu")) == {
        "label": "ran",
        "export": "ran",
    }
    (root / "labels" / "labels.tif").unlink()
    again = run_pipeline(root / "p.yaml", device="cpu")
    assert statuses(again) == {"label": "skipped", "export": "ran"}
    assert (root / "labels" / "labels.tif").exists()
    (root / "labels" / "label.json").unlink()
    assert statuses(run_pipeline(root / "p.yaml", device="cpu")) == {
        "label": "ran",
        "export": "ran",
    }
