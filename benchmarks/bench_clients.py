"""Many clients in one job: memory per rank for K = 1, 10, 100, and the cost of one swap (``fedrun.residency``).

Part 1, memory: for each K and each ``federation.resident`` a fresh job (``--ranks`` processes, each K=1 on one)
sets up its clients through ``fedrun.setup.setup_clients`` (real Fashion-MNIST, a fixed subset split over the
K clients, so the images do not grow with K) and trains one round of one step per client (batch 8) through the
same turns and exchange as ``fedrun.loop.Run.round``. Per rank it prints the peak device memory
(``torch.cuda.max_memory_allocated``; a CPU has none apart from host memory: n/a), the host RSS after the round,
how many clients' states were on the device at once (the module's accounting) and each client's state size.

Part 2, swap vs local epoch on the paper preset (paper UNet, Fashion-MNIST 28x28, batch 128, K = 100 IID: 600
images, so an epoch is 5 steps): the median of ``--swap-repeats`` swaps of one client in and out of host
memory, against the time of ``--epoch-steps`` local steps of batch 128 scaled to the epoch's 5 steps.

    python -m benchmarks.bench_clients                    # CPU, ~3-5 min on 2 busy cores
    python -m benchmarks.bench_clients --device cuda --ema 0.999 --json clients.json

Targets (the ISSUE's): device memory at K = 100 <= 1.5x K = 1 (GPU only), host RSS growth per extra client
<= 1.25x its state size, a swap < 5 % of a local epoch.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch

from benchmarks.common import base_parser, check, device_info, median, parse_args, pick_device, report, spawn_ranks
from fedrun import dist
from fedrun.client import ClientState, LocalTrainer, StepConfig, local_steps
from fedrun.config import apply_overrides
from fedrun.methods import get_method
from fedrun.output import Sink
from fedrun.presets import get_preset
from fedrun.residency import Residency, state_bytes

SUBSET = 1000
"""Training images of every memory job, split over its K clients (so images do not grow with K)."""
PAPER_CLIENT_IMAGES = 600  # Fashion-MNIST's 60,000 over K = 100 IID clients


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _memory_job(
    ctx: dist.DistContext, clients: int, resident: str, data_root: str, ema: float | None, preset: str
) -> dict:
    """One rank of a job of ``clients`` clients: set up, one round of one step each, its numbers."""
    from fedrun.setup import setup_clients

    overrides: dict[str, Any] = {
        "federation.clients": clients,
        "federation.resident": resident,
        "federation.max_local_steps": 1,
        "optim.batch_size": 8,
        "data.subset": SUBSET,
        "data.root": data_root,
    }
    if ema:
        overrides["optim.ema_decay"] = ema
    cfg = apply_overrides(get_preset(preset), overrides)
    method = get_method(cfg.federation.method)
    h = setup_clients(cfg, ctx, method, Sink())
    plan = method.plan(1, clients, cfg.federation.seed)
    for client in h.clients.values():
        with h.residency.turn(client):
            h.trainer.train_round(client, 1)
    h.exchange.sync(plan, {k: c.params for k, c in h.clients.items()})
    cuda = ctx.device.type == "cuda"
    mine = {
        "hosted": float(len(h.clients)),
        "device_peak_mib": torch.cuda.max_memory_allocated(ctx.device) / 2**20 if cuda else -1.0,
        "rss_mib": rss_bytes() / 2**20,
        "peak_on_device": float(h.residency.peak_on_device),
        "state_mib": state_bytes(h.first) / 2**20,
    }
    per_rank = dist.gather_dict({ctx.rank: mine}, dict[str, float], "bench numbers")
    return {"where": h.residency.where, "ranks": {str(r): v for r, v in sorted(per_rank.items())}}


def memory_table(args, device: torch.device) -> tuple[list[dict], list[list[Any]]]:
    results, rows = [], []
    for k in args.clients:
        for resident in args.resident if k > 1 else ["device"]:
            ranks = min(args.ranks, k)
            res = spawn_ranks(_memory_job, ranks, device.type, k, resident, args.data_root, args.ema, args.preset)
            for rank, m in res["ranks"].items():
                dev = "n/a" if m["device_peak_mib"] < 0 else round(m["device_peak_mib"], 1)
                rows.append(
                    [k, ranks, rank, res["where"], int(m["hosted"]), int(m["peak_on_device"]), dev,
                     round(m["rss_mib"], 1), round(m["state_mib"], 2), load_avg()]
                )  # fmt: skip
                results.append({"clients": k, "ranks": ranks, "rank": int(rank), "where": res["where"], **m})
    return results, rows


def swap_vs_epoch(args, device: torch.device) -> dict[str, float]:
    """Median seconds of one swap (in + out) of a paper client through host memory, and of a local epoch."""
    cfg = get_preset(args.preset)
    if args.ema:
        cfg = apply_overrides(cfg, {"optim.ema_decay": args.ema})
    from fedrun.build import build_diffusion, build_model
    from unet import EMA

    torch.manual_seed(0)
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    trainer = LocalTrainer(model, build_diffusion(cfg), StepConfig.from_config(cfg, device), device)
    residency = Residency(model, device, "host")
    size = cfg.data.image_size or 28  # both presets here train on Fashion-MNIST
    images = torch.randint(0, 256, (PAPER_CLIENT_IMAGES, 1, size, size), dtype=torch.uint8, device=device)
    ema = EMA(model, args.ema) if args.ema else None
    client = residency.park(ClientState(cid=0, params=trainer.new_client_params(0), images=images, ema=ema))
    swaps = []
    for _ in range(args.swap_repeats):
        before = residency.swap_seconds
        with residency.turn(client):
            pass
        swaps.append(residency.swap_seconds - before)
    epoch_steps = local_steps(PAPER_CLIENT_IMAGES, cfg.optim.batch_size, 1, None)
    trainer.cfg.max_local_steps = args.epoch_steps
    with residency.turn(client):
        trainer.train_round(client, 1)  # warm-up
        t0 = time.perf_counter()
        trainer.train_round(client, 2)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = (time.perf_counter() - t0) / args.epoch_steps
    return {
        "swap_s": median(swaps),
        "step_s": step_s,
        "epoch_steps": float(epoch_steps),
        "epoch_s": step_s * epoch_steps,
        "state_mib": state_bytes(client) / 2**20,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,10,100", help="client counts K (default 1,10,100)")
    p.add_argument("--resident", default="device,host", help="federation.resident values to compare")
    p.add_argument("--ranks", type=int, default=2, help="ranks per job (gloo on CPU, NCCL on GPUs; K=1 uses 1)")
    p.add_argument("--ema", type=float, default=None, help="per-client EMA decay (its shadow is swapped too)")
    p.add_argument("--data-root", default=os.environ.get("FEDRUN_DATA", "../shared/data"))
    p.add_argument("--preset", default="paper-fmnist", help="the run's preset (model, image size, batch)")
    p.add_argument("--swap-repeats", type=int, default=20)
    p.add_argument("--epoch-steps", type=int, default=2, help="timed local steps of batch 128 (scaled to 5)")
    args = parse_args(p, argv)
    args.clients = [int(k) for k in args.clients.split(",")]
    args.resident = args.resident.split(",")
    if args.quick:
        args.clients, args.swap_repeats, args.epoch_steps, args.preset = [1, 4, 6], 3, 1, "tiny"
    device = pick_device(args.device)
    info = device_info(device)
    info["load_avg_start"] = load_avg()
    results, rows = memory_table(args, device)
    swap = swap_vs_epoch(args, device)
    swap["load_avg"] = load_avg()

    targets = []
    kmax, kmin = max(args.clients), min(args.clients)
    by = {(r["clients"], r["where"], r["rank"]): r for r in results}
    one, big = by.get((kmin, "device", 0)), by.get((kmax, "host", 0))
    ratios: dict[str, float] = {"swap/epoch": swap["swap_s"] / swap["epoch_s"]}
    payload_growth: dict[str, float] = {}
    hosts = sorted((r["hosted"], r) for r in results if r["where"] == "host" and r["rank"] == 0)
    if len(hosts) >= 2:
        # The marginal host memory of a client: RSS between the two largest jobs per extra hosted client,
        # against its state (a rank with several clients also has fixed extras: the exchange's packed
        # buffer and scratch, the working module; those do not grow with K).
        (n0, a), (n1, b) = hosts[-2], hosts[-1]
        growth = (b["rss_mib"] - a["rss_mib"]) / max((n1 - n0) * b["state_mib"], 1e-9)
        payload_growth[f"{int(n0)} -> {int(n1)} hosted"] = growth  # may be <= 0 in a --quick run: no ratio
        targets.append(check("host RSS growth per extra client / its state size", growth, "<=", 1.25))
    if one and big and device.type == "cuda":
        dev_ratio = big["device_peak_mib"] / one["device_peak_mib"]
        ratios[f"device peak K={kmax} host / K={kmin}"] = dev_ratio
        targets.append(check(f"device memory K={kmax} / K={kmin}", dev_ratio, "<=", 1.5))
    targets.append(check(f"one swap / one local epoch ({args.preset})", ratios["swap/epoch"], "<=", 0.05))
    swap_rows = [[swap["state_mib"], swap["swap_s"] * 1e3, swap["step_s"], int(swap["epoch_steps"]),
                  swap["epoch_s"], ratios["swap/epoch"] * 100, swap["load_avg"]]]  # fmt: skip
    heads = ["K", "ranks", "rank", "states", "hosted", "on device at once", "device peak MiB", "host RSS MiB",
             "state MiB/client", "load 1/5/15 min"]  # fmt: skip
    tables = [
        ("memory per rank after one round (one step per client)", heads, rows),
        (
            f"one swap (in + out, host memory) vs one local epoch, preset {args.preset}",
            ["state MiB", "swap ms", "step s", "steps/epoch", "epoch s", "swap % of epoch", "load 1/5/15 min"],
            swap_rows,
        ),
    ]
    payload = {"results": results, "swap": swap, "ratios": ratios, "rss_growth_per_state": payload_growth}
    return report("bench_clients", info, tables, targets, payload, args.json)


if __name__ == "__main__":
    main()
