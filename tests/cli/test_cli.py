import dataclasses
import importlib
import inspect
import logging
import re

import click
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from rasters import write_raster
from skimage import data

from superdml import __version__
from superdml.cli.commands import cli
from superdml.cli.options import field_help, given
from superdml.cli.registry import RunContext
from superdml.cli.stages import REGISTRY
from superdml.config.schema import AugmentConfig, TrainConfig
from superdml.core.errors import MissingInputError


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def small_tif(tmp_path):
    return write_raster(tmp_path / "small.tif", data.astronaut()[:96, :128].transpose(2, 0, 1))


def test_version_and_help(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(cli, ["--help"], terminal_width=400, max_content_width=400)
    assert result.exit_code == 0
    listed = result.output.split("Commands:\n", 1)[1].splitlines()
    assert sorted(line.split()[0] for line in listed if line.strip()) == sorted(cli.commands)
    for name, command in cli.commands.items():
        assert f"  {name} " in result.output and command.get_short_help_str(400) in result.output
    stages = {name for name, spec in REGISTRY.items() if spec.command}
    assert stages <= set(cli.commands)  # every command-line stage of the registry is a command


def registry_flags(spec):
    """The options and arguments the registry gives the command of `spec`."""
    flags = {p.cli or "--" + p.name.replace("_", "-") for p in spec.params}
    if spec.config:  # the fields of the option class (evaluate: only label's vote rule)
        flags |= {"--config"} | {
            "--" + key.replace(".", "-").replace("_", "-")
            for key, *_ in flat_fields(spec.option_class())
        }
    flags |= {"--device"} if "device" in spec.context else set()
    flags |= {"--workers", "--scheduler"} if "client" in spec.context else set()
    return flags


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_help_exits_0_and_lists_its_options(runner, name):
    result = runner.invoke(cli, [name, "--help"], terminal_width=400, max_content_width=400)
    assert result.exit_code == 0, result.output
    usage, options = result.output.split("Options:\n", 1)
    assert usage.startswith(f"Usage: cli {name} [OPTIONS]")
    shown = {entry.split()[0].rstrip(",") for entry in re.split(r"\n(?=  -)", options)}
    arguments = usage.splitlines()[0].removeprefix(f"Usage: cli {name} [OPTIONS]")
    shown |= set(re.findall(r"[A-Z][A-Z_]+", arguments))
    declared = {
        p.opts[0] if isinstance(p, click.Option) else p.human_readable_name.rstrip(".")
        for p in cli.commands[name].params
    }
    assert declared | {"--help"} == shown  # no option hidden, none shown twice
    spec = REGISTRY.get(name)
    if spec is not None and spec.command:  # a stage: its options come from the registry
        assert registry_flags(spec) <= shown, registry_flags(spec) - shown


@pytest.mark.slow
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
        cli,
        ["--debug", "segment", str(tmp_path / "x.tif"), "--out", str(tmp_path), "--workers", "0"],
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
    # --workers 0: no local cluster to start (segment starts it before reading its input)
    args = [
        "segment",
        str(tmp_path / "missing.tif"),
        "--out",
        str(tmp_path / "o"),
        "--workers",
        "0",
    ]

    def run(flag):
        return CliRunner().invoke(cli, [flag, *args] if where == "before" else [*args, flag])

    debug = run("--debug")
    assert isinstance(debug.exception, MissingInputError)  # --debug: raised, with traceback
    quiet = run("-q")
    assert quiet.exit_code == 2 and logging.getLogger().level == logging.WARNING


# ------------------------------------------------------------ options from the registry

CONFIG_STAGES = [s for s in REGISTRY.values() if s.command and s.config is not None]


def flat_fields(cls, prefix=""):
    """(dotted key, default, documenting class) of every leaf field of a config dataclass."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            yield from flat_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, default, cls


@pytest.mark.parametrize("spec", CONFIG_STAGES, ids=lambda s: s.name)
def test_every_config_field_is_an_option_with_its_help_and_default(runner, spec):
    result = runner.invoke(cli, [spec.name, "--help"], terminal_width=400, max_content_width=400)
    assert result.exit_code == 0, result.output
    entries = re.split(r"\n(?=  -)", result.output.split("Options:\n", 1)[1])
    lines = {entry.split()[0]: entry for entry in entries}  # option -> its help, unwrapped
    for key, default, owner in flat_fields(spec.option_class()):
        flag = "--" + key.replace(".", "-").replace("_", "-")
        assert flag in lines, f"{spec.name}: no {flag}"
        line = " ".join(lines[flag].split())
        assert " ".join(field_help(owner)[key.split(".")[-1]].split()) in line
        if isinstance(default, bool):
            assert f"[default: {flag[2:] if default else 'no-' + flag[2:]}]" in line
        elif default is None or default == {}:
            assert "[default:" not in line
        else:
            assert f"[default: {default}]" in line
        assert not re.search(r"\[\d[\d.]*\]", line), "a default copied into the help"


def test_field_help_reads_every_documented_field():
    helps = field_help(TrainConfig)
    assert helps["epochs"].startswith("Training epochs; one epoch visits")
    assert field_help(AugmentConfig)["vflip"] == field_help(AugmentConfig)["hflip"]
    assert "``" not in helps["loss_params"] and "{margin: 0.2}" in helps["loss_params"]
    for spec in CONFIG_STAGES:
        fields = flat_fields(spec.option_class())
        assert all(field_help(owner)[k.split(".")[-1]] for k, _, owner in fields)


def parsed_config(name, args):
    """The config the command `name` would run with, parsed from `args` without running."""
    command = cli.commands[name]
    with command.make_context(name, args) as ctx:
        return REGISTRY[name].build_config(given(ctx, ctx.params))


def test_option_beats_config_file_beats_default(tmp_path):
    (tmp_path / "seg.yaml").write_text("region_size: 24\ncompactness: 0.5\n")
    base = ["x.tif", "--out", str(tmp_path), "--config", str(tmp_path / "seg.yaml")]
    config = parsed_config("segment", [*base, "--region-size", "16", "--bands", "3,1"])
    assert (config.region_size, config.compactness, config.max_iter) == (16, 0.5, 10)
    assert config.bands == (3, 1)
    assert parsed_config("segment", base).region_size == 24
    assert parsed_config("segment", ["x.tif", "--out", str(tmp_path)]).region_size == 32


def test_nested_and_mapping_options_merge_with_the_file(tmp_path):
    (tmp_path / "t.yaml").write_text("augment: {hflip: false, color_jitter: 0.1}\nepochs: 3\n")
    args = ["--train-dir", str(tmp_path), "--out", str(tmp_path / "m"), "--config",
            str(tmp_path / "t.yaml"), "--no-augment-vflip", "--loss-params", "{margin: 0.3}",
            "--lr", "0.02"]  # fmt: skip
    config = parsed_config("train", args)
    assert config.augment == AugmentConfig(hflip=False, vflip=False, color_jitter=0.1)
    assert (config.loss_params, config.lr, config.epochs) == ({"margin": 0.3}, 0.02, 3)


def test_option_overrides_the_config_file_in_a_run(runner, small_tif, tmp_path):
    (tmp_path / "seg.yaml").write_text("region_size: 24\ncompactness: 0.5\ntile_size: 96\n")
    out = tmp_path / "seg"
    result = runner.invoke(
        cli,
        ["-q", "segment", str(small_tif), "--out", str(out), "--config", str(tmp_path / "seg.yaml"),
         "--region-size", "16", "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "small" / "segment.yaml").read_text())
    assert (written["region_size"], written["compactness"], written["tile_size"]) == (16, 0.5, 96)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mask", "blur"], "error: mask: got 'blur', expected one of none, outside, alpha"),
        (["--loss-params", "[1]"], "expected a YAML mapping"),
    ],
)
def test_bad_generated_option_exits_2(runner, tmp_path, args, message):
    command = "train" if "--loss-params" in args else "crops"
    base = ["--train-dir", str(tmp_path)] if command == "train" else [str(tmp_path)]
    result = runner.invoke(cli, [command, *base, "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_review_per_class_and_limit_exclude_each_other(runner, tmp_path):
    result = runner.invoke(
        cli, ["review", str(tmp_path), "--segments", str(tmp_path), "--out", str(tmp_path / "r"),
              "--per-class", "3", "--limit", "9"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output == "error: per_class and limit: give one, not both\n"


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_registry_entry_takes_what_the_registry_passes(spec):
    fields = set(spec.config_fields())
    assert not fields & {p.name for p in spec.params}, "a parameter shadows a config field"
    context = {f.name for f in dataclasses.fields(RunContext)}
    assert {p.name for p in spec.params if p.cli_only} <= context  # the CLI routes them there
    module, _, function = spec.entry.partition(":")
    entry = getattr(importlib.import_module(module), function)
    kwargs = {p.arg or p.name: None for p in spec.params if not p.cli_only}
    kwargs.update(dict.fromkeys(spec.context), **({"config": None} if spec.config else {}))
    signature = inspect.signature(entry)
    signature.bind(**kwargs)
    for name in ("device", "client"):  # the command offers --device, --workers/--scheduler
        assert (name in signature.parameters) == (name in spec.context), name
