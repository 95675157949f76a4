"""Superpixel crops: the crop rule, vectorized extraction, and ``superdml crops``.

``superdml crops`` writes training crop folders for people to sort (the folder layout
and ``crops.parquet`` are :mod:`superdml.crops.folder`'s, shared with ``review``).

The crop rule, shared by ``superdml crops``, training and labeling:

- a ``crop_size`` square centered on the superpixel's centroid pixel
  (``floor(row)``, ``floor(col)``), read from the source raster across tile edges and
  padded with 0 beyond the raster edge;
- 8-bit scaling: uint8 rasters as they are; other dtypes linearly from the band's 1st
  percentile (0) to its 99th percentile (255), clipped, with the percentiles measured
  over the whole raster at segment time; nodata pixels become 0;
- three color bands: the first three of the segmented bands (or ``bands``), a single
  band repeated as gray, two bands padded with a zero band;
- except for rasters of more than three bands (alpha aside) or not 8-bit, and for
  ``bands`` choosing more than three: those keep every chosen band at the raster's
  dtype (TIFF chips, a color preview PNG beside) and the crop rule records per-band
  1st..99th percentiles that scale them for the model (the lossless rule of
  :class:`~superdml.crops.rule.CropRule`);
- mask mode ``none`` (context kept), ``outside`` (pixels of other superpixels zeroed) or
  ``alpha`` (context kept, the superpixel mask as a fourth band: RGBA PNGs);
- with ``context`` (:attr:`~superdml.crops.rule.CropRule.context`), a wider view of
  the superpixel (``context`` times the crop's side, averaged down to the crop's size,
  never masked) stacked after the crop's bands in the same file: every crop is then a
  TIFF chip with a preview PNG of the crop beside, so one file carries both views and
  a person sorting moves them together.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from superdml.config.schema import CropsConfig, config_hash, config_to_dict
from superdml.core import storage
from superdml.core.atomic import write_json
from superdml.core.cluster import map_tasks
from superdml.core.errors import InputError, input_error
from superdml.core.ownership import check_apart, claim_output
from superdml.core.provenance import fingerprint
from superdml.crops.cut import crop_tile_with_previews, make_rule
from superdml.crops.folder import (
    CROPS_SCHEMA,
    CROPS_TABLE,
    clear_crops,
    count_labels,
    read_crops_meta,
    write_crops,
    write_crops_table,
)
from superdml.crops.rule import (
    CropRule,
)
from superdml.raster.class_names import UNLABELED
from superdml.raster.classes import SCHEME_FILE, ClassScheme, write_scheme
from superdml.raster.io import open_raster, read_window, tile_grid
from superdml.raster.label_rasters import (
    check_label_overlap,
    read_class_nodata,
    read_label_scheme,
    read_labels_on_grid,
)
from superdml.segment.run import SegmentRun, load_segment_runs

logger = logging.getLogger(__name__)

PENDING = ".crops-pending.json"  # what an unfinished run crops (its provenance)
TILE_SIZE = 2048

#: One tile's candidates: majority class value (-1: none) and its share of the superpixel.
CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("segment_id", pa.uint32(), nullable=False),
        pa.field("value", pa.int64(), nullable=False),
        pa.field("purity", pa.float32(), nullable=False),
    ]
)


# ------------------------------------------------------------------ pure functions


def majority_labels(
    segments: np.ndarray, classes: np.ndarray, ids: np.ndarray, class_nodata: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Majority class of each superpixel and its share of the superpixel's pixels.

    Parameters
    ----------
    segments : (H, W) uint32 ndarray
        Window holding the whole of every superpixel in `ids`.
    classes : (H, W) integer ndarray
        Label raster on the same grid.
    ids : (N,) ndarray
        Superpixels to label.
    class_nodata : int or None
        Label value that is no class (counts against the purity).

    Returns
    -------
    majority : (N,) int64 ndarray
        Majority class value (-1 when the superpixel has no labeled pixel).
    purity : (N,) float32 ndarray
        Majority pixels / all pixels of the superpixel.
    """
    order = np.argsort(ids)
    sorted_ids = np.asarray(ids)[order]
    seg = segments.ravel()
    pos = np.searchsorted(sorted_ids, seg)
    pos = np.minimum(pos, max(sorted_ids.size - 1, 0))
    inside = sorted_ids.size > 0
    hit = (sorted_ids[pos] == seg) & (seg > 0) if inside else np.zeros_like(seg, dtype=bool)
    n = sorted_ids.size
    area = np.bincount(pos[hit], minlength=n)
    cls = classes.ravel()[hit].astype(np.int64)
    labeled = cls != class_nodata if class_nodata is not None else np.ones_like(cls, dtype=bool)
    values, cls_index = np.unique(cls[labeled], return_inverse=True)
    majority = np.full(n, -1, dtype=np.int64)
    purity = np.zeros(n, dtype=np.float32)
    if values.size:
        counts = np.bincount(
            pos[hit][labeled] * values.size + cls_index, minlength=n * values.size
        ).reshape(n, values.size)
        best = counts.argmax(axis=1)
        has = counts.max(axis=1) > 0
        majority[has] = values[best[has]]
        purity = (counts.max(axis=1) / np.maximum(area, 1)).astype(np.float32)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return majority[inverse], purity[inverse]


# ------------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class CropsResult:
    """What ``export_crops`` wrote: the folder, ``crops.parquet`` and counts per class."""

    out_dir: Path
    table_path: Path
    n_crops: int
    per_class: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class _CropJob:
    run: SegmentRun
    rule: CropRule
    out_dir: str
    label_path: str | None
    class_nodata: int | None


def _label_task(job: _CropJob, row: int, col: int, height: int, width: int) -> pa.Table:
    """Majority class and purity of the superpixels owned by one tile."""
    table = job.run.superpixels_in(row, col, height, width)
    if table.num_rows == 0:
        return CANDIDATES_SCHEMA.empty_table()
    ids = table.column("segment_id").to_numpy()
    r0 = int(pc.min(table.column("row_start")).as_py())
    r1 = int(pc.max(table.column("row_stop")).as_py())
    c0 = int(pc.min(table.column("col_start")).as_py())
    c1 = int(pc.max(table.column("col_stop")).as_py())
    with open_raster(job.run.segments_path) as seg:
        segments, _ = read_window(seg, [1], r0, c0, r1 - r0, c1 - c0)
    label_path = cast(str, job.label_path)  # this task only runs when a label raster is given
    classes = read_labels_on_grid(label_path, job.run.source, r0, c0, r1 - r0, c1 - c0)
    value, purity = majority_labels(segments[0], classes, ids, job.class_nodata)
    return pa.table([ids, value, purity], schema=CANDIDATES_SCHEMA)


@dataclass(frozen=True)
class _Chosen:
    """The superpixels of one tile to write: ids, class names and purities."""

    ids: np.ndarray
    labels: list[str]
    purity: np.ndarray


def _crop_task(
    job: _CropJob, row: int, col: int, height: int, width: int, chosen: _Chosen | None
) -> pa.Table:
    """Write the crops of one tile's chosen superpixels; return their table rows."""
    table = job.run.superpixels_in(row, col, height, width)
    labels: list[str] = [UNLABELED] * table.num_rows
    purity = np.full(table.num_rows, np.nan, dtype=np.float32)
    if chosen is not None:
        ids = table.column("segment_id").to_numpy()
        order = np.argsort(chosen.ids)
        pos = np.searchsorted(chosen.ids, ids, sorter=order).clip(0, max(len(order) - 1, 0))
        hit = chosen.ids[order[pos]] == ids if len(order) else np.zeros(len(ids), bool)
        table = table.filter(pa.array(hit))
        labels = [chosen.labels[i] for i in order[pos[hit]]]
        purity = chosen.purity[order[pos[hit]]]
    if table.num_rows == 0:
        return CROPS_SCHEMA.empty_table()
    crops, previews = crop_tile_with_previews(job.run, job.rule, table)
    return write_crops(
        Path(job.out_dir), job.run.name, table, crops, labels, purity=purity, previews=previews
    )


def _choose(value: np.ndarray, purity: np.ndarray, config: CropsConfig) -> np.ndarray:
    """Indexes of the superpixels to crop: pure enough, then `per_class` or `sample`.

    Parameters
    ----------
    value : (N,) int64 ndarray
        Majority class value, -1 for none (all -1 without a label raster).
    purity : (N,) float ndarray
        Majority share (1 without a label raster).
    """
    index = np.flatnonzero((value >= 0) & (purity >= config.min_purity))
    rng = np.random.default_rng(config.seed)
    if config.per_class is not None:
        picked = [
            rng.permutation(index[value[index] == v])[: config.per_class]
            for v in np.unique(value[index])
        ]
        return np.sort(np.concatenate(picked)) if picked else index
    if config.sample is not None and index.size > config.sample:
        return np.sort(rng.choice(index, config.sample, replace=False))
    return index


def _ids_task(job: _CropJob, row: int, col: int, height: int, width: int) -> pa.Table:
    """Ids of one tile's superpixels, unlabeled (value 0, purity 1)."""
    ids = job.run.superpixels_in(row, col, height, width).column("segment_id")
    n = len(ids)
    return pa.table([ids, np.zeros(n, np.int64), np.ones(n, np.float32)], schema=CANDIDATES_SCHEMA)


def export_crops(
    segment_dir: str | Path,
    out_dir: str | Path,
    config: CropsConfig | None = None,
    label_raster: str | Path | None = None,
    classes: str | Path | None = None,
    client: Any = None,
) -> CropsResult:
    """Write crops of superpixels into class folders, plus ``crops.parquet``.

    Parameters
    ----------
    segment_dir : path
        A segment run folder (every raster in it) or one raster's subfolder.
    out_dir : path
        Crop folder: ``<class>/<raster>_<segment_id>.png`` and the class scheme used in
        ``classes.yaml``, or ``unlabeled/...`` without a label raster.
    config : CropsConfig, optional
        Crop size, mask mode, bands, sampling and purity.
    label_raster : path, optional
        Categorical raster (any grid; reprojected with nearest) giving each superpixel
        its majority class; superpixels below ``min_purity`` are skipped.
    classes : path, optional
        Scheme file (code -> name or {name, color, description}) of the label raster;
        see :func:`superdml.raster.label_rasters.read_label_scheme`.
    client : distributed.Client, optional

    Returns
    -------
    CropsResult
    """
    start = time.perf_counter()
    config = config or CropsConfig()
    if config.per_class is not None and label_raster is None:
        raise InputError("--per-class needs --label-raster (classes come from it)")
    runs = load_segment_runs(segment_dir)
    rule = make_rule(runs, config)
    scheme: ClassScheme | None = None
    class_nodata = None
    if label_raster is not None:
        label_raster = storage.resolve(label_raster)
        class_nodata = read_class_nodata(label_raster)
        scheme = read_label_scheme(label_raster, classes)
        for run in runs:
            check_label_overlap(label_raster, run.source)
    out_dir = Path(out_dir)
    inputs = [run.folder for run in runs] + [p for p in (label_raster, classes) if p is not None]
    check_apart(out_dir, inputs)
    provenance = {
        "segments": {run.name: run.fingerprint for run in runs},
        "label_raster": None if label_raster is None else fingerprint(label_raster),
        "classes": None if classes is None else fingerprint(classes),
        "config": config_hash(config),
    }
    table_path = out_dir / CROPS_TABLE
    with claim_output(out_dir, "crops"):
        if table_path.exists() and (done := _finished(out_dir, table_path, provenance, start)):
            return done
        _check_pending(out_dir, provenance)
        jobs = [_CropJob(run, rule, str(out_dir), label_raster, class_nodata) for run in runs]
        calls = [
            (job, t.row, t.col, t.height, t.width)
            for job in jobs
            for t in tile_grid(job.run.source.height, job.run.source.width, TILE_SIZE)
        ]
        chosen: list[_Chosen | None] = [None] * len(calls)
        if label_raster is not None or config.sample is not None:
            chosen, scheme = _select(calls, client, config, label_raster, scheme, classes)
        crop_calls = [(*call, ch) for call, ch in zip(calls, chosen, strict=True)]
        tables = map_tasks(_crop_task, crop_calls, client, desc="crops")
        table = pa.concat_tables(tables) if tables else CROPS_SCHEMA.empty_table()
        if scheme is not None:
            write_scheme(out_dir / SCHEME_FILE, scheme)
        meta = {
            "crop_rule": rule.to_dict(),
            "config": config_to_dict(config),
            "segments": [storage.resolve(run.folder) for run in runs],
            "label_raster": label_raster,
            "provenance": provenance,
        }
        write_crops_table(out_dir, table, meta)
    return _result(out_dir, table_path, table, start)


def _select(
    calls: list[tuple[Any, ...]],
    client: Any,
    config: CropsConfig,
    label_raster: str | None,
    scheme: ClassScheme | None,
    classes: str | Path | None,
) -> tuple[list[_Chosen | None], ClassScheme | None]:
    """Choose the superpixels of every tile to crop (:func:`_choose`), with their classes.

    Parameters
    ----------
    calls : list of tuple
        ``(job, row, col, height, width)`` of every tile.
    client : distributed.Client or None
    config : CropsConfig
    label_raster : str or None
        The label raster; without it every superpixel is a candidate, unlabeled.
    scheme : ClassScheme or None
        Scheme of the label raster.
    classes : path or None
        The scheme's file (else the label raster is named for classes it lacks).

    Returns
    -------
    chosen : list of _Chosen
        One per call, in order.
    scheme : ClassScheme or None
        `scheme` plus ``class_<v>`` for chosen class values it did not name.
    """
    task = _label_task if label_raster is not None else _ids_task
    parts = map_tasks(task, calls, client, desc="classes")
    tile = np.repeat(np.arange(len(parts)), [p.num_rows for p in parts])
    cand = pa.concat_tables(parts)
    value = cand.column("value").to_numpy()
    purity = cand.column("purity").to_numpy()
    picked = _choose(value, purity, config)
    ids = cand.column("segment_id").to_numpy()
    if scheme is not None:
        scheme = _name_unnamed(scheme, value[picked], classes or str(label_raster))
    names = {} if scheme is None else {e.code: e.name for e in scheme.entries}
    chosen: list[_Chosen | None] = []
    for t in range(len(calls)):
        sel = picked[tile[picked] == t]
        names_t = [names.get(int(v), UNLABELED) for v in value[sel]]
        kept = purity[sel].astype(np.float32) if label_raster else np.full(sel.size, np.nan)
        chosen.append(_Chosen(ids[sel], names_t, kept))
    return chosen, scheme


def _name_unnamed(scheme: ClassScheme, values: np.ndarray, source: str | Path) -> ClassScheme:
    """Return `scheme` plus ``class_<v>`` for the cropped class values `values` it lacks."""
    named = {e.code for e in scheme.entries}
    unnamed = sorted({int(v) for v in values} - named)
    return scheme.with_classes({v: f"class_{v}" for v in unnamed}, source)


def _check_pending(out_dir: Path, provenance: dict[str, Any]) -> None:
    """Record what this run crops; refuse to mix with an interrupted run of other inputs."""
    pending = out_dir / PENDING
    crops = (
        p for p in out_dir.rglob("*") if p.suffix in (".png", ".tif") and not p.name.startswith(".")
    )
    if pending.exists() and json.loads(pending.read_text()) != provenance and any(crops):
        raise input_error(
            out_dir,
            "holds the crops of an interrupted run of other inputs: rerun that to finish "
            "it, or choose another --out",
        )
    write_json(pending, provenance)


def _result(out_dir: Path, table_path: Path, table: pa.Table, start: float) -> CropsResult:
    seconds = time.perf_counter() - start
    return CropsResult(out_dir, table_path, table.num_rows, count_labels(table), seconds)


def _finished(
    out_dir: Path, table_path: Path, provenance: dict[str, Any], start: float
) -> CropsResult | None:
    """Return the finished crops of the same inputs in `out_dir`, or clear untouched ones.

    Crops of other inputs are removed (None: crop again) only while nobody has sorted
    them: every file in the folder is one the table lists, where it wrote it. Otherwise
    the run is refused; crops people may have sorted are never rewritten.
    """
    if read_crops_meta(table_path).get("provenance") == provenance:
        logger.info("%s: up to date, skipped", out_dir)
        return _result(out_dir, table_path, pq.read_table(table_path), start)
    reason = "holds crops made from other segments, label raster or options"
    clear_crops(out_dir, "crops", reason, also=[SCHEME_FILE])
    return None
