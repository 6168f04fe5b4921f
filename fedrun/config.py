"""Typed run configuration: a tree of small dataclasses, overrides, JSON (named presets: ``fedrun.presets``).

Every field is validated in ``__post_init__`` (its declared type first, then its range) so a bad value fails
before any process starts, with one line naming the field and what is allowed (``ConfigError``; the checks live
in ``fedrun.validation``). Nothing here imports torch: the CLI builds and checks a config before it decides
whether a command needs torch at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrun.methods import METHOD_NAMES, USPLIT_TRAIN
from fedrun.partition import KINDS as PARTITIONS
from fedrun.validation import (  # ConfigError: imported from here too
    ConfigError,
    check,
    check_types,
    choice,
    parse_value,
    unknown_name_message,
)
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
    """Mixed precision of the local step: auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
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


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "runs"
    """Parent folder of run directories."""
    name: str | None = None
    """Run directory name under out_dir; None = derived from preset, method, K and seed."""
    checkpoint_every: int = 1
    """Write a checkpoint every N rounds (and always at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    sample_every: int = 0
    """Log a sample grid to TensorBoard every N rounds; 0 = only at the end."""
    num_samples: int = 16
    """Images in a sample grid."""
    sample_steps: int | None = None
    """Sampler steps for grids: None = full ancestral DDPM, else DDIM with this many steps."""
    sample_clip: bool = False
    """Clip the predicted x0 to [-1, 1] at every step of the grids' sampler (short runs: no saturated blobs)."""
    fid_every: int = 0
    """Score FID every N rounds during training (0 = never; use `fedrun eval` afterwards)."""
    fid_samples: int = 1000
    """Samples per model for FID during training (the paper: 1,000)."""
    fid_ref: str | None = None
    """Reference for FID during training: 'fashion-mnist:test', a stats .npz or an image folder;
    None = the test split of data.dataset."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when available, else cpu), cpu or cuda."""
    threads: int = 0
    """Intra-op CPU threads of each rank (torch.set_num_threads); 0 = auto: $OMP_NUM_THREADS when set, else the
    cores this process may use divided by the ranks on its node (``fedrun.threads``)."""
    dist_timeout_s: int = 600
    """Process-group timeout: a dead peer ends in an error after this long, never a silent hang."""
    preset: str | None = None
    """The preset this config started from (informational)."""

    def __post_init__(self) -> None:
        check_types(self, "")
        check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "allowed: >= 1")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "allowed: >= 1")
        check(self.sample_every >= 0, "sample_every", self.sample_every, "allowed: >= 0")
        check(self.num_samples >= 1, "num_samples", self.num_samples, "allowed: >= 1")
        check(
            self.sample_steps is None or self.sample_steps >= 1,
            "sample_steps",
            self.sample_steps,
            "allowed: a positive integer or none",
        )
        check(self.fid_every >= 0, "fid_every", self.fid_every, "allowed: >= 0")
        check(self.fid_samples >= 2, "fid_samples", self.fid_samples, "allowed: an integer >= 2")
        choice("device", self.device.split(":")[0], DEVICES)
        check(self.threads >= 0, "threads", self.threads, "allowed: 0 (auto) or a positive integer")
        check(self.dist_timeout_s >= 1, "dist_timeout_s", self.dist_timeout_s, "allowed: >= 1")
        if self.name is not None:
            # The run directory stays inside out_dir: a name is a relative path without '..'.
            name = Path(self.name)
            check(
                bool(name.parts) and not name.is_absolute() and ".." not in name.parts,
                "name",
                self.name,
                "allowed: a folder name inside out_dir (not absolute, no '..'), e.g. my-run",
            )

    # -- derived -----------------------------------------------------------------------------
    def run_dir(self) -> Path:
        name = self.name or (
            f"{self.preset or 'run'}-{self.federation.method}-k{self.federation.clients}"
            f"-{self.data.partition}-s{self.federation.seed}"
        )
        return Path(self.out_dir) / name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """Leaf fields by dotted name ('federation.method': 'udec'), the names --set takes."""
        return _flatten(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, d, prefix="")

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        return cls.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Overrides: "federation.clients=4", "optim.lr=2e-4", "model.dim_mults=1,2,4", "data.subset=none".


def field_names(cfg: Any = None, prefix: str = "") -> list[str]:
    """All dotted leaf field names of the config tree."""
    cls = type(cfg) if cfg is not None else RunConfig
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += field_names(t(), prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def unknown_field_message(key: str) -> str:
    """One line: 'unknown config field 'optim.lrr' (did you mean optim.lr?)'."""
    return unknown_name_message(key, field_names())


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a new, validated config with dotted-name overrides applied (values may be strings)."""
    d = cfg.to_dict()
    known = set(field_names())
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(unknown_field_message(key))
        parts = key.split(".")
        node: Any = d
        cls: Any = RunConfig
        for p in parts[:-1]:
            node = node[p]
            cls = typing.get_type_hints(cls)[p]
        tp = typing.get_type_hints(cls)[parts[-1]]
        node[parts[-1]] = parse_value(value, tp, key)
    return RunConfig.from_dict(d)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, prefix + k + ".") if isinstance(v, dict) else {prefix + k: v})
    return out


def _from_dict(cls: Any, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        what = f"{prefix}* fields" if prefix else "config sections"
        raise ConfigError(f"invalid {prefix.rstrip('.') or 'config'}={d!r}: expected a JSON object of {what}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(unknown_field_message(prefix + sorted(unknown)[0]))
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _from_dict(t, v, prefix + k + ".")
        elif isinstance(v, list) and any(typing.get_origin(a) is tuple for a in typing.get_args(t)):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = parse_value(v, t, prefix + k) if isinstance(v, str) and t is not str else v
    return cls(**kwargs)
