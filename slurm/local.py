"""``fedrun sweep --local``: a sweep's unfinished points run in this process, one after the other, without Slurm.

For a machine without a cluster (a laptop, a CI runner): what a Slurm array element would run, in turn, with the
same manifest, so the same sweep may later go to Slurm, or a Slurm sweep be finished here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slurm.submit import TrainFn
    from slurm.sweep import SweepPoint


def run_locally(todo: list[SweepPoint], train_fn: TrainFn, write_manifest: Callable[[], Path]) -> Path:
    """Run the unfinished points in this process, one after the other, without Slurm (a machine without a
    cluster): each point is one process hosting all its clients in turn, as ``fedrun train`` without torchrun.
    The manifest is rewritten after every run (status running, done or failed); a failed run is reported
    and the next one starts. Started again, the sweep skips the finished runs and resumes the others."""
    for n, p in enumerate(todo, 1):
        p.status = "running"
        write_manifest()
        print(f"sweep: run {n} of {len(todo)}: {p.run_dir.name}", flush=True)
        start = time.monotonic()
        try:
            train_fn(p.config)
            p.status = "done"
        except Exception as e:  # one run's failure (a diverged run, a bad cell) must not stop the grid
            p.status = "failed"
            print(f"sweep: {p.run_dir.name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        print(f"sweep: {p.run_dir.name} {p.status} after {time.monotonic() - start:.0f} s", flush=True)
    return write_manifest()
