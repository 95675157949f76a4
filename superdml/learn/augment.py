"""Batched training augmentation: random geometry and color per sample, then normalization."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from superdml.config.schema import AugmentConfig


class TrainTransform(nn.Module):
    """Batched training augmentation with random parameters drawn per sample.

    Steps: scale to [0, 1] floats; resize to the input size (antialiased) when needed;
    one ``grid_sample`` applying each sample's random resized crop, flips and 90-degree
    rotation to all bands alike (alpha included, bilinear); brightness, contrast and
    saturation jitter on the first three (RGB) bands only, in that order (and, with
    `context_band`, the same jitter on the context view's first three); normalize.

    Accepts ``(C, H, W)`` or ``(N, C, H, W)`` uint8 (or float in [0, 1]) tensors and
    returns float32 ``(..., C, S, S)`` on the input's device (so a batch can be augmented
    on the GPU). Random parameters are drawn on the CPU from `generator` or torch's
    global generator (seeded per DataLoader worker).
    """

    mean: Tensor  # buffers registered in __init__
    std: Tensor

    def __init__(
        self,
        augment: AugmentConfig,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        context_band: int | None = None,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean and std: got {len(mean)} and {len(std)} values, expected equal")
        super().__init__()
        self.augment = augment
        self.input_size = input_size
        self.context_band = context_band  # where a context view's bands start, if any
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment `images`, ``(C, H, W)`` or ``(N, C, H, W)``, into normalized floats."""
        single = images.ndim == 3
        x = images.unsqueeze(0) if single else images
        x = _to_float(x)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x,
                size=(self.input_size,) * 2,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        x = self._geometry(x, generator)
        if self.augment.color_jitter > 0:
            x = self._jitter(x, generator)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x[0] if single else x

    def _geometry(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        a = self.augment
        if not (a.hflip or a.vflip or a.rot90 or a.random_resized_crop is not None):
            return x
        n = x.shape[0]
        # theta maps output (col, row) coordinates in [-1, 1] to input coordinates:
        # input = diag(width, height) @ flips @ rotation @ output + center
        linear = torch.eye(2).repeat(n, 1, 1)
        if a.rot90:
            angle = torch.randint(0, 4, (n,), generator=generator) * (math.pi / 2)
            cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
            linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
        for axis, enabled in ((0, a.hflip), (1, a.vflip)):
            if enabled:
                sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
                linear[:, axis] = linear[:, axis] * sign[:, None]
        center = torch.zeros(n, 2)
        if a.random_resized_crop is not None:
            area = torch.empty(n).uniform_(a.random_resized_crop, 1.0, generator=generator)
            log_ratio = torch.empty(n).uniform_(
                math.log(3 / 4), math.log(4 / 3), generator=generator
            )
            width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
            height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
            center = (torch.rand(n, 2, generator=generator) * 2 - 1) * (
                1 - torch.stack([width, height], 1)
            )
            linear = linear * torch.stack([width, height], 1)[:, :, None]
        theta = torch.cat([linear, center[:, :, None]], 2).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        strength = self.augment.color_jitter
        n = x.shape[0]

        def factor() -> Tensor:
            draw = torch.empty(n, 1, 1, 1).uniform_(1 - strength, 1 + strength, generator=generator)
            return draw.to(x.device)

        # brightness, then contrast and saturation of three color bands: one draw for all views
        width = min(3, x.shape[1] if self.context_band is None else self.context_band)
        factors = [factor(), *((factor(), factor()) if width == 3 else ())]
        for start in (0,) if self.context_band is None else (0, self.context_band):
            color = (x[:, start : start + width] * factors[0]).clamp(0, 1)
            if width == 3:
                mean_gray = TF.rgb_to_grayscale(color).mean((2, 3), keepdim=True)
                color = (mean_gray + (color - mean_gray) * factors[1]).clamp(0, 1)
                gray = TF.rgb_to_grayscale(color)
                color = (gray + (color - gray) * factors[2]).clamp(0, 1)
            x = torch.cat([x[:, :start], color, x[:, start + width :]], 1)
        return x


def _to_float(x: Tensor) -> Tensor:
    return x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
