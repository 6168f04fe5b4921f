"""Named presets: plain functions returning a ``RunConfig`` (``fedrun train --preset NAME``).

A preset sets only what differs from the defaults, which are the paper's Fashion-MNIST setup; the preset's
name is recorded in ``RunConfig.preset``.
"""

from __future__ import annotations

from collections.abc import Callable

from fedrun.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    FederationConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)


def preset_quickstart() -> RunConfig:
    """Laptop CPU: 2 clients, 3 rounds of a few local steps on real Fashion-MNIST (a few minutes)."""
    return RunConfig(
        data=DataConfig(subset=4000),
        federation=FederationConfig(clients=2, rounds=3, local_epochs=1, max_local_steps=25),
        optim=OptimConfig(batch_size=32, lr=5e-4),
        num_samples=16,
        sample_steps=50,
        preset="quickstart",
    )


def preset_paper_fmnist() -> RunConfig:
    """The paper's setup: Fashion-MNIST, batch 128, Adam 1e-4, Huber, E=5, R=15, beta=0.5, seed 2023."""
    return RunConfig(preset="paper-fmnist")


def preset_paper_celeba() -> RunConfig:
    """The paper's CelebA setting (64x64x3, centre crop 178)."""
    return RunConfig(data=DataConfig(dataset="celeba"), preset="paper-celeba")


def preset_ddpm_cifar10() -> RunConfig:
    """Ho et al.'s DDPM UNet (35.7M parameters) on CIFAR-10, L2 loss, Adam 2e-4."""
    return RunConfig(
        model=ModelConfig(arch="ddpm-unet"),
        diffusion=DiffusionConfig(loss="l2"),
        data=DataConfig(dataset="cifar10"),
        optim=OptimConfig(lr=2e-4, ema_decay=0.9999),
        preset="ddpm-cifar10",
    )


def preset_tiny() -> RunConfig:
    """Tests: a small paper UNet (dim_mults 1,2), a few steps, few diffusion steps."""
    return RunConfig(
        model=ModelConfig(dim_mults=(1, 2)),
        diffusion=DiffusionConfig(timesteps=50),
        data=DataConfig(subset=256),
        federation=FederationConfig(clients=2, rounds=2, local_epochs=1, max_local_steps=2),
        optim=OptimConfig(batch_size=8),
        num_samples=4,
        sample_steps=5,
        preset="tiny",
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "quickstart": preset_quickstart,
    "paper-fmnist": preset_paper_fmnist,
    "paper-celeba": preset_paper_celeba,
    "ddpm-cifar10": preset_ddpm_cifar10,
    "tiny": preset_tiny,
}


def get_preset(name: str) -> RunConfig:
    """A fresh config of the preset ``name``; ConfigError naming the presets when there is none."""
    if name not in PRESETS:
        raise ConfigError(f"invalid preset={name!r}: allowed: " + ", ".join(PRESETS))
    return PRESETS[name]()
