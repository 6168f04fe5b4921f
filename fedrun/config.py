"""Typed run configuration: ``RunConfig``, a tree of small dataclasses (its sections: ``fedrun.sections``),
overrides, JSON (named presets: ``fedrun.presets``).

Every field is validated in ``__post_init__`` (its declared type first, then its range) so a bad value fails
before any process starts, with one line naming the field and what is allowed (``ConfigError``; the checks live
in ``fedrun.validation``). Nothing here imports torch: the CLI builds and checks a config before it decides
whether a command needs torch at all.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrun.sections import (  # re-exported: the sections and their choice lists are part of this API
    AMP_DTYPES,
    DATASETS,
    DEVICES,
    EXCHANGE_DTYPES,
    LOSSES,
    PARTITIONS,
    PLACEMENTS,
    SERVER_OPTIMIZERS,
    TORCHVISION_DATASETS,
    DataConfig,
    DiffusionConfig,
    FederationConfig,
    ModelConfig,
    OptimConfig,
    default_data_root,
)
from fedrun.validation import (  # ConfigError: imported from here too
    ConfigError,
    check,
    check_types,
    choice,
    parse_value,
    unknown_name_message,
)

__all__ = [
    "AMP_DTYPES",
    "DATASETS",
    "DEVICES",
    "EXCHANGE_DTYPES",
    "LOSSES",
    "NOT_TRAINED_FIELDS",
    "PARTITIONS",
    "PLACEMENTS",
    "SERVER_OPTIMIZERS",
    "TORCHVISION_DATASETS",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "FederationConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "apply_overrides",
    "default_data_root",
    "field_names",
    "unknown_field_message",
]


NOT_TRAINED_FIELDS = frozenset(
    {
        "name",
        "out_dir",
        "preset",
        "data.root",
        "data.download",
        "data.placement",
        "federation.resident",
        "device",
        "dist_timeout_s",
        "optim.compile",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
        "num_samples",
        "sample_steps",
        "sample_clip",
        "fid_every",
        "fid_samples",
        "fid_ref",
        "fid_ref_num",
        "eval_samples",
        "threads",
    }
)
"""Fields (dotted, as ``--set`` takes them) that do not change what a run trains: where it runs, what it logs.
The one list: a resume may change them (``fedrun.rundir.RESUMABLE_CHANGES`` adds a few more) and a report never
keeps runs apart by them (``evaluation.report``)."""


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
    """Reference for FID during training and ``eval_samples``: 'fashion-mnist:test', a stats .npz or an image
    folder; None = the test split of data.dataset (a split is resized to data.image_size, as the model saw it)."""
    fid_ref_num: int | None = None
    """Only the first N images of fid_ref (not of a statistics file): a quicker reference, computed once and
    cached apart, as `fedrun eval --ref-num N`; None = all."""
    eval_samples: int = 0
    """After the last round, sample this many images of every final model and score FID and KID against
    fid_ref as `fedrun eval` does, writing fid.json (the grids' sampler: DDIM with sample_steps, x0 clipped with
    sample_clip; the EMA weights when kept, else the raw ones); 0 = no (run `fedrun eval` afterwards). Runs on
    rank 0 alone after the ranks have finished: the run directory must hold every client's model."""
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
        check(
            self.fid_ref_num is None or self.fid_ref_num >= 2,
            "fid_ref_num",
            self.fid_ref_num,
            "allowed: an integer >= 2 or none",
        )
        check(self.eval_samples == 0 or self.eval_samples >= 2, "eval_samples", self.eval_samples, "allowed: 0 or >= 2")
        choice("device", self.device.split(":")[0], DEVICES)
        check(self.threads >= 0, "threads", self.threads, "allowed: 0 (auto) or a positive integer")
        check(self.dist_timeout_s >= 1, "dist_timeout_s", self.dist_timeout_s, "allowed: >= 1")
        check(
            not (self.federation.dp and self.optim.ema_decay),
            "optim.ema_decay",
            self.optim.ema_decay,
            "with DP the EMA models would be averaged once more at the end, a release the accountant does not "
            "count: set optim.ema_decay=none",
        )
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

    def test_split(self) -> str:
        """The paper's FID reference for this run: its dataset's test split ('fashion-mnist:test')."""
        return f"{self.data.dataset}:test"

    def training_fid_ref(self) -> str:
        """The reference of FID during training: ``fid_ref``, else the test split."""
        return self.fid_ref or self.test_split()

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
