"""Sampling throughput as each sampler runs: every mode in a process of its own, with the malloc it runs under.

``bench_sample`` runs every mode in one process with glibc's default malloc, so it compares the two loops alone.
``fedrun eval`` also sets its process's malloc to keep freed memory (``fedrun.heap``, ``FEDRUN_HEAP=keep``); a
script running diffusers' loop has glibc's defaults, under which every activation above glibc's largest mmap
threshold (32 MiB: at fedrun eval's batch of 250 most of the paper UNet's) is mapped and faulted in anew at every
step. The setting is per process, so here each mode is a child process (the modes taking turns, ``--turns``):

  project               ``sample_images`` on the channels_last UNet, FEDRUN_HEAP=keep: what ``fedrun eval`` runs
  diffusers             diffusers' documented loop on the UNet as built (NCHW), glibc's defaults: a plain script
  project+system-heap   the project's sampler with glibc's defaults (what the layout alone gives)
  diffusers+cl          the diffusers loop on the channels_last UNet, glibc's defaults
  diffusers+keep-heap   the diffusers loop in a process with fedrun's heap (what the heap alone gives)

so the table shows where a ratio comes from. fp32 (the protocol's precision), the same weights and noise as
``bench_sample``; batch: ``fedrun eval``'s (250) unless ``--batch``.

    python -m benchmarks.bench_sample_as_run                 # CPU: paper UNet, batch 250, 3 steps, ~6 min
    python -m benchmarks.bench_sample_as_run --batch 32 --steps 10 --turns 3

diffusers is a bench extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_sample import ARCHS, TARGET, build, diffusers_sampler, project_sampler
from benchmarks.common import base_parser, check, device_info, median, parse_args, pick_device, report
from benchmarks.steps import have_diffusers
from evaluation.evaluate import evaluate_run
from fedrun.heap import ENV

REPO = Path(__file__).resolve().parents[1]
# mode -> (sampler, FEDRUN_HEAP of its process)
MODES = {
    "project": ("project", "keep"),
    "diffusers": ("diffusers", "system"),
    "project+system-heap": ("project", "system"),
    "diffusers+cl": ("diffusers+cl", "system"),
    "diffusers+keep-heap": ("diffusers", "keep"),
}
EVAL_BATCH = inspect.signature(evaluate_run).parameters["batch_size"].default  # fedrun eval's sampling batch


def child(mode: str, arch: str, batch: int, steps: int, calls: int, device: torch.device) -> dict[str, Any]:
    """In the child: apply FEDRUN_HEAP, build the sampler, warm up, time ``calls`` chains."""
    from evaluation.sample import for_sampling
    from fedrun.heap import apply_heap

    choice = apply_heap()
    size, channels = ARCHS[arch]
    shape = (batch, channels, size, size)
    sampler = MODES[mode][0]
    if sampler == "project":
        run = project_sampler(for_sampling(build(arch, device)), steps, shape, device, None)
    else:
        model = build(arch, device)
        if sampler == "diffusers+cl":
            model = model.to(memory_format=torch.channels_last)
        run = diffusers_sampler(model, steps, shape, device, None)
    run()  # warm: oneDNN's primitives built, the heap grown to its working size
    seconds = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()  # returns the samples on the CPU: the chain has finished
        seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "heap_applied": choice.applied}


def run_child(mode: str, args: argparse.Namespace, batch: int, steps: int, calls: int) -> dict[str, Any]:
    env = {**os.environ, ENV: MODES[mode][1], "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.bench_sample_as_run", "--child", mode, "--arch", args.arch]
    cmd += ["--batch", str(batch), "--steps", str(steps), "--calls", str(calls), "--device", args.device]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="paper-unet", choices=tuple(ARCHS), help="the UNet both samplers drive")
    p.add_argument("--batch", type=int, help=f"images per batch (default: fedrun eval's, {EVAL_BATCH})")
    p.add_argument("--steps", type=int, help="timesteps of the chain (default 3; quick 2)")
    p.add_argument("--turns", type=int, help="child processes per mode, taking turns (default 3; quick 1)")
    p.add_argument("--calls", type=int, help="timed chains per child (default 2; quick 1)")
    p.add_argument("--child", choices=tuple(MODES), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv)
    device = pick_device(args.device)
    if device.type == "cpu" and not args.threads:
        torch.set_num_threads(1)  # as bench_sample: ratios, not the machine's best, and steady on a busy box
    batch = args.batch or (2 if args.quick else EVAL_BATCH)
    steps = args.steps or (2 if args.quick else 3)
    calls = args.calls or (1 if args.quick else 2)
    if args.child:  # one measurement, in a child process: its line of JSON is all it prints
        print(json.dumps(child(args.child, args.arch, batch, steps, calls, device)))
        return {}
    if not have_diffusers():
        p.error("diffusers is not installed; this benchmark compares against its loop: pip install -e '.[bench]'")
    turns = args.turns or (1 if args.quick else 3)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for _ in range(turns):  # the modes take turns, so drift in the machine's load hits all of them
        for mode in MODES:
            runs[mode].append(run_child(mode, args, batch, steps, calls))
    seconds = {m: [s for r in rs for s in r["seconds"]] for m, rs in runs.items()}
    ips = {m: batch * steps / median(s) for m, s in seconds.items()}
    rows = [[m, MODES[m][1], batch, steps, ips[m], ips[m] / ips["diffusers"]] for m in MODES]
    title = (
        f"DDPM sampling on {device}, each mode in its own process: {args.arch}, batch {batch}, {steps}-step chain, "
        f"fp32, {torch.get_num_threads()} thread(s), median of {turns} x {calls} chains (ratio = over diffusers)"
    )
    headers = ["mode", "FEDRUN_HEAP", "batch", "steps", "img x steps / s", "ratio"]
    targets = [
        check("project as fedrun eval runs it / diffusers loop in a plain process", ips["project"] / ips["diffusers"],
              ">=", TARGET),
        check("the same with both in a process with fedrun's heap (the loops alone)",
              ips["project"] / ips["diffusers+keep-heap"], ">=", TARGET),
    ]  # fmt: skip
    payload = {
        "config": {"arch": args.arch, "batch": batch, "steps": steps, "turns": turns, "calls": calls},
        "results": [
            {
                "mode": m,
                "heap": MODES[m][1],
                "heap_applied": all(r["heap_applied"] for r in runs[m]),
                "seconds": seconds[m],
                "img_steps_per_s": ips[m],
            }
            for m in MODES
        ],  # fmt: skip
        "ratios": {m: ips[m] / ips["diffusers"] for m in MODES},
    }
    return report("bench_sample_as_run", device_info(device), [(title, headers, rows)], targets, payload, args.json)


if __name__ == "__main__":
    main()
