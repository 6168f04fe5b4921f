"""The encoder / bottleneck / decoder split of a UNet's parameters, resolved by module-name prefix.

Each model class declares `GROUP_PREFIXES = {"encoder": (...), "bottleneck": (...), "decoder": (...)}`
naming its top-level children. The split is checked hard: every parameter must fall in exactly one
group, otherwise the federated methods would silently share or drop parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["GROUPS", "parameter_groups", "group_sizes"]

GROUPS: tuple[str, ...] = ("encoder", "bottleneck", "decoder")


def _matches(name: str, prefix: str) -> bool:
    # Whole dotted components only: prefix "ups" must not claim "upsample.weight".
    return name == prefix or name.startswith(prefix + ".")


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Map each group in GROUPS to its parameter names, in `model.named_parameters()` order.

    Raises ValueError if the model's class declares no GROUP_PREFIXES, declares other groups than
    GROUPS, or if a parameter matches no group or more than one.
    """
    prefixes = getattr(type(model), "GROUP_PREFIXES", None)
    if prefixes is None:
        raise ValueError(f"{type(model).__name__} declares no GROUP_PREFIXES")
    if set(prefixes) != set(GROUPS):
        cls = type(model).__name__
        raise ValueError(f"{cls}.GROUP_PREFIXES has groups {sorted(prefixes)}, need {GROUPS}")
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, _ in model.named_parameters():
        hits = [g for g in GROUPS if any(_matches(name, p) for p in prefixes[g])]
        if len(hits) != 1:
            where = "no group" if not hits else f"several groups {hits}"
            raise ValueError(f"parameter {name!r} of {type(model).__name__} falls in {where}")
        groups[hits[0]].append(name)
    return groups


def group_sizes(model: nn.Module) -> dict[str, int]:
    """Number of scalar parameters per group, plus "total" (what the communication counts are made of)."""
    numel = {n: p.numel() for n, p in model.named_parameters()}
    sizes = {g: sum(numel[n] for n in names) for g, names in parameter_groups(model).items()}
    sizes["total"] = sum(numel.values())
    return sizes
