"""The reference: the last averaged value of each shared group, identical on every rank.

Changes against it are what travels in bf16 (``fedrun.exchange.update``), and it is what the server update
adds the average change to (``fedrun.exchange.server``). It is stored once: one flat tensor per group, laid
out like the group's run in the layout that uses it (element i of the reference belongs to element i of
the run), so that both stages are one operation per bucket; by parameter name it reads as a Mapping of
views of those tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrun.exchange.layout import Signature, accumulation_dtype, signature


@dataclass(frozen=True, eq=False)
class GroupReference:
    """One group's reference: a flat tensor and, per parameter, its view of it (``signature`` order)."""

    flat: Tensor
    signature: Signature
    views: tuple[Tensor, ...]


def _new(sig: Signature, dtype: torch.dtype, device: torch.device) -> GroupReference:
    flat = torch.empty(sum(s.numel() for s, _ in sig), dtype=dtype, device=device)
    views, pos = [], 0
    for shape, stride in sig:
        views.append(flat.as_strided(shape, stride, pos))
        pos += shape.numel()
    return GroupReference(flat, sig, tuple(views))


class Reference(Mapping[str, Tensor]):
    """Per group the reference (``GroupReference``); as a Mapping, parameter name -> its reference value."""

    def __init__(self, named_groups: Mapping[str, Sequence[str]]) -> None:
        self._named = named_groups
        self._where = {n: (g, i) for g, names in named_groups.items() for i, n in enumerate(names)}
        self._groups: dict[str, GroupReference] = {}

    def __getitem__(self, name: str) -> Tensor:
        g, i = self._where[name]
        if g not in self._groups:
            raise KeyError(name)
        return self._groups[g].views[i]

    def __iter__(self) -> Iterator[str]:
        return (n for g in self._groups for n in self._named[g])

    def __len__(self) -> int:
        return sum(len(self._named[g]) for g in self._groups)

    def clear(self) -> None:
        """Forget every group's reference."""
        self._groups.clear()

    def set(self, params: Mapping[str, Tensor]) -> None:
        """Copy the values of every group all of whose parameters ``params`` holds (stored in at least
        float32, laid out like the tensors given); KeyError for a group given only in part."""
        for g, names in self._named.items():
            present = [n for n in names if n in params]
            if not present:
                continue
            if len(present) != len(names):
                missing = [n for n in names if n not in params]
                raise KeyError(f"set_reference: group {g!r} lacks parameter(s) {missing[:5]}")
            tensors = [params[n].detach() for n in names]
            sig, dtype, device = signature(tensors), accumulation_dtype(tensors), tensors[0].device
            old = self._groups.get(g)
            if old is None or old.signature != sig or old.flat.dtype != dtype or old.flat.device != device:
                old = self._groups[g] = _new(sig, dtype, device)
            torch._foreach_copy_(list(old.views), tensors)

    def get(self, group: str, sig: Signature, dtype: torch.dtype, device: torch.device) -> GroupReference | None:
        """The group's reference laid out as ``sig`` in ``dtype`` on ``device`` (re-laid out, by element
        index, if it was stored otherwise), or None when there is none for these shapes."""
        old = self._groups.get(group)
        if old is None or [s for s, _ in old.signature] != [s for s, _ in sig]:
            return None
        if old.signature == sig and old.flat.dtype == dtype and old.flat.device == device:
            return old
        new = self._groups[group] = _new(sig, dtype, device)
        torch._foreach_copy_(list(new.views), list(old.views))
        return new

    def create(self, group: str, sig: Signature, dtype: torch.dtype, device: torch.device) -> GroupReference:
        """A fresh reference for the group, values undefined: the caller writes all of them."""
        new = self._groups[group] = _new(sig, dtype, device)
        return new
