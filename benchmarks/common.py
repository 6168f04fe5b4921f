"""Shared helpers of the benchmark scripts: device description, timing, tables, targets, JSON, 2-rank spawn.

Every script prints a small table of ratios measured side by side in one run, then one PASS/FAIL line per
target, and writes the same numbers as JSON with ``--json PATH``. Run them from the repository root as
modules (``python -m benchmarks.bench_step``) so that ``fedrun``, ``unet`` and ``benchmarks`` import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

# -- device --------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, and when (UTC)."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def describe(info: Mapping[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['cpu_cores']} cores"
    return f"{where} | torch {info['torch']} | {info['date']}"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ----------------------------------------------------------------------------------------


def time_interleaved(
    runners: Mapping[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each runner, ``repeats`` times, the runners taking turns (A B A B ...).

    Taking turns spreads slow phases of a shared machine over all variants instead of penalising one.
    """
    out: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out[name].append(time.perf_counter() - t0)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -- output ----------------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4f}" if abs(v) < 1 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain, aligned text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One goal of the ISSUE, checked against a measured value: ``value op limit``."""

    name: str
    value: float
    op: str  # "<=" or ">="
    limit: float
    passed: bool


def check(name: str, value: float, op: str, limit: float) -> Target:
    if op not in ("<=", ">="):
        raise ValueError(f"op must be '<=' or '>=', got {op!r}")
    passed = value <= limit if op == "<=" else value >= limit
    return Target(name, float(value), op, float(limit), bool(passed))


def format_targets(targets: Sequence[Target]) -> str:
    return "\n".join(f"{'PASS' if t.passed else 'FAIL'}  {t.name}: {t.value:.4f} {t.op} {t.limit:g}" for t in targets)


def report(
    name: str,
    info: Mapping[str, Any],
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
    targets: Sequence[Target],
    payload: Mapping[str, Any],
    json_path: str | None,
) -> dict[str, Any]:
    """Print the tables and target lines; write ``payload`` plus device and targets to ``json_path``."""
    print(f"# {name} | {describe(info)}")
    for title, headers, rows in tables:
        print(f"\n{title}\n{format_table(headers, rows)}")
    if targets:
        print("\n" + format_targets(targets))
    doc = {"benchmark": name, "device": dict(info), **payload, "targets": [asdict(t) for t in targets]}
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {path}")
    return doc


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="smallest settings (smoke test; numbers meaningless)")
    p.add_argument(
        "--threads",
        type=thread_counts,
        metavar="N[,M,...]",
        help="torch CPU threads; 'auto' = fedrun's choice here (fedrun.threads). bench_step takes a "
        "list (e.g. 1,2,auto) and measures every count side by side",
    )
    return p


def thread_counts(text: str) -> list[int]:
    """'2' -> [2]; '1,2,auto' -> [1, 2, what fedrun train would choose for one process here], duplicates dropped."""
    from fedrun.threads import available_cores, choose_threads

    counts: list[int] = []
    for part in (t.strip() for t in text.split(",") if t.strip()):
        if part == "auto":
            n = choose_threads(0, available_cores(), 1, os.environ.get("OMP_NUM_THREADS")).threads
        elif part.isdigit() and int(part) >= 1:
            n = int(part)
        else:
            raise argparse.ArgumentTypeError(f"invalid thread count {part!r}: allowed: a positive integer or auto")
        counts += [] if n in counts else [n]
    if not counts:
        raise argparse.ArgumentTypeError("no thread count given")
    return counts


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None, thread_sweep: bool = False) -> argparse.Namespace:
    """Parse the command line and apply the first of ``--threads``; several counts only where the script
    measures each (``thread_sweep``)."""
    args = p.parse_args(argv)
    if args.threads:
        if len(args.threads) > 1 and not thread_sweep:
            p.error(f"--threads: this benchmark takes one count, got {args.threads}")
        torch.set_num_threads(args.threads[0])
    return args


# -- two ranks -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_entry(rank: int, world_size: int, port: int, device: str, out: str, worker: Callable, args: tuple):
    # The environment torchrun would export; fedrun.dist then owns the process group (NCCL with CUDA).
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    from fedrun import dist

    ctx = dist.init_distributed(device, timeout_s=300)
    try:
        result = worker(ctx, *args)
        if ctx.is_main:
            Path(out).write_text(json.dumps(result))
        dist.leave()
    finally:
        dist.cleanup()


def spawn_ranks(worker: Callable, world_size: int, device: str, *args: Any) -> Any:
    """Run ``worker(ctx, *args)`` on ``world_size`` fresh processes joined in one process group; returns
    what rank 0's worker returned (JSON-serialisable). ``device``: "cpu" (gloo) or "cuda" (NCCL, one GPU
    per rank). ``worker`` must be a module-level function."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.start_processes(
            _rank_entry,
            args=(world_size, free_port(), device, out, worker, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return json.loads(Path(out).read_text())
