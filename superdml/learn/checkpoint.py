"""Self-describing checkpoints that ``torch.load(path, weights_only=True)`` reads.

A checkpoint is one file holding only tensors, dicts, lists, str, int, float, bool and
None, so loading it never unpickles arbitrary objects. It carries everything the later
stages need to rebuild the model and prepare its inputs:

========================  ==============================================================
key                       value
========================  ==============================================================
``format``                ``"superdml-checkpoint"``
``format_version``        ``1``
``superdml_version``      version of the package that wrote it
``model``                 :func:`~superdml.learn.models.model_spec`: ``backbone``,
                          ``embedding_size``, ``in_channels`` (band count), ``input_size``
``normalization``         ``{"kind": "imagenet" | "dataset", "mean": [...], "std": [...]}``
``class_names``           list of str; label i is ``class_names[i]``
``loss``                  ``{"name": str, "params": dict, "state_dict": dict}``; the
                          state_dict holds learned proxies / centers
``train_config``          the training config as a plain dict
``metrics``               validation metrics, ``{name: float}``
``state_dict``            model weights (CPU tensors)
``crop_rule``             ``{"crop_size", "mask", "scaling", ...}`` or None
``class_scheme``          :meth:`ClassScheme.to_dict <superdml.raster.classes.ClassScheme.to_dict>`
                          (codes, names, colors) or None (not recorded)
``resume``                None, or :func:`~superdml.learn.resume.resume_state`: epoch,
                          optimizer and scheduler state_dicts, RNG states, best score
========================  ==============================================================
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from superdml import __version__
from superdml.config.schema import config_to_dict
from superdml.core import storage
from superdml.core.atomic import atomic_write
from superdml.core.errors import CheckpointError, require_file
from superdml.core.provenance import sha256_file
from superdml.crops.rule import CropRule
from superdml.learn.models import EmbeddingNet, model_spec
from superdml.raster.classes import ClassScheme

FORMAT = "superdml-checkpoint"
FORMAT_VERSION = 1

_PLAIN = (Tensor, str, int, float, bool, type(None))


def _plain(value: Any, key: str) -> Any:
    """Return `value` with tensors detached on the CPU, or raise TypeError.

    Only what ``torch.load(..., weights_only=True)`` reads back is allowed, so a
    checkpoint that was written can always be loaded.
    """
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"checkpoint {key}: key {k!r} is not a str or int")
            out[k] = _plain(v, f"{key}.{k}")
        return out
    if isinstance(value, list | tuple):
        return type(value)(_plain(v, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"checkpoint {key}: {type(value).__name__} cannot be loaded with weights_only; "
        "convert it to tensors, lists, dicts or numbers"
    )


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: EmbeddingNet,
    input_size: int,
    class_names: Sequence[str],
    normalization: str,
    mean: Sequence[float],
    std: Sequence[float],
    loss_name: str,
    loss_params: Mapping[str, Any] | None = None,
    loss_state: Mapping[str, Tensor] | None = None,
    train_config: Any = None,
    metrics: Mapping[str, float] | None = None,
    crop_rule: Mapping[str, Any] | None = None,
    class_scheme: ClassScheme | None = None,
    resume: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary name, then rename) and return its path.

    Parameters
    ----------
    path : path
        Destination file (conventionally ``checkpoint.pt``).
    model : EmbeddingNet
        Its weights and :func:`~superdml.learn.models.model_spec`.
    input_size : int
        Side S of the model input in pixels.
    class_names : sequence of str
        Class of each label id.
    normalization : {"imagenet", "dataset"}
        Where `mean` and `std` come from.
    mean, std : sequence of float
        Per-band normalization of pixels scaled to [0, 1] (one value per band).
    loss_name : str
        Registry name of the loss.
    loss_params : mapping, optional
        The loss's keyword arguments.
    loss_state : mapping of str to Tensor, optional
        The loss module's ``state_dict()`` (learned proxies or centers).
    train_config : TrainConfig or mapping, optional
        Stored as a plain dict.
    metrics : mapping of str to float, optional
        Validation metrics.
    crop_rule : mapping, optional
        ``crop_size``, ``mask``, ``scaling`` of the crops the model was trained on.
    class_scheme : ClassScheme, optional
        Codes, names and colors of the classes (it names every class of `class_names`).
    resume : mapping, optional
        :func:`~superdml.learn.resume.resume_state`, for ``train --resume``.

    Raises
    ------
    ValueError
        When `mean`/`std` do not have one value per band.
    TypeError
        When a value would not load with ``weights_only`` (nothing is written).
    """
    spec = model_spec(model, input_size)
    if not len(mean) == len(std) == spec["in_channels"]:
        raise ValueError(
            f"mean and std: got {len(mean)} and {len(std)} values, expected one per band "
            f"({spec['in_channels']})"
        )
    if dataclasses.is_dataclass(train_config) and not isinstance(train_config, type):
        train_config = config_to_dict(train_config)
    payload = _plain(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "superdml_version": __version__,
            "model": spec,
            "normalization": {
                "kind": normalization,
                "mean": [float(v) for v in mean],
                "std": [float(v) for v in std],
            },
            "class_names": [str(c) for c in class_names],
            "loss": {
                "name": loss_name,
                "params": dict(loss_params or {}),
                "state_dict": dict(loss_state or {}),
            },
            "train_config": dict(train_config or {}),
            "metrics": {str(k): float(v) for k, v in (metrics or {}).items()},
            "state_dict": model.state_dict(),
            "crop_rule": None if crop_rule is None else dict(crop_rule),
            "class_scheme": None if class_scheme is None else class_scheme.to_dict(),
            "resume": None if resume is None else dict(resume),
        },
        "",
    )
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


# -------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the plain dict `data` with typed accessors.

    Attributes
    ----------
    path : Path
        The file it was read from.
    data : dict
        Everything in the file (see the module docstring for the keys).
    """

    path: Path
    data: dict[str, Any]

    @property
    def model_spec(self) -> dict[str, Any]:
        """``backbone``, ``embedding_size``, ``in_channels``, ``input_size``."""
        return dict(self.data["model"])

    @property
    def backbone(self) -> str:
        """Name of the torchvision backbone."""
        return str(self.data["model"]["backbone"])

    @property
    def embedding_size(self) -> int:
        """Embedding dimension D."""
        return int(self.data["model"]["embedding_size"])

    @property
    def input_size(self) -> int:
        """Model input side S in pixels."""
        return int(self.data["model"]["input_size"])

    @property
    def bands(self) -> int:
        """Band count C of the model input."""
        return int(self.data["model"]["in_channels"])

    @property
    def normalization(self) -> str:
        """Where mean/std come from: ``imagenet`` or ``dataset``."""
        return str(self.data["normalization"]["kind"])

    @property
    def mean(self) -> list[float]:
        """Per-band mean of pixels scaled to [0, 1]."""
        return [float(v) for v in self.data["normalization"]["mean"]]

    @property
    def std(self) -> list[float]:
        """Per-band std of pixels scaled to [0, 1]."""
        return [float(v) for v in self.data["normalization"]["std"]]

    @property
    def class_names(self) -> list[str]:
        """Class name of each label id."""
        return list(self.data["class_names"])

    @property
    def loss_name(self) -> str:
        """Registry name of the loss."""
        return str(self.data["loss"]["name"])

    @property
    def loss_params(self) -> dict[str, Any]:
        """Keyword arguments of the loss."""
        return dict(self.data["loss"]["params"])

    @property
    def loss_state(self) -> dict[str, Tensor]:
        """The loss module's state_dict (learned proxies / centers)."""
        return dict(self.data["loss"]["state_dict"])

    @property
    def train_config(self) -> dict[str, Any]:
        """The training config as a plain dict."""
        return dict(self.data["train_config"])

    @property
    def metrics(self) -> dict[str, float]:
        """Validation metrics."""
        return dict(self.data["metrics"])

    @property
    def state_dict(self) -> dict[str, Tensor]:
        """Model weights."""
        return self.data["state_dict"]

    @property
    def crop_rule(self) -> dict[str, Any] | None:
        """``crop_size``, ``mask``, ``scaling`` of the training crops, or None."""
        rule = self.data["crop_rule"]
        return None if rule is None else dict(rule)

    @property
    def rule(self) -> CropRule | None:
        """The crop rule of the training crops (:class:`CropRule`), or None."""
        rule = self.data["crop_rule"]
        return None if rule is None else CropRule.from_dict(rule)

    @property
    def class_scheme(self) -> ClassScheme | None:
        """Codes, names and colors of the classes; None when the checkpoint records none.

        Raises
        ------
        InputError
            When the recorded scheme is malformed or lacks a class of the checkpoint.
        """
        stored = self.data.get("class_scheme")
        if stored is None:
            return None
        scheme = ClassScheme.from_dict(stored, self.path)
        return scheme.covering(self.class_names, self.path)

    @property
    def resume(self) -> dict[str, Any] | None:
        """Resume state (:func:`~superdml.learn.resume.resume_state`), or None."""
        state = self.data["resume"]
        return None if state is None else dict(state)


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "normalization": dict,
    "class_names": list,
    "loss": dict,
    "train_config": dict,
    "metrics": dict,
    "state_dict": dict,
    "crop_rule": (dict, type(None)),
    "resume": (dict, type(None)),
}


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check its layout.

    Tensors are mapped to the CPU.

    Raises
    ------
    MissingInputError
        When `path` is not a file.
    CheckpointError
        When the file is not a torch file, holds pickled objects other than tensors and
        plain values (refused, never unpickled), is not a superdml checkpoint (a plain
        state_dict, say), has another format version, or lacks a part; one line naming
        the file and the problem.
    """
    require_file(path, "checkpoint")
    name = os.fspath(path)
    path = storage.local_copy(path)  # a URI's object: fetched once into the local cache
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{name}: not a torch checkpoint file (not a torch.save archive)")
    try:
        with warnings.catch_warnings():
            # the weights_only unpickler warns about foreign pickle protocols; the file is
            # rejected below with a clearer message anyway
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        problem = (
            "holds Python objects other than tensors and plain values (refused, not unpickled)"
            if "weights only" in str(err).lower()
            else "not a torch checkpoint file (cannot be unpickled)"
        )
        raise CheckpointError(f"{name}: {problem}") from None
    except Exception as err:  # whatever torch.load raises, the file is unusable input
        raise CheckpointError(
            f"{name}: not a torch checkpoint file ({type(err).__name__})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        kind = "a plain state_dict" if _is_state_dict(data) else f"a {type(data).__name__}"
        raise CheckpointError(
            f"{name}: not a superdml checkpoint ({kind} without format {FORMAT!r})"
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{name}: checkpoint format version {version!r}, this superdml "
            f"({__version__}) reads version {FORMAT_VERSION}: retrain or use a matching "
            "superdml version"
        )
    for key, expected in _REQUIRED.items():
        if not isinstance(data.get(key), expected):
            raise CheckpointError(f"{name}: damaged checkpoint, {key!r} is missing or wrong")
    if not isinstance(data.get("class_scheme"), (dict, type(None))):  # absent before schemes
        raise CheckpointError(f"{name}: damaged checkpoint, 'class_scheme' is wrong")
    spec, norm = data["model"], data["normalization"]
    for key in ("backbone", "embedding_size", "in_channels", "input_size"):
        if key not in spec:
            raise CheckpointError(f"{name}: damaged checkpoint, model.{key} is missing")
    bands = spec["in_channels"]
    if not (len(norm.get("mean", [])) == len(norm.get("std", [])) == bands):
        raise CheckpointError(
            f"{name}: damaged checkpoint, normalization needs one mean and std per band ({bands})"
        )
    return Checkpoint(path=Path(path), data=data)


def _is_state_dict(data: Any) -> bool:
    return isinstance(data, Mapping) and all(isinstance(v, Tensor) for v in data.values())


def build_model_from_checkpoint(
    ckpt: Checkpoint, device: str | torch.device | None = None
) -> EmbeddingNet:
    """Rebuild the checkpoint's model with its weights, in eval mode.

    The model is built without memory (on torch's ``meta`` device, so no random
    initialization is computed only to be overwritten: 0.3 s of a CPU's start-up for a
    ResNet-18) and then takes the checkpoint's tensors as its own.

    Raises
    ------
    CheckpointError
        When the weights do not fit the described backbone.
    """
    spec = ckpt.model_spec
    with torch.device("meta"):
        model = EmbeddingNet(spec["backbone"], spec["embedding_size"], spec["in_channels"])
    try:
        model.load_state_dict(ckpt.state_dict, assign=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[0]
        raise CheckpointError(
            f"{ckpt.path}: model weights do not fit {spec['backbone']} ({detail})"
        ) from None
    if device is not None:
        model.to(device)
    return model.eval()


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a checkpoint file (:func:`~superdml.core.provenance.sha256_file`).

    Raises
    ------
    MissingInputError
        Naming `path` as the checkpoint when it is not a file.
    """
    require_file(path, "checkpoint")
    return sha256_file(storage.local_copy(path))
