"""The ``superdml`` command line: each command parses options and calls one function.

Errors caused by input (:class:`~superdml.errors.SuperDMLError`) print one line
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
from superdml.errors import SuperDMLError

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


def _parse_bands(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        bands = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected 1-based band numbers like 1,2,3") from None
    if not bands or min(bands) < 1:
        raise click.BadParameter(f"{value!r}: expected 1-based band numbers like 1,2,3")
    return bands


def bands_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--bands 1,2,3``: 1-based band numbers, parsed into a tuple of int."""
    return click.option("--bands", callback=_parse_bands, help="1-based band numbers, e.g. 1,2,3.")(
        f
    )


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--config FILE``: a YAML file of the stage's keys."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="YAML config of this stage; options given here override it.",
    )(f)


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
        help="Worker processes of the local dask cluster (default: one per core; label: "
        "one using every core; 0: no cluster, run in this process).",
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


def precision_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--precision auto|fp32|bf16``, checked by the stage (a bad value: one line, exit 2)."""
    return click.option(
        "--precision",
        help="Model arithmetic: auto (bf16 where the device computes it), fp32 or bf16.",
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


# ---------------------------------------------------------------------- commands


@cli.command()
@click.argument("rasters", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@config_option
@click.option("--region-size", type=int, help="Approximate superpixel side in pixels [32].")
@click.option("--compactness", type=float, help="Weight of the spatial term [0.2].")
@click.option("--tile-size", type=int, help="Core tile side in pixels [2048].")
@bands_option
@click.option("--nodata", type=float, help="Value to treat as nodata (default: the raster's).")
@click.option("--backend", metavar="auto|numpy|torch", help="SLIC implementation [auto: torch].")
@click.option(
    "--device", metavar="auto|cpu|cuda", help="Where the torch backend runs [auto: CUDA if any]."
)
@cluster_options
def segment(
    rasters: tuple[Path, ...],
    out: Path,
    config_path: Path | None,
    region_size: int | None,
    compactness: float | None,
    tile_size: int | None,
    bands: tuple[int, ...] | None,
    nodata: float | None,
    backend: str | None,
    device: str | None,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Segment RASTERS into SLIC superpixels: segments.tif + superpixels.parquet each."""
    from superdml.cluster import make_client
    from superdml.config import SegmentConfig, load_config
    from superdml.segment import segment_raster

    config = load_config(
        config_path,
        SegmentConfig,
        {
            "region_size": region_size,
            "compactness": compactness,
            "tile_size": tile_size,
            "bands": bands,
            "nodata": nodata,
            "backend": backend,
            "device": device,
        },
    )
    with make_client(workers, scheduler) as client:
        for raster in rasters:
            result = segment_raster(raster, out, config, client=client)
            click.echo(
                f"{raster}: {result.n_superpixels} superpixels in {result.n_tiles} tiles "
                f"-> {result.segments_path}, {result.table_path}"
            )


@cli.command()
@click.argument("segment_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@config_option
@click.option("--crop-size", type=int, help="Crop side in pixels [64].")
@click.option(
    "--mask",
    type=click.Choice(["none", "outside", "alpha"]),
    help="Pixels outside the superpixel: kept, zeroed, or kept with an alpha mask [none].",
)
@bands_option
@click.option("--sample", type=int, help="Draw this many superpixels at random.")
@click.option("--per-class", type=int, help="At most this many per class (with --label-raster).")
@click.option("--seed", type=int, help="Seed of the random draws [0].")
@click.option(
    "--label-raster",
    type=click.Path(path_type=Path),
    help="Categorical raster: each superpixel goes to its majority class's folder.",
)
@click.option(
    "--classes",
    type=click.Path(path_type=Path),
    help="Class scheme YAML: code -> name or {name, color, description} (see README).",
)
@click.option("--min-purity", type=float, help="Minimum majority share [0.8].")
@cluster_options
def crops(
    segment_dir: Path,
    out: Path,
    config_path: Path | None,
    crop_size: int | None,
    mask: str | None,
    bands: tuple[int, ...] | None,
    sample: int | None,
    per_class: int | None,
    seed: int | None,
    label_raster: Path | None,
    classes: Path | None,
    min_purity: float | None,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Write PNG crops of the superpixels in SEGMENT_DIR into class folders."""
    from superdml.cluster import make_client
    from superdml.config import CropsConfig, load_config
    from superdml.crops import export_crops

    config = load_config(
        config_path,
        CropsConfig,
        {
            "crop_size": crop_size,
            "mask": mask,
            "bands": bands,
            "sample": sample,
            "per_class": per_class,
            "seed": seed,
            "min_purity": min_purity,
        },
    )
    with make_client(workers, scheduler) as client:
        result = export_crops(segment_dir, out, config, label_raster, classes, client=client)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.per_class.items()))
    click.echo(f"{result.n_crops} crops ({counts}) -> {result.out_dir}, {result.table_path}")


@cli.command("label")
@click.argument("segment_dir", type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option(
    "--reference",
    required=True,
    type=click.Path(path_type=Path),
    help="REF_DIR of `superdml index`.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--raster", type=click.Path(path_type=Path), help="The source raster, if it moved.")
@config_option
@click.option("--k", type=int, help="Nearest references that vote [10].")
@click.option("--batch-size", type=int, help="Crops per forward pass [256].")
@click.option("--crop-size", type=int, help="Crop side (default: the checkpoint's crop rule).")
@click.option("--tile-size", type=int, help="Raster tile side, the unit of work [1024].")
@click.option(
    "--unknown-threshold", type=float, help="Similarity below which the label is unknown."
)
@click.option(
    "--keep-embeddings", is_flag=True, default=None, help="Keep tile embeddings for re-votes."
)
@click.option("--overwrite", is_flag=True, help="Replace predictions made with another checkpoint.")
@precision_option
@device_option
@cluster_options
def label_command(
    segment_dir: Path,
    checkpoint: Path,
    reference: Path,
    out: Path,
    raster: Path | None,
    config_path: Path | None,
    k: int | None,
    batch_size: int | None,
    crop_size: int | None,
    tile_size: int | None,
    unknown_threshold: float | None,
    keep_embeddings: bool | None,
    overwrite: bool,
    precision: str | None,
    device: str,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Label every superpixel of SEGMENT_DIR by kNN against a reference index."""
    from superdml.cluster import make_client
    from superdml.config import LabelConfig, load_config
    from superdml.label import label

    config = load_config(
        config_path,
        LabelConfig,
        {
            "k": k,
            "batch_size": batch_size,
            "crop_size": crop_size,
            "tile_size": tile_size,
            "unknown_threshold": unknown_threshold,
            "keep_embeddings": keep_embeddings,
            "precision": precision,
        },
    )
    with make_client(workers, scheduler, stage="label") as client:
        result = label(
            segment_dir, checkpoint, reference, out, config, raster, device, client, overwrite
        )
    click.echo(
        f"{result.n_superpixels} superpixels in {result.n_tiles} tiles "
        f"({result.n_skipped} already done), {result.superpixels_per_second:.0f} superpixels/s "
        f"-> {result.out_dir / 'predictions'}"
    )


@cli.command("export")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--segments", required=True, type=click.Path(path_type=Path), help="SEGMENT_DIR.")
@click.option(
    "--raster-format", type=click.Choice(["cog", "gtiff"]), default="cog", show_default=True
)
@click.option(
    "--vector", type=click.Choice(["gpkg", "parquet", "none"]), default="gpkg", show_default=True
)
@click.option(
    "--allow-incomplete",
    is_flag=True,
    help="Export a label run with tiles that have no predictions (left unlabeled).",
)
def export_command(
    out: Path, segments: Path, raster_format: str, vector: str, allow_incomplete: bool
) -> None:
    """Write label/score rasters, polygons, a QGIS style and a summary for OUT."""
    from superdml.export import export

    result = export(out, segments, raster_format, vector, allow_incomplete)  # type: ignore[arg-type]
    for name, files in result.outputs.items():
        click.echo(f"{name}: " + ", ".join(str(p) for p in files.values()))


@cli.command("index")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option(
    "--reference-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Labeled crops, one folder per class.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@config_option
@click.option("--batch-size", type=int, help="Crops per forward pass [256].")
@click.option("--ivf-threshold", type=int, help="More references than this get an IVF index.")
@click.option("--nprobe", type=int, help="Inverted lists an IVF search visits [32].")
@precision_option
@device_option
def index_command(
    checkpoint: Path,
    reference_dir: Path,
    out: Path,
    config_path: Path | None,
    batch_size: int | None,
    ivf_threshold: int | None,
    nprobe: int | None,
    precision: str | None,
    device: str,
) -> None:
    """Embed the labeled crops of --reference-dir into a reference index at --out."""
    from superdml.config import IndexConfig, load_config
    from superdml.index import build_index

    config = load_config(
        config_path,
        IndexConfig,
        {
            "batch_size": batch_size,
            "ivf_threshold": ivf_threshold,
            "nprobe": nprobe,
            "precision": precision,
        },
    )
    result = build_index(checkpoint, reference_dir, out, config, device)
    counts = ", ".join(f"{k}: {v}" for k, v in result.per_class.items())
    click.echo(
        f"{result.n_references} references ({counts}); {result.n_embedded} embedded, "
        f"{result.n_reused} reused, {result.n_removed} removed -> {result.out_dir} "
        f"({result.index_type} index)"
    )


@cli.command("infer")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), help="REF_DIR of `superdml index`.")
@click.option(
    "--reference-dir",
    type=click.Path(path_type=Path),
    help="Labeled crop folder to embed on the fly instead of --reference.",
)
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw each image and its neighbours into this figure (.png, .pdf, .svg).",
)
@precision_option
@device_option
def infer_command(
    images: tuple[Path, ...],
    checkpoint: Path,
    reference: Path | None,
    reference_dir: Path | None,
    k: int,
    plot: Path | None,
    precision: str | None,
    device: str,
) -> None:
    """Label IMAGES by their k nearest references and print those references."""
    from superdml.infer import infer, plot_neighbours

    if (reference is None) == (reference_dir is None):
        raise click.UsageError("give exactly one of --reference and --reference-dir")
    results = infer(images, checkpoint, reference, reference_dir, k, device, precision or "auto")
    for result in results:
        click.echo(f"{result.image}: {result.label} (score {result.score:.3f})")
        for rank, neighbour in enumerate(result.neighbours, 1):
            click.echo(f"  {rank}. {neighbour.file}  {neighbour.label}  {neighbour.similarity:.4f}")
    if plot is not None:
        click.echo(f"-> {plot_neighbours(results, plot)}")


@cli.command("train")
@click.option(
    "--train-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Labeled crops: one sub-folder of images per class.",
)
@click.option(
    "--val-dir",
    type=click.Path(path_type=Path),
    help="Validation crops (default: a stratified share of --train-dir, val_fraction).",
)
@click.option(
    "--loss",
    metavar="NAME",
    help="triplet, proxy_nca, proxy_anchor or soft_triple; without --config the "
    "shipped configs/losses/NAME.yaml is used.",
)
@config_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option(
    "--init",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Warm-start from this checkpoint (its classes may differ).",
)
@click.option("--epochs", type=int, help="Training epochs (overrides the config).")
@precision_option
@device_option
def train_command(
    train_dir: Path,
    val_dir: Path | None,
    loss: str | None,
    config_path: Path | None,
    out: Path,
    resume: bool,
    init: Path | None,
    epochs: int | None,
    precision: str | None,
    device: str,
) -> None:
    """Train an embedding network on labeled crop folders: best.pt, last.pt, metrics.csv."""
    from superdml.config import TrainConfig, load_config
    from superdml.train import train, training_config_path

    config = load_config(
        training_config_path(config_path, loss, out, resume),
        TrainConfig,
        {"loss": loss, "epochs": epochs},
    )
    result = train(train_dir, out, config, val_dir, resume, init, device, precision or "auto")
    score = result.metrics.get("map_at_r")
    validation = f", map_at_r {score:.4f}" if score is not None else ""
    click.echo(
        f"{result.epochs_run} epochs in {result.seconds:.0f} s{validation} -> "
        f"{result.best_path}, {result.last_path}, {result.metrics_path}"
    )


@cli.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--query-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Labeled crops to evaluate: one sub-folder of images per class.",
)
@click.option(
    "--reference-dir",
    type=click.Path(path_type=Path),
    help="Labeled references to search (default: the queries, each leaving itself out).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@precision_option
@device_option
def evaluate_command(
    checkpoint: Path,
    query_dir: Path,
    reference_dir: Path | None,
    out: Path,
    precision: str | None,
    device: str,
) -> None:
    """Evaluate a checkpoint: metrics.json, confusion matrix, t-SNE and similarity figures."""
    from superdml.evaluate import evaluate

    result = evaluate(checkpoint, query_dir, out, reference_dir, device, precision or "auto")
    click.echo(
        f"{result.n_query} queries, {result.n_reference} references: map_at_r "
        f"{result.metrics['map_at_r']:.4f}, top1_accuracy {result.metrics['top1_accuracy']:.4f}"
        f" -> {result.metrics_path}"
    )


@cli.command("run")
@click.argument("pipeline")
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a var or stage.option."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where relative paths resolve.",
)
@click.option("--force", multiple=True, metavar="STAGE", help="Rerun this stage and what follows.")
@device_option
@cluster_options
def run_command(
    pipeline: str,
    sets: tuple[str, ...],
    workdir: Path | None,
    force: tuple[str, ...],
    device: str,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Run the stages of a PIPELINE file (or a shipped one by name), skipping those up to date.

    A shipped pipeline runs in the current folder unless --workdir says otherwise;
    `superdml init DIR` writes editable copies of them.
    """
    from superdml.cluster import make_client
    from superdml.pipeline import load_pipeline, run_pipeline

    load_pipeline(pipeline, list(sets), workdir)  # fail on a bad file before starting a cluster
    with make_client(workers, scheduler) as client:
        result = run_pipeline(pipeline, list(sets), workdir, list(force), client, device)
    for stage in result.stages:
        click.echo(f"{stage.name}: {stage.status} ({stage.seconds:.1f} s)")


@cli.command("init")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def init_command(folder: Path) -> None:
    """Write editable copies of the shipped configs and pipelines into a new FOLDER."""
    from superdml.shipped import copy_shipped, pipeline_names

    written = copy_shipped(folder)
    click.echo(f"{len(written)} files -> {folder}/configs, {folder}/pipelines")
    click.echo(
        f"run one with: superdml run {folder}/pipelines/<name>.yaml "
        f"--set configs={folder}/configs (pipelines: {', '.join(pipeline_names())})"
    )


@cli.command("review")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--segments", required=True, type=click.Path(path_type=Path), help="SEGMENT_DIR.")
@click.option("--raster", type=click.Path(path_type=Path), help="The source raster, if it moved.")
@click.option(
    "--out",
    "folder",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for <predicted class>/ crops and crops.parquet.",
)
@config_option
@click.option("--max-score", type=float, help="Candidates have a vote share at most this [0.6].")
@click.option("--unknown", is_flag=True, default=None, help="Also every unknown superpixel.")
@click.option("--per-class", type=int, help="At most this many per predicted class.")
@click.option("--limit", type=int, help="At most this many in all, without --per-class [200].")
@click.option(
    "--diverse", is_flag=True, default=None, help="Spread the picks over the embedding space."
)
@click.option("--seed", type=int, help="Seed of the --diverse k-means [0].")
@device_option
def review_command(
    out: Path,
    segments: Path,
    raster: Path | None,
    folder: Path,
    config_path: Path | None,
    max_score: float | None,
    unknown: bool | None,
    per_class: int | None,
    limit: int | None,
    diverse: bool | None,
    seed: int | None,
    device: str,
) -> None:
    """Write crops of the least certain superpixels of OUT into class folders to relabel."""
    from superdml.config import ReviewConfig, load_config
    from superdml.review import review

    if per_class is not None and limit is not None:
        raise click.UsageError("give --per-class or --limit, not both")
    config = load_config(
        config_path,
        ReviewConfig,
        {
            "max_score": max_score,
            "unknown": unknown,
            "per_class": per_class,
            "limit": limit,
            "diverse": diverse,
            "seed": seed,
        },
    )
    result = review(out, segments, folder, config, raster, device)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.per_class.items()))
    click.echo(f"{result.n_crops} crops to review ({counts}) -> {result.folder}")


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
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs [8].")
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
    from superdml.cluster import make_client
    from superdml.demo import demo

    with make_client(workers, scheduler) as client:
        result = demo(out, device, size, epochs, client)
    click.echo(
        f"demo finished in {result.seconds:.0f} s: unseen-half pixel accuracy "
        f"{result.pixel_accuracy:.3f}\n  report:   {result.report}\n  overview: {result.overview}\n"
        f"  labels:   {result.out_dir / 'labels' / 'labels.tif'} (open in QGIS with labels.qml)"
    )
