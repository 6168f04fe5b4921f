"""Throughput of one local training step: the paper's eager fp32 step vs the project's optimised step.

Modes, measured side by side in one run (the modes take turns, see ``common.time_interleaved``):

  eager-fp32   the paper's code style: fp32, NCHW, plain ``torch.optim.Adam``, ``loss.item()`` every step
  optimised    ``fedrun.client.LocalTrainer`` as ``fedrun.train`` sets it up: the precision ``optim.amp=auto``
               picks here (``fedrun.precision``: bf16 autocast on a GPU and on an AMX CPU, else fp32; ``--amp``
               sets another), channels_last, fused Adam on GPU, no host sync inside the loop
  optimised-P  the same step in the other precision P (fp32 or bf16), so that the two are side by side
  +compile     the same with ``torch.compile(model)`` (``--compile``)
  +ema         the same with a per-client EMA updated every step (``--ema DECAY``; the ddpm-cifar10 preset)

Models: the paper UNet of the paper-fmnist preset (28x28x1), Ho et al.'s UNet of the ddpm-cifar10 preset
(32x32x3) and, when ``diffusers`` is installed (``pip install -e '.[bench]'``), diffusers' ``UNet2DModel`` in
the DDPM CIFAR-10 configuration on the same device, through the same two code paths.

    python -m benchmarks.bench_step                      # CPU: ~1-2 min with the small defaults
    python -m benchmarks.bench_step --threads 1,2,auto   # + the optimised step at each thread count, in turns
    python -m benchmarks.bench_step --device cuda --compile --json step.json

On CPU the step runs with one thread unless ``--threads`` says otherwise; with several counts the table of
modes uses the first, and a second table gives the optimised step (what ``fedrun train`` runs) at each count,
every count taking its turn in the same repeats (``auto`` = the count ``fedrun train`` would choose here).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common import (
    base_parser,
    check,
    device_info,
    median,
    parse_args,
    pick_device,
    report,
    time_interleaved,
)
from benchmarks.steps import ARCHS, at_threads, eager_fp32, have_diffusers, optimised
from fedrun.precision import amp_choice
from unet import GaussianDiffusion

# (batch, warmup steps, timed steps per repeat). CPU: small, so the script stays around 1-2 minutes on 2
# cores; GPU: the paper's batch.
CPU_DEFAULTS = {"paper-unet": (16, 2, 4), "ddpm-unet": (4, 1, 3), "diffusers": (4, 1, 3)}
GPU_DEFAULTS = {arch: (128, 10, 30) for arch in ARCHS}
QUICK = (2, 1, 1)
# img/s of the ISSUE's anchors (H100 80GB, batch 128, diffusers UNet2DModel DDPM CIFAR-10 config).
H100_ANCHORS = {"fp32": 1431.0, "bf16": 2271.0, "bf16+compile": 2866.0}


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--archs",
        default="paper-unet,ddpm-unet,diffusers",
        help="comma-separated: paper-unet, ddpm-unet, diffusers (skipped when not installed)",
    )
    p.add_argument("--batch", type=int, help="batch size (default: 128 on GPU, 16/4 on CPU)")
    p.add_argument("--warmup", type=int, help="warmup steps per mode")
    p.add_argument("--iters", type=int, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, help="timed repeats per mode, taking turns (median reported)")
    p.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="precision of the optimised step, as optim.amp (auto: fedrun.precision's rule); the other "
        "precision is measured beside it (optimised-fp32 or optimised-bf16) unless --no-other-amp",
    )
    p.add_argument("--no-other-amp", action="store_true", help="skip the optimised step in the other precision")
    p.add_argument("--compile", action="store_true", help="add the optimised step with torch.compile")
    p.add_argument("--ema", type=float, metavar="DECAY", help="add the optimised step with a per-step EMA")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.03,
        help="'not slower' targets pass at ratio >= 1 - tolerance (timing noise of a shared CPU)",
    )
    return p


@dataclass
class Measured:
    """What the run measured, every model's modes side by side."""

    rows: list[list[Any]] = field(default_factory=list)  # the modes table
    results: list[dict[str, Any]] = field(default_factory=list)  # the same, for the JSON
    thread_rows: list[list[Any]] = field(default_factory=list)  # the optimised step at each thread count
    thread_results: list[dict[str, Any]] = field(default_factory=list)
    precisions: dict[str, dict[str, str]] = field(default_factory=dict)  # arch -> auto's choice, the other, why

    def img_per_s(self) -> dict[tuple[str, str], float]:
        return {(r["arch"], r["mode"]): r["img_per_s"] for r in self.results}


def runners_for(arch: str, args: argparse.Namespace, device: torch.device, counts: list[int], sizes, m: Measured):
    """The modes of one model, each a closure timing ``iters`` steps at its thread count."""
    size, channels, n_images = ARCHS[arch]
    batch, warmup, iters = sizes
    n_images = max(4 * batch, 64) if args.quick else n_images
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, channels, size, size), dtype=torch.uint8, generator=gen).to(device)
    choice = amp_choice(args.amp, device, size)  # what fedrun train would run for this model here
    amp, other = choice.dtype, "fp32" if choice.precision == "bf16" else "bf16"
    m.precisions[arch] = {"choice": choice.precision, "other": other, "why": choice.describe()}
    diffusion = GaussianDiffusion(loss="huber")

    def opt(dtype: torch.dtype | None, **kw: Any):
        return optimised(arch, images, batch, warmup, iters, diffusion, device, dtype, **kw)

    runners = {"eager-fp32": eager_fp32(arch, images, batch, warmup, iters, diffusion, device), "optimised": opt(amp)}
    if args.compile:
        runners["optimised+compile"] = opt(amp, compile_model=True)
    if args.ema:
        runners["optimised+ema"] = opt(amp, ema_decay=args.ema)
    if not args.no_other_amp:  # both precisions side by side: is auto's pick the faster one here?
        runners[f"optimised-{other}"] = opt(torch.bfloat16 if other == "bf16" else None)
    runners = {name: at_threads(fn, counts[0]) for name, fn in runners.items()}
    for n in counts[1:]:  # the optimised step at the other counts, taking turns with the rest
        runners[f"optimised@{n}t"] = at_threads(opt(amp), n)
    return runners


def measure(arch: str, args: argparse.Namespace, device: torch.device, counts: list[int], repeats: int, m: Measured):
    """Time one model's modes in turns; add its rows to ``m``."""
    sizes = QUICK if args.quick else (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)[arch]
    batch, _, iters = sizes = (args.batch or sizes[0], args.warmup or sizes[1], args.iters or sizes[2])
    runners = runners_for(arch, args, device, counts, sizes, m)
    seconds = time_interleaved(runners, repeats, device)
    for n in counts:
        secs = seconds.pop("optimised" if n == counts[0] else f"optimised@{n}t")
        rates = [batch * iters / median(secs), batch * iters / max(secs), batch * iters / min(secs)]
        m.thread_rows.append([arch, n, *rates])
        m.thread_results.append({"arch": arch, "threads": n, "seconds": secs, "img_per_s": rates[0]})
        if n == counts[0]:
            seconds["optimised"] = secs
    seconds = {mode: seconds[mode] for mode in runners if mode in seconds}  # the table's order
    base = batch * iters / median(seconds["eager-fp32"])
    pr = m.precisions[arch]
    for mode, secs in seconds.items():
        ips = batch * iters / median(secs)
        if mode == "eager-fp32":
            label = "fp32"
        elif mode == f"optimised-{pr['other']}":
            label = pr["other"]
        else:
            label = pr["choice"] + mode.removeprefix("optimised")
        m.results.append(
            {
                "arch": arch,
                "mode": mode,
                "precision": label,
                "batch": batch,
                "iters": iters,
                "repeats": repeats,
                "seconds": secs,
                "img_per_s": ips,
                "ratio_vs_eager": ips / base,
            }
        )
        m.rows.append([arch, mode, label, batch, ips, ips / base])
    if device.type == "cuda":
        torch.cuda.empty_cache()


def amp_table(m: Measured) -> list[list[Any]]:
    """Per model: auto's pick, the optimised step's img/s in fp32 and in bf16, and their ratio."""
    ips, rows = m.img_per_s(), []
    for arch, pr in m.precisions.items():
        if (arch, f"optimised-{pr['other']}") in ips:
            by = {pr["choice"]: ips[(arch, "optimised")], pr["other"]: ips[(arch, f"optimised-{pr['other']}")]}
            rows.append([arch, pr["choice"], by["fp32"], by["bf16"], by["bf16"] / by["fp32"]])
    return rows


def vs_diffusers_table(m: Measured) -> list[list[Any]]:
    """Per mode: the project's ddpm-unet vs diffusers' UNet2DModel (same config), when both were measured."""
    ips = m.img_per_s()
    modes = sorted({mode for a, mode in ips if a == "ddpm-unet"})
    if not any(a == "diffusers" for a, _ in ips):
        return []
    return [
        [mode, ips[("ddpm-unet", mode)], ips[("diffusers", mode)], ips[("ddpm-unet", mode)] / ips[("diffusers", mode)]]
        for mode in modes
    ]


def targets(m: Measured, args: argparse.Namespace, device: torch.device, amp_rows, vs_diffusers) -> list[Any]:
    tol, ips = args.tolerance, m.img_per_s()
    out = []
    if device.type == "cpu":  # the ISSUE's CPU target is about the project's own models
        for arch in (a for a in m.precisions if a != "diffusers"):
            out.append(
                check(
                    f"cpu {arch}: optimised / eager-fp32 img/s (not slower, {tol:.0%} noise allowance)",
                    ips[(arch, "optimised")] / ips[(arch, "eager-fp32")],
                    ">=",
                    1 - tol,
                )
            )
    for arch, choice, fp32, bf16, _ in amp_rows:
        if args.amp == "auto" and arch != "diffusers":
            by, other = {"fp32": fp32, "bf16": bf16}, "fp32" if choice == "bf16" else "bf16"
            out.append(
                check(
                    f"{device.type} {arch}: optim.amp=auto picks {choice}; its img/s / {other}'s "
                    f"(not slower, {tol:.0%} noise allowance)",
                    by[choice] / by[other],
                    ">=",
                    1 - tol,
                )
            )
    if vs_diffusers:
        best = {a: max(v for (arch, _), v in ips.items() if arch == a) for a in ("ddpm-unet", "diffusers")}
        out.append(
            check(
                f"ddpm-unet fastest step / diffusers UNet2DModel fastest step (not slower, {tol:.0%} noise allowance)",
                best["ddpm-unet"] / best["diffusers"],
                ">=",
                1 - tol,
            )
        )
    return out


def tables(m: Measured, device: torch.device, repeats: int, counts: list[int], amp_rows, vs_diffusers):
    out = [
        (
            f"Training step throughput on {device} (median of {repeats} repeats; "
            "ratio = img/s / eager-fp32 of the same model)",
            ["model", "mode", "precision", "batch", "img/s", "ratio"],
            m.rows,
        )
    ]
    if amp_rows:
        out.append(
            (
                "Precision: the optimised step in fp32 and in bf16 autocast, side by side (median; "
                "'auto picks' = fedrun.precision's rule on this machine)",
                ["model", "auto picks", "fp32 img/s", "bf16 img/s", "bf16 / fp32"],
                amp_rows,
            )
        )
    if len(counts) > 1:
        base_ips = {r[0]: r[2] for r in m.thread_rows if r[1] == counts[0]}
        out.append(
            (
                f"Intra-op threads: the optimised step at each count, side by side (median, slowest and "
                f"fastest of {repeats} repeats; ratio = img/s / {counts[0]} thread(s))",
                ["model", "threads", "img/s", "slowest", "fastest", "ratio"],
                [[*r, r[2] / base_ips[r[0]]] for r in m.thread_rows],
            )
        )
    if vs_diffusers:
        out.append(
            (
                "Project ddpm-unet vs diffusers UNet2DModel (same config, same device, same mode)",
                ["mode", "ddpm-unet img/s", "diffusers img/s", "ratio"],
                vs_diffusers,
            )
        )
    if device.type == "cuda":
        out.append(
            (
                "ISSUE anchors (H100 80GB, batch 128, diffusers UNet2DModel): comparable only on an H100 at batch 128",
                ["precision", "img/s"],
                [[k, v] for k, v in H100_ANCHORS.items()],
            )
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv, thread_sweep=True)
    device = pick_device(args.device)
    if device.type == "cpu" and not args.threads:
        # One thread by default: the ratios are what this reports, and on a busy machine (CI, a shared
        # 2-core box) torch's spinning OpenMP threads make multi-thread timings erratic (here 5x slower).
        torch.set_num_threads(1)
    counts = args.threads or [torch.get_num_threads()]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        p.error(f"unknown arch(s) {unknown}; allowed: {', '.join(ARCHS)}")
    skipped = []
    if "diffusers" in archs and not have_diffusers():
        archs.remove("diffusers")
        skipped.append("diffusers (not installed: pip install -e '.[bench]')")
    repeats = args.repeats or (1 if args.quick else 3)

    m = Measured()
    for arch in archs:
        measure(arch, args, device, counts, repeats, m)
    amp_rows, vs_diffusers = amp_table(m), vs_diffusers_table(m)
    if skipped:
        print("skipped: " + "; ".join(skipped))
    payload = {
        "config": {
            "device": str(device),
            "amp": {arch: pr["choice"] for arch, pr in m.precisions.items()},
            "amp_why": {arch: pr["why"] for arch, pr in m.precisions.items()},
            "compile": args.compile,
            "ema": args.ema,
            "repeats": repeats,
            "quick": args.quick,
            "skipped": skipped,
            "threads": counts,
        },
        "results": m.results,
        "threads": m.thread_results,
        "ratios": {f"{r['arch']}/{r['mode']}": r["ratio_vs_eager"] for r in m.results},
        "vs_diffusers": {row[0]: row[3] for row in vs_diffusers},
        "bf16_vs_fp32": {row[0]: row[4] for row in amp_rows},
    }
    return report(
        "bench_step",
        device_info(device),
        tables(m, device, repeats, counts, amp_rows, vs_diffusers),
        targets(m, args, device, amp_rows, vs_diffusers),
        payload,
        args.json,
    )


if __name__ == "__main__":
    main()
