"""Start one process per rank, each with its own command line, as separate sites would (no torchrun).

`run_sites(commands, cwd, timeout_s)` gives process r the environment a launcher would (RANK=r, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT; one thread), starts every command at once, waits for
all of them and returns each one's exit code, output and seconds. The commands are argument lists after
`python` (e.g. ["-m", "fedrun", "train", ...] or a script). Test modules import it as `from sites import ...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from multiproc import free_port


@dataclass
class Site:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    """From the start of all ranks to this one's exit (inf: killed at the timeout)."""

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""

    @property
    def error_lines(self) -> list[str]:
        """The ``fedrun: error:`` lines (a warning of torch's may follow them while the group closes)."""
        return [line for line in self.stderr.splitlines() if line.startswith("fedrun: error:")]


def run_sites(commands: list[list[str]], cwd: Path, timeout_s: float, repo_root: Path) -> list[Site]:
    """Run ``commands[r]`` as rank r of one process group; every process is killed after ``timeout_s``."""
    port = free_port()
    procs, logs = [], []
    start = time.monotonic()
    for r, args in enumerate(commands):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(len(commands)),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        # Files, not pipes: a rank blocked on a full pipe while the other waits in a collective would hang both.
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        logs.append((out, err))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=err, text=True))
    ended: dict[int, float] = {}
    try:
        while len(ended) < len(procs) and time.monotonic() - start < timeout_s:
            for r, p in enumerate(procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = time.monotonic() - start
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    sites = []
    for r, (p, (out, err)) in enumerate(zip(procs, logs, strict=True)):
        out.seek(0)
        err.seek(0)
        sites.append(Site(p.returncode, out.read(), err.read(), ended.get(r, float("inf"))))
        out.close()
        err.close()
    return sites
