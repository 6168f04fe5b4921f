"""Cost of one FedAvg sync: ``fedrun.exchange.Exchange.sync`` vs ONE all-reduce of a flat buffer of the same
byte count, for the shared groups of each method (full, usplit, ulatdec, udec); for int8 exchange, vs ONE
fp32 all-reduce of the same parameters (what int8 replaces: its quantising and two collectives vs 4x the
bytes).

Two ranks are spawned here, one client each, joined through ``fedrun.dist`` (gloo on CPU; NCCL, one GPU per
rank, when there are >= 2 GPUs). Two syncs are timed: "in place" (the exchange adopted the model's parameters,
as ``fedrun train`` does for one client per rank: scale + one all-reduce where they lie) and "packed" (the path
of a rank hosting several clients: pack into a bucketed buffer, all-reduce, copy back). Per repeat the
operations take turns, each after a barrier; a repeat counts the slower rank. The ``local`` column is the
packed sync in a one-rank group (pack and copy back: everything but the collective).

    python -m benchmarks.bench_sync                      # paper UNet, fp32, bf16 and int8 exchange
    python -m benchmarks.bench_sync --arch ddpm-unet --repeats 50 --json sync.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.distributed as tdist

from benchmarks.common import (
    base_parser,
    check,
    device_info,
    median,
    parse_args,
    pick_device,
    report,
    spawn_ranks,
    time_interleaved,
)
from fedrun.exchange import DEFAULT_BUCKET_BYTES, EXCHANGE_DTYPES, Exchange
from fedrun.methods import METHODS, plan_round
from unet import create_model, parameter_groups

SHAPES = {"paper-unet": (28, 1), "ddpm-unet": (32, 3)}
SEED = 2023
LIMIT = 1.1  # ISSUE target: a sync may cost at most 1.1x the single flat all-reduce


def _timed(fn, device: torch.device, inner: int = 1) -> float:
    """Seconds per call of ``fn``, over ``inner`` back-to-back calls started together after a barrier."""
    tdist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / inner


def _time_turns(ops: dict, device: torch.device, warmup: int, repeats: int, inner: int, world: int) -> dict:
    """Seconds per call of each op, per repeat, on the slower rank (which decides how long a collective step
    takes). Each timing is ``inner`` calls in a row (the barrier's own jitter spread over them); the order of
    the operations rotates from repeat to repeat, so none always runs right after the same other."""
    for _ in range(warmup):
        for fn in ops.values():
            _timed(fn, device)
    times: dict[str, list[float]] = {k: [] for k in ops}
    names = list(ops)
    for i in range(repeats):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            times[k].append(_timed(ops[k], device, inner))
    gathered: list[Any] = [None] * world
    tdist.all_gather_object(gathered, times)
    return {k: [max(g[k][i] for g in gathered) for i in range(repeats)] for k in ops}


def worker(
    ctx,
    arch: str,
    methods: list[str],
    dtypes: list[str],
    warmup: int,
    repeats: int,
    bucket_bytes: int | None,
    inner: int,
) -> dict:
    """Runs on every rank; rank 0's return value is the result."""
    device, world, rank = ctx.device, ctx.world_size, ctx.rank
    size, channels = SHAPES[arch]
    torch.manual_seed(0)
    # As fedrun.train builds it: channels_last, one client per rank whose parameters the exchange adopts.
    model = create_model(arch, image_size=size, channels=channels).to(device).to(memory_format=torch.channels_last)
    groups = parameter_groups(model)
    # The packed path (a rank hosting several clients) on its own copy of the weights.
    copy = {n: p.detach().clone() for n, p in model.named_parameters()}
    solo = [tdist.new_group([r]) for r in range(world)]  # every rank creates every group, in order
    rows = []
    for dtype in dtypes:
        for method in methods:
            plan = plan_round(method, 1, world, SEED)
            in_place = Exchange(groups, [1000] * world, exchange_dtype=dtype, bucket_bytes=bucket_bytes)
            assert in_place.adopt(model)
            mine = {n: p.data for n, p in model.named_parameters()}
            packed = Exchange(groups, [1000] * world, exchange_dtype=dtype, bucket_bytes=bucket_bytes)
            local = Exchange(groups, [1000], group=solo[rank], exchange_dtype=dtype, bucket_bytes=bucket_bytes)
            local_plan = plan_round(method, 1, 1, SEED)  # one client: the same shared groups, no peer
            assert local_plan.shared_groups() == plan.shared_groups() or method == "usplit"
            # bf16 exchanges changes against a reference (steady state); without one the first sync is fp32.
            for avg, params in ((in_place, mine), (packed, copy), (local, copy)):
                avg.set_reference(params)
            first = in_place.sync(plan, {rank: mine})
            assert in_place.packed_layout is None, "the adopted model did not sync in place"
            nbytes = first.bytes
            assert packed.sync(plan, {rank: copy}).bytes == nbytes
            if dtype == "int8":  # one fp32 all-reduce of the same parameters (and slots)
                shared = plan.shared_groups()
                numel = sum(p.numel() for g in shared for p in (dict(model.named_parameters())[n] for n in groups[g]))
                flat = torch.ones(numel + len(shared), dtype=torch.float32, device=device)
            else:
                wire = torch.bfloat16 if dtype == "bf16" else torch.float32
                flat = torch.ones(nbytes // wire.itemsize, dtype=wire, device=device)
            ops = {
                "in_place": lambda: in_place.sync(plan, {rank: mine}),  # noqa: B023 (used inside this iteration)
                "packed": lambda: packed.sync(plan, {rank: copy}),  # noqa: B023
                "flat": lambda: tdist.all_reduce(flat),  # noqa: B023
                "local": lambda: local.sync(local_plan, {0: copy}),  # noqa: B023
            }
            worst = _time_turns(ops, device, warmup, repeats, inner, world)
            med = {k: median(worst[k]) for k in ops}
            rows.append(
                {
                    "method": method,
                    "exchange_dtype": dtype,
                    "groups": list(plan.shared_groups()),
                    "bytes": nbytes,
                    "flat_bytes": flat.numel() * flat.element_size(),
                    "collectives": first.collectives,
                    "packed_collectives": len(packed.packed_layout.buckets),
                    **{f"{k}_s": worst[k] for k in ops},
                    **{f"{k}_median_s": med[k] for k in ops},
                    "ratio": med["in_place"] / med["flat"],
                    "packed_ratio": med["packed"] / med["flat"],
                }
            )
    return {"rows": rows, "backend": ctx.backend, "world_size": world}


def on_device(arch: str, rows: list[dict], device: torch.device, warmup: int, repeats: int) -> list[dict]:
    """In this process, on ``device``: the packed Exchange.sync with no peer (everything but the collective)
    vs one device copy of the same bytes. On a GPU this is where per-parameter kernel launches show."""
    size, channels = SHAPES[arch]
    torch.manual_seed(0)
    model = create_model(arch, image_size=size, channels=channels).to(device)
    groups = parameter_groups(model)
    mine = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = []
    for r in rows:
        avg = Exchange(groups, [1000], exchange_dtype=r["exchange_dtype"])
        avg.set_reference(mine)
        plan = plan_round(r["method"], 1, 1, SEED)
        src = torch.ones(r["bytes"], dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ops = {"sync": lambda: avg.sync(plan, {0: mine}), "copy": lambda: dst.copy_(src)}  # noqa: B023
        time_interleaved(ops, warmup, device)
        t = time_interleaved(ops, repeats, device)
        out.append(
            {
                "method": r["method"],
                "exchange_dtype": r["exchange_dtype"],
                "bytes": r["bytes"],
                "sync_median_s": median(t["sync"]),
                "copy_median_s": median(t["copy"]),
                "ratio": median(t["sync"]) / median(t["copy"]),
            }
        )
    return out


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="paper-unet", choices=tuple(SHAPES))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of full,usplit,...")
    p.add_argument("--exchange", default="fp32,bf16,int8", help="exchange dtypes: fp32, bf16, int8 (any of them)")
    p.add_argument("--repeats", type=int, help="timed repeats (median reported); default 20, quick 2")
    p.add_argument("--warmup", type=int, help="untimed repeats first; default 3, quick 1")
    p.add_argument("--inner", type=int, help="calls per timing (back to back); default 5, quick 1")
    p.add_argument(
        "--bucket-mb",
        type=float,
        default=DEFAULT_BUCKET_BYTES / 2**20,
        help=f"Exchange bucket size in MiB (default {DEFAULT_BUCKET_BYTES / 2**20:g}); 0 = one bucket",
    )
    return p


SYNC_HEADERS = [
    "method",
    "exchange",
    "bytes",
    "buckets",
    "in place ms",
    "flat all-reduce ms",
    "ratio",
    "packed ms",
    "packed ratio",
    "local ms",
]


def sync_row(r: dict) -> list[Any]:
    ms = {k: 1e3 * r[f"{k}_median_s"] for k in ("in_place", "flat", "packed", "local")}
    return [
        r["method"],
        r["exchange_dtype"],
        r["bytes"],
        r["collectives"],
        ms["in_place"],
        ms["flat"],
        r["ratio"],
        ms["packed"],
        r["packed_ratio"],
        ms["local"],
    ]


def on_device_table(local: list[dict], gpu: torch.device):
    return (
        f"Packed Exchange.sync with no peer on {torch.cuda.get_device_name(gpu)} (pack and copy "
        "back) vs one device copy of the same bytes",
        ["method", "exchange", "bytes", "sync ms", "copy ms", "ratio"],
        [
            [
                r["method"],
                r["exchange_dtype"],
                r["bytes"],
                1e3 * r["sync_median_s"],
                1e3 * r["copy_median_s"],
                r["ratio"],
            ]
            for r in local
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = parse_args(p, argv)
    device = pick_device(args.device)
    gpu = device if device.type == "cuda" else None
    note = ""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        note = f"{torch.cuda.device_count()} GPU: NCCL needs one GPU per rank, so 2 gloo ranks on CPU"
        device = torch.device("cpu")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.exchange.split(",") if d.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    for d in dtypes:
        if d not in EXCHANGE_DTYPES:
            p.error(f"unknown exchange dtype {d!r}; allowed: {', '.join(EXCHANGE_DTYPES)}")
    repeats = args.repeats or (2 if args.quick else 20)
    warmup = args.warmup or (1 if args.quick else 3)
    bucket_bytes = int(args.bucket_mb * 2**20) or None
    inner = args.inner or (1 if args.quick else 5)
    out = spawn_ranks(worker, 2, device.type, args.arch, methods, dtypes, warmup, repeats, bucket_bytes, inner)
    rows = out["rows"]
    # int8 has no target here: on one host the wire is nearly free and its quantising is what it costs.
    targets = [
        check(
            f"sync {r['method']} ({r['exchange_dtype']}), in place / one flat all-reduce of the same bytes",
            r["ratio"],
            "<=",
            LIMIT,
        )
        for r in rows
        if r["exchange_dtype"] != "int8"
    ]
    title = (
        f"Exchange.sync vs one all_reduce of a flat buffer of the same bytes: {args.arch}, "
        f"{out['world_size']} ranks ({out['backend']}), median of {repeats} x {inner} calls, slower rank. "
        "'in place': one client per rank, parameters adopted (what fedrun train does then); 'packed': the "
        "path of ranks hosting several clients; 'local': the packed sync without a peer (pack + unpack); "
        "int8 rows: the flat all-reduce is fp32 of the same parameters (4x int8's bytes)"
    )
    if note:
        print("note: " + note)
    payload = {
        "config": {
            "arch": args.arch,
            "backend": out["backend"],
            "world_size": out["world_size"],
            "bucket_bytes": bucket_bytes,
            "inner": inner,
            "repeats": repeats,
            "warmup": warmup,
            "quick": args.quick,
            "note": note,
        },
        "results": rows,
        "ratios": {f"{r['method']}/{r['exchange_dtype']}": r["ratio"] for r in rows},
    }
    tables = [(title, SYNC_HEADERS, [sync_row(r) for r in rows])]
    if gpu is not None:
        payload["on_device"] = local = on_device(args.arch, rows, gpu, warmup, repeats)
        tables.append(on_device_table(local, gpu))
    info = device_info(gpu if gpu is not None else device)
    return report("bench_sync", info, tables, targets, payload, args.json)


if __name__ == "__main__":
    main()
