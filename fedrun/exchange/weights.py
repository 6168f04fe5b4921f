"""Stage 1, who takes part: FedAvg's normalised weights of a round, as pure functions of the plan and sizes.

With w_k = |D_k| / sum_j |D_j| the data share of client k and C_g the clients that contribute group g this
round (``RoundPlan.contributors``), FedAvg (eq. 1 of McMahan et al.) averages each group as

    theta_g = sum_{k in C_g} p_k,g theta_k,g,        p_k,g = w_k / sum_{j in C_g} w_j,

so the p_k,g of a group sum to 1. Every rank computes them from data every rank has, so the all-reduced sum
of the p-weighted contributions IS the average: nothing is divided after the collective. A rank also sends,
per group, the sum of its hosted contributors' p_k,g (its *weight slot*); summed over the ranks the slots
must be 1, which catches ranks that disagree about the plan or about who hosts whom (``check_weight_sums``).

``weighted_average`` is the reference the exchange is tested against: the same average of named tensors.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrun.methods import RoundPlan


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_k w_k states[k] / sum_k w_k for every parameter name (FedAvg, eq. 1 of McMahan et al.).

    Accumulates in float64 and returns each tensor in the dtype of ``states[0]``. Raises ValueError on an
    empty list, a length mismatch, differing names or shapes, a negative weight or a total weight <= 0.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"total weight must be > 0, got {total}")
    names = set(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != names:
            diff = sorted(names.symmetric_difference(s))
            raise ValueError(f"state {i} has different parameter names than state 0: {diff[:5]}")
    out: dict[str, Tensor] = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            raise TypeError(f"{name}: cannot average a {first.dtype} tensor")
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for i, (s, w) in enumerate(zip(states, weights, strict=True)):
            if s[name].shape != first.shape:
                raise ValueError(f"{name}: shape {tuple(s[name].shape)} in state {i} != {tuple(first.shape)}")
            acc.add_(s[name].detach().double(), alpha=w / total)
        out[name] = acc.to(first.dtype)
    return out


def data_shares(client_sizes: Sequence[int]) -> tuple[float, ...]:
    """w_k = |D_k| / sum_j |D_j| for every client of the federation; ValueError unless every size is >= 0
    and the total is > 0."""
    if not client_sizes or any(s < 0 for s in client_sizes) or sum(client_sizes) <= 0:
        raise ValueError(f"client_sizes must be >= 0 with a positive total, got {list(client_sizes)}")
    total = sum(int(s) for s in client_sizes)
    return tuple(int(s) / total for s in client_sizes)


def fedavg_weights(plan: RoundPlan, shares: Sequence[float]) -> dict[str, dict[int, float]]:
    """p_k,g = w_k / sum_{j in C_g} w_j for every group g the plan shares and every contributor k in C_g
    (groups in GROUPS order, clients in client order). ValueError when a group's contributors all have
    w = 0, or when the plan and ``shares`` count different clients."""
    if plan.num_clients != len(shares):
        raise ValueError(f"plan has {plan.num_clients} clients, the exchange {len(shares)}")
    out: dict[str, dict[int, float]] = {}
    for g in plan.shared_groups():
        contributors = plan.contributors(g)
        den = math.fsum(shares[k] for k in contributors)
        if not den > 0:
            raise ValueError(f"group {g!r}: its contributors {contributors} all have 0 examples")
        out[g] = {k: shares[k] / den for k in contributors}
    return out


@dataclass(frozen=True)
class RankShare:
    """This rank's part of a round: per shared group, its hosted contributors and their p_k,g."""

    groups: tuple[str, ...]
    """The groups the round shares, in GROUPS order."""
    contributors: tuple[tuple[tuple[int, float], ...], ...]
    """Per group (same order): (client, p_k,g) of every hosted contributor, in client order."""
    slots: tuple[float, ...]
    """Per group, the weight this rank sends: sum of its hosted contributors' p_k,g (0 when none)."""


def rank_share(plan: RoundPlan, shares: Sequence[float], hosted: Collection[int]) -> RankShare:
    """The groups of the round and, per group, which of the ``hosted`` clients contribute with which
    p_k,g (``fedavg_weights``). ValueError when no client or one out of range is hosted."""
    weights = fedavg_weights(plan, shares)
    if not hosted:
        raise ValueError("a rank must host at least one client")
    bad = sorted(k for k in hosted if not 0 <= k < plan.num_clients)
    if bad:
        raise ValueError(f"hosted client(s) {bad} out of range for {plan.num_clients} clients")
    mine = tuple(tuple((k, p) for k, p in w.items() if k in hosted) for w in weights.values())
    return RankShare(tuple(weights), mine, tuple(math.fsum(p for _, p in c) for c in mine))


class WeightSumError(RuntimeError):
    """The weight slots of a group did not sum to 1 over the ranks."""


def check_weight_sums(round: int, groups: Sequence[str], sums: Sequence[float], tol: float, written: bool) -> None:
    """WeightSumError unless every group's weight slots, summed over the ranks, are 1 to ``tol``.
    ``written``: this rank's shared parameters were already scaled in place (the error then says that they
    are no longer valid)."""
    for g, got in zip(groups, sums, strict=True):
        if abs(got - 1.0) > tol:
            msg = (
                f"round {round}: the FedAvg weights of {g!r} sum to {got:.6g} over the ranks, not 1: "
                "ranks disagree about the round plan or the hosted clients"
            )
            if written:
                msg += (
                    "; this rank's shared parameters were averaged in place and are no longer valid: "
                    "resume from the last checkpoint"
                )
            raise WeightSumError(msg)
