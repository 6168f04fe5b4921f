"""Sampling throughput: the project's DDPM sampler vs diffusers' ``DDPMScheduler`` loop driving the same UNet.

FID needs 1,000 samples x 1,000 steps per model, so this is the cost of every score. Modes, measured side by side
in one run (taking turns, see ``common.time_interleaved``), all from the same weights and the same x_T:

  project          ``evaluation.sample.sample_images`` as ``fedrun eval`` runs it (``GaussianDiffusion.p_sample_loop``,
                   the UNet in channels_last: ``evaluation.sample.for_sampling``), fp32
  project-bf16     the same under bf16 autocast (``amp=torch.bfloat16``)
  project-graphs   (CUDA only) ``sample_images(graphs=True)``: the UNet replayed from CUDA graphs
                   (``evaluation.graphs``), fp32; ``project-bf16-graphs`` the same under bf16 autocast
  diffusers        the loop of diffusers' documentation: ``for t in scheduler.timesteps: eps = model(x, t);
                   x = scheduler.step(eps, t, x).prev_sample`` with ``DDPMScheduler`` (linear betas,
                   ``fixed_small`` variance = the project's posterior variance, no clipping: the same sampler),
                   driving the UNet as it is built (NCHW), under ``torch.no_grad``
  diffusers-bf16   the same under bf16 autocast
  diffusers+cl     the diffusers loop with the UNet in channels_last, to show how much of a gap the memory
                   layout alone explains (``--no-cl`` skips it)

The chain is shortened to ``--steps`` (a schedule of that many timesteps: each step costs what one of 1,000 costs);
throughput is images x steps / s. The first batch of each mode also gives its samples: both samplers draw their
noise from one generator in the same order, so ``max |project - diffusers|`` checks that they run the same chain.

    python -m benchmarks.bench_sample                  # CPU: paper UNet 28x28, batch 32, 10 steps, ~1-3 min
    python -m benchmarks.bench_sample --device cuda --batch 250 --steps 100

diffusers is a bench extra: ``pip install -e '.[bench]'``; without it only the project's modes run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.common import base_parser, check, device_info, median, parse_args, pick_device, report, time_interleaved
from benchmarks.steps import have_diffusers
from evaluation.sample import for_sampling, sample_images
from unet import GaussianDiffusion, create_model

ARCHS = {"paper-unet": (28, 1), "ddpm-unet": (32, 3)}  # arch -> (image size, channels)
CPU_DEFAULTS = {"paper-unet": (32, 10), "ddpm-unet": (4, 5)}  # (batch, steps)
GPU_DEFAULTS = {"paper-unet": (250, 100), "ddpm-unet": (250, 50)}
QUICK = (2, 3)
TARGET = 1.5  # the ISSUE: the project's sampler >= 1.5x the diffusers loop


def build(arch: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # every mode samples with the same weights
    size, channels = ARCHS[arch]
    return create_model(arch, image_size=size, channels=channels).to(device).eval()


def project_sampler(
    model: nn.Module,
    steps: int,
    shape: tuple[int, ...],
    device: torch.device,
    amp: torch.dtype | None,
    graphs: bool = False,
) -> Callable[[], torch.Tensor]:
    """One batch of ``sample_images`` (seed 0, so batch 0's generator), uint8 [B, C, H, W]. With ``graphs`` each
    call captures anew (a graph lives for one ``sample_images`` call), as ``fedrun eval`` would per model."""
    diffusion = GaussianDiffusion(timesteps=steps)
    kw = {"batch_size": shape[0], "device": device, "seed": 0, "progress": False, "amp": amp, "graphs": graphs}
    return lambda: sample_images(model, diffusion, shape[0], shape[1:], **kw)


def diffusers_sampler(
    model: nn.Module, steps: int, shape: tuple[int, ...], device: torch.device, amp: torch.dtype | None
) -> Callable[[], torch.Tensor]:
    """diffusers' DDPM loop on ``model(x, t) -> eps``, the same generator seeding as ``sample_images``."""
    from diffusers import DDPMScheduler

    from evaluation.sample import batch_seed, to_uint8

    scheduler = DDPMScheduler(
        num_train_timesteps=steps, beta_schedule="linear", variance_type="fixed_small", clip_sample=False
    )
    scheduler.set_timesteps(steps)

    @torch.no_grad()
    def run() -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(batch_seed(0, 0))
        x = torch.randn(shape, device=device, generator=g)
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            for t in scheduler.timesteps:
                eps = model(x, t.to(device).expand(shape[0])).float()
                x = scheduler.step(eps, t, x, generator=g).prev_sample
        return to_uint8(x).cpu()

    return run


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="paper-unet", choices=tuple(ARCHS), help="the UNet both samplers drive")
    p.add_argument("--batch", type=int, help="images per batch (default: 32 on CPU, 250 on GPU: fedrun eval's)")
    p.add_argument("--steps", type=int, help="timesteps of the chain (default: 10 on CPU, 100 on GPU)")
    p.add_argument("--repeats", type=int, help="timed repeats per mode, taking turns (median reported)")
    p.add_argument("--no-cl", action="store_true", help="skip the diffusers loop with a channels_last UNet")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 modes (a CPU without native bf16 emulates it)")
    return p


def samplers(args: argparse.Namespace, device: torch.device, steps: int, shape: tuple[int, ...]):
    """The modes to time, by name, and what was skipped and why."""
    bf16 = torch.bfloat16
    model = build(args.arch, device)
    mine = for_sampling(build(args.arch, device))  # the same weights, laid out as fedrun eval samples them
    runners: dict[str, Callable[[], torch.Tensor]] = {"project": project_sampler(mine, steps, shape, device, None)}
    if not args.no_bf16:
        runners["project-bf16"] = project_sampler(mine, steps, shape, device, bf16)
    skipped = ["the bf16 modes (--no-bf16)"] if args.no_bf16 else []
    if device.type == "cuda":
        runners["project-graphs"] = project_sampler(mine, steps, shape, device, None, graphs=True)
        if not args.no_bf16:
            runners["project-bf16-graphs"] = project_sampler(mine, steps, shape, device, bf16, graphs=True)
    else:
        skipped.append("the CUDA graphs modes (CUDA only)")
    if have_diffusers():
        runners["diffusers"] = diffusers_sampler(model, steps, shape, device, None)
        if not args.no_bf16:
            runners["diffusers-bf16"] = diffusers_sampler(model, steps, shape, device, bf16)
        if not args.no_cl:
            cl = build(args.arch, device).to(memory_format=torch.channels_last)
            runners["diffusers+cl"] = diffusers_sampler(cl, steps, shape, device, None)
    else:
        skipped.append("diffusers (not installed: pip install -e '.[bench]')")
    return runners, skipped


# Pairs of modes whose samples should agree (the same chain), when both ran.
SAME_CHAIN = (
    ("project", "diffusers"),
    ("project-bf16", "diffusers-bf16"),
    ("project", "project-bf16"),
    ("project", "project-graphs"),
    ("project-bf16", "project-bf16-graphs"),
)


def sample_targets(ips: dict[str, float]) -> list[Any]:
    if "diffusers" not in ips:
        return []
    out = [
        check(f"{mine} / {theirs} (img x steps / s, same precision)", ips[mine] / ips[theirs], ">=", TARGET)
        for mine, theirs in (("project", "diffusers"), ("project-bf16", "diffusers-bf16"))
        if mine in ips
    ]
    out.append(
        check(
            "fastest project mode / fastest diffusers mode",
            max(v for k, v in ips.items() if k.startswith("project"))
            / max(v for k, v in ips.items() if k.startswith("diffusers")),
            ">=",
            TARGET,
        )
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(parser(), argv)
    device = pick_device(args.device)
    if device.type == "cpu" and not args.threads:
        torch.set_num_threads(1)  # as bench_step: ratios, not the machine's best, and steady on a busy box
    batch, steps = QUICK if args.quick else (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)[args.arch]
    batch, steps = args.batch or batch, args.steps or steps
    repeats = args.repeats or (1 if args.quick else 3)
    size, channels = ARCHS[args.arch]
    runners, skipped = samplers(args, device, steps, (batch, channels, size, size))

    samples = {name: fn() for name, fn in runners.items()}  # warmup, and the samples compared below
    seconds = time_interleaved(runners, repeats, device)
    ips = {name: batch * steps / median(s) for name, s in seconds.items()}
    base = ips.get("diffusers", ips["project"])
    rows = [[name, batch, steps, ips[name], ips[name] / base] for name in runners]
    diff_rows = [
        [a, b, int((samples[a].int() - samples[b].int()).abs().max())]
        for a, b in SAME_CHAIN
        if a in samples and b in samples
    ]
    tables = [
        (
            f"DDPM sampling on {device}: {args.arch}, {steps}-step chain, median of {repeats} repeats "
            f"(ratio = img x steps / s over {'diffusers' if 'diffusers' in ips else 'project'})",
            ["mode", "batch", "steps", "img x steps / s", "ratio"],
            rows,
        )
    ]
    if diff_rows:
        tables.append(
            ("The same chain? largest difference of the uint8 samples of batch 0", ["a", "b", "max |a - b|"], diff_rows)
        )
    if skipped:
        print("skipped: " + "; ".join(skipped))
    payload = {
        "config": {"arch": args.arch, "batch": batch, "steps": steps, "repeats": repeats, "skipped": skipped},
        "results": [
            {"mode": n, "seconds": seconds[n], "img_steps_per_s": ips[n], "ratio": ips[n] / base} for n in runners
        ],
        "ratios": {n: ips[n] / base for n in runners},
        "max_abs_diff": {f"{a}/{b}": d for a, b, d in diff_rows},
    }
    return report("bench_sample", device_info(device), tables, sample_targets(ips), payload, args.json)


if __name__ == "__main__":
    main()
