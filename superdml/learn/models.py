"""Embedding networks: a torchvision ResNet, global average pooling, a linear head.

The output is L2-normalized, so the dot product of two embeddings is their cosine
similarity. Any band count is accepted: the first convolution is rebuilt for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tvm

from superdml.config.schema import Backbone, TrainConfig
from superdml.core.errors import ConfigError, input_error, require_file

BACKBONES: dict[str, tuple[Callable[..., tvm.ResNet], Any]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights),
}


def _hub_cache() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _download_weights(backbone: str) -> dict[str, Tensor]:
    """Return torchvision's ImageNet weights of `backbone`, from the hub cache or the net."""
    weights = BACKBONES[backbone][1].DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"pretrained: the {backbone} ImageNet weights ({os.path.basename(weights.url)}) "
            f"are not in the torch hub cache {_hub_cache()} (TORCH_HOME) and could not be "
            f"downloaded ({reason}); set 'pretrained: false', set 'weights_path: FILE' to a "
            "local torchvision state_dict, or copy the file into that cache"
        ) from None


def _read_weights(path: str | os.PathLike[str], backbone: str) -> dict[str, Tensor]:
    """Return the tensors of a torchvision state_dict file (read with weights_only)."""
    require_file(path, f"{backbone} weights_path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever torch.load raises, the file is unusable input
        raise input_error(
            path, f"not a torch state_dict file readable with weights_only ({type(err).__name__})"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise input_error(path, f"expected a torchvision {backbone} state_dict (name -> tensor)")
    return dict(state)


def _adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Turn RGB filters ``(O, 3, h, w)`` into filters for `in_channels` bands.

    More bands: the RGB filters are kept and every extra band gets the mean of the RGB
    filters. Fewer bands: every band gets the mean RGB filter scaled by ``3 / bands``,
    so a gray image gives the same response as the same image in RGB (one band: the
    sum of the RGB filters).
    """
    mean = weight.mean(dim=1, keepdim=True)
    if in_channels >= 3:
        return torch.cat([weight, mean.expand(-1, in_channels - 3, -1, -1)], dim=1)
    return (mean * (3 / in_channels)).expand(-1, in_channels, -1, -1).clone()


class EmbeddingNet(nn.Module):
    """ResNet features, global average pooling and a linear head, L2-normalized.

    Parameters
    ----------
    backbone : {"resnet18", "resnet34", "resnet50"}
        torchvision ResNet, built with ``weights=None`` unless `pretrained` or
        `weights_path` is given.
    embedding_size : int
        Output dimension D.
    in_channels : int
        Input bands C; the first convolution is rebuilt for C bands (see
        :func:`_adapt_first_conv` for how pretrained RGB filters are carried over).
    pretrained : bool
        Start from torchvision's ImageNet weights (``ResNet*_Weights.DEFAULT``), taken
        from the torch hub cache (``torch.hub.get_dir()``, under ``$TORCH_HOME``) or
        downloaded into it.
    weights_path : path or None
        A local torchvision state_dict of `backbone` (its ``fc`` layer is ignored);
        takes precedence over `pretrained`.

    Raises
    ------
    ConfigError
        When `pretrained` weights are neither cached nor downloadable, naming the
        ways on (``pretrained: false``, ``weights_path: FILE``) and the cache folder.
    MissingInputError, InputError
        When `weights_path` is missing or is not a state_dict of `backbone`.

    Notes
    -----
    ``forward`` maps ``(N, C, H, W)`` float images to ``(N, D)`` unit-length embeddings.
    """

    def __init__(
        self,
        backbone: Backbone | str = "resnet18",
        embedding_size: int = 128,
        in_channels: int = 3,
        pretrained: bool = False,
        weights_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ConfigError(f"backbone: got {backbone!r}, expected one of {', '.join(BACKBONES)}")
        if in_channels < 1 or embedding_size < 1:
            raise ValueError(
                f"in_channels and embedding_size: expected integers >= 1, got {in_channels} "
                f"and {embedding_size}"
            )
        self.backbone_name = backbone
        self.embedding_size = embedding_size
        self.in_channels = in_channels
        net = BACKBONES[backbone][0](weights=None)
        state = None
        if weights_path is not None:
            state = _read_weights(weights_path, backbone)
            source = Path(weights_path)
        elif pretrained:
            state = _download_weights(backbone)
            source = Path(_hub_cache())
        conv = net.conv1
        first = nn.Conv2d(
            in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False
        )
        if state is None:
            nn.init.kaiming_normal_(first.weight, mode="fan_out", nonlinearity="relu")
        else:
            first_weight = state.pop("conv1.weight", None)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as err:
                raise input_error(
                    source, f"does not fit {backbone} ({str(err).splitlines()[-1].strip()})"
                ) from None
            missing = [k for k in missing if k != "conv1.weight" and not k.startswith("fc.")]
            if first_weight is None or missing or unexpected:
                absent = ["conv1.weight"] if first_weight is None else missing
                problem = f"missing {absent[0]}" if absent else f"unexpected {unexpected[0]}"
                raise input_error(source, f"not a torchvision {backbone} state_dict ({problem})")
            if first_weight.shape[1] == in_channels:
                first.weight.data.copy_(first_weight)
            elif first_weight.shape[1] == 3:
                first.weight.data.copy_(_adapt_first_conv(first_weight, in_channels))
            else:
                raise input_error(
                    source,
                    f"conv1 takes {first_weight.shape[1]} bands, expected 3 or {in_channels}",
                )
        net.conv1 = first
        features = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self.embedding = nn.Linear(features, embedding_size)

    def forward(self, images: Tensor) -> Tensor:
        """Embed ``(N, C, H, W)`` images into ``(N, D)`` L2-normalized vectors."""
        return F.normalize(self.embedding(self.backbone(images)), dim=1)


def build_model(config: TrainConfig, in_channels: int) -> EmbeddingNet:
    """Build the embedding network that `config` describes, for `in_channels` bands."""
    return EmbeddingNet(
        backbone=config.backbone,
        embedding_size=config.embedding_size,
        in_channels=in_channels,
        pretrained=config.pretrained,
        weights_path=config.weights_path,
    )


def model_spec(model: EmbeddingNet, input_size: int) -> dict[str, Any]:
    """Return what rebuilds `model`: backbone, embedding_size, in_channels, input_size."""
    return {
        "backbone": model.backbone_name,
        "embedding_size": model.embedding_size,
        "in_channels": model.in_channels,
        "input_size": int(input_size),
    }
