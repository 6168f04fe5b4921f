"""Adoption: a module's grouped parameters moved into one flat tensor, so that a sync works where they lie.

    flat = [ parameters of GROUPS[0] | ... | parameters of GROUPS[-1] | one weight slot per group ]

(only the groups the exchange knows, each in ``named_groups`` order, each parameter in its own memory
order). Every method shares a suffix of GROUPS (decoder; bottleneck + decoder; all), so the shared groups
and their slots are always one contiguous run of ``flat``: that run is the buffer of an aliased
``Layout``, and a rank's single client is then scaled and all-reduced without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedrun.exchange.layout import dense_strides
from fedrun.methods import GROUPS


@dataclass(frozen=True, eq=False)
class Adopted:
    """The flat tensor the adopted parameters live in, and where each of them lies in it."""

    flat: Tensor
    order: tuple[str, ...]
    """The adopted groups, in GROUPS order."""
    numel: int
    """Parameter elements; the weight slots follow."""
    starts: dict[str, int]
    """Group -> its first element in ``flat``."""
    ptrs: dict[str, int]
    """Parameter name -> the address its tensor must still have for a sync to work in place."""

    def run(self, groups: tuple[str, ...]) -> Tensor | None:
        """The buffer of a layout of ``groups``: ``flat[start of groups[0] : numel + len(groups)]``, or None
        unless ``groups`` are the last adopted groups (a suffix of ``order``)."""
        if not groups or self.order[len(self.order) - len(groups) :] != groups:
            return None
        return self.flat[self.starts[groups[0]] : self.numel + len(groups)]

    def holds(self, names: Sequence[str], tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` (a client's parameters ``names``) are exactly the adopted ones, in place."""
        ptrs = self.ptrs
        return [ptrs.get(n) for n in names] == [t.data_ptr() for t in tensors] and {t.dtype for t in tensors} <= {
            self.flat.dtype
        }


@torch.no_grad()
def adopt_parameters(module: nn.Module, named_groups: Mapping[str, Sequence[str]]) -> Adopted | None:
    """Move the module's grouped parameters into one flat tensor (layout above) and return where they lie.

    The parameters stay the same ``nn.Parameter`` objects with the same values, shapes and strides
    (channels_last included); only their storage moves (``param.data`` becomes a view of the flat tensor).
    Returns None, and changes nothing, when the grouped parameters differ in dtype or device, or are not
    float32 or wider (the packed path accumulates in at least float32; the in-place path must round alike).
    KeyError when the module lacks a grouped parameter.
    """
    named = dict(module.named_parameters())
    order = tuple(g for g in GROUPS if g in named_groups)
    missing = [n for g in order for n in named_groups[g] if n not in named]
    if missing:
        raise KeyError(f"adopt: the module has no parameter(s) {missing[:5]} of the exchange's groups")
    params = [named[n] for g in order for n in named_groups[g]]
    if not params or len({(t.dtype, t.device) for t in params}) != 1:
        return None
    dtype = params[0].dtype
    if not dtype.is_floating_point or torch.promote_types(dtype, torch.float32) != dtype:
        return None
    numel = sum(t.numel() for t in params)
    flat = torch.zeros(numel + len(GROUPS), dtype=dtype, device=params[0].device)
    starts: dict[str, int] = {}
    ptrs: dict[str, int] = {}
    pos = 0
    for g in order:
        starts[g] = pos
        for n in named_groups[g]:
            t = named[n]
            view = flat.as_strided(t.shape, dense_strides(t), pos)
            view.copy_(t.detach())
            t.data = view
            ptrs[n] = view.data_ptr()
            pos += t.numel()
    return Adopted(flat, order, numel, starts, ptrs)
