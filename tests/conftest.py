"""Shared fixtures: labeled crop folders cut from scikit-image's bundled images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data


def _gray(image: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    return lambda: np.repeat(image()[:, :, None], 3, axis=2)


def _region(image: Callable[[], np.ndarray], rows: slice, cols: slice) -> Callable[[], np.ndarray]:
    return lambda: image()[rows, cols]


# class name -> (H, W, 3) uint8 source image; each class is a visibly different texture
SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "brick": _gray(data.brick),
    "grass": _gray(data.grass),
    "gravel": _gray(data.gravel),
    "astronaut": _region(data.astronaut, slice(0, 512), slice(0, 200)),
    "coffee": _region(data.coffee, slice(0, 400), slice(0, 600)),
    "chelsea": _region(data.chelsea, slice(0, 300), slice(0, 451)),
}


def make_crop_folders(
    root: Path,
    classes: Sequence[str] = tuple(SOURCES),
    per_class: int = 24,
    size: int | tuple[int, int] = (32, 64),
    seed: int = 0,
    bands: int = 3,
) -> Path:
    """Write ``root/<class>/<class>_<i>.png`` crops and return `root`.

    Parameters
    ----------
    root : Path
        Created if missing.
    classes : sequence of str
        Keys of :data:`SOURCES`.
    per_class : int
        Crops per class.
    size : int or (int, int)
        Crop side, or the inclusive range each crop's side is drawn from.
    seed : int
        Seed of crop positions, sizes and masks.
    bands : {3, 4}
        RGB crops, or RGBA crops whose alpha band is a random elliptical mask (0/255),
        as written by the ``alpha`` crop mask mode.
    """
    rng = np.random.default_rng(seed)
    low, high = (size, size) if isinstance(size, int) else size
    root.mkdir(parents=True, exist_ok=True)
    for name in classes:
        source = SOURCES[name]()
        folder = root / name
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(low, high + 1))
            row = int(rng.integers(0, source.shape[0] - side + 1))
            col = int(rng.integers(0, source.shape[1] - side + 1))
            crop = source[row : row + side, col : col + side]
            if bands == 4:
                rr, cc = np.mgrid[:side, :side] - (side - 1) / 2
                radius = rng.uniform(0.25, 0.5, size=2) * side
                inside = (rr / radius[0]) ** 2 + (cc / radius[1]) ** 2 <= 1
                crop = np.dstack([crop, np.where(inside, 255, 0).astype(np.uint8)])
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def crop_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six classes x 24 RGB crops of 32-64 px (read-only: copy before changing it)."""
    return make_crop_folders(tmp_path_factory.mktemp("crops"))


@pytest.fixture(scope="session")
def crop_folders_rgba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes x 16 RGBA (alpha mask) crops of 48 px (read-only)."""
    return make_crop_folders(
        tmp_path_factory.mktemp("crops_rgba"),
        classes=("brick", "grass", "coffee", "chelsea"),
        per_class=16,
        size=48,
        bands=4,
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared CPU: thread synchronization costs more than it gains."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
