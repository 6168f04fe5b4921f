"""Build the model and the diffusion process from a RunConfig (the only place config meets unet/)."""

from __future__ import annotations

from torch import nn

from fedrun.config import RunConfig
from fedrun.data import dataset_shape
from unet import GaussianDiffusion, create_model


def image_shape(cfg: RunConfig) -> tuple[int, int]:
    """(channels, image_size) the model is built for (the data loaders convert to the same)."""
    return dataset_shape(cfg.data.dataset, cfg.data.image_size)


def build_model(cfg: RunConfig) -> nn.Module:
    channels, size = image_shape(cfg)
    return create_model(
        cfg.model.arch, image_size=size, channels=channels, dim_mults=cfg.model.dim_mults, dropout=cfg.model.dropout
    )


def build_diffusion(cfg: RunConfig) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion(timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end, loss=d.loss)
