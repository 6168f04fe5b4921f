"""`fedrun info`: parameter groups and the communication budget of every method, before a run."""

from __future__ import annotations

import argparse
import json

from fedrun.build import build_model
from fedrun.comm import collective_bytes_per_round, paper_total, usplit_range
from fedrun.config import RunConfig
from fedrun.methods import METHOD_NAMES, get_method, plan_round
from unet import GROUPS, group_sizes, parameter_groups


def describe(cfg: RunConfig, num_clients: int, rounds: int) -> dict:
    model = build_model(cfg)
    groups = parameter_groups(model)
    named = dict(model.named_parameters())
    sizes = {g: n for g, n in group_sizes(model).items() if g in GROUPS}
    named_sizes = {g: [named[n].numel() for n in groups[g]] for g in GROUPS}
    seed = cfg.federation.seed
    comm: dict = {}
    bytes_per_round: dict = {}
    for m in METHOD_NAMES:
        if get_method(m).split_roles:
            comm[m] = list(usplit_range(sizes, num_clients, rounds))
        else:
            comm[m] = paper_total(m, sizes, num_clients, rounds, seed)
        plan = plan_round(m, 1, num_clients, seed)
        bytes_per_round[m] = {dt: collective_bytes_per_round(plan, named_sizes, dt) for dt in ("fp32", "bf16")}
    return {
        "model": {"arch": cfg.model.arch, "dataset": cfg.data.dataset},
        "params": {"total": sum(sizes.values()), **sizes},
        "clients": num_clients,
        "rounds": rounds,
        "comm": comm,
        "bytes_per_round_per_rank": bytes_per_round,
    }


def format_info(d: dict) -> str:
    p = d["params"]
    lines = [f"model {d['model']['arch']} for {d['model']['dataset']}: {p['total']:,} parameters"]
    for g in GROUPS:
        lines.append(f"  {g:<10} {p[g]:>12,}  {100 * p[g] / p['total']:5.1f} %")
    lines.append(f"paper count N (parameters, star topology) for K={d['clients']}, R={d['rounds']}:")
    full = d["comm"]["full"]
    for m in METHOD_NAMES:
        v = d["comm"][m]
        if isinstance(v, list):
            txt = f"{v[0] / 1e6:,.2f} .. {v[1] / 1e6:,.2f} x 10^6" if v[0] != v[1] else f"{v[0] / 1e6:,.2f} x 10^6"
            rel = f"{100 * v[0] / full:.1f}..{100 * v[1] / full:.1f} % of full"
        else:
            txt, rel = f"{v / 1e6:,.2f} x 10^6", f"{100 * v / full:.1f} % of full"
        b = d["bytes_per_round_per_rank"][m]
        lines.append(f"  {m:<8} {txt:<28} {rel:<22} all-reduce/round/rank: {b['fp32'] / 2**20:,.2f} MiB fp32, "
                     f"{b['bf16'] / 2**20:,.2f} MiB bf16")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fedrun.cli import config_from_args

    cfg = config_from_args(args)
    d = describe(cfg, cfg.federation.clients, cfg.federation.rounds)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def register(sub) -> None:
    from fedrun.cli import add_config_arguments

    p = sub.add_parser("info", help="parameters and communication budget per method (K=--clients, R=--rounds)")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
