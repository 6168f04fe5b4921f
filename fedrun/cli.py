"""`fedrun` command line: thin, dispatches to the modules that do the work.

Subcommands: train, config, info, partition, submit, sweep, eval, fid, report. This is the composition root,
the one module that imports all four packages (fedrun, unet, slurm, evaluation): it hands the training entry
to Slurm and the FID scorer to training, so that no package imports upwards. Building the parser imports no
torch (``fedrun --help`` is instant); a command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import evaluation.commands
import slurm.commands
from fedrun import info
from fedrun.args import add_config_arguments, config_from_args
from fedrun.config import DATASETS, PARTITIONS, ConfigError, RunConfig
from fedrun.heap import HeapError, apply_heap
from fedrun.methods import METHOD_NAMES
from fedrun.presets import PRESETS


def train_entry(cfg: RunConfig) -> Path:
    """One federated run, as every rank runs it (torchrun or a Slurm task): ``fedrun.train.train``, with FID
    during training when ``cfg.fid_every`` asks for it, then FID and KID of the final models in fid.json when
    ``cfg.eval_samples`` does. Module-level, so that submitit pickles it by name."""
    from evaluation.inception import find_inception_weights
    from evaluation.scoring import fid_scorer  # torch and Inception: only when a run starts
    from fedrun.train import train

    scores_at_end = bool(cfg.eval_samples) and os.environ.get("RANK", "0") == "0"  # rank 0 alone
    if cfg.fid_every or scores_at_end:
        find_inception_weights()  # missing weights: one line now, not after the training
    run_dir = train(cfg, scorer_factory=fid_scorer if cfg.fid_every else None)
    # train() has left the process group: rank 0 scores alone (the others' models are in the run directory).
    if scores_at_end:
        evaluation.commands.score_finished_run(cfg, run_dir)
    return run_dir


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
        prog="fedrun",
        description="Federated training of diffusion models (FedDiffuse).",
        epilog=_epilog(),
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


def _error(message: str, code: int) -> int:
    print(f"fedrun: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


# What follows a collective's own message in torch/gloo errors: advice for torch developers, not for a user.
_TORCH_NOISE = re.compile(r"\s*(This is typically caused by|Exception raised from|GLHF).*$", re.DOTALL)
_TORCH_WHERE = re.compile(r"^\[[^\]]*\]\s*")  # '[/__w/pytorch/.../pair.cc:561] ' before gloo's message


def run_failure(e: BaseException) -> str | None:
    """The one line for a run that stopped for a reason outside the code, or None (a bug keeps its traceback).

    Such reasons: ranks that disagree, or a peer's payload refused (``fedrun.dist.PeerError``), and the process
    group failing: a peer rank that died, stopped answering within ``dist_timeout_s``, or never joined. Torch is
    only consulted when a command already imported it (the error cannot come from it otherwise).
    """
    fdist = sys.modules.get("fedrun.dist")
    if fdist is not None and isinstance(e, fdist.PeerError):
        return str(e)
    floop = sys.modules.get("fedrun.loop")
    if floop is not None and isinstance(e, floop.DivergedError):  # the run diverged: the line says what to do
        return str(e)
    tdist = sys.modules.get("torch.distributed")
    text = _TORCH_WHERE.sub("", _TORCH_NOISE.sub("", " ".join(str(e).split()))).rstrip(".")
    if tdist is None or not (isinstance(e, tdist.DistError) or re.search(r"gloo|nccl", str(e), re.IGNORECASE)):
        return None
    rank = f"rank {os.environ.get('RANK', '0')}"
    resume = "start the same command on every rank again to resume from the newest checkpoint"
    if isinstance(e, tdist.DistStoreError) or "waiting for clients" in text:
        return (
            f"{rank}: the process group did not form ({text}): start every rank with the same WORLD_SIZE, "
            f"MASTER_ADDR and MASTER_PORT within dist_timeout_s"
        )
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        return f"{rank}: a peer rank stopped answering ({text}; dist_timeout_s sets the wait): {resume}"
    if re.search(r"closed by peer|reset by peer|broken pipe|connection refused", text, re.IGNORECASE):
        return f"{rank}: lost contact with a peer rank ({text}); it probably crashed, see its log: {resume}"
    if isinstance(e, tdist.DistError):
        return f"{rank}: the process group failed ({text}): {resume}"
    return None  # another gloo/NCCL error (a wrong collective call, say): a bug, with its traceback


def main(argv: list[str] | None = None) -> int:
    """The ``fedrun`` command: 0 on success; 2 for a bad input (one line); 1 for a run that failed (one line
    when the reason lies outside the code, see ``run_failure``; a bug keeps its traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        return _error(str(e), 2)
    except FileNotFoundError as e:
        # Missing data / weights: the message says what to put where; no traceback.
        if type(e).__name__ in ("DataNotFoundError", "WeightsNotFoundError"):
            return _error(str(e), 2)
        raise
    except KeyboardInterrupt:
        print("fedrun: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = run_failure(e)
        if line is None:
            raise
        return _error(line, 1)


def run() -> None:
    """The program ``fedrun`` (and ``python -m fedrun``, what torchrun starts): ``main``, then exit with its code.

    Before exiting, ``gc.freeze()``: the interpreter's last collection then skips the objects that live until
    the end (torch's modules, the run's): a rank exits ~0.75 s sooner on a 2-core Xeon (1.0 -> 0.2 s), a second
    every job waits for. Not in ``main``, which tests call in-process.

    First, this process's malloc keeps freed memory for reuse (``fedrun.heap``, ``FEDRUN_HEAP``): its CPU tensors
    are then not faulted in anew at every step. Also not in ``main``: it is the program's, not a library call's.
    """
    try:
        apply_heap()
    except HeapError as e:
        sys.exit(_error(str(e), 2))
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
