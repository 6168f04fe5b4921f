"""Stage 2, each client's update: what a contributor puts on the wire, already weighted by its p_k,g.

    values:   u_k = theta_k          (fp32 exchange; and bf16/int8 exchange while there is no reference)
    changes:  u_k = theta_k - ref    (bf16/int8 exchange once every shared group has a reference)

``Update.accumulate`` writes sum_{k hosted} p_k,g u_k into a part of the layout's buffer, in the buffer's
dtype, and rounds it once into the wire: summed over the ranks that is the average update
sum_{k in C_g} p_k,g u_k.

Why changes in bf16: bf16 keeps 8 significant bits, so sending the weights themselves would perturb every
shared parameter by up to 2^-8 of its magnitude each round (half a unit in the last place). The change
theta_k - ref is made in the buffer's dtype (at least fp32) first, so small changes survive the cast, and
the error becomes at most 2^-8 of what a client's training changed in one round. E.g. ref = 10 and
theta = 10 + 2^-10: the value rounds to 10 in bf16 (spacing 2^-4 there), the change 2^-10 is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrun.exchange.layout import Layout, Part


@dataclass(frozen=True)
class Update:
    """What a client sends, weighted: its values, or its change against the reference, and in which dtype.
    A new kind of update (quantised with error feedback, masked) is a new instance or subclass."""

    changes: bool
    """u_k = theta_k - ref (else theta_k)."""
    wire_dtype: torch.dtype | None
    """dtype on the wire; None = the buffer's (at least fp32)."""

    def accumulate(
        self,
        layout: Layout,
        part: Part,
        contributors: Sequence[tuple[int, float]],
        sources: Mapping[int, Sequence[Tensor]],
        ref: Tensor | None,
    ) -> None:
        """part.seg = sum_k p_k u_k over ``contributors`` (client, p_k), theta_k = the part's parameters of
        ``sources[k]`` (layout order), ``ref`` the part's reference (with ``changes``); then part.wire =
        part.seg rounded once to the wire's dtype. No contributor: the wire gets zeros.

        Rounding, identical on every path and for every bucketing: the first contributor's update is made
        in the buffer (copy, subtract, scale: each exact per element), later ones parameter by parameter
        (one add with alpha each). An aliased layout's client *is* the buffer, so its copy is skipped.
        """
        if self.changes and ref is None:
            raise ValueError("changes need the reference of the part")
        if not contributors:
            part.wire.zero_()
            return
        ref = ref if self.changes else None
        seg, views = part.seg, part.views
        for j, (k, p) in enumerate(contributors):
            src = sources[k][part.first : part.stop]
            if j == 0:
                if not layout.aliased:
                    torch._foreach_copy_(views, src)
                if ref is not None:
                    seg.sub_(ref)
                if p != 1:  # x * 1 is x, bit for bit
                    seg.mul_(p)
            elif ref is None and src[0].device == seg.device:
                torch._foreach_add_(views, src, alpha=p)
            else:  # (theta_k - ref) first, in the buffer's dtype: small changes survive the cast; a client
                # waiting on another device (host memory, fedrun.residency) is copied over first (exact)
                scratch, scratch_views = layout.scratch(part)
                torch._foreach_copy_(scratch_views, src)
                if ref is not None:
                    scratch.sub_(ref)
                torch._foreach_add_(views, scratch_views, alpha=p)
        if part.wire is not seg:
            part.wire.copy_(seg)  # one rounding, even on one rank (same-dtype ops before: mixed ones are slow)

    def decode(self, part: Part) -> None:
        """After the all-reduce: the part's average update from the wire into the buffer (exact)."""
        if part.wire is not part.seg:
            part.seg.copy_(part.wire)

    def encode_slots(self, slots: Sequence[float]) -> Tensor:
        """This rank's weight slots as the wire carries them (float64, cast by the copy into the wire)."""
        return torch.tensor(list(slots), dtype=torch.float64)

    def decode_slots(self, wire_slots: Tensor) -> list[float]:
        """The summed weight slots, read back from the wire."""
        return wire_slots.tolist()


class QuantisedChanges(Update):
    """int8 changes: the buffer gets sum_k p_k (theta_k - ref) in its dtype (``accumulate``) and the int8
    sync (``fedrun.exchange.int8``) quantises that; no wire twin (``wire_dtype`` None)."""


VALUES = Update(changes=False, wire_dtype=None)
BF16_CHANGES = Update(changes=True, wire_dtype=torch.bfloat16)
INT8_CHANGES = QuantisedChanges(changes=True, wire_dtype=None)
CHANGE_DTYPES = ("bf16", "int8")
"""The exchange dtypes that send changes against a reference (once there is one)."""


def choose_update(exchange_dtype: str, has_reference: bool) -> Update:
    """bf16 and int8 exchange send changes once every shared group has a reference; everything else values,
    in the buffer's dtype (so a first sync without a reference is exact)."""
    if not has_reference or exchange_dtype not in CHANGE_DTYPES:
        return VALUES
    return INT8_CHANGES if exchange_dtype == "int8" else BF16_CHANGES


def slot_tolerance(wire_dtype: torch.dtype) -> float:
    """How far from 1 the summed weight slots may be on this wire (bf16 keeps 8 significant bits)."""
    return 1e-2 if wire_dtype == torch.bfloat16 else 1e-5
