"""What every dask worker of a run sets up before its first task: GDAL's read settings.

A separate module from :mod:`superdml.core.cluster` because it imports ``distributed``
(seconds), which only runs on a cluster pay for.
"""

from __future__ import annotations

from typing import Any

from distributed import WorkerPlugin

from superdml.core.gdal_settings import apply_read_settings, read_settings

__all__ = ["WorkerSettings"]


class WorkerSettings(WorkerPlugin):
    """Apply the client's GDAL read settings on each worker, before any task runs.

    It carries :func:`~superdml.core.gdal_settings.read_settings` as the client has them
    (the declared values, or the client's environment's): GDAL configuration options,
    never credentials, which each worker reads from its own environment and files. A
    value the worker's own environment sets wins.

    Parameters
    ----------
    settings : dict of str, optional
        Default: :func:`~superdml.core.gdal_settings.read_settings` of this process.
    """

    name = "superdml-worker-settings"

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.settings = read_settings() if settings is None else dict(settings)

    def setup(self, worker: Any) -> None:
        """Set the settings in the worker process's environment (before GDAL reads them)."""
        apply_read_settings(self.settings)
