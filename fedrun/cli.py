"""`fedrun` command line: thin, dispatches to the modules that do the work.

Subcommands: train, info, partition, submit, sweep, eval, fid, report.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from fedrun.config import ConfigError, RunConfig, apply_overrides, field_names, get_preset

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


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments that build a RunConfig: preset, JSON file, shortcuts, --set overrides."""
    g = p.add_argument_group("configuration (preset, then --config, then flags, then --set)")
    g.add_argument("--preset", default="quickstart", help="named preset (default: quickstart)")
    g.add_argument("--config", type=Path, help="a config.json (e.g. from an earlier run) to start from")
    for flag, (dest, tp) in SHORTCUTS.items():
        g.add_argument(flag, dest="opt_" + dest.replace(".", "__"), type=str, default=None,
                       metavar=tp.__name__.upper(), help=f"sets {dest}")
    g.add_argument("--download", action="store_true", default=None, help="download a missing dataset")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set optim.ema_decay=0.999 (repeatable)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig from parsed arguments; raises ConfigError with a one-line message."""
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"invalid --config={str(path)!r}: file not found")
        cfg = RunConfig.from_json(path.read_text())
    else:
        cfg = get_preset(args.preset)
    overrides: dict[str, Any] = {}
    for dest, _tp in SHORTCUTS.values():
        v = getattr(args, "opt_" + dest.replace(".", "__"), None)
        if v is not None:
            overrides[dest] = v
    if getattr(args, "download", None):
        overrides["data.download"] = "true"
    for item in getattr(args, "overrides", []) or []:
        if "=" not in item:
            raise ConfigError(f"invalid --set {item!r}: expected FIELD=VALUE, e.g. optim.lr=2e-4")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    return apply_overrides(cfg, overrides) if overrides else cfg


def config_to_argv(cfg: RunConfig) -> list[str]:
    """The reverse: argv that rebuilds `cfg` exactly (used to launch tasks on Slurm)."""
    argv: list[str] = []
    default = RunConfig()
    flat, flat_default = cfg.to_flat_dict(), default.to_flat_dict()
    for k in field_names():
        v = flat[k]
        if v != flat_default[k] or k == "data.root":
            if isinstance(v, (list, tuple)):
                v = ",".join(str(x) for x in v)
            argv += ["--set", f"{k}={'none' if v is None else v}"]
    return ["--preset", "paper-fmnist"] + argv  # paper-fmnist == RunConfig() defaults


# -- subcommands -----------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from fedrun.train import train

    train(cfg)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrun", description="Federated training of diffusion models (FedDiffuse)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train (one process, or every rank under torchrun / Slurm)")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config as JSON")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_config)

    # Subcommands that live next to the code they drive; each module has register(sub).
    for module in ("fedrun.info", "fedrun.partition", "slurm.commands", "evaluation.commands"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a part not yet built must not break the rest
            if e.name and module.startswith(e.name):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"fedrun: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        # Missing data / weights: the message says what to put where; no traceback.
        if type(e).__name__ in ("DataNotFoundError", "WeightsNotFoundError"):
            print(f"fedrun: error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("fedrun: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
