"""The ``superdml`` command line: each command parses options and calls one function.

Errors caused by input (:class:`~superdml.core.errors.SuperDMLError`) print one line
``error: <file>: <problem>`` and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from superdml import __version__
from superdml.cli.options import LOCATION, config_options, given, param_option
from superdml.cli.registry import CONFIG, RunContext, StageSpec
from superdml.cli.stages import REGISTRY
from superdml.config.load import load_config
from superdml.config.schema import LabelConfig, VoteConfig
from superdml.core.errors import SuperDMLError

logger = logging.getLogger("superdml")


_ANYWHERE = ("--quiet", "-q", "--debug")
"""Group options also accepted after the command name (``superdml train ... --quiet``)."""


class _Group(click.Group):
    """A click group that turns :class:`SuperDMLError` into one line and exit code 2.

    :data:`_ANYWHERE` options may come anywhere before a ``--``: they are moved in
    front of the command name, where the group parses them.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        moved = [a for a in args[:end] if a in _ANYWHERE]
        rest = [a for a in args[:end] if a not in _ANYWHERE]
        return super().parse_args(ctx, [*moved, *rest, *args[end:]])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SuperDMLError as err:
            if ctx.meta.get("superdml.debug"):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


# ----------------------------------------------------------------- shared options


def cluster_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--workers N | --scheduler ADDRESS``: the dask cluster to run on."""
    f = click.option(
        "--scheduler",
        metavar="ADDRESS",
        help="Attach to a running dask scheduler instead of starting a local cluster.",
    )(f)
    return click.option(
        "--workers",
        type=click.IntRange(min=0),
        help="Worker processes of a local dask cluster (default: in this process, unless "
        "a cluster of one worker per core pays for the raster's tiles; label: in this "
        "process, its model on every core; 0: no cluster).",
    )(f)


def device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--device auto|cpu|cuda``."""
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where to run the model.",
    )(f)


# ------------------------------------------------------------------------- group


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="superdml")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.option("--debug", is_flag=True, help="Debug logging; show tracebacks of errors.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """Label superpixels of large rasters with deep metric learning."""
    ctx.meta["superdml.debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # superdml's own progress at `level`; other libraries (dask, rasterio) only warnings
    handler.addFilter(lambda r: r.name.startswith("superdml") or r.levelno >= logging.WARNING)
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main() -> None:
    """Entry point of the ``superdml`` console script."""
    sys.exit(cli.main(prog_name="superdml", standalone_mode=True))


# ---------------------------------------------------------------- stage commands


def _stage_command(spec: StageSpec) -> click.Command:
    """Build the command of a registry stage (:mod:`superdml.cli.stages`).

    Its parameters come from the stage's :class:`~superdml.cli.stages.Param` list, then
    ``--config`` and one option per config field, then the shared ``--device`` and
    ``--workers/--scheduler`` where the stage takes a device or a dask client. Options
    left out keep the config file's value, else the field's default.
    """
    params = [param_option(p) for p in spec.params]
    if spec.config is not None:
        params.append(
            click.Option(
                ["--config", CONFIG],
                type=LOCATION,
                help="YAML config of this stage; options given here override it.",
            )
        )
        params += config_options(spec.options_from or spec.config)

    def callback(**values: Any) -> None:
        options = given(click.get_current_context(), values)
        run = RunContext(
            resume=options.pop("resume", False), overwrite=options.pop("overwrite", False)
        )
        if "device" in spec.context:  # the shared --device (segment's is a config key)
            options.pop("device", None)
            run.device = values["device"]
        workers, scheduler = options.pop("workers", None), options.pop("scheduler", None)
        spec.check_options(options)
        spec.build_config(options, run.resume)  # a bad value fails before a cluster starts
        if "client" in spec.context:
            from superdml.core.cluster import make_client

            with make_client(workers, scheduler, stage=spec.cluster) as client:
                run.client = client
                result = spec.run(options, run)
        else:
            result = spec.run(options, run)
        click.echo(spec.summary(result))

    command = click.Command(spec.name, callback=callback, params=params, help=spec.help)
    for shared, wanted in ((device_option, "device"), (cluster_options, "client")):
        if wanted in spec.context:
            shared(command)  # click's option decorators append to a command's params
    return command


for _spec in REGISTRY.values():
    if _spec.command:
        cli.add_command(_stage_command(_spec))


# ---------------------------------------------------------------- other commands


@cli.command("infer")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), help="REF_DIR of `superdml index`.")
@click.option(
    "--reference-dir",
    type=click.Path(path_type=Path),
    help="Labeled crop folder to embed on the fly instead of --reference.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw each image and its neighbours into this figure (.png, .pdf, .svg).",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML config of `superdml label` (its labeling rule applies); options given here "
    "override it.",
)
@device_option
def infer_command(
    images: tuple[Path, ...],
    checkpoint: Path,
    reference: Path | None,
    reference_dir: Path | None,
    plot: Path | None,
    config: Path | None,
    device: str,
    **rule: Any,
) -> None:
    """Label IMAGES by label's rule (the vote of their k nearest references); print those."""
    from superdml.label.infer import infer, plot_neighbours

    if (reference is None) == (reference_dir is None):
        raise click.UsageError("give exactly one of --reference and --reference-dir")
    label_config = load_config(config, LabelConfig, given(click.get_current_context(), rule))
    results = infer(images, checkpoint, reference, reference_dir, label_config, device)
    for result in results:
        click.echo(f"{result.image}: {result.label} (score {result.score:.3f})")
        for rank, neighbour in enumerate(result.neighbours, 1):
            click.echo(f"  {rank}. {neighbour.file}  {neighbour.label}  {neighbour.similarity:.4f}")
    if plot is not None:
        click.echo(f"-> {plot_neighbours(results, plot)}")


infer_command.params += config_options(VoteConfig)  # label's rule, the options evaluate takes


@cli.command("run")
@click.argument("pipeline")
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a var or stage.option."
)
@click.option(
    "--workdir",
    type=LOCATION,
    help="Where relative paths resolve and stage records live (a folder or a bucket URI).",
)
@click.option("--force", multiple=True, metavar="STAGE", help="Rerun this stage and what follows.")
@device_option
@cluster_options
def run_command(
    pipeline: str,
    sets: tuple[str, ...],
    workdir: Path | str | None,
    force: tuple[str, ...],
    device: str,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Run the stages of a PIPELINE file (or a shipped one by name), skipping those up to date.

    A shipped pipeline runs in the current folder unless --workdir says otherwise;
    `superdml init DIR` writes editable copies of them.
    """
    from superdml.cli.pipeline import load_pipeline, run_pipeline
    from superdml.core.cluster import stage_clients

    load_pipeline(pipeline, list(sets), workdir)  # fail on a bad file before starting a cluster
    with stage_clients(workers, scheduler) as clients:
        result = run_pipeline(pipeline, list(sets), workdir, list(force), clients, device)
    for stage in result.stages:
        click.echo(f"{stage.name}: {stage.status} ({stage.seconds:.1f} s)")


@cli.command("init")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def init_command(folder: Path) -> None:
    """Write editable copies of the shipped configs and pipelines into a new FOLDER."""
    from superdml.config.shipped import copy_shipped, pipeline_names

    written = copy_shipped(folder)
    click.echo(f"{len(written)} files -> {folder}/configs, {folder}/pipelines")
    click.echo(
        f"run one with: superdml run {folder}/pipelines/<name>.yaml "
        f"--set configs={folder}/configs (pipelines: {', '.join(pipeline_names())})"
    )


@cli.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
)
@click.option(
    "--size",
    type=click.IntRange(min=256),
    default=1024,
    show_default=True,
    help="Mosaic side in pixels.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Training epochs (default: the shipped demo pipeline's).",
)
@device_option
@cluster_options
def demo_command(
    out: Path,
    size: int,
    epochs: int | None,
    device: str,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Label a sample mosaic end to end and write DIR/report.md and DIR/overview.png."""
    from superdml.cli.demo import demo
    from superdml.core.cluster import stage_clients

    with stage_clients(workers, scheduler) as clients:
        result = demo(out, device, size, epochs, clients)
    click.echo(
        f"demo finished in {result.seconds:.0f} s: unseen-half pixel accuracy "
        f"{result.pixel_accuracy:.3f}\n  report:   {result.report}\n  overview: {result.overview}\n"
        f"  labels:   {result.out_dir / 'labels' / 'labels.tif'} (open in QGIS with labels.qml)"
    )


@cli.command("serve")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--train-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Training folder: each decision moves the crop into TRAIN_DIR/<class>/.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option(
    "--retrain-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where Retrain writes its rounds (default: FOLDER-retrain beside FOLDER).",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), help="Retrain epochs (default: the pipeline's)."
)
@click.option("--workers", type=click.IntRange(min=0), help="Retrain dask workers (0: no cluster).")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model of 'more like this' (default: the label run's).",
)
@device_option
def serve_command(
    folder: Path,
    train_dir: Path,
    port: int,
    retrain_dir: Path | None,
    epochs: int | None,
    workers: int | None,
    checkpoint: Path | None,
    device: str,
) -> None:
    """Sort the crops of FOLDER (review or crops output) in the browser, on 127.0.0.1."""
    from superdml.serve.server import ServeOptions, serve

    options = ServeOptions(port, retrain_dir, epochs, workers, device, checkpoint)
    serve(folder, train_dir, options, announce=lambda line: click.echo(line, err=False))
