"""GDAL's settings for reading rasters, on a local disk or as COGs in object storage.

Declared once here. :data:`READ_SETTINGS` hold for a whole process: they are GDAL
configuration options set as environment variables, which GDAL reads as it needs them.
:func:`apply_read_settings` sets them in this process (the raster I/O module calls it when
imported), and :class:`superdml.core.worker_plugin.WorkerSettings` on every dask worker
(:func:`superdml.core.cluster.make_client` registers it on each client it makes or
attaches). A value already in a process's environment wins: the user's choice.

:data:`REMOTE_OPEN_SETTINGS` hold only while a raster in object storage is open
(:func:`superdml.raster.io.open_raster`): ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``
spares the listing of the object's prefix at each open, but on a local disk it would
hide a raster's sidecar files (its ``.msk`` mask, ``.ovr`` overviews, ``.aux.xml``) and
so change what is read.

Credentials are no setting: GDAL reads them on each machine itself, from the
environment and the usual files (S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` with ``~/.aws/credentials`` and ``~/.aws/config``,
a web identity token or an instance role; GCS: ``GOOGLE_APPLICATION_CREDENTIALS``; Azure:
``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_ACCOUNT`` with a key or token).
Nothing here reads, copies or logs them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = [
    "READ_SETTINGS",
    "REMOTE_OPEN_SETTINGS",
    "REMOTE_PREFIXES",
    "apply_read_settings",
    "is_remote",
    "read_settings",
]

#: GDAL configuration options of every process that reads rasters.
READ_SETTINGS: dict[str, str] = {
    # The block cache, in MB (GDAL's default is 5% of RAM per process: it would hold
    # most of a large raster and make peak memory grow with raster size); 64 MB holds
    # a tile's windows.
    "GDAL_CACHEMAX": "64",
    # A window's blocks are fetched one range after another through GDAL's cache of
    # downloaded ranges, not as parallel requests that bypass it: a tile's halo reaches
    # into its neighbours' blocks, which its neighbours then fetched a second time.
    # Measured on an S3 emulator, 9 tiles of 512 px with their halo, one open each, of a
    # 4.4 MiB COG: 7 requests and 3.3 MiB instead of 17 and 13.7 MiB (GDAL's parallel
    # default; merged ranges and HTTP/2 multiplexing changed neither figure), in the
    # same time (benchmarks/README.md, "Object storage").
    "GDAL_HTTP_MULTIRANGE": "SERIAL",
    # Object stores answer 429/503 when throttling: retry, waiting longer each time.
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
}

#: GDAL configuration options while a raster in object storage is open.
REMOTE_OPEN_SETTINGS: dict[str, str] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}

#: How names of rasters in object storage start: URIs, and GDAL's own network prefixes.
REMOTE_PREFIXES = (
    "s3://", "gs://", "az://", "http://", "https://",
    "/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/", "/vsicurl/",
)  # fmt: skip


def read_settings() -> dict[str, str]:
    """Return :data:`READ_SETTINGS` as this process has them (its environment wins)."""
    return {key: os.environ.get(key, value) for key, value in READ_SETTINGS.items()}


def apply_read_settings(settings: Mapping[str, str] | None = None) -> None:
    """Set GDAL's read settings in this process's environment, keeping values it has.

    Parameters
    ----------
    settings : mapping, optional
        The settings (default :data:`READ_SETTINGS`): a worker gets its client's.
    """
    for key, value in (READ_SETTINGS if settings is None else settings).items():
        os.environ.setdefault(key, value)


def is_remote(name: str | os.PathLike[str]) -> bool:
    """Whether GDAL reads `name` over the network (a URI or a /vsi network path)."""
    return str(name).startswith(REMOTE_PREFIXES)
