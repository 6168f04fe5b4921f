"""Command-line arguments that build a ``RunConfig``: preset, ``--config`` file, shortcut flags, ``--set``.

Every command that runs or describes a run (train, config, info, submit, sweep) takes the same arguments
through ``add_config_arguments`` and reads them back with ``config_from_args``.
Torch-free, so that parsing and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedrun.config import (
    DATASETS,
    DEVICES,
    PARTITIONS,
    ConfigError,
    RunConfig,
    apply_overrides,
)
from fedrun.methods import METHOD_NAMES
from fedrun.presets import PRESETS, get_preset
from unet import ARCHS  # torch-free: unet's names are lazy

# Short flags for the fields users change most; anything else goes through --set key=value.
SHORTCUTS: dict[str, tuple[str, type]] = {
    "--method": ("federation.method", str),
    "--clients": ("federation.clients", int),
    "--rounds": ("federation.rounds", int),
    "--local-epochs": ("federation.local_epochs", float),
    "--max-local-steps": ("federation.max_local_steps", int),
    "--partition": ("data.partition", str),
    "--beta": ("data.beta", float),
    "--seed": ("federation.seed", int),
    "--dataset": ("data.dataset", str),
    "--data-root": ("data.root", str),
    "--client-data": ("data.client_data", str),
    "--subset": ("data.subset", int),
    "--batch-size": ("optim.batch_size", int),
    "--lr": ("optim.lr", float),
    "--ema": ("optim.ema_decay", float),
    "--arch": ("model.arch", str),
    "--out-dir": ("out_dir", str),
    "--name": ("name", str),
    "--device": ("device", str),
}
# Allowed values shown in --help; the config checks them (one-line ConfigError), not argparse, so that a flag,
# --set and a config.json fail the same way.
ALLOWED: dict[str, tuple[str, ...]] = {
    "federation.method": METHOD_NAMES,
    "data.partition": PARTITIONS,
    "data.dataset": DATASETS,
    "model.arch": ARCHS,
    "device": DEVICES,
}


def _dest(field: str) -> str:
    return "opt_" + field.replace(".", "__")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments that build a RunConfig: preset, JSON file, shortcuts, --set overrides."""
    g = p.add_argument_group("configuration (preset, then --config, then flags, then --set)")
    g.add_argument(
        "--preset",
        default="quickstart",
        metavar="NAME",
        help="named preset (default: quickstart): " + ", ".join(PRESETS),
    )
    g.add_argument("--config", type=Path, help="a config.json (e.g. from an earlier run) to start from")
    for flag, (field, tp) in SHORTCUTS.items():
        allowed = ALLOWED.get(field)
        g.add_argument(
            flag,
            dest=_dest(field),
            type=str,
            default=None,
            metavar="NAME" if allowed else tp.__name__.upper(),
            help=f"sets {field}" + (": " + ", ".join(allowed) if allowed else ""),
        )
    g.add_argument("--download", action="store_true", default=None, help="download a missing dataset")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any config field, e.g. --set optim.ema_decay=0.999 (repeatable; "
        "`fedrun config` prints them all)",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig from parsed arguments; raises ConfigError with a one-line message."""
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"invalid --config={str(path)!r}: file not found")
        try:
            cfg = RunConfig.from_json(path.read_text())
        except UnicodeDecodeError:
            raise ConfigError(f"invalid --config={str(path)!r}: not a JSON text file") from None
        except ConfigError as e:  # the file, then what is wrong in it
            raise ConfigError(f"--config {path}: {e}") from None
    else:
        cfg = get_preset(args.preset)
    overrides: dict[str, Any] = {}
    for field, _tp in SHORTCUTS.values():
        v = getattr(args, _dest(field), None)
        if v is not None:
            overrides[field] = v
    if getattr(args, "download", None):
        overrides["data.download"] = "true"
    for item in getattr(args, "overrides", []) or []:
        if "=" not in item:
            raise ConfigError(f"invalid --set {item!r}: expected FIELD=VALUE, e.g. optim.lr=2e-4")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    return apply_overrides(cfg, overrides) if overrides else cfg
