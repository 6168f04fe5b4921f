"""int8 block quantisation, its error feedback and its wire geometry, as pure maths (no collectives).

A flat float32 tensor is cut into blocks of ``BLOCK`` = 256 values; each block travels as 256 int8 codes and
one float32 scale (its absmax / 127):

    s_b = max_i |x_i| / 127,    q_i = round(x_i / s_b) in [-127, 127],    x_i ~ q_i s_b

so every value is off by at most half a quantum, |x_i - q_i s_b| <= s_b / 2 (plus float32 rounding of the
division and the product: a relative 2^-16 of s_b at most), and a block of zeros has s_b = 0 and q = 0.
That is 260 bytes per 256 values, 25.4 % of float32.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD): the part a sender's quantisation lost,
e = y - deq(Q(y)) with y = u + e_previous, is added to its next update, so over T rounds

    sum_t deq(Q(y_t)) = sum_t u_t + e_0 - e_T,      |e_T| <= s_T / 2 per element:

what was sent tracks what should have been sent within half a quantum, however many rounds. ``Residual``
is that state.

The sync of ``fedrun.exchange.int8`` cuts the blocks into one shard per rank (``Geometry``); ``reduce_reference``
is what it computes, written out in one process, for the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 256
"""Values per block (one scale each)."""
QMAX = 127
"""Largest code: symmetric, so -x quantises to -q (-128 is never used)."""


def quantise(x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes int8 [n], scales float32 [n / BLOCK]) of a flat float32 ``x`` whose length is a multiple of
    BLOCK. Round half to even (``torch.round``); a block of zeros gets scale 0 and codes 0."""
    if x.dim() != 1 or x.numel() % BLOCK or x.dtype != torch.float32:
        raise ValueError(
            f"quantise needs a flat float32 tensor of a multiple of {BLOCK} values, got {x.shape} {x.dtype}"
        )
    blocks = x.view(-1, BLOCK)
    scale = blocks.abs().amax(dim=1).div_(QMAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # 0 / 1 = 0: a zero block stays 0
    q = torch.div(blocks, safe[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q.view(-1), scale


def dequantise(q: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """q_i s_b in float32, flat (into ``out`` when given): the value a receiver reads."""
    blocks = q.view(-1, BLOCK)
    if out is None:
        out = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
    res = out.view(-1, BLOCK)
    res.copy_(blocks)  # int8 -> float32, exact
    return res.mul_(scale[:, None]).view(-1)


class Residual:
    """One sender's error feedback: what its quantisation lost so far, added to what it sends next."""

    def __init__(self, numel: int, device: torch.device | str = "cpu") -> None:
        self.error = torch.zeros(numel, dtype=torch.float32, device=device)

    def compress(self, update: Tensor) -> tuple[Tensor, Tensor]:
        """Quantise ``update + error`` (a multiple of BLOCK values) and keep what was lost as the new error."""
        y = update + self.error
        q, s = quantise(y)
        torch.sub(y, dequantise(q, s), out=self.error)
        return q, s


@dataclass(frozen=True)
class Geometry:
    """How ``numel`` values and ``slots`` weight slots travel over ``world`` ranks.

    The values are padded with zeros to ``world * blocks`` blocks; rank j owns the blocks [j * blocks,
    (j + 1) * blocks). One chunk (what a rank sends to one owner in the all-to-all, and what an owner sends
    to every rank in the all-gather) is, in bytes,

        [ slots float32 (4 * slots) | scales float32 (4 * blocks) | codes int8 (BLOCK * blocks) ]

    so both collectives carry ``world`` chunks per rank: ``wire_bytes``."""

    numel: int
    slots: int
    world: int

    @property
    def blocks(self) -> int:
        """Blocks per shard (per rank)."""
        return max(1, math.ceil(math.ceil(self.numel / BLOCK) / self.world))

    @property
    def padded(self) -> int:
        """Values after padding: ``world`` shards of ``blocks`` blocks."""
        return self.world * self.blocks * BLOCK

    @property
    def shard(self) -> int:
        """Values per shard."""
        return self.blocks * BLOCK

    @property
    def chunk_bytes(self) -> int:
        return 4 * self.slots + 4 * self.blocks + BLOCK * self.blocks

    @property
    def wire_bytes(self) -> int:
        """Bytes one rank hands to the all-to-all, equal to what it receives from the all-gather: like an
        all-reduce's buffer, a rank's wire moves about 2 (world - 1) / world times it."""
        return self.world * self.chunk_bytes


def wire_bytes(numel: int, slots: int, world: int) -> int:
    """``Geometry(numel, slots, world).wire_bytes``: the int8 sync's bytes per rank and round (0 values: 0)."""
    return Geometry(numel, slots, world).wire_bytes if numel else 0


def pad(x: Tensor, geometry: Geometry) -> Tensor:
    """``x`` (``geometry.numel`` values) followed by zeros up to ``geometry.padded``, float32."""
    out = torch.zeros(geometry.padded, dtype=torch.float32, device=x.device)
    out[: x.numel()].copy_(x)
    return out


def reduce_shard(codes: Sequence[Tensor], scales: Sequence[Tensor]) -> Tensor:
    """An owner's fp32 sum of the dequantised shards it received, in rank order (rank 0 first)."""
    acc = dequantise(codes[0], scales[0]).clone()
    for q, s in zip(codes[1:], scales[1:], strict=True):
        acc.add_(dequantise(q, s))
    return acc


def reduce_reference(
    updates: Sequence[Tensor], senders: Sequence[Residual], owners: Sequence[Residual], geometry: Geometry
) -> Tensor:
    """What the int8 sync of ``fedrun.exchange.int8`` computes, in one process: every rank r quantises its
    update (with error feedback ``senders[r]``), every owner j sums shard j of all ranks in fp32, adds its
    own residual ``owners[j]`` and re-quantises; the result, dequantised, is ``geometry.numel`` values."""
    sent = [senders[r].compress(pad(u, geometry)) for r, u in enumerate(updates)]
    n, parts = geometry.shard, []
    for j, owner in enumerate(owners):
        lo = j * n
        shard = reduce_shard([q[lo : lo + n] for q, _ in sent], [s[lo // BLOCK : (lo + n) // BLOCK] for _, s in sent])
        parts.append(dequantise(*owner.compress(shard)))
    return torch.cat(parts)[: geometry.numel]
