"""DP-FedAvg's two operations on a client's update (McMahan et al. 2018, "Learning differentially private
recurrent language models", Algorithm 1), with the noise of central DP added in a distributed way.

    clip:   u_k <- u_k * min(1, C / ||u_k||_2)        (||.|| over every shared group the client sends)
    noise:  u_k <- u_k + z_k,  z_k ~ N(0, sigma^2 C^2 / n) per element, n = the clients of the sum

The n noises are independent, so their sum is N(0, sigma^2 C^2): the noise the Gaussian mechanism puts on
the sum of the clipped updates, without a trusted server that adds it. Each rank draws from its own
generator, seeded from ``os.urandom`` (never from the run seed, which every rank knows): no other rank can
derive it. torch's generators are not cryptographic; what no peer can derive is their 64-bit secret seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor


def l2_norm(tensors: Sequence[Tensor]) -> float:
    """sqrt(sum of squares) of all elements of ``tensors``, accumulated in float64 (0 for none)."""
    if not tensors:
        return 0.0
    squares = torch.stack([t.detach().double().square().sum() for t in tensors])
    return float(squares.sum().sqrt())


def clip_factor(norm: float, clip: float) -> float:
    """min(1, C / norm): the factor that brings an update of L2 norm ``norm`` to at most C (1 for norm 0)."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update of norm {norm}")
    return 1.0 if norm <= clip else clip / norm


@torch.no_grad()
def clip_(tensors: Sequence[Tensor], clip: float) -> float:
    """Scale ``tensors`` in place so that their joint L2 norm is at most ``clip``; returns the factor."""
    factor = clip_factor(l2_norm(tensors), clip)
    if factor != 1.0:
        torch._foreach_mul_(list(tensors), factor)
    return factor


def noise_std(noise_multiplier: float, clip: float, n: int) -> float:
    """sigma C / sqrt(n): the standard deviation one of ``n`` clients adds, so that the sum has sigma C."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return noise_multiplier * clip / math.sqrt(n)


class NoiseSource:
    """This rank's Gaussian noise: one generator per device, seeded from ``os.urandom`` when first used.

    Never checkpointed and never derived from the config: a resumed run draws new noise (a DP run does not
    replay bit for bit, by design; everything else about it does)."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            g.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return g

    @torch.no_grad()
    def add_(self, t: Tensor, std: float) -> Tensor:
        """t += N(0, std^2) per element, in place (drawn in t's dtype, at least float32); returns ``t``."""
        if std == 0:
            return t
        dtype = torch.promote_types(t.dtype, torch.float32)
        z = torch.randn(t.shape, dtype=dtype, device=t.device, generator=self.generator(t.device))
        return t.add_(z, alpha=std)
