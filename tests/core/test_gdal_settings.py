"""GDAL's read settings: declared once, set in this process and on every dask worker."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import rasterio
from rasters import write_raster

from superdml.core.gdal_settings import READ_SETTINGS, REMOTE_OPEN_SETTINGS, read_settings
from superdml.core.worker_plugin import WorkerSettings
from superdml.raster.io import open_raster


def test_a_local_raster_keeps_its_sidecar_mask(tmp_path):
    """EMPTY_DIR (no listing on open) is for object storage only: locally it hides sidecars."""
    path = write_raster(tmp_path / "a.tif", np.full((1, 32, 32), 9, np.uint8))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), rasterio.open(path, "r+") as dst:
        mask = np.full((32, 32), 255, np.uint8)
        mask[:4] = 0
        dst.write_mask(mask)  # a.tif.msk
    assert (tmp_path / "a.tif.msk").exists()
    assert not set(REMOTE_OPEN_SETTINGS) & set(READ_SETTINGS)
    with open_raster(path) as src:
        assert (src.read_masks(1)[:, 0] == mask[:, 0]).all()


def test_the_environment_wins_and_credentials_never_travel(monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "7")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-key-123")
    plugin = WorkerSettings()
    assert plugin.settings == {**READ_SETTINGS, "GDAL_HTTP_MAX_RETRY": "7"} == read_settings()
    assert b"sekrit-key-123" not in pickle.dumps(plugin)


@pytest.mark.slow
def test_every_worker_gets_the_settings_before_its_first_task(monkeypatch):
    from superdml.core.cluster import make_client

    for key in READ_SETTINGS:  # the workers inherit none of them from this process
        monkeypatch.delenv(key, raising=False)
    with make_client(workers=1) as client:
        settings = client.run(lambda: {key: os.environ.get(key) for key in READ_SETTINGS})
    assert list(settings.values()) == [READ_SETTINGS]
