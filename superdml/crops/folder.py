"""Crop folders: crops sorted into class folders, and ``crops.parquet`` beside them.

``superdml crops`` (training crops, by majority class) and ``superdml review`` (the
least certain crops, by predicted class) write the same kind of folder::

    FOLDER/<class>/<raster>_<segment_id>.png     (review: <raster>_<segment_id>_s<score>.png)
    FOLDER/crops.parquet                         one row per crop, ``CROPS_SCHEMA``

Crops of the lossless crop rule (more than three bands, or not 8-bit) are TIFF chips
(``.tif``: one image of every band at the raster's dtype, band-sequential, uncompressed,
readable by GDAL, QGIS and tifffile) with an 8-bit color preview (``.png``, same name,
quickly compressed: :data:`PREVIEW_PNG_LEVEL`) beside each, for people. Training reads
the chips and ignores the previews: a person moving a chip should move its preview too,
but a stale preview changes nothing. A chip's bytes are tifffile's: the header, which
depends only on the shape and dtype, is made by tifffile once per shape and the pixels
follow it (tifffile per chip costs about 0.3 ms, more than the rest of writing it).

Crops with a context view (:attr:`CropRule.context <superdml.crops.rule.CropRule.context>`)
are TIFF chips under either rule: the crop's bands, then the wider view's, in one file.

People sort the crops by moving them between class folders. The table records where
each crop was written, so a later run tells its own files from moved or added ones
(:func:`clear_crops`) and never removes a person's work. Every file is written
atomically, a batch of crops together (:func:`superdml.core.atomic.atomic_files`: each
file durable before its name appears, before the table naming it is written); the stage
writing the folder owns it (see :mod:`superdml.core.ownership`).
"""

from __future__ import annotations

import functools
import io
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

from superdml.core.atomic import AtomicFiles, atomic_files, atomic_write
from superdml.core.ownership import clear_listed

CROPS_TABLE = "crops.parquet"
ROW_GROUP_SIZE = 65536
#: zlib level of PNG crops: PIL's default, small files for the crops people keep.
CROP_PNG_LEVEL = 6
#: zlib level of the preview PNGs beside TIFF chips: every run remakes them and no stage
#: reads them, so speed before size (64 px crops of scikit-image's photos: level 1 encodes
#: 30 to 45 % faster than level 6, files 8 to 15 % larger).
PREVIEW_PNG_LEVEL = 1

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


def chip_bytes(crop: np.ndarray) -> bytes:
    """Return the TIFF chip of a (C, H, W) crop of any dtype: what tifffile would write.

    One uncompressed image of C samples per pixel, stored band after band
    (``planarconfig="separate"``, as the crop's array), in native byte order.
    """
    crop = np.ascontiguousarray(crop, crop.dtype.newbyteorder("="))
    return _chip_header(crop.shape, crop.dtype.str) + crop.tobytes()


@functools.lru_cache(maxsize=16)
def _chip_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """Return tifffile's bytes of a chip of `shape` and `dtype` before its pixels.

    Raises
    ------
    RuntimeError
        When tifffile does not end the file with the pixels (a tifffile that changed
        its layout: a bug to fix here, never a chip written wrong).
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    pixels = (np.arange(size) % 251).astype(np.uint8).view(dtype).reshape(shape)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="minisblack", planarconfig="separate")
    data = buffer.getvalue()
    if not data.endswith(pixels.tobytes()):
        raise RuntimeError(f"tifffile {tifffile.__version__} does not end a chip with its pixels")
    return data[: len(data) - size]


def png_bytes(crop: np.ndarray, compress_level: int = CROP_PNG_LEVEL) -> bytes:
    """Return a (3 or 4, H, W) uint8 crop encoded as an RGB or RGBA PNG (zlib `compress_level`)."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(crop.transpose(1, 2, 0)))
    image.save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


def add_crop(
    batch: AtomicFiles, path: Path, crop: np.ndarray, preview: np.ndarray | None = None
) -> None:
    """Add one crop's files to `batch`: its PNG, or its TIFF chip and the `preview` PNG.

    Parameters
    ----------
    batch : AtomicFiles
    path : Path
        The crop's file (``.png``, or ``.tif`` with `preview`).
    crop : (C, S, S) ndarray
        uint8 with 3 or 4 bands, or anything with `preview`.
    preview : (3 or 4, S, S) uint8 ndarray, optional
        Color preview of a lossless crop (:func:`~superdml.crops.cut.crop_tile_with_previews`).
    """
    if preview is None:
        batch.write(path, png_bytes(crop))
    else:
        batch.write(path, chip_bytes(crop))
        batch.write(path.with_name(preview_file(path.name)), png_bytes(preview, PREVIEW_PNG_LEVEL))


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

    PNGs, or with `previews` TIFF chips of the crops and PNGs of the previews; all
    durable under their names on return, none visible earlier (one atomic batch).

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
        Color previews of lossless crops (:func:`~superdml.crops.cut.crop_tile_with_previews`).

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
    with atomic_files() as batch:
        for i, (crop, file) in enumerate(zip(crops, files, strict=True)):
            add_crop(batch, folder / file, crop, None if previews is None else previews[i])
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
