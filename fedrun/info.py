"""`fedrun info` and `fedrun partition`: what a setup looks like before a run.

``info``: the model's parameter groups and the communication budget of every method. ``partition``: how a
data set is split over the clients (sizes, class histograms). Registering them imports no torch; ``info``
builds the model when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from fedrun.args import add_config_arguments, config_from_args
from fedrun.comm import TRAFFIC_TERMS, collective_bytes_per_round, paper_total, usplit_range
from fedrun.config import EXCHANGE_DTYPES, PARTITIONS, TORCHVISION_DATASETS, RunConfig, default_data_root
from fedrun.methods import METHOD_NAMES, get_method, plan_round
from fedrun.partition import class_histograms, format_partition, partition
from unet import GROUPS, group_sizes, parameter_groups


def describe(cfg: RunConfig, num_clients: int, rounds: int) -> dict:
    """Parameters per group, the paper's count N per method over the run, and the bytes of one rank's all-reduce
    per round (two figures: ``fedrun.comm.TRAFFIC_TERMS``)."""
    from fedrun.build import build_model  # torch: only when the command runs

    model = build_model(cfg)
    groups = parameter_groups(model)
    named = dict(model.named_parameters())
    sizes = {g: n for g, n in group_sizes(model).items() if g in GROUPS}
    named_sizes = {g: [named[n].numel() for n in groups[g]] for g in GROUPS}
    seed, sample = cfg.federation.seed, cfg.federation.sample_clients
    comm: dict = {}
    bytes_per_round: dict = {}
    for m in METHOD_NAMES:
        if get_method(m).split_roles:
            comm[m] = list(usplit_range(sizes, num_clients, rounds, sample))
        else:
            comm[m] = paper_total(m, sizes, num_clients, rounds, seed, sample)
        plan = plan_round(m, 1, num_clients, seed)
        bytes_per_round[m] = {
            dt: collective_bytes_per_round(plan, named_sizes, dt, world_size=num_clients) for dt in EXCHANGE_DTYPES
        }
    return {
        "model": {"arch": cfg.model.arch, "dataset": cfg.data.dataset},
        "params": {"total": sum(sizes.values()), **sizes},
        "clients": num_clients,
        "sample_clients": sample,
        "rounds": rounds,
        "comm": comm,
        "bytes_per_round_per_rank": bytes_per_round,
        "units": {
            "comm": "N: parameters over all rounds, the paper's count (star topology, round 1's download "
            "of the whole model included); usplit: [min, max] over role draws",
            "bytes_per_round_per_rank": "bytes one rank hands to its all-reduce in one round, by exchange "
            "dtype (int8: to its all-to-all, one rank per client; 0 on the wire with a single process: no "
            "collective)",
        },
    }


def _span(lo: float, hi: float, fmt: str, scale: float) -> str:
    """'a' or 'a .. b', each scaled and formatted."""
    return format(lo * scale, fmt) if lo == hi else f"{lo * scale:{fmt}} .. {hi * scale:{fmt}}"


def format_info(d: dict) -> str:
    """The text of ``fedrun info``: the parameter groups, then both traffic figures per method, each named."""
    p = d["params"]
    lines = [f"model {d['model']['arch']} for {d['model']['dataset']}: {p['total']:,} parameters"]
    for g in GROUPS:
        lines.append(f"  {g:<10} {p[g]:>12,}  {100 * p[g] / p['total']:5.1f} %")
    K, R = d["clients"], d["rounds"]
    m = d.get("sample_clients", 0)
    lines += [
        f"communication of K={K} clients over R={R} rounds, two figures that are not comparable:",
        *(f"  {line}" for line in TRAFFIC_TERMS),
        *(
            [
                f"  sampling    {m} of the {K} clients take part in a round: N counts their uploads (all {K} "
                "download); the all-reduce",
                "              moves the same bytes as without sampling (clients not drawn send zeros)",
            ]
            if m and m != K
            else []
        ),
        f"  {'method':<8} {'N over the run':<28} {'of full':<16} all-reduce per round and rank, of full fp32",
        f"  {'':<8} {'':<28} {'':<16} " + "".join(f"{dt:<20}" for dt in EXCHANGE_DTYPES).rstrip(),
    ]
    full = d["comm"]["full"]
    full_bytes = d["bytes_per_round_per_rank"]["full"]["fp32"]
    for m in METHOD_NAMES:
        v = d["comm"][m]
        lo, hi = v if isinstance(v, list) else (v, v)  # usplit: the range over role draws
        b = d["bytes_per_round_per_rank"][m]
        per_dtype = "".join(
            f"{f'{b[dt] / 2**20:,.2f} MiB {100 * b[dt] / full_bytes:5.1f} %':<20}" for dt in EXCHANGE_DTYPES
        )
        lines.append(
            f"  {m:<8} {_span(lo, hi, ',.2f', 1e-6) + ' x 10^6':<28} "
            f"{_span(lo, hi, '.1f', 100 / full) + ' %':<16} {per_dtype.rstrip()}"
        )
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    d = describe(cfg, cfg.federation.clients, cfg.federation.rounds)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def run_partition(args: argparse.Namespace) -> int:
    """Run ``fedrun partition``: 0 on success, 1 (message on stderr) on missing data or bad input."""
    from fedrun.data import DataNotFoundError, load_labels  # torchvision: only when the command runs

    root = args.data_root or default_data_root()
    try:
        labels = load_labels(args.dataset, root, train=True, download=args.download)
        if args.subset is not None:
            if args.subset < 1:
                raise ValueError(f"invalid --subset={args.subset}: allowed: a positive integer")
            labels = labels[: args.subset]
        parts = partition(labels, args.clients, args.partition, args.beta, args.seed, args.min_per_client)
    except (DataNotFoundError, ValueError) as e:
        print(f"fedrun partition: error: {e}", file=sys.stderr)
        return 1
    num_classes = int(labels.max()) + 1
    if args.json:
        out = {
            "dataset": args.dataset,
            "partition": args.partition,
            "clients": args.clients,
            "beta": args.beta,
            "seed": args.seed,
            "min_per_client": args.min_per_client,
            "examples": len(labels),
            "sizes": [len(p) for p in parts],
            "class_histograms": class_histograms(labels, parts, num_classes).tolist(),
        }
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{args.dataset}: {len(labels)} examples over {args.clients} clients, "
            f"partition={args.partition} beta={args.beta} seed={args.seed}"
        )
        print(format_partition(parts, labels, num_classes))
    return 0


def _add_partition_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "partition",
        help="show how a data set is split over clients (sizes, class histograms)",
        description="Print per-client sizes and class histograms of a simulated partition.",
    )
    p.add_argument("--dataset", default="fashion-mnist", choices=TORCHVISION_DATASETS)
    p.add_argument("--clients", type=int, default=2, help="number of clients K (default 2)")
    p.add_argument("--partition", default="iid", choices=PARTITIONS)
    p.add_argument("--beta", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--seed", type=int, default=2023, help="partition seed (default 2023, the paper's)")
    p.add_argument("--min-per-client", type=int, default=10, help="skewed kinds: minimum examples per client")
    p.add_argument("--subset", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--data-root", default=None, help=f"data root (default $FEDRUN_DATA or {default_data_root()})")
    p.add_argument("--download", action="store_true", help="download a missing data set (needs internet)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_partition)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``info`` and ``partition`` subcommands to ``sub`` (the result of ``parser.add_subparsers()``)."""
    p = sub.add_parser("info", help="parameters and communication budget per method (K=--clients, R=--rounds)")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_info)
    _add_partition_parser(sub)
