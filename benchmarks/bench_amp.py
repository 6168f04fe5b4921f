"""bf16 autocast vs fp32 on this CPU (or GPU), and what ``optim.amp=auto`` picks: the rule checked here.

For each (image side, ``dim_mults``, batch) of the grid, the paper UNet (dim = the image side) trains with the
project's optimised step (``LocalTrainer``, channels_last, as ``fedrun train`` runs it) in fp32 and under bf16
autocast, the two taking turns; the table gives both rates, bf16 / fp32, and ``fedrun.precision``'s pick for
that image side on this machine. One target per row: the pick is not slower than the other precision. A FAIL
row is a place where the rule (a function of the CPU's flags and the image side only, so that a resume always
trains in the run's precision) leaves speed unused or loses some; BENCHMARKS.md has the figures it was set from.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.common import (
    Target,
    base_parser,
    check,
    device_info,
    median,
    parse_args,
    pick_device,
    report,
    time_interleaved,
)
from benchmarks.steps import optimised
from fedrun.precision import amp_choice
from unet import GaussianDiffusion, create_model

# (image side, dim_mults, batch): the presets' sizes (16: quickstart, cpu-table, the tests; 28: Fashion-MNIST
# as the paper trains it) and the ones between, where the rule's thresholds lie.
GRID: list[tuple[int, tuple[int, ...], int]] = [
    (28, (1, 2, 4), 2),
    (28, (1, 2, 4), 8),
    (28, (1, 2, 4), 32),
    (28, (1, 2, 4), 64),
    (28, (1, 2), 8),
    (32, (1, 2, 4), 32),
    (24, (1, 2, 4), 32),
    (20, (1, 2, 4), 16),
    (20, (1, 2, 4), 32),
    (16, (1, 2, 4), 8),
    (16, (1, 2, 4), 32),
    (16, (1, 2, 4), 128),
    (16, (1, 2), 8),
    (16, (1, 2), 32),
]
QUICK_GRID = [(16, (1, 2), 2)]
IMAGES_PER_REPEAT = 256  # timed images per repeat and precision (at least 2 steps)


def measure(
    size: int, mults: tuple[int, ...], batch: int, repeats: int, device: torch.device, per_repeat: int
) -> dict[str, Any]:
    """img/s of the optimised step in fp32 and bf16 for one grid point, the two taking turns."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(8 * batch, 256), 1, size, size), dtype=torch.uint8, generator=gen).to(device)
    diffusion = GaussianDiffusion(loss="huber")
    iters = max(2, per_repeat // batch)
    runners = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)  # both precisions start from the same weights
        model = create_model("paper-unet", image_size=size, channels=1, dim_mults=mults)
        runners[name] = optimised("paper-unet", images, batch, 2, iters, diffusion, device, dtype, model=model)
    seconds = time_interleaved(runners, repeats, device)
    rate = {name: batch * iters / median(s) for name, s in seconds.items()}
    pick = amp_choice("auto", device, size).precision
    return {
        "size": size,
        "dim_mults": list(mults),
        "batch": batch,
        "fp32_img_per_s": rate["fp32"],
        "bf16_img_per_s": rate["bf16"],
        "bf16_vs_fp32": rate["bf16"] / rate["fp32"],
        "auto_picks": pick,
    }


def select_grid(p: argparse.ArgumentParser, sizes: str | None, quick: bool) -> list[tuple[int, tuple[int, ...], int]]:
    """The grid's rows, or those of the ``--sizes`` given."""
    grid = QUICK_GRID if quick else GRID
    if not sizes:
        return grid
    allowed = sorted({g[0] for g in grid})
    try:
        wanted = {int(s) for s in sizes.split(",") if s.strip()}
    except ValueError:
        p.error(f"--sizes {sizes!r}: allowed: comma-separated image sides from {allowed}")
    chosen = [g for g in grid if g[0] in wanted]
    if not chosen:
        p.error(f"--sizes {sizes!r}: no row of the grid has these sides; allowed: {allowed}")
    return chosen


def target(r: dict[str, Any], tolerance: float) -> Target:
    """The row's pick is not slower than the other precision."""
    mine = r["bf16_vs_fp32"] if r["auto_picks"] == "bf16" else 1 / r["bf16_vs_fp32"]
    other = "fp32" if r["auto_picks"] == "bf16" else "bf16"
    where = f"{r['size']}x{r['size']} dim_mults {','.join(map(str, r['dim_mults']))} batch {r['batch']}"
    return check(f"{where}: auto picks {r['auto_picks']}; its img/s / {other}'s", mine, ">=", 1 - tolerance)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, help="timed repeats per precision, taking turns (default 5, quick 1)")
    p.add_argument("--sizes", help="comma-separated image sides: only these rows of the grid (default: all)")
    p.add_argument(
        "--tolerance", type=float, default=0.03, help="'not slower' passes at ratio >= 1 - tolerance (timing noise)"
    )
    args = parse_args(p, argv)
    device = pick_device(args.device)
    if device.type == "cpu" and not args.threads:
        torch.set_num_threads(1)  # as bench_step: ratios are the point, and one thread keeps them steady
    grid = select_grid(p, args.sizes, args.quick)
    repeats = args.repeats or (1 if args.quick else 5)
    results = []
    for size, mults, batch in grid:
        results.append(measure(size, mults, batch, repeats, device, 4 if args.quick else IMAGES_PER_REPEAT))
        print(f"  {size}x{size} {mults} batch {batch}: bf16 / fp32 {results[-1]['bf16_vs_fp32']:.3f}", flush=True)
    rows = [
        [f"{r['size']}x{r['size']}", ",".join(map(str, r["dim_mults"])), r["batch"], r["fp32_img_per_s"],
         r["bf16_img_per_s"], r["bf16_vs_fp32"], r["auto_picks"]]
        for r in results
    ]  # fmt: skip
    threads = torch.get_num_threads()
    title = f"The optimised step in fp32 and bf16 autocast, taking turns (median of {repeats}, {threads} thread(s))"
    headers = ["image", "dim_mults", "batch", "fp32 img/s", "bf16 img/s", "bf16 / fp32", "auto picks"]
    ratios = {f"{r['size']}/{','.join(map(str, r['dim_mults']))}/{r['batch']}": r["bf16_vs_fp32"] for r in results}
    rule = {size: amp_choice("auto", device, size).describe() for size in sorted({g[0] for g in grid})}
    payload = {"config": {"repeats": repeats, "threads": threads, "rule": rule}, "results": results, "ratios": ratios}
    targets = [target(r, args.tolerance) for r in results]
    return report("bench_amp", device_info(device), [(title, headers, rows)], targets, payload, args.json)


if __name__ == "__main__":
    main()
