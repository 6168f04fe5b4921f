"""Stage 2 with privacy: each client's change clipped and noised (DP-FedAvg), then, with secure aggregation,
encoded in fixed point and masked, so that the transport sums what no peer can read alone.

Per client k of a group g's contributors C_g (n_g = |C_g|), per element, against the reference ref (the
last shared parameters, identical on every rank):

    u_k = theta_k - ref                                  always changes: clipping values means nothing
    u_k <- u_k * min(1, C / ||u_k||)                     DP: ||.|| over every group k sends this round
    u_k <- u_k + N(0, sigma^2 C^2 / n_g)                 DP: this rank's own noise (``fedrun.privacy.dp``)
    wire += encode(p_k u_k) + mask_k  (mod 2^32)         secure aggregation (``fedrun.privacy.secagg``)

else ``wire = sum_k p_k u_k`` as the plain stage does. After the all-reduce the wire decodes to the average
change and the server update adds it to ref (``fedrun.exchange.server``). With DP p_k = 1/n_g (the config
refuses size weighting), so the noise on the average is N(0, sigma^2 C^2) / n_g: the Gaussian mechanism's.

The weight slots travel unmasked (they are the public plan) in fixed point of 2^30 per unit on an int64
wire: sum_k p_k = 1 is then checked to 1e-5 as on fp32.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrun.exchange.layout import Layout, Part
from fedrun.exchange.reference import GroupReference
from fedrun.exchange.update import Update
from fedrun.exchange.weights import RankShare
from fedrun.methods import RoundPlan
from fedrun.privacy.dp import NoiseSource, clip_factor, noise_std
from fedrun.privacy.fixedpoint import FixedPoint
from fedrun.privacy.secagg import PairKeys

SLOT_SCALE = 2.0**30
"""Fixed-point units per 1 of a weight slot on the int64 wire (K clients round by at most K * 2^-31)."""


@dataclass(frozen=True)
class PrivacySettings:
    clip: float | None
    """DP's C; None = no DP."""
    noise_multiplier: float
    """DP's sigma."""
    value_range: float | None
    """Secure aggregation's fixed-point range; None = no secure aggregation."""


class Privacy:
    """The privacy stage's state over a run: the noise source, the pair keys, which syncs each round had.

    Args:
        settings: what is on.
        keys: this rank's pair secrets (``fedrun.privacy.secagg.exchange_keys``), with secure aggregation.
    """

    def __init__(self, settings: PrivacySettings, keys: PairKeys | None = None) -> None:
        if (settings.value_range is None) != (keys is None):
            raise ValueError("secure aggregation needs both a value range and the pair keys")
        self.settings = settings
        self.keys = keys
        self.fixed = None if settings.value_range is None else FixedPoint(settings.value_range)
        self.noise = NoiseSource()
        self._uses: dict[int, int] = {}
        self.saturated = 0
        """Elements of this rank's clients saturated by the fixed-point range in the last sync."""
        self.clip_factors: dict[int, float] = {}
        """The last sync's min(1, C / ||u_k||) of every hosted contributor."""

    @property
    def secure(self) -> bool:
        return self.fixed is not None

    def kind(self, exchange_dtype: str, refs: Sequence[GroupReference] | None) -> Update:
        """What the layout needs to know before ``prepare``: changes, and the wire's dtype (int64 with
        secure aggregation, else the exchange's)."""
        if refs is None:
            raise RuntimeError(
                "the privacy stage sends changes against the last shared parameters, and there are none "
                "(Exchange.set_reference was not called, or a failed sync dropped them): resume from a checkpoint"
            )
        if self.secure:
            wire: torch.dtype | None = torch.int64
        else:
            wire = torch.bfloat16 if exchange_dtype == "bf16" else None
        return Update(changes=True, wire_dtype=wire)

    @torch.no_grad()
    def prepare(
        self,
        kind: Update,
        plan: RoundPlan,
        share: RankShare,
        layout: Layout,
        sources: Mapping[int, Sequence[Tensor]],
        refs: Sequence[GroupReference],
    ) -> PrivateUpdate:
        """This sync's update: every hosted contributor's clip factor (its change's norm over the groups it
        sends, all buckets), the noise std of every group and the sync's number within its round."""
        use = self._uses.get(plan.round, 0)
        self._uses[plan.round] = use + 1
        everyone = tuple(tuple(plan.contributors(g)) for g in share.groups)
        clip = self.settings.clip
        self.clip_factors = {}
        if clip is not None:
            squares: dict[int, float] = defaultdict(float)
            for bucket in layout.buckets:
                for part in bucket.parts:
                    ref_views = list(refs[part.group].views[part.gfirst : part.gfirst + part.stop - part.first])
                    for k, _ in share.contributors[part.group]:
                        diffs = torch._foreach_sub(list(sources[k][part.first : part.stop]), ref_views)
                        norms = torch.stack(torch._foreach_norm(diffs)).double()
                        squares[k] += float(norms.square().sum())
            self.clip_factors = {k: clip_factor(math.sqrt(v), clip) for k, v in squares.items()}
            stds = tuple(noise_std(self.settings.noise_multiplier, clip, len(c)) for c in everyone)
        else:
            stds = tuple(0.0 for _ in everyone)
        self.saturated = 0
        return PrivateUpdate(True, kind.wire_dtype, self, plan.round, use, dict(self.clip_factors), stds, everyone)


@dataclass(frozen=True)
class PrivateUpdate(Update):
    """One sync's private update (module docstring); made by ``Privacy.prepare``."""

    privacy: Privacy
    round: int
    use: int
    """The sync's number within its round: a mask stream is never used twice."""
    factors: dict[int, float]
    """Hosted contributor -> its clip factor (DP)."""
    stds: tuple[float, ...]
    """Per group: the noise std each contributor adds (DP; 0 without)."""
    everyone: tuple[tuple[int, ...], ...]
    """Per group: all its contributors, on every rank (the mask pairs)."""

    def accumulate(
        self,
        layout: Layout,
        part: Part,
        contributors: Sequence[tuple[int, float]],
        sources: Mapping[int, Sequence[Tensor]],
        ref: Tensor | None,
    ) -> None:
        """The wire of ``part``: sum_k p_k u_k over the hosted ``contributors`` (module docstring), in the
        buffer's dtype then rounded once, or encoded, masked and reduced mod 2^32."""
        if ref is None:
            raise ValueError("the privacy stage needs the reference of the part")
        if not contributors:
            part.wire.zero_()  # the contributors' masks cancel among themselves
            return
        p, gi = self.privacy, part.group
        for j, (k, w) in enumerate(contributors):
            src = sources[k][part.first : part.stop]
            if j == 0:
                seg, views = part.seg, part.views
                if not layout.aliased:
                    torch._foreach_copy_(views, src)
            else:
                seg, views = layout.scratch(part)
                torch._foreach_copy_(views, src)
            seg.sub_(ref)
            if p.settings.clip is not None:
                if self.factors[k] != 1.0:
                    seg.mul_(self.factors[k])
                p.noise.add_(seg, self.stds[gi])
            if p.fixed is not None:
                assert p.keys is not None
                code, saturated = p.fixed.encode(seg, w)
                p.saturated += saturated
                code.add_(p.keys.mask(k, self.everyone[gi], self.round, self.use, part.lo, part.hi).to(code.device))
                if j == 0:
                    part.wire.copy_(code)
                else:
                    part.wire.add_(code)
            elif j == 0:
                if w != 1:
                    seg.mul_(w)
            else:
                torch._foreach_add_(list(part.views), list(views), alpha=w)
        if p.fixed is not None:
            FixedPoint.reduce_(part.wire)
        elif part.wire is not part.seg:
            part.wire.copy_(part.seg)

    def decode(self, part: Part) -> None:
        """After the all-reduce: the part's average change from the wire into the buffer."""
        fixed = self.privacy.fixed
        if fixed is None:
            super().decode(part)
        else:
            part.seg.copy_(fixed.decode(part.wire))

    def encode_slots(self, slots: Sequence[float]) -> Tensor:
        if self.privacy.fixed is None:
            return super().encode_slots(slots)
        return torch.tensor([round(s * SLOT_SCALE) for s in slots], dtype=torch.int64)

    def decode_slots(self, wire_slots: Tensor) -> list[float]:
        if self.privacy.fixed is None:
            return super().decode_slots(wire_slots)
        return [v / SLOT_SCALE for v in wire_slots.tolist()]
