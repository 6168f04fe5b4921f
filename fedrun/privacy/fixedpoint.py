"""Fixed point in the ring Z_(2^32), so that pairwise masks cancel exactly in a sum (Bonawitz et al. 2017).

A real x with |x| <= range is the integer q = round(x * 2^30 / range), one quantum being range * 2^-30.
Each client encodes its weighted update p_k x_k (|p_k x_k| <= p_k range, saturated there), adds its mask
and reduces mod 2^32; the ranks' values (each < 2^32) are summed in int64, so even 2^31 ranks cannot
overflow. Since sum_k p_k = 1, the true sum lies in [-2^30, 2^30] quanta plus half a quantum of rounding
per client, inside the signed range [-2^31, 2^31): reduced mod 2^32 and read as a signed 32-bit integer it
is the exact integer sum of the clients' encodings, masks or not. E.g. range 1: x = 0.25 -> 2^28.
"""

from __future__ import annotations

import torch
from torch import Tensor

RING_BITS = 32
MODULUS = 2**RING_BITS
RING_MASK = MODULUS - 1
"""x & RING_MASK is x mod 2^32 for every int64 x (two's complement), negatives included."""
FRACTION_BITS = 30
"""Quanta per ``range``: 2^30, leaving a factor 2 of headroom below 2^31 for the clients' roundings."""
NOISE_SIGMAS = 8.0
"""With DP the range covers the clip plus this many standard deviations of the noise (P < 1e-15 per value
of exceeding it; a value beyond is saturated and counted)."""


def range_from_clip(clip: float, noise_multiplier: float) -> float:
    """The range of a DP client's value: the clip C plus NOISE_SIGMAS times the largest noise std (sigma C,
    that of a single client) — every element of a clipped update is at most C."""
    return clip * (1.0 + NOISE_SIGMAS * noise_multiplier)


class FixedPoint:
    """Encoding of reals in [-range, range] into Z_(2^32), in quanta of ``range * 2^-30``."""

    def __init__(self, value_range: float) -> None:
        if not value_range > 0:
            raise ValueError(f"the fixed-point range must be > 0, got {value_range}")
        self.range = float(value_range)
        self.scale = 2.0**FRACTION_BITS / self.range
        self.quantum = self.range / 2.0**FRACTION_BITS

    @torch.no_grad()
    def encode(self, x: Tensor, weight: float = 1.0) -> tuple[Tensor, int]:
        """round(weight * clamp(x, -range, range) / quantum) as int64 (not yet reduced), and how many
        elements were saturated (|x| > range). ``weight`` is the client's p_k: the sum of the weights is 1."""
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        xd = x.detach().double()
        saturated = int((xd.abs() > self.range).sum())
        return xd.clamp_(-self.range, self.range).mul_(weight * self.scale).round_().to(torch.int64), saturated

    @staticmethod
    def reduce_(q: Tensor) -> Tensor:
        """q mod 2^32, in place (int64)."""
        return q.bitwise_and_(RING_MASK)

    @torch.no_grad()
    def decode(self, q: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """A sum of encodings (int64, any multiple of 2^32 away) as reals: reduced mod 2^32, read as a signed
        32-bit integer, times the quantum."""
        signed = (q & RING_MASK) ^ 2**31  # [0, 2^32) -> shifted so that subtracting 2^31 gives the signed value
        return (signed - 2**31).double().mul_(self.quantum).to(dtype)
