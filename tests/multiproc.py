"""Run a test body on several real processes (gloo on 127.0.0.1, CPU) and collect what each rank saw.

`spawn_ranks(world, body, out_dir)` spawns `world` processes; each runs `rank_main`, which sets the launcher's
environment, initialises the process group, calls `body(ctx)` (a picklable module-level function, or a
functools.partial of one) and writes the returned dict, or the traceback of what it raised, to rank{rank}.json.
Test modules import it as `from multiproc import ...` (pytest puts tests/ on sys.path; there is no package).
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fedrun import dist as fdist

Body = Callable[[fdist.DistContext], dict]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, out_dir: str, body: Body, timeout_s: float) -> None:
    """One rank: environment, process group (init timeout `timeout_s`), `body(ctx)`, cleanup, rank{rank}.json."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        ctx = fdist.init_distributed(device="cpu", timeout_s=timeout_s)
        result.update(body(ctx))
    except Exception:
        result["exception"] = traceback.format_exc()
    finally:
        fdist.cleanup()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def spawn_ranks(
    world: int, body: Body, out_dir: Path, timeout_s: float, init_timeout_s: float = 30, label: str = ""
) -> list[dict]:
    """Spawn `world` ranks running `body`, wait at most `timeout_s`, and return every rank's result (rank order),
    failing the test if a rank did not finish or raised."""
    ctx = mp.start_processes(
        rank_main,
        args=(world, free_port(), str(out_dir), body, init_timeout_s),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish {label or body} within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]
    for res in results:
        assert "exception" not in res, res["exception"]
    return results
