"""Build the model and the diffusion process from a RunConfig (the only place config meets unet/)."""

from __future__ import annotations

from torch import nn

from fedrun.config import RunConfig
from unet import GaussianDiffusion, create_model

# Native (channels, image size) of the built-in datasets; image folders default to 1x28 unless
# data.image_size says otherwise, and their channel count is read from the model config's dataset.
_NATIVE = {"fashion-mnist": (1, 28), "mnist": (1, 28), "cifar10": (3, 32), "celeba": (3, 64)}


def image_shape(cfg: RunConfig) -> tuple[int, int]:
    """(channels, image_size) the model is built for."""
    channels, size = _NATIVE.get(cfg.data.dataset, (3, 64))
    return channels, cfg.data.image_size or size


def build_model(cfg: RunConfig) -> nn.Module:
    channels, size = image_shape(cfg)
    return create_model(cfg.model.arch, image_size=size, channels=channels,
                        dim_mults=cfg.model.dim_mults, dropout=cfg.model.dropout)


def build_diffusion(cfg: RunConfig) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion(timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end, loss=d.loss)
