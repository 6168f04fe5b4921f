"""The sections of a run's config (model, diffusion, data, federation, optim) and the choice lists they own.

Each section validates its fields in ``__post_init__`` (``fedrun.validation``); ``fedrun.config`` assembles
them into ``RunConfig`` and re-exports everything here, so ``from fedrun.config import FederationConfig``
keeps working. Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from fedrun.methods import METHOD_NAMES, USPLIT_TRAIN
from fedrun.partition import KINDS as PARTITIONS
from fedrun.validation import ConfigError, check, check_types, choice
from unet import ARCHS  # torch-free: unet's names are lazy

# Choice lists this module owns (the others come from the module that gives them meaning, above).
TORCHVISION_DATASETS = ("fashion-mnist", "mnist", "cifar10", "celeba")
DATASETS = (*TORCHVISION_DATASETS, "imagefolder")
PLACEMENTS = ("auto", "device", "host")
LOSSES = ("huber", "l2")
EXCHANGE_DTYPES = ("fp32", "bf16", "int8")
"""What the exchange may send: fp32, bf16 (half the bytes) or int8 blocks with error feedback (about a quarter);
``fedrun.exchange`` imports it from here."""
AMP_DTYPES = ("auto", "fp32", "bf16")
WEIGHTINGS = ("auto", "size", "uniform")
"""FedAvg's client weights: by data size, uniform, or auto (uniform with DP, else size)."""
SECAGG_DTYPES = ("fp32",)
"""The exchange dtypes secure aggregation supports: its wire is int64 fixed point, made from fp32 values."""
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "nesterov")
"""What the server update does with the average (``fedrun.exchange.server``): fedavg takes it; the others step
along the pseudo-gradient (last shared parameters minus the average)."""
SERVER_OPTIMIZER_FIELDS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("server_lr", "server_momentum"),
    "nesterov": ("server_lr", "server_momentum"),
    "fedadam": ("server_lr", "server_betas", "server_eps"),
    "fedyogi": ("server_lr", "server_betas", "server_eps"),
}
"""The ``federation.server_*`` fields each server optimiser reads; setting another is refused."""
SERVER_LR_DEFAULTS = {"fedavgm": 1.0, "nesterov": 0.7, "fedadam": 1e-2, "fedyogi": 1e-2}
"""``federation.server_lr`` when none is given: FedAvgM's 1 (Hsu et al. 2019), DiLoCo's 0.7 (Douillard et al.
2023), and 1e-2 for the adaptive ones, whose step is about server_lr per parameter (Reddi et al. 2021)."""
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
    """Dtype of what is exchanged: fp32, bf16 (half the bytes) or int8 (a quarter, with error feedback)."""
    error_feedback: bool = True
    """int8: add what each quantisation lost to the next update (false: drop it; for comparison only)."""
    seed: int = 2023
    """Seed of initialisation, partition, USplit roles and client sampling (the paper: 2023)."""
    sample_clients: int = 0
    """Clients drawn to take part in each round (uniformly, without replacement, from (seed, round)); the
    others do not train and contribute nothing, but receive the new shared parameters. 0 = all."""
    server_optimizer: str = "fedavg"
    """The server update: fedavg (the average), fedavgm (SGD with momentum), nesterov (SGD with Nesterov
    momentum: DiLoCo's outer step), fedadam or fedyogi (Reddi et al. 2021), on the pseudo-gradient."""
    server_lr: float | None = None
    """Server learning rate; None = the optimiser's default (fedavgm 1, nesterov 0.7, fedadam/fedyogi 0.01)."""
    server_momentum: float = 0.9
    """Momentum of fedavgm and nesterov."""
    server_betas: tuple[float, ...] = (0.9, 0.99)
    """(beta1, beta2) of fedadam and fedyogi."""
    server_eps: float = 1e-3
    """Epsilon (Reddi et al.'s tau) of fedadam and fedyogi, added to the root of the second moment."""
    weighting: str = "auto"
    """FedAvg's client weights: 'size' (|D_k|, the paper), 'uniform', or 'auto' (uniform with DP, else size)."""
    dp_clip: float | None = None
    """DP-FedAvg: the L2 norm C every client's update (over its shared groups) is clipped to; None = no DP."""
    dp_noise_multiplier: float = 1.0
    """DP-FedAvg: sigma, the noise std on the sum of the clipped updates divided by C."""
    dp_delta: float = 1e-5
    """DP-FedAvg: the delta at which epsilon is reported."""
    dp_epsilon_budget: float | None = None
    """DP-FedAvg: stop (checkpoint, DONE with the reason) before the round that would exceed this epsilon."""
    secure_aggregation: bool = False
    """Mask every client's update with pairwise masks so that peers and the wire see only the sum."""
    secagg_range: float | None = None
    """Secure aggregation: the largest |value| of a client's update in the fixed-point encoding (larger ones
    are saturated and reported); None = from the clip with DP, else 1.0."""
    resident: str = "auto"
    """Where a rank keeps the states (parameters, EMA) of its clients while they wait for their turn:
    'device', 'host' (pinned on a GPU machine, swapped in for each turn: device memory stays one client's
    working set) or 'auto' (host on a GPU rank hosting several clients, else device). ``fedrun.residency``."""

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
        check(
            self.error_feedback or self.exchange_dtype == "int8",
            "federation.error_feedback",
            self.error_feedback,
            f"only int8 has error feedback to turn off (federation.exchange_dtype={self.exchange_dtype})",
        )
        choice("federation.resident", self.resident, PLACEMENTS)
        # The partition draws from numpy's RandomState(seed), which takes 0 .. 2**32 - 1 only.
        check(0 <= self.seed < 2**32, "federation.seed", self.seed, "allowed: an integer from 0 to 2**32 - 1")
        check(
            0 <= self.sample_clients <= self.clients,
            "federation.sample_clients",
            self.sample_clients,
            f"allowed: 0 (all) to federation.clients={self.clients}",
        )
        self._check_server()
        self._check_privacy()

    def _check_server(self) -> None:
        choice("federation.server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        check(
            self.server_lr is None or self.server_lr > 0,
            "federation.server_lr",
            self.server_lr,
            "allowed: > 0 or none (the optimiser's default)",
        )
        check(0 <= self.server_momentum < 1, "federation.server_momentum", self.server_momentum, "allowed: 0 <= m < 1")
        self.server_betas = tuple(float(b) for b in self.server_betas)
        check(
            len(self.server_betas) == 2 and all(0 <= b < 1 for b in self.server_betas),
            "federation.server_betas",
            self.server_betas,
            "allowed: two numbers beta1,beta2 with 0 <= beta < 1",
        )
        check(self.server_eps > 0, "federation.server_eps", self.server_eps, "allowed: > 0")
        # A field the chosen optimiser ignores would silently do nothing: refuse it instead.
        used = SERVER_OPTIMIZER_FIELDS[self.server_optimizer]
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("server_lr", "server_momentum", "server_betas", "server_eps"):
            value = getattr(self, name)
            if name not in used and value != defaults[name]:
                users = [o for o, f in SERVER_OPTIMIZER_FIELDS.items() if name in f]
                raise ConfigError(
                    f"invalid federation.{name}={value!r} with federation.server_optimizer="
                    f"{self.server_optimizer}, which does not use it (used by {', '.join(users)})"
                )

    @property
    def effective_server_lr(self) -> float:
        """``server_lr``, or the chosen optimiser's default (``SERVER_LR_DEFAULTS``); 1 for fedavg."""
        if self.server_lr is not None:
            return self.server_lr
        return SERVER_LR_DEFAULTS.get(self.server_optimizer, 1.0)

    @property
    def sampling(self) -> bool:
        """Whether rounds draw a subset of the clients (0 < sample_clients < clients)."""
        return 0 < self.sample_clients < self.clients

    @property
    def dp(self) -> bool:
        """Whether DP-FedAvg is on (``dp_clip`` set)."""
        return self.dp_clip is not None

    @property
    def fedavg_weighting(self) -> str:
        """'size' or 'uniform': ``weighting`` with 'auto' resolved (uniform with DP, the standard analysis)."""
        return ("uniform" if self.dp else "size") if self.weighting == "auto" else self.weighting

    def _check_privacy(self) -> None:
        """The privacy fields and the combinations they refuse (one line each, before any process starts)."""
        choice("federation.weighting", self.weighting, WEIGHTINGS)
        if self.dp_clip is not None:
            check(self.dp_clip > 0, "federation.dp_clip", self.dp_clip, "allowed: > 0, or none for no DP")
            check(
                self.weighting != "size",
                "federation.weighting",
                self.weighting,
                "DP-FedAvg weights clients uniformly: a size-weighted average moves by up to max_k w_k*C "
                "(not C/n, which the noise is calibrated to) and its weights reveal the clients' sizes; "
                "use weighting=uniform or auto",
            )
        check(
            self.dp_noise_multiplier > 0,
            "federation.dp_noise_multiplier",
            self.dp_noise_multiplier,
            "allowed: > 0",
        )
        check(0 < self.dp_delta < 1, "federation.dp_delta", self.dp_delta, "allowed: 0 < delta < 1")
        if self.dp_epsilon_budget is not None:
            check(self.dp_epsilon_budget > 0, "federation.dp_epsilon_budget", self.dp_epsilon_budget, "allowed: > 0")
            check(
                self.dp,
                "federation.dp_epsilon_budget",
                self.dp_epsilon_budget,
                "a privacy budget needs DP on: set federation.dp_clip",
            )
        if self.dp:
            check(
                self.exchange_dtype != "int8",
                "federation.exchange_dtype",
                self.exchange_dtype,
                "DP (federation.dp_clip) clips and noises fp32 or bf16 changes; int8 with DP is not supported: "
                "allowed with it: fp32, bf16",
            )
        if self.secagg_range is not None:
            check(self.secagg_range > 0, "federation.secagg_range", self.secagg_range, "allowed: > 0 or none")
        if self.secure_aggregation:
            check(
                self.exchange_dtype in SECAGG_DTYPES,
                "federation.exchange_dtype",
                self.exchange_dtype,
                "secure aggregation sums int64 fixed point made from fp32 values; allowed with it: "
                + ", ".join(SECAGG_DTYPES),
            )


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
    prox_mu: float = 0.0
    """FedProx (Li et al. 2020): (mu/2) ||theta - theta_shared||^2 over the shared groups joins the local loss,
    theta_shared the shared parameters received at the start of the round; 0 = off."""

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
        check(self.prox_mu >= 0, "optim.prox_mu", self.prox_mu, "allowed: >= 0 (0 = off)")
