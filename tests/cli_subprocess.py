"""Run ``python -m fedrun`` (or torchrun with it) in a subprocess as a user would; read its one error line, its
models.

Test modules import it as `from cli_subprocess import ...` (pytest puts tests/ on sys.path; there is no package).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--seed", "7"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env_without_launcher(**extra: str) -> dict[str, str]:
    """This process's environment without a launcher's variables, one intra-op thread, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def fedrun(*args: str, cwd: Path = REPO, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedrun", *args],
        cwd=cwd,
        env=env_without_launcher(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(p: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The single `fedrun: error:` line of a run that exited with ``code``; it contains every needle."""
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("fedrun: error:")]
    assert len(errors) == 1, p.stderr[-4000:]
    assert p.returncode == code, (p.returncode, p.stderr[-4000:])
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """A launcher's variables for rank ``rank`` of ``world`` on 127.0.0.1:``port``."""
    return dict(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def run_fedrun(repo_root, args, nproc=1, max_restarts=0, check=True, timeout=400) -> subprocess.CompletedProcess:
    """``fedrun train ARGS``: in this interpreter for one rank, else under torchrun (``nproc`` ranks, standalone)."""
    if nproc == 1 and max_restarts == 0:
        cmd = [sys.executable, "-m", "fedrun", "train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}",
            "-m",
            "fedrun",
            "train",
            *args,
        ]
    p = subprocess.run(cmd, cwd=repo_root, env=env_without_launcher(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def load_models(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run_dir / "models").glob("*.pt"))}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for f in a:
        assert a[f].keys() == b[f].keys()
        different = [n for n in a[f] if not torch.equal(a[f][n], b[f][n])]
        assert not different, f"{f}: {len(different)} tensors differ, e.g. {different[:3]}"
