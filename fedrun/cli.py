"""`fedrun` command line: thin, dispatches to the modules that do the work.

Subcommands: train, config, info, partition, submit, sweep, eval, fid, report. This is the composition root,
the one module that imports all four packages (fedrun, unet, slurm, evaluation): it hands the training entry
to Slurm and the FID scorer to training, so that no package imports upwards. Building the parser imports no
torch (``fedrun --help`` is instant); a command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import evaluation.commands
import slurm.commands
from fedrun import info
from fedrun.args import add_config_arguments, config_from_args
from fedrun.config import DATASETS, METHOD_NAMES, PARTITIONS, ConfigError, RunConfig
from fedrun.presets import PRESETS


def train_entry(cfg: RunConfig) -> Path:
    """One federated run, as every rank runs it (torchrun or a Slurm task): ``fedrun.train.train``, with FID
    during training when ``cfg.fid_every`` asks for it. Module-level, so that submitit pickles it by name."""
    from evaluation.scoring import fid_scorer  # torch and Inception: only when a run starts
    from fedrun.train import train

    return train(cfg, scorer_factory=fid_scorer if cfg.fid_every else None)


def _cmd_train(args: argparse.Namespace) -> int:
    train_entry(config_from_args(args))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_json())
    return 0


def _version() -> str:
    try:
        return version("fedrun")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _epilog() -> str:
    """The allowed values of the choices users ask for most, and what each preset is."""
    lines = [
        "methods:    " + ", ".join(METHOD_NAMES),
        "partitions: " + ", ".join(PARTITIONS),
        "datasets:   " + ", ".join(DATASETS),
        "presets:",
    ]
    lines += [f"  {name:<13} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in PRESETS.items()]
    lines.append("`fedrun COMMAND --help` for a command's options; `fedrun config` prints every config field.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrun", description="Federated training of diffusion models (FedDiffuse).", epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedrun {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train (one process, or every rank under torchrun / Slurm)")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config as JSON")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_config)

    # Subcommands that live next to the code they drive; each module has register(sub).
    info.register(sub)
    slurm.commands.register(sub, train_fn=train_entry)
    evaluation.commands.register(sub)
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
