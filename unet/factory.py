"""``create_model``: a backbone by name (``unet.ARCHS``)."""

from __future__ import annotations

from torch import nn

from unet import ARCHS
from unet.ddpm_unet import DDPMUNet
from unet.model import UNet


def create_model(
    arch: str,
    image_size: int,
    channels: int,
    dim_mults: tuple[int, ...] | None = None,
    dropout: float = 0.1,
) -> nn.Module:
    """Build a noise-prediction network.

    "paper-unet": the paper's UNet with dim = image_size, dim_mults default (1, 2, 4); it has no dropout,
        so `dropout` is ignored.
    "ddpm-unet": Ho et al.'s UNet (diffusers' ddpm-cifar10-32 configuration), channel multipliers default
        (1, 2, 2, 2), attention at 16x16.
    """
    if arch == "paper-unet":
        return UNet(dim=image_size, channels=channels, dim_mults=tuple(dim_mults or (1, 2, 4)))
    if arch == "ddpm-unet":
        return DDPMUNet(
            image_size=image_size,
            in_channels=channels,
            channel_mults=tuple(dim_mults or (1, 2, 2, 2)),
            dropout=dropout,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
