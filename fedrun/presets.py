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
    """CPU, a few minutes on 2 cores (``make quickstart``): 2 clients, FedAvg of the whole paper UNet on real
    Fashion-MNIST at 16x16, an EMA for the grid, clipped DDIM, then FID and KID of 200 samples in fid.json.

    Sized by measurement on a 2-core Xeon (issue 13, BENCHMARKS.md): at 28x28 the paper UNet (dim 28, 3.0M
    parameters) costs ~4x more per step than at 16x16 (dim = image size = 16, 1.0M parameters) and still
    draws saturated blobs after the steps 2 minutes allow; at 16x16, ~1,000 steps of 32 images draw
    recognisable garments. bf16 autocast saves little at this size, and CPUs without native bf16 are slower
    with it, so the local step stays fp32. The raw weights of so short a run drift between rounds; their EMA
    (decay 0.99, a horizon of ~100 steps) does not. The scores are against the first 200 test images at 16x16
    (computed once, cached: the full 10,000 would take half an hour of Inception on such a CPU; KID is unbiased
    at 200).
    """
    return RunConfig(
        data=DataConfig(image_size=16, subset=20000),
        federation=FederationConfig(clients=2, rounds=8, local_epochs=100, max_local_steps=60),
        optim=OptimConfig(batch_size=32, lr=2e-3, ema_decay=0.99, keep_state=True),
        num_samples=64,
        sample_steps=25,
        sample_clip=True,
        checkpoint_every=4,
        eval_samples=200,
        fid_ref_num=200,
        preset="quickstart",
    )


def preset_cpu_table() -> RunConfig:
    """The paper's Table 1 at CPU scale (with sweeps/cpu-table.yaml): 16x16 Fashion-MNIST, 400 local steps of
    32 images per run over all clients and 4 rounds, FID and KID of 64 clipped-DDIM samples per model.

    Sized so that the grid's 34 runs (4 methods x IID/label skew x K in {2, 5}, the centralised K = 1, 2 seeds)
    train and score within an hour on 2 idle cores (BENCHMARKS.md): ~0.14 s a step of 32 at 16x16, ~0.2 s an
    image for Inception. The grid keeps the total budget: max_local_steps = 400 / (K x rounds). Adam's state
    is kept across rounds (the paper's code builds a fresh Adam every round, which 20 steps a round cannot
    afford); the EMA decay 0.95 (a horizon of ~20 steps) suits K = 5's 80 steps per client; the reference is
    the first 1,000 test images at 16x16 (cached once).
    """
    return RunConfig(
        data=DataConfig(image_size=16, subset=20000),
        federation=FederationConfig(clients=2, rounds=4, local_epochs=100, max_local_steps=50),
        optim=OptimConfig(batch_size=32, lr=2e-3, ema_decay=0.95, keep_state=True),
        num_samples=16,
        sample_steps=25,
        sample_clip=True,
        checkpoint_every=4,
        eval_samples=64,
        fid_ref_num=1000,
        preset="cpu-table",
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
    """Tests: a small paper UNet (dim_mults 1,2) at 16x16 (dim 16: 289,527 parameters, a training step 4.7x
    faster than at 28x28 on a 2-core AMD EPYC), a few steps, few diffusion steps."""
    return RunConfig(
        model=ModelConfig(dim_mults=(1, 2)),
        diffusion=DiffusionConfig(timesteps=50),
        data=DataConfig(image_size=16, subset=256),
        federation=FederationConfig(clients=2, rounds=2, local_epochs=1, max_local_steps=2),
        optim=OptimConfig(batch_size=8),
        num_samples=4,
        sample_steps=5,
        preset="tiny",
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "quickstart": preset_quickstart,
    "cpu-table": preset_cpu_table,
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
