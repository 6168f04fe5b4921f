"""glibc's malloc as fedrun sets it (``FEDRUN_HEAP=keep``, ``fedrun.heap``) vs its defaults (``system``).

The setting is per process and cannot be undone cleanly, so each measurement is a child process with one of
the two settings, the two taking turns (``--turns`` pairs). Each child times one workload on the CPU:

  sample      the paper UNet's forward pass (28x28, batch 32, channels_last, fp32, inference): one step of
              ``fedrun eval``'s sampler
  inception   pytorch-fid's Inception features of 50 images (FID's and KID's cost; needs the weights, see
              ``evaluation.inception``: skipped when they are missing)
  train       the optimised training step (``LocalTrainer``, paper UNet 28x28, batch 32)

and reports the median seconds per call, the minor page faults per call and its peak RSS. The table gives
system / keep for time (> 1: keep is faster) and keep / system for peak RSS (what the kept heap costs).

    python -m benchmarks.bench_heap                        # ~3-5 min on 2 CPU cores
    python -m benchmarks.bench_heap --workloads sample --turns 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Target, base_parser, check, device_info, median, parse_args, report
from fedrun.heap import ENV

WORKLOADS = ("sample", "inception", "train")
MODES = ("system", "keep")
REPO = Path(__file__).resolve().parents[1]


def _workload(name: str, quick: bool) -> Callable[[], object]:
    """The workload's one call, built in the child."""
    from unet import GaussianDiffusion, create_model

    torch.manual_seed(0)
    size, batch = (16, 2) if quick else (28, 32)
    if name == "inception":
        from evaluation.inception import inception_features

        images = torch.randint(0, 256, (4 if quick else 50, 1, size, size), dtype=torch.uint8)
        return lambda: inception_features(images, progress=False)
    model = create_model("paper-unet", image_size=size, channels=1, dim_mults=(1, 2) if quick else (1, 2, 4))
    if name == "train":
        from benchmarks.steps import optimised

        images = torch.randint(0, 256, (8 * batch, 1, size, size), dtype=torch.uint8)
        diffusion, cpu = GaussianDiffusion(loss="huber"), torch.device("cpu")
        return optimised("paper-unet", images, batch, 1, 1, diffusion, cpu, None, model=model)
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500)

    def forward() -> None:
        with torch.inference_mode():
            model(x, t)

    return forward


def child(name: str, calls: int, threads: int, quick: bool) -> dict[str, Any]:
    """In the child: apply FEDRUN_HEAP, warm up, time ``calls`` calls of the workload."""
    import resource
    import time

    from fedrun.heap import apply_heap

    choice = apply_heap()
    torch.set_num_threads(threads)
    fn = _workload(name, quick)
    fn()
    fn()  # warm: oneDNN's primitives built, the heap grown to its working size
    seconds, faults = [], 0
    for _ in range(calls):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"applied": choice.applied, "seconds": median(seconds), "faults": faults / calls, "max_rss_kib": rss}


def run_child(name: str, mode: str, calls: int, threads: int, quick: bool) -> dict[str, Any]:
    env = {**os.environ, ENV: mode, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "benchmarks.bench_heap", "--child", name, "--calls", str(calls)]
    args += ["--threads", str(threads)] + (["--quick"] if quick else [])
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{name} ({mode}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def have_inception() -> bool:
    from evaluation.inception import WeightsNotFoundError, find_inception_weights

    try:
        find_inception_weights()
    except WeightsNotFoundError as e:
        print(f"inception: skipped ({e})")
        return False
    return True


def measure(name: str, turns: int, calls: int, threads: int, quick: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for _ in range(turns):  # the modes take turns, so drift in the machine's load hits both
        for mode in MODES:
            runs[mode].append(run_child(name, mode, calls, threads, quick))
    row: dict[str, Any] = {"workload": name}
    for mode in MODES:
        row[mode] = {k: median([r[k] for r in runs[mode]]) for k in ("seconds", "faults", "max_rss_kib")}
        row[mode]["applied"] = all(r["applied"] for r in runs[mode])
    row["system_vs_keep_time"] = row["system"]["seconds"] / row["keep"]["seconds"]
    row["keep_vs_system_rss"] = row["keep"]["max_rss_kib"] / row["system"]["max_rss_kib"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--turns", type=int, help="child processes per setting, taking turns (default 2, quick 1)")
    p.add_argument("--calls", type=int, help="timed calls per child (default 5, quick 2)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = parse_args(p, argv)
    threads = (args.threads or [1])[0]
    calls = args.calls or (2 if args.quick else 5)
    if args.child:  # one measurement, in a child process: its line of JSON is all it prints
        print(json.dumps(child(args.child, calls, threads, args.quick)))
        return {}
    if args.device == "cuda":
        p.error("--device cuda: bench_heap measures CPU work (the host's malloc); allowed: cpu, auto")
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        p.error(f"--workloads {args.workloads!r}: allowed: comma-separated of {', '.join(WORKLOADS)}")
    if "inception" in names and not have_inception():
        names.remove("inception")
    turns = args.turns or (1 if args.quick else 2)
    results = []
    for name in names:
        results.append(measure(name, turns, calls, threads, args.quick))
        print(f"  {name}: system / keep time {results[-1]['system_vs_keep_time']:.3f}", flush=True)
    rows = [
        [r["workload"], r["system"]["seconds"] * 1e3, r["keep"]["seconds"] * 1e3, r["system_vs_keep_time"],
         r["system"]["faults"], r["keep"]["faults"], r["system"]["max_rss_kib"] / 1024,
         r["keep"]["max_rss_kib"] / 1024, r["keep_vs_system_rss"]]
        for r in results
    ]  # fmt: skip
    headers = ["workload", "system ms", "keep ms", "system / keep", "system faults", "keep faults",
               "system RSS MiB", "keep RSS MiB", "RSS keep / system"]  # fmt: skip
    title = (
        f"One call per workload, child processes taking turns ({turns} per setting, median of {calls} calls "
        f"each, {threads} thread(s))"
    )
    targets: list[Target] = [
        check(f"{r['workload']}: time with glibc's defaults / with fedrun's (not slower, 3% noise allowance)",
              r["system_vs_keep_time"], ">=", 0.97)
        for r in results
    ]  # fmt: skip
    ratios = {f"{r['workload']}/{k}": r[k] for r in results for k in ("system_vs_keep_time", "keep_vs_system_rss")}
    payload = {"config": {"turns": turns, "calls": calls, "threads": threads}, "results": results, "ratios": ratios}
    info = device_info(torch.device("cpu"))
    return report("bench_heap", info, [(title, headers, rows)], targets, payload, args.json)


if __name__ == "__main__":
    main()
