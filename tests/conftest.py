"""Shared fixtures: the session's test worlds, and crop folders of scikit-image's images.

Every session fixture is read-only: a test that changes files copies them into its
``tmp_path`` first (:meth:`worlds.World.copy_to`, ``shutil.copytree``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image
from skimage import data

# OpenMP threads that wait for work spin at full speed by default: on a busy machine
# (CI runners, parallel jobs) torch's two threads then burn about 4x the CPU of one thread
# and run about 3x slower. Set before torch loads; the stages' subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# pytest-xdist runs the suite in one process per core (`-n auto`): each process, and the
# stages' subprocesses it starts, gets its share of the cores instead of all of them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_variable, str(_share))

if TYPE_CHECKING:  # the worlds import the stages (torch): only the tests that use one pay
    from worlds import LabelRun, World


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


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Fail the session when a test changed, added or removed a file under `folder`."""
    from superdml.core.provenance import tree_fingerprint

    before = tree_fingerprint(folder)
    yield
    if tree_fingerprint(folder) != before:
        raise AssertionError(f"a test changed the shared {folder}: copy it into tmp_path first")


@pytest.fixture(scope="session")
def shared_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The untrained world (:func:`worlds.make_world`): a 256 px mosaic in 4 tiles,
    8 crops per class, an untrained model and its reference. For mechanics, not accuracy."""
    from worlds import make_world

    world = make_world(tmp_path_factory.mktemp("world"))
    with read_only(world.root):
        yield world


@pytest.fixture(scope="session")
def shared_label_run(
    shared_world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LabelRun]:
    """The untrained world labeled with :data:`worlds.LABEL` (outside the world's root)."""
    from worlds import label_world

    run = label_world(shared_world, tmp_path_factory.mktemp("label_run") / "out")
    with read_only(run.out):
        yield run


@pytest.fixture(scope="session")
def shared_trained_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A 384 px mosaic whose left half's crops (40 per class) trained a model 4 epochs
    and make its reference: for tests of how well the unseen right half is labeled."""
    from rasters import texture_mosaic
    from worlds import make_world

    from superdml.config.schema import CropsConfig

    left = texture_mosaic(384)[1].copy()
    left[:, 192:] = 0  # only the left half is labeled
    crops = CropsConfig(crop_size=32, mask="none", per_class=40)
    world = make_world(
        tmp_path_factory.mktemp("trained"), 384, model="trained", crops=crops, label_raster=left
    )
    with read_only(world.root):
        yield world


@pytest.fixture(scope="session")
def untrained_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two untrained 32 px checkpoints with different weights (seeds 0 and 1), classes
    brick, grass, coffee: for stages whose results need a model, not a good one."""
    from checkpoints import save_untrained_checkpoint

    root = tmp_path_factory.mktemp("untrained")
    classes = ("brick", "grass", "coffee")
    return (
        save_untrained_checkpoint(root / "a.pt", classes, seed=0),
        save_untrained_checkpoint(root / "b.pt", classes, seed=1),
    )


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An S3 emulator for the session (:mod:`s3`): yields the environment pointing at it."""
    from s3 import s3_emulator

    with s3_emulator(str(tmp_path_factory.mktemp("aws"))) as env:
        yield env


@pytest.fixture
def bucket(s3_endpoint: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A prefix of the emulator's bucket that no other test uses: ``s3://superdml-test/<id>``."""
    import re
    import uuid

    from s3 import BUCKET

    test = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40]
    return f"s3://{BUCKET}/{test}-{uuid.uuid4().hex[:8]}"
