"""Architectures and the DDPM process. No optimiser, logging or torch.distributed in this package.

Names are imported on first use (PEP 562), so that ``unet.GROUPS`` and ``unet.ARCHS`` (the choice lists the
configuration validates against) cost no torch import: ``fedrun --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

ARCHS: tuple[str, ...] = ("paper-unet", "ddpm-unet")
"""The backbones ``create_model`` builds."""

_LAZY = {
    "DDPMUNet": "unet.ddpm_unet",
    "EMA": "unet.ema",
    "GROUPS": "unet.groups",
    "GaussianDiffusion": "unet.diffusion",
    "UNet": "unet.model",
    "create_model": "unet.factory",
    "group_sizes": "unet.groups",
    "parameter_groups": "unet.groups",
}

__all__ = [  # noqa: F822 (the lazy names are resolved by __getattr__)
    "ARCHS",
    "DDPMUNet",
    "EMA",
    "GROUPS",
    "GaussianDiffusion",
    "UNet",
    "create_model",
    "group_sizes",
    "parameter_groups",
]

if TYPE_CHECKING:
    from unet.ddpm_unet import DDPMUNet
    from unet.diffusion import GaussianDiffusion
    from unet.ema import EMA
    from unet.factory import create_model
    from unet.groups import GROUPS, group_sizes, parameter_groups
    from unet.model import UNet


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'unet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
