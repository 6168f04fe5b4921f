"""Stage 4, the server update: each shared group's new value from the average update, into every client.

There is no server process: every rank runs this step on the identical all-reduced average, so every rank
ends with the identical new value, bit for bit. Today's rule is plain FedAvg:

    values sent:   theta_new = sum_k p_k,g theta_k                     (= the average)
    changes sent:  theta_new = ref + sum_k p_k,g (theta_k - ref)       (ref <- theta_new)

A server optimiser (FedAvgM, FedAdam) plugs in here as another class with ``step``: it would move ref
along the pseudo-gradient ref - average, its state laid out like the reference (``fedrun.exchange.reference``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedrun.exchange.layout import Part


class FedAvg:
    """Plain FedAvg: the new value is the average (values sent) or ref + average change (changes sent)."""

    def step(self, average: Tensor, ref: Tensor | None, changes: bool) -> Tensor:
        """The new value of a part, in place: with ``changes`` ``ref += average`` and ``ref`` is returned;
        else ``average`` is, and ``ref`` (when given) becomes a copy of it, the next sync's reference."""
        if changes:
            if ref is None:
                raise ValueError("FedAvg.step: changes were sent but there is no reference to add them to")
            return ref.add_(average)
        if ref is not None:
            ref.copy_(average)
        return average


def write_back(
    part: Part, new: Tensor, new_views: Sequence[Tensor], clients: Sequence[Sequence[Tensor]], aliased: bool
) -> None:
    """Write a part's new value (``new``, and per parameter ``new_views``) into every hosted client's
    parameters (layout order). Aliased: the only client is the buffer, so one copy, unless already there."""
    if aliased:
        if new is not part.seg:
            part.seg.copy_(new)
        return
    for params in clients:
        torch._foreach_copy_(params[part.first : part.stop], new_views)
