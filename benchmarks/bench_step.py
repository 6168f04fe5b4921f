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

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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
from fedrun.client import ClientState, LocalTrainer, StepConfig
from fedrun.precision import amp_choice
from unet import EMA, GaussianDiffusion, create_model

# arch -> (image size, channels, images per client: the dataset split over 2 clients)
ARCHS: dict[str, tuple[int, int, int]] = {
    "paper-unet": (28, 1, 30_000),  # paper-fmnist: Fashion-MNIST 60k / 2
    "ddpm-unet": (32, 3, 25_000),  # ddpm-cifar10: CIFAR-10 50k / 2
    "diffusers": (32, 3, 25_000),  # diffusers UNet2DModel, DDPM CIFAR-10 config
}
# (batch, warmup steps, timed steps per repeat). CPU: small, so the script stays around 1-2 minutes on 2
# cores; GPU: the paper's batch.
CPU_DEFAULTS = {"paper-unet": (16, 2, 4), "ddpm-unet": (4, 1, 3), "diffusers": (4, 1, 3)}
GPU_DEFAULTS = {arch: (128, 10, 30) for arch in ARCHS}
QUICK = (2, 1, 1)
# img/s of the ISSUE's anchors (H100 80GB, batch 128, diffusers UNet2DModel DDPM CIFAR-10 config).
H100_ANCHORS = {"fp32": 1431.0, "bf16": 2271.0, "bf16+compile": 2866.0}

# google/ddpm-cifar10-32's config.json (35,746,307 parameters, the same network as unet.DDPMUNet).
DIFFUSERS_DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    resnet_time_scale_shift="default",
    time_embedding_type="positional",
)


class DiffusersEps(nn.Module):
    """``UNet2DModel`` behind the project's ``model(x_t, t) -> eps`` interface."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(**DIFFUSERS_DDPM_CIFAR10)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:  # ImportError, or a diffusers that does not import with this torch
        return False
    return True


def build(arch: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # every mode starts from the same weights
    if arch == "diffusers":
        model = DiffusersEps()
    else:
        size, channels, _ = ARCHS[arch]
        model = create_model(arch, image_size=size, channels=channels)
    return model.to(device)


def eager_fp32(
    arch: str,
    images: torch.Tensor,
    batch: int,
    warmup: int,
    iters: int,
    diffusion: GaussianDiffusion,
    device: torch.device,
) -> Callable[[], None]:
    """The paper's step: fp32, NCHW, default Adam, the loss read back to the host every step."""
    model = build(arch, device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1)
    state = {"perm": torch.randperm(images.shape[0], device=device, generator=gen), "pos": 0}
    losses: list[float] = []

    def steps(n: int) -> None:
        for _ in range(n):
            if state["pos"] + batch > images.shape[0]:
                state["perm"], state["pos"] = torch.randperm(images.shape[0], device=device, generator=gen), 0
            idx = state["perm"][state["pos"] : state["pos"] + batch]
            state["pos"] += batch
            x0 = images[idx].float().div_(127.5).sub_(1.0)
            loss = diffusion.training_loss(model, x0, generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())

    steps(warmup)
    return lambda: steps(iters)


def optimised(
    arch: str,
    images: torch.Tensor,
    batch: int,
    warmup: int,
    iters: int,
    diffusion: GaussianDiffusion,
    device: torch.device,
    amp: torch.dtype | None,
    compile_model: bool = False,
    ema_decay: float | None = None,
    model: nn.Module | None = None,
) -> Callable[[], None]:
    """The project's step: LocalTrainer, set up as fedrun.train does; one round = ``iters`` steps.
    ``model``: the network to train (default: ``build(arch)``)."""
    # channels_last on every device, as fedrun.setup builds the working model.
    model = (model if model is not None else build(arch, device)).to(device, memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    cfg = StepConfig(
        lr=1e-4, batch_size=batch, local_epochs=1e9, max_local_steps=warmup, keep_opt_state=False, amp_dtype=amp, seed=0
    )
    trainer = LocalTrainer(net, diffusion, cfg, device, alias_client=0)
    client = ClientState(
        cid=0, params=trainer.new_client_params(0), images=images, ema=EMA(model, ema_decay) if ema_decay else None
    )
    rounds = iter(range(1, 1 << 30))
    trainer.train_round(client, next(rounds))  # warmup (and compilation)
    cfg.max_local_steps = iters

    def run() -> None:
        res = trainer.train_round(client, next(rounds))
        if not math.isfinite(res.loss_sum):
            raise RuntimeError(f"{arch}: non-finite loss {res.loss_sum}")

    return run


def at_threads(fn: Callable[[], None], n: int) -> Callable[[], None]:
    """``fn`` run with ``n`` intra-op threads: modes at different counts can take turns in one process."""

    def run() -> None:
        torch.set_num_threads(n)
        fn()

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    diffusion = GaussianDiffusion(loss="huber")

    rows, results = [], []
    precisions: dict[str, dict[str, str]] = {}
    thread_rows: list[list[Any]] = []
    thread_results: list[dict[str, Any]] = []
    for arch in archs:
        size, channels, n_images = ARCHS[arch]
        batch, warmup, iters = QUICK if args.quick else (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)[arch]
        batch, warmup, iters = args.batch or batch, args.warmup or warmup, args.iters or iters
        n_images = max(4 * batch, 64) if args.quick else n_images
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n_images, channels, size, size), dtype=torch.uint8, generator=gen).to(device)
        choice = amp_choice(args.amp, device, size)  # what fedrun train would run for this model here
        amp, amp_name = choice.dtype, choice.precision
        other = "fp32" if amp_name == "bf16" else "bf16"
        precisions[arch] = {"choice": amp_name, "other": other, "why": choice.describe()}
        runners = {
            "eager-fp32": eager_fp32(arch, images, batch, warmup, iters, diffusion, device),
            "optimised": optimised(arch, images, batch, warmup, iters, diffusion, device, amp),
        }
        if args.compile:
            runners["optimised+compile"] = optimised(
                arch, images, batch, warmup, iters, diffusion, device, amp, compile_model=True
            )
        if args.ema:
            runners["optimised+ema"] = optimised(
                arch, images, batch, warmup, iters, diffusion, device, amp, ema_decay=args.ema
            )
        if not args.no_other_amp:  # both precisions side by side: is auto's pick the faster one here?
            runners[f"optimised-{other}"] = optimised(
                arch, images, batch, warmup, iters, diffusion, device, torch.bfloat16 if other == "bf16" else None
            )
        runners = {name: at_threads(fn, counts[0]) for name, fn in runners.items()}
        for n in counts[1:]:  # the optimised step at the other counts, taking turns with the rest
            runners[f"optimised@{n}t"] = at_threads(
                optimised(arch, images, batch, warmup, iters, diffusion, device, amp), n
            )
        seconds = time_interleaved(runners, repeats, device)
        for n in counts:
            secs = seconds.pop("optimised" if n == counts[0] else f"optimised@{n}t")
            thread_rows.append(
                [arch, n, batch * iters / median(secs), batch * iters / max(secs), batch * iters / min(secs)]
            )
            thread_results.append(
                {"arch": arch, "threads": n, "seconds": secs, "img_per_s": batch * iters / median(secs)}
            )
            if n == counts[0]:
                seconds["optimised"] = secs
        seconds = {m: seconds[m] for m in runners if m in seconds}  # the table's order
        base = batch * iters / median(seconds["eager-fp32"])
        for mode, secs in seconds.items():
            ips = batch * iters / median(secs)
            label = (
                "fp32"
                if mode == "eager-fp32"
                else other
                if mode == f"optimised-{other}"
                else amp_name + mode.removeprefix("optimised")
            )
            results.append(
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
            rows.append([arch, mode, label, batch, ips, ips / base])
        del runners, images
        if device.type == "cuda":
            torch.cuda.empty_cache()

    tol = args.tolerance
    ips = {(r["arch"], r["mode"]): r["img_per_s"] for r in results}
    targets = []
    if device.type == "cpu":  # the ISSUE's CPU target is about the project's own models
        for arch in (a for a in archs if a != "diffusers"):
            targets.append(
                check(
                    f"cpu {arch}: optimised / eager-fp32 img/s (not slower, {tol:.0%} noise allowance)",
                    ips[(arch, "optimised")] / ips[(arch, "eager-fp32")],
                    ">=",
                    1 - tol,
                )
            )
    amp_rows = []
    for arch, pr in precisions.items():
        if (arch, f"optimised-{pr['other']}") not in ips:
            continue
        by = {pr["choice"]: ips[(arch, "optimised")], pr["other"]: ips[(arch, f"optimised-{pr['other']}")]}
        amp_rows.append([arch, pr["choice"], by["fp32"], by["bf16"], by["bf16"] / by["fp32"]])
        if args.amp == "auto" and arch != "diffusers":
            targets.append(
                check(
                    f"{device.type} {arch}: optim.amp=auto picks {pr['choice']}; its img/s / {pr['other']}'s "
                    f"(not slower, {tol:.0%} noise allowance)",
                    by[pr["choice"]] / by[pr["other"]],
                    ">=",
                    1 - tol,
                )
            )
    vs_diffusers = []
    if "diffusers" in archs and "ddpm-unet" in archs:
        for mode in sorted({m for a, m in ips if a == "ddpm-unet"}):
            r = ips[("ddpm-unet", mode)] / ips[("diffusers", mode)]
            vs_diffusers.append([mode, ips[("ddpm-unet", mode)], ips[("diffusers", mode)], r])
        best = max(v for (a, _), v in ips.items() if a == "ddpm-unet")
        targets.append(
            check(
                f"ddpm-unet fastest step / diffusers UNet2DModel fastest step (not slower, {tol:.0%} noise allowance)",
                best / max(v for (a, _), v in ips.items() if a == "diffusers"),
                ">=",
                1 - tol,
            )
        )

    tables = [
        (
            f"Training step throughput on {device} (median of {repeats} repeats; "
            "ratio = img/s / eager-fp32 of the same model)",
            ["model", "mode", "precision", "batch", "img/s", "ratio"],
            rows,
        )
    ]
    if amp_rows:
        tables.append(
            (
                "Precision: the optimised step in fp32 and in bf16 autocast, side by side (median; "
                "'auto picks' = fedrun.precision's rule on this machine)",
                ["model", "auto picks", "fp32 img/s", "bf16 img/s", "bf16 / fp32"],
                amp_rows,
            )
        )
    if len(counts) > 1:
        base_ips = {r[0]: r[2] for r in thread_rows if r[1] == counts[0]}
        tables.append(
            (
                f"Intra-op threads: the optimised step at each count, side by side (median, slowest and "
                f"fastest of {repeats} repeats; ratio = img/s / {counts[0]} thread(s))",
                ["model", "threads", "img/s", "slowest", "fastest", "ratio"],
                [[*r, r[2] / base_ips[r[0]]] for r in thread_rows],
            )
        )
    if vs_diffusers:
        tables.append(
            (
                "Project ddpm-unet vs diffusers UNet2DModel (same config, same device, same mode)",
                ["mode", "ddpm-unet img/s", "diffusers img/s", "ratio"],
                vs_diffusers,
            )
        )
    if device.type == "cuda":
        anchors = [[k, v] for k, v in H100_ANCHORS.items()]
        tables.append(
            (
                "ISSUE anchors (H100 80GB, batch 128, diffusers UNet2DModel): comparable only on an H100 at batch 128",
                ["precision", "img/s"],
                anchors,
            )
        )
    if skipped:
        print("skipped: " + "; ".join(skipped))
    payload = {
        "config": {
            "device": str(device),
            "amp": {arch: pr["choice"] for arch, pr in precisions.items()},
            "amp_why": {arch: pr["why"] for arch, pr in precisions.items()},
            "compile": args.compile,
            "ema": args.ema,
            "repeats": repeats,
            "quick": args.quick,
            "skipped": skipped,
            "threads": counts,
        },
        "results": results,
        "threads": thread_results,
        "ratios": {f"{r['arch']}/{r['mode']}": r["ratio_vs_eager"] for r in results},
        "vs_diffusers": {row[0]: row[3] for row in vs_diffusers},
        "bf16_vs_fp32": {row[0]: row[4] for row in amp_rows},
    }
    return report("bench_step", device_info(device), tables, targets, payload, args.json)


if __name__ == "__main__":
    main()
