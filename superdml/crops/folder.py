"""Crop folders: crops sorted into class folders, and ``crops.parquet`` beside them.

``superdml crops`` (training crops, by majority class) and ``superdml review`` (the
least certain crops, by predicted class) write the same kind of folder::

    FOLDER/<class>/<raster>_<segment_id>.png     (review: <raster>_<segment_id>_s<score>.png)
    FOLDER/crops.parquet                         one row per crop, ``CROPS_SCHEMA``

Crops of the lossless crop rule (more than three bands, or not 8-bit) are TIFF chips
(``.tif``: every band at the raster's dtype, uncompressed, readable by GDAL, QGIS and
tifffile; written with tifffile, about ten times faster than GDAL for files this small)
with an 8-bit color preview (``.png``, same name) beside each, for people. Training reads
the chips and ignores the previews: a person moving a chip should move its preview too,
but a stale preview changes nothing.

Crops with a context view (:attr:`CropRule.context <superdml.crops.rule.CropRule.context>`)
are TIFF chips under either rule: the crop's bands, then the wider view's, in one file.

People sort the crops by moving them between class folders. The table records where
each crop was written, so a later run tells its own files from moved or added ones
(:func:`clear_crops`) and never removes a person's work. Every file is written
atomically; the stage writing the folder owns it (see :mod:`superdml.core.ownership`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tifffile
from PIL import Image

from superdml.core.atomic import atomic_write
from superdml.core.ownership import clear_listed

CROPS_TABLE = "crops.parquet"
ROW_GROUP_SIZE = 65536

#: One row per crop. ``purity`` is the majority class's share of the superpixel
#: (``crops`` with a label raster; null otherwise), ``score`` and ``margin`` the
#: predicted vote (``review``; null in ``crops``).
CROPS_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("segment_id", pa.uint32(), nullable=False),
        pa.field("raster", pa.string(), nullable=False),
        pa.field("x", pa.float64()),
        pa.field("y", pa.float64()),
        pa.field("label", pa.string()),
        pa.field("purity", pa.float32()),
        pa.field("score", pa.float32()),
        pa.field("margin", pa.float32()),
    ]
)


def crop_file(
    label: str, raster: str, segment_id: int, score: float | None = None, ext: str = ".png"
) -> str:
    """Return a crop's path in its folder: ``<label>/<raster>_<segment_id>[_s<score>].png``.

    With a `score` the name carries it to two decimals (``_s0.42``), so a person sorting
    review crops sees how sure the model was; `ext` ``.tif`` names a TIFF chip.
    """
    suffix = "" if score is None else f"_s{score:.2f}"
    return f"{label}/{raster}_{int(segment_id)}{suffix}{ext}"


def preview_file(chip: str) -> str:
    """Return the preview PNG's path of a TIFF chip's path (a PNG crop is its own)."""
    return chip[: -len(".tif")] + ".png" if chip.endswith(".tif") else chip


def write_chip(path: Path, crop: np.ndarray) -> None:
    """Write a (C, H, W) crop of any dtype as an uncompressed TIFF chip, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(crop), photometric="minisblack")


def write_png(path: Path, crop: np.ndarray) -> None:
    """Write a (3 or 4, H, W) uint8 crop as an RGB or RGBA PNG, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Image.fromarray(np.ascontiguousarray(crop.transpose(1, 2, 0))).save(tmp, "PNG")


def write_crops(
    folder: Path,
    raster: str,
    superpixels: pa.Table,
    crops: np.ndarray,
    labels: Sequence[str],
    purity: np.ndarray | None = None,
    score: np.ndarray | None = None,
    margin: np.ndarray | None = None,
    previews: np.ndarray | None = None,
) -> pa.Table:
    """Write a batch of crops into their class folders; return their table rows.

    PNGs, or with `previews` TIFF chips of the crops and PNGs of the previews.

    Parameters
    ----------
    folder : Path
        The crop folder, owned by the calling stage.
    raster : str
        Name of the raster the crops come from (its segment run subfolder's name).
    superpixels : pyarrow.Table
        The crops' rows of the superpixel table (``segment_id``, ``x``, ``y``), in the
        order of `crops`.
    crops : (N, C, S, S) ndarray
        uint8 with 3 or 4 bands, or anything with `previews`.
    labels : sequence of str, length N
        The class folder of each crop.
    purity : (N,) float ndarray, optional
        Majority class share of each superpixel; NaN (or not given) is null.
    score, margin : (N,) float ndarray, optional
        Predicted vote of each superpixel; with `score` the file names carry it.
    previews : (N, 3 or 4, S, S) uint8 ndarray, optional
        Color previews of lossless crops (:meth:`CropRule.preview_image`).

    Returns
    -------
    pyarrow.Table
        N rows of ``CROPS_SCHEMA``, ``file`` relative to `folder`.
    """
    n = len(crops)
    ids = superpixels.column("segment_id").to_numpy()
    scores = [None] * n if score is None else [float(s) for s in score]
    ext = ".png" if previews is None else ".tif"
    files = [
        crop_file(label, raster, sid, s, ext)
        for label, sid, s in zip(labels, ids, scores, strict=True)
    ]
    for i, (crop, file) in enumerate(zip(crops, files, strict=True)):
        if previews is None:
            write_png(folder / file, crop)
        else:
            write_chip(folder / file, crop)
            write_png(folder / preview_file(file), previews[i])
    return pa.table(
        {
            "file": files,
            "segment_id": superpixels.column("segment_id"),
            "raster": [raster] * n,
            "x": superpixels.column("x"),
            "y": superpixels.column("y"),
            "label": pa.array(labels, pa.string()),
            "purity": _float_column(purity, n),
            "score": _float_column(score, n),
            "margin": _float_column(margin, n),
        },
        schema=CROPS_SCHEMA,
    )


def _float_column(values: np.ndarray | None, n: int) -> pa.Array:
    """Return a float32 column of `values` (NaN as null), or `n` nulls when None."""
    if values is None:
        return pa.nulls(n, pa.float32())
    return pa.array(np.asarray(values, np.float32), pa.float32(), from_pandas=True)


def write_crops_table(folder: Path, table: pa.Table, meta: dict[str, Any]) -> Path:
    """Write `table` as ``folder/crops.parquet`` atomically, `meta` in its metadata.

    Parameters
    ----------
    folder : Path
    table : pyarrow.Table
        Rows of ``CROPS_SCHEMA`` (from :func:`write_crops`).
    meta : dict
        JSON-serializable provenance (crop rule, config, inputs), stored under the
        metadata key ``superdml``.

    Returns
    -------
    Path
        The table's path.

    Raises
    ------
    ValueError
        When `table` is not of ``CROPS_SCHEMA`` (a bug: rows come from :func:`write_crops`).
    """
    if not table.schema.remove_metadata().equals(CROPS_SCHEMA):
        raise ValueError(f"crops table rows are not of CROPS_SCHEMA: {table.schema}")
    path = folder / CROPS_TABLE
    table = table.replace_schema_metadata({"superdml": json.dumps(meta)})
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_SIZE)
    return path


def read_crops_meta(path: Path) -> dict[str, Any]:
    """Return the ``superdml`` metadata of a ``crops.parquet`` (empty when it has none)."""
    stored = pq.read_schema(path).metadata or {}
    meta: dict[str, Any] = json.loads(stored.get(b"superdml", b"{}"))
    return meta


def clear_crops(folder: Path, stage: str, reason: str, also: Iterable[str] = ()) -> None:
    """Remove the crops ``folder/crops.parquet`` lists (and their previews), `also`, the table.

    Nothing happens without a table. Only while every visible file in `folder` is one
    the table (or `also`) lists, where it was written; see
    :func:`superdml.core.ownership.clear_listed`.

    Raises
    ------
    InputError
        People moved or added a file: ``<folder>: <reason>, and <file> is not where
        superdml <stage> put it ...``.
    """
    table = folder / CROPS_TABLE
    if table.exists():
        files = pq.read_table(table, columns=["file"]).column("file").to_pylist()
        previews = [preview_file(f) for f in files if f.endswith(".tif")]
        clear_listed(folder, table, [*files, *previews, *also], stage, reason)


def count_labels(table: pa.Table) -> dict[str, int]:
    """Return the number of crops in each class folder (``label``) of a crops table."""
    counts = pc.value_counts(table.column("label")).to_pylist()
    return {d["values"]: d["counts"] for d in counts}
