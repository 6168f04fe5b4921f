"""The sections of a run's config (model, diffusion, data, federation, optim) and the choice lists they own.

Each section validates its fields in ``__post_init__`` (``fedrun.validation``); ``fedrun.config`` assembles
them into ``RunConfig`` and re-exports everything here, so ``from fedrun.config import FederationConfig``
keeps working. Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedrun.methods import METHOD_NAMES, USPLIT_TRAIN
from fedrun.partition import KINDS as PARTITIONS
from fedrun.validation import check, check_types, choice
from unet import ARCHS  # torch-free: unet's names are lazy

# Choice lists this module owns (the others come from the module that gives them meaning, above).
TORCHVISION_DATASETS = ("fashion-mnist", "mnist", "cifar10", "celeba")
DATASETS = (*TORCHVISION_DATASETS, "imagefolder")
PLACEMENTS = ("auto", "device", "host")
LOSSES = ("huber", "l2")
EXCHANGE_DTYPES = ("fp32", "bf16")
"""What the exchange may send: fp32, or bf16 (half the bytes); ``fedrun.exchange`` imports it from here."""
AMP_DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def default_data_root() -> str:
    """``$FEDRUN_DATA`` if set, else ``~/.cache/fedrun/data``."""
    return os.environ.get("FEDRUN_DATA") or str(Path.home() / ".cache" / "fedrun" / "data")


@dataclass
class ModelConfig:
    arch: str = "paper-unet"
    """Backbone: 'paper-unet' (the FedDiffuse ConvNeXt UNet) or 'ddpm-unet' (Ho et al. 2020)."""
    dim_mults: tuple[int, ...] | None = None
    """Channel multipliers per level; None = the architecture's default ((1,2,4) paper, (1,2,2,2) ddpm)."""
    dropout: float = 0.1
    """Dropout in the ResNet blocks of 'ddpm-unet' (ignored by 'paper-unet')."""

    def __post_init__(self) -> None:
        check_types(self, "model.")
        choice("model.arch", self.arch, ARCHS)
        if self.dim_mults is not None:
            self.dim_mults = tuple(int(m) for m in self.dim_mults)
            check(
                len(self.dim_mults) > 0 and all(m > 0 for m in self.dim_mults),
                "model.dim_mults",
                self.dim_mults,
                "a non-empty list of positive integers",
            )
        check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "allowed: 0 <= dropout < 1")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    """Number of diffusion steps T."""
    beta_start: float = 1e-4
    """First beta of the linear schedule."""
    beta_end: float = 0.02
    """Last beta of the linear schedule."""
    loss: str = "huber"
    """Training loss on the predicted noise: 'huber' (the paper's code) or 'l2' (Ho et al.)."""

    def __post_init__(self) -> None:
        check_types(self, "diffusion.")
        check(self.timesteps >= 1, "diffusion.timesteps", self.timesteps, "allowed: an integer >= 1")
        check(
            0 < self.beta_start < self.beta_end < 1,
            "diffusion.beta_start",
            (self.beta_start, self.beta_end),
            "allowed: 0 < beta_start < beta_end < 1",
        )
        choice("diffusion.loss", self.loss, LOSSES)


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    """Dataset: fashion-mnist, mnist, cifar10, celeba or imagefolder (see client_data)."""
    root: str = field(default_factory=default_data_root)
    """Where torchvision datasets live ($FEDRUN_DATA, else ~/.cache/fedrun/data)."""
    download: bool = False
    """Download a missing torchvision dataset (needs internet)."""
    client_data: str | None = None
    """Real deployments: a path template with '{client}', each client reads only its own image folder."""
    image_size: int | None = None
    """Resize images to this size; None = the dataset's native size (28, 32, 64 for celeba)."""
    partition: str = "iid"
    """Simulation split of one dataset over clients: iid, label-skew or quantity-skew."""
    beta: float = 0.5
    """Dirichlet concentration of the skewed partitions (the paper: 0.5)."""
    min_per_client: int = 10
    """Skewed partitions are redrawn until every client has at least this many examples."""
    subset: int | None = None
    """Use only the first N training examples (quick runs); None = all."""
    placement: str = "auto"
    """Where a rank keeps its clients' images during training: 'device' (on the GPU, batches gathered
    there: no transfer per step), 'host' (CPU memory, each batch pinned and copied asynchronously), or 'auto'
    (the device when they take at most half of its free memory, else the host)."""

    def __post_init__(self) -> None:
        check_types(self, "data.")
        choice("data.dataset", self.dataset, DATASETS)
        choice("data.placement", self.placement, PLACEMENTS)
        choice("data.partition", self.partition, PARTITIONS)
        check(self.beta > 0, "data.beta", self.beta, "allowed: beta > 0")
        check(self.min_per_client >= 1, "data.min_per_client", self.min_per_client, "allowed: >= 1")
        check(
            self.subset is None or self.subset >= 1, "data.subset", self.subset, "allowed: a positive integer or none"
        )
        check(
            self.image_size is None or self.image_size >= 8,
            "data.image_size",
            self.image_size,
            "allowed: an integer >= 8 or none",
        )
        if self.dataset == "imagefolder":
            check(
                bool(self.client_data) and "{client}" in self.client_data,
                "data.client_data",
                self.client_data,
                "imagefolder needs a path template containing '{client}'",
            )
        elif self.client_data is not None:
            check(
                "{client}" in self.client_data,
                "data.client_data",
                self.client_data,
                "a path template containing '{client}'",
            )


@dataclass
class FederationConfig:
    clients: int = 2
    """Number of federated clients K (>= number of ranks; a rank hosts several in turn)."""
    method: str = "full"
    """What is averaged each round: full, usplit, ulatdec or udec."""
    rounds: int = 15
    """Communication rounds R."""
    local_epochs: float = 5
    """Local epochs E per round (fractions allowed for quick runs)."""
    max_local_steps: int | None = None
    """Cap on local optimiser steps per client per round; None = no cap."""
    usplit_train: str = "all"
    """USplit: train 'all' parameters (the paper's code) or only the 'assigned' part."""
    exchange_dtype: str = "fp32"
    """Dtype of what is exchanged: fp32, or bf16 (half the bytes)."""
    seed: int = 2023
    """Seed of initialisation, partition and USplit roles (the paper: 2023)."""

    def __post_init__(self) -> None:
        check_types(self, "federation.")
        check(self.clients >= 1, "federation.clients", self.clients, "allowed: an integer >= 1")
        choice("federation.method", self.method, METHOD_NAMES)
        check(self.rounds >= 1, "federation.rounds", self.rounds, "allowed: an integer >= 1")
        check(self.local_epochs > 0, "federation.local_epochs", self.local_epochs, "allowed: > 0")
        check(
            self.max_local_steps is None or self.max_local_steps >= 1,
            "federation.max_local_steps",
            self.max_local_steps,
            "allowed: a positive integer or none",
        )
        choice("federation.usplit_train", self.usplit_train, USPLIT_TRAIN)
        choice("federation.exchange_dtype", self.exchange_dtype, EXCHANGE_DTYPES)
        # The partition draws from numpy's RandomState(seed), which takes 0 .. 2**32 - 1 only.
        check(0 <= self.seed < 2**32, "federation.seed", self.seed, "allowed: an integer from 0 to 2**32 - 1")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Adam learning rate (the paper: 1e-4)."""
    batch_size: int = 128
    """Per-client batch size (the paper: 128)."""
    keep_state: bool = False
    """Keep each client's Adam state across rounds (the paper's code builds a fresh Adam every round)."""
    ema_decay: float | None = None
    """EMA decay of each client's weights, e.g. 0.999; None = no EMA."""
    amp: str = "auto"
    """Mixed precision of the local step: auto (bf16 on a GPU and on a CPU with AMX for images of 28 pixels
    or more, else fp32: ``fedrun.precision``), fp32 or bf16."""
    compile: bool = False
    """torch.compile the model for the local step."""

    def __post_init__(self) -> None:
        check_types(self, "optim.")
        check(self.lr > 0, "optim.lr", self.lr, "allowed: > 0")
        check(self.batch_size >= 1, "optim.batch_size", self.batch_size, "allowed: an integer >= 1")
        check(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "optim.ema_decay",
            self.ema_decay,
            "allowed: 0 < decay < 1 or none",
        )
        choice("optim.amp", self.amp, AMP_DTYPES)
