"""The one-command demo: a georeferenced sample mosaic labeled end to end, with a report.

The mosaic is made from images bundled with scikit-image (brick, grass, gravel, and
regions of the coffee and cat photos) arranged in irregular regions (wavy Voronoi
cells), each class in both halves. Crops are pre-labeled from the truth of the left
half only; the report scores the predicted label raster on the right (unseen) half.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin

from superdml.core.atomic import atomic_write, write_json
from superdml.core.cluster import Stage, default_workers
from superdml.core.ownership import claim_output

CLASS_NAMES = ("brick", "grass", "gravel", "coffee", "cat")
DEMO_CRS = "EPSG:32633"  # WGS 84 / UTM zone 33N
DEMO_ORIGIN = (500_000.0, 4_650_000.0)
PIXEL_SIZE = 0.5
#: Rows of the bands :func:`voronoi_regions` computes at once, a thread each.
BAND_ROWS = 256


def _tiled(image: np.ndarray, size: int) -> np.ndarray:
    image = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    reps = (size // image.shape[0] + 1, size // image.shape[1] + 1, 1)
    return np.tile(image, reps)[:size, :size]


def _photo(image: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    scale = size / min(image.shape[:2]) * 0.6
    shape = (int(image.shape[0] * scale), int(image.shape[1] * scale))
    small = (resize(image, shape, anti_aliasing=True) * 255).astype(np.uint8)
    flipped = np.concatenate([small, small[:, ::-1]], axis=1)  # mirrored: seamless tiling
    return _tiled(np.concatenate([flipped, flipped[::-1]], axis=0), size)


def voronoi_regions(size: int, n_classes: int, seed: int = 7, per_half: int = 1) -> np.ndarray:
    """Return irregular regions (wavy Voronoi cells) with every class in both halves.

    Computed in bands of :data:`BAND_ROWS` rows on a thread per core (each pixel's
    cell depends on the pixel alone, so the bands give the whole's result bit for bit).

    Returns
    -------
    (size, size) uint8 ndarray
        Class ids 1..n_classes.
    """
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(1, n_classes + 1), 2 * per_half)
    half = np.tile([0, 1], n_classes * per_half)
    seeds = np.stack(
        [rng.uniform(0.05, 0.95, classes.size), (half + rng.uniform(0.1, 0.9, classes.size)) / 2],
        axis=1,
    )
    truth = np.zeros((size, size), dtype=np.uint8)

    def band(start: int) -> None:
        stop = min(start + BAND_ROWS, size)
        rows, cols = np.mgrid[start:stop, 0:size] / size
        rows, cols = rows + 0.04 * np.sin(cols * 17), cols + 0.04 * np.cos(rows * 13)
        best = np.full(rows.shape, np.inf)
        out = truth[start:stop]
        for (r, c), k in zip(seeds, classes, strict=True):
            dist = (rows - r) ** 2 + (cols - c) ** 2
            closer = dist < best
            np.copyto(best, dist, where=closer)
            np.copyto(out, np.uint8(k), where=closer)

    with ThreadPoolExecutor(default_workers()) as pool:
        list(pool.map(band, range(0, size, BAND_ROWS)))
    return truth


def demo_mosaic(size: int = 1024, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Build the demo mosaic and its truth.

    Returns
    -------
    rgb : (3, size, size) uint8 ndarray
    truth : (size, size) uint8 ndarray
        Ids 1..5 of :data:`CLASS_NAMES`.
    """
    from skimage import data

    makers = [(_tiled, data.brick), (_tiled, data.grass), (_tiled, data.gravel),
              (_photo, data.coffee), (_photo, data.chelsea)]  # fmt: skip
    with ThreadPoolExecutor(default_workers()) as pool:  # the resizes release the GIL
        made = [pool.submit(make, image(), size) for make, image in makers]
        truth = voronoi_regions(size, len(makers), seed, per_half=1 + size // 1024)
        sources = [source.result() for source in made]
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    for k, src in enumerate(sources, start=1):
        np.copyto(rgb, src, where=(truth == k)[..., None])
    return rgb.transpose(2, 0, 1), truth


@dataclass(frozen=True)
class DemoData:
    """Files of the demo input: the mosaic, its truth, and the truth of the left half."""

    mosaic: Path
    truth: Path
    truth_left: Path


def write_demo_data(folder: Path, size: int = 1024) -> DemoData:
    """Write the demo mosaic and truth rasters (GeoTIFF, UTM 33N, 0.5 m pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb, truth = demo_mosaic(size)
    transform = from_origin(*DEMO_ORIGIN, PIXEL_SIZE, PIXEL_SIZE)
    common = {"driver": "GTiff", "height": size, "width": size, "crs": DEMO_CRS,
              "transform": transform, "tiled": True, "blockxsize": 256, "blockysize": 256,
              "compress": "deflate", "num_threads": "all_cpus"}  # fmt: skip
    files = DemoData(folder / "mosaic.tif", folder / "truth.tif", folder / "truth_left.tif")
    with rasterio.open(files.mosaic, "w", count=3, dtype="uint8", **common) as dst:
        dst.write(rgb)
    left = truth.copy()
    left[:, size // 2 :] = 0
    for path, values in ((files.truth, truth), (files.truth_left, left)):
        with rasterio.open(path, "w", count=1, dtype="uint8", nodata=0, **common) as dst:
            dst.write(values, 1)
            dst.update_tags(1, class_names=json.dumps(list(CLASS_NAMES)))
    return files


def unseen_half_scores(
    predicted: np.ndarray, truth: np.ndarray, class_names: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """Pixel accuracy and per-class precision, recall and F1 on the right half.

    Parameters
    ----------
    predicted, truth : (H, W) integer ndarray
        Class ids from 1 in the order of `class_names`; 0 = unlabeled (counts as wrong).
    class_names : sequence of str

    Returns
    -------
    dict
        ``pixel_accuracy`` and ``per_class`` {name: {precision, recall, f1, pixels}}.
    """
    half = truth.shape[1] // 2
    p, t = predicted[:, half:].ravel(), truth[:, half:].ravel()
    valid = t > 0
    p, t = p[valid], t[valid]
    per_class = {}
    for k, name in enumerate(class_names, start=1):
        tp = float(np.sum((p == k) & (t == k)))
        precision = tp / max(np.sum(p == k), 1)
        recall = tp / max(np.sum(t == k), 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1,
                           "pixels": int(np.sum(t == k))}  # fmt: skip
    return {"pixel_accuracy": float(np.mean(p == t)), "per_class": per_class}


def _overview(
    data: DemoData, predicted: np.ndarray, scores: Path, out: Path, names: list[str]
) -> None:
    """Draw mosaic, truth, predicted labels (truth ids) and scores side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from superdml.raster.classes import palette as class_colors

    with rasterio.open(data.mosaic) as src:
        rgb = src.read().transpose(1, 2, 0)
    with rasterio.open(data.truth) as src:
        truth = src.read(1)
    with rasterio.open(scores) as src:
        score = src.read(1)
    colors = [(0, 0, 0), *class_colors(len(names))]
    cmap = ListedColormap(np.asarray(colors) / 255.0)
    fig = Figure(figsize=(16, 4.6), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    panels = [
        (rgb, "mosaic", {}),
        (truth, "truth (left half: training crops)", {"cmap": cmap, "vmin": 0, "vmax": len(names)}),
        (predicted, "predicted labels", {"cmap": cmap, "vmin": 0, "vmax": len(names)}),
        (score, "score (kNN vote share)", {"cmap": "viridis", "vmin": 0, "vmax": 1}),
    ]
    for ax, (image, title, kwargs) in zip(axes, panels, strict=True):
        shown = ax.imshow(image, interpolation="nearest", **kwargs)
        ax.set_title(title)
        ax.axvline(image.shape[1] / 2, color="white", lw=1, ls="--")
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[3], fraction=0.046)
    handles = [
        Patch(color=(r / 255.0, g / 255.0, b / 255.0), label=n)
        for n, (r, g, b) in zip(names, colors[1:], strict=True)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), frameon=False)
    fig.subplots_adjust(left=0.01, right=0.97, top=0.92, bottom=0.1, wspace=0.05)
    fig.savefig(out)


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its report and what it measured."""

    out_dir: Path
    report: Path
    overview: Path
    pixel_accuracy: float
    seconds: float


def demo(
    out_dir: str | Path = "demo-out",
    device: str = "auto",
    size: int = 1024,
    epochs: int | None = None,
    clients: Callable[[Stage], Any] | None = None,
) -> DemoResult:
    """Run the demo: mosaic -> segment -> crops -> train -> index -> label -> export -> review.

    Parameters
    ----------
    out_dir : path
        Working folder (inputs in ``data/``, each stage in its own folder, the report).
    device : {"auto", "cpu", "cuda"}
    size : int
        Side of the square mosaic in pixels (1024: the full demo).
    epochs : int, optional
        Training epochs (the pipeline's value when None).
    clients : callable, optional
        The dask client of each cluster shape (:func:`superdml.core.cluster.stage_clients`);
        everything runs in this process when None.

    Returns
    -------
    DemoResult
    """
    from superdml.cli.pipeline import run_pipeline
    from superdml.label.predictions import load_label_run

    start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    with claim_output(out_dir, "demo"):
        data = write_demo_data(out_dir / "data", size)
        sets = [f"mosaic={data.mosaic}", f"truth_left={data.truth_left}"]
        if epochs is not None:
            sets.append(f"epochs={epochs}")
        result = run_pipeline("demo", sets, out_dir, clients=clients, device=device)
        scheme = load_label_run(out_dir / "labels").scheme
        labels, scores = out_dir / "labels" / "labels.tif", out_dir / "labels" / "scores.tif"
        with rasterio.open(labels) as src:
            predicted = src.read(1)
        with rasterio.open(data.truth) as src:
            truth = src.read(1)
        # predicted values are the class scheme's codes; map them to truth ids (others: 0)
        to_truth = np.zeros(1 << 16, dtype=np.int64)
        for name, code in scheme.codes.items():
            to_truth[code] = CLASS_NAMES.index(name) + 1 if name in CLASS_NAMES else 0
        scores_half = unseen_half_scores(to_truth[predicted], truth, CLASS_NAMES)
        overview = out_dir / "overview.png"
        _overview(data, to_truth[predicted], scores, overview, list(CLASS_NAMES))
        seconds = time.perf_counter() - start
        report = out_dir / "report.md"
        with atomic_write(report) as tmp:
            tmp.write_text(_report(out_dir, result, scores_half, seconds))
        write_json(out_dir / "report.json", scores_half)
    return DemoResult(out_dir, report, overview, scores_half["pixel_accuracy"], seconds)


def _report(out_dir: Path, result: Any, scores: dict[str, Any], seconds: float) -> str:
    from superdml.learn.checkpoint import load_checkpoint

    metrics = load_checkpoint(out_dir / "model" / "best.pt").metrics
    lines = [
        "# superdml demo",
        "",
        "![overview](overview.png)",
        "",
        f"Crops from the left half trained the model; the right half was never seen. "
        f"Total time {seconds:.0f} s.",
        "",
        "## Unseen (right) half, pixel-wise",
        "",
        f"Pixel accuracy: **{scores['pixel_accuracy']:.3f}** (chance: {1 / len(CLASS_NAMES):.2f})",
        "",
        "| class | precision | recall | F1 | pixels |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['pixels']} |"
        for name, c in scores["per_class"].items()
    ]
    lines += ["", "## Validation metrics of the model (held-out left-half crops)", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in sorted(metrics.items())]
    lines += ["", "## Stages", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} |" for s in result.stages]
    lines += [
        "",
        "## Files",
        "",
        "- `data/mosaic.tif`, `data/truth.tif`: the input mosaic and its truth",
        "- `segments/mosaic/`: `segments.tif`, `superpixels.parquet`",
        "- `crops/`: training crops by class, `crops.parquet`",
        "- `model/`: `best.pt`, `last.pt`, `metrics.csv`",
        "- `reference/`: the FAISS reference index",
        "- `labels/`: `predictions/`, `labels.tif`, `scores.tif`, `labels.qml`, "
        "`superpixels.gpkg`, `summary.json`",
        "- `review/`: the least certain superpixels, by predicted class, to relabel",
        "",
    ]
    return "\n".join(lines)
