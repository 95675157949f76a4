"""The configs and pipelines shipped inside the package, found by name.

``configs/`` holds one YAML per stage and one training config per loss
(``losses/<loss>.yaml``); ``pipelines/`` the pipelines ``superdml run NAME`` runs. Both
sit at the repository's root; the wheel maps them into the package (``superdml/configs``,
``superdml/pipelines``), so an installed copy carries them. :func:`copy_shipped`
(``superdml init``) writes editable copies.
"""

from __future__ import annotations

import os
import shutil
from importlib.resources import files
from pathlib import Path

from superdml.core.errors import InputError, MissingInputError, did_you_mean
from superdml.core.ownership import claim_output

__all__ = [
    "configs_dir",
    "copy_shipped",
    "loss_config_path",
    "pipeline_names",
    "pipeline_path",
    "resolve_pipeline",
]


def _root() -> Path:
    """Return the folder holding ``configs/`` and ``pipelines/``: the package or the source tree."""
    package = Path(str(files("superdml")))
    return package if (package / "configs").is_dir() else package.parent


def configs_dir() -> Path:
    """Return the folder of the shipped configs (``${configs}`` in pipelines)."""
    return _root() / "configs"


def _pipelines_dir() -> Path:
    return _root() / "pipelines"


def pipeline_names() -> list[str]:
    """Return the names of the shipped pipelines, sorted."""
    return sorted(p.stem for p in _pipelines_dir().glob("*.yaml"))


def pipeline_path(name: str) -> Path:
    """Return the shipped pipeline `name` (``label_mosaic``, ``retrain``...).

    Raises
    ------
    MissingInputError
        Naming the shipped pipelines.
    """
    path = _pipelines_dir() / f"{name}.yaml"
    if not path.is_file():
        names = pipeline_names()
        raise MissingInputError(
            f"{name}: no such shipped pipeline{did_you_mean(name, names)} "
            f"(shipped: {', '.join(names)})"
        )
    return path


def resolve_pipeline(pipeline: str | os.PathLike[str]) -> Path:
    """Return `pipeline` if it is a file, else the shipped pipeline of that name.

    Raises
    ------
    MissingInputError
        When it is neither, naming the shipped pipelines.
    """
    path = Path(pipeline)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and (_pipelines_dir() / f"{name}.yaml").is_file():
        return _pipelines_dir() / f"{name}.yaml"
    names = pipeline_names()
    raise MissingInputError(
        f"{pipeline}: no such file, nor a shipped pipeline{did_you_mean(name, names)} "
        f"(shipped: {', '.join(names)})"
    )


def loss_config_path(loss: str | None) -> Path | None:
    """Return the shipped training config of `loss` (``configs/losses/<loss>.yaml``).

    None when `loss` is None or has no shipped config.
    """
    if loss is None:
        return None
    path = configs_dir() / "losses" / f"{loss}.yaml"
    return path if path.is_file() else None


def copy_shipped(folder: str | os.PathLike[str]) -> list[Path]:
    """Write editable copies of the shipped configs and pipelines into `folder`.

    ``folder/configs/...`` and ``folder/pipelines/...``; `folder` must be new or empty
    (it is then owned by ``init``), so no file of yours is overwritten.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    InputError
        When `folder` is not empty and not made by ``superdml init``, or already holds
        copies.
    """
    folder = Path(folder)
    written = []
    with claim_output(folder, "init"):
        for name in ("configs", "pipelines"):
            if (folder / name).exists():
                raise InputError(f"{folder / name}: exists already: copy into a new folder")
        for name in ("configs", "pipelines"):
            shutil.copytree(_root() / name, folder / name, ignore=shutil.ignore_patterns("__*"))
            written += sorted(p for p in (folder / name).rglob("*.yaml"))
    return written
