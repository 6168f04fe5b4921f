"""Stage 4, the server update: each shared group's new value from the average update, into every client.

There is no server process: every rank runs this step on the identical all-reduced average, so every rank
ends with the identical new value, bit for bit. Plain FedAvg (``FedAvg``, the default):

    values sent:   theta_new = sum_k p_k,g theta_k                     (= the average)
    changes sent:  theta_new = ref + sum_k p_k,g (theta_k - ref)       (ref <- theta_new)

A server optimiser (``ServerOptimizer``, Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 1)
instead treats the pseudo-gradient

    Delta = ref - average        (ref: the last shared parameters, every client's start of the round)

as a gradient of the shared parameters and steps ref along it with its own rule and state, then sends the new
ref to every client. Its state (momentum, moments) is laid out like the reference, one flat tensor per group
and slot (``fedrun.exchange.reference``), so that a step is a few operations per part of a bucket; every rule
is elementwise, hence the same whatever the bucketing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedrun.config import SERVER_OPTIMIZERS
from fedrun.exchange.layout import Part, Signature
from fedrun.exchange.reference import GroupReference, Reference


class FedAvg:
    """Plain FedAvg: the new value is the average (values sent) or ref + average change (changes sent)."""

    name = "fedavg"

    def begin(self, groups: Sequence[str], sigs: Sequence[Signature], dtype: torch.dtype, device: torch.device) -> None:
        """Nothing to prepare: FedAvg keeps no state."""

    def step(self, average: Tensor, ref: Tensor | None, changes: bool, part: Part | None = None) -> Tensor:
        """The new value of a part, in place: with ``changes`` ``ref += average`` and ``ref`` is returned;
        else ``average`` is, and ``ref`` (when given) becomes a copy of it, the next sync's reference."""
        if changes:
            if ref is None:
                raise ValueError("FedAvg.step: changes were sent but there is no reference to add them to")
            return ref.add_(average)
        if ref is not None:
            ref.copy_(average)
        return average


class ServerOptimizer(FedAvg):
    """A server optimiser on the pseudo-gradient of each shared group; subclasses give ``slots`` and ``rule``.

    ``begin`` is called once per sync (the rounds each group has stepped, for bias corrections, advance by
    one), then ``step`` for every part of every bucket. ``state_dict`` holds everything by parameter name.
    """

    slots: tuple[str, ...] = ()

    def __init__(self, named_groups: Mapping[str, Sequence[str]], lr: float) -> None:
        self.lr = float(lr)
        self.state = {s: Reference(named_groups) for s in self.slots}
        """Slot -> its values per group, laid out like the reference (zeros before a group's first step)."""
        self.steps: dict[str, int] = {}
        """Group -> the server steps it has taken."""
        self._now: list[tuple[int, dict[str, GroupReference]]] = []  # per layout group: (t, slot -> state)
        self._sq = torch.zeros((), dtype=torch.float64)

    def begin(self, groups: Sequence[str], sigs: Sequence[Signature], dtype: torch.dtype, device: torch.device) -> None:
        self._now = []
        self._sq = torch.zeros((), dtype=torch.float64, device=device)
        for g, sig in zip(groups, sigs, strict=True):
            self.steps[g] = self.steps.get(g, 0) + 1
            now = {}
            for s in self.slots:
                st = self.state[s].get(g, sig, dtype, device)
                if st is None:
                    st = self.state[s].create(g, sig, dtype, device)
                    st.flat.zero_()
                now[s] = st
            self._now.append((self.steps[g], now))

    def step(self, average: Tensor, ref: Tensor | None, changes: bool, part: Part | None = None) -> Tensor:
        """ref <- ref moved by ``rule`` along Delta = ref - average (values) or -average (changes); the
        average's buffer holds Delta afterwards. Returns ``ref``."""
        if ref is None or part is None:
            raise ValueError(f"{self.name}: a server optimiser needs the reference and the part of every step")
        delta = average.neg_() if changes else average.sub_(ref).neg_()  # ref - average, exact either way
        self._sq += torch.linalg.vector_norm(delta).double() ** 2  # before the rule, which may reuse delta
        t, now = self._now[part.group]
        n = delta.numel()
        self.rule(ref, delta, {s: st.flat[part.glo : part.glo + n] for s, st in now.items()}, t)
        return ref

    def rule(self, x: Tensor, delta: Tensor, state: dict[str, Tensor], t: int) -> None:
        """One step of parameters ``x`` along the pseudo-gradient ``delta`` (may be overwritten), in place;
        ``state``: slot -> its values for these elements; ``t``: the step, from 1."""
        raise NotImplementedError

    def pseudo_grad_norm(self) -> float:
        """||Delta|| over every shared group of the last sync (one host sync)."""
        return math.sqrt(float(self._sq))

    def state_dict(self) -> dict:
        """The state by parameter name (on the CPU) and the steps per group: tensors and plain values only."""
        return {
            "optimizer": self.name,
            "steps": dict(self.steps),
            "state": {s: {n: t.detach().cpu().clone() for n, t in ref.items()} for s, ref in self.state.items()},
        }

    def load_state_dict(self, sd: Mapping) -> None:
        """Replace the state by ``sd`` (``state_dict``'s; its tensors may lie on any device)."""
        if sd["optimizer"] != self.name:
            raise ValueError(f"server state of {sd['optimizer']!r}, this run's server optimiser is {self.name!r}")
        for s, ref in self.state.items():
            ref.clear()
            ref.set(sd["state"][s])
        self.steps = {str(g): int(t) for g, t in sd["steps"].items()}


class SGDMomentum(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019) and, with ``nesterov``, DiLoCo's outer step (Douillard et al. 2023, with
    lr 0.7 and momentum 0.9): torch.optim.SGD's rule (dampening 0, no weight decay) on Delta,

        b <- mu b + Delta;   x <- x - lr b               (nesterov: x <- x - lr (Delta + mu b))

    The buffer starts at zero, so the first step's b is Delta, as torch.optim's clone of the first gradient.
    """

    slots = ("momentum",)

    def __init__(self, named_groups: Mapping[str, Sequence[str]], lr: float, momentum: float, nesterov: bool):
        super().__init__(named_groups, lr)
        self.momentum, self.nesterov = float(momentum), nesterov
        self.name = "nesterov" if nesterov else "fedavgm"

    def rule(self, x: Tensor, delta: Tensor, state: dict[str, Tensor], t: int) -> None:
        buf = state["momentum"]
        buf.mul_(self.momentum).add_(delta)
        if self.nesterov:
            x.add_(delta.add_(buf, alpha=self.momentum), alpha=-self.lr)
        else:
            x.add_(buf, alpha=-self.lr)


class FedAdam(ServerOptimizer):
    """FedAdam: torch.optim.Adam's rule on Delta with eps = ``eps`` (Reddi et al.'s tau),

        m <- b1 m + (1 - b1) Delta;   v <- b2 v + (1 - b2) Delta^2
        x <- x - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    Unlike Reddi et al.'s Algorithm 2 the moments are bias-corrected (as Adam and Flower's FedAdam do), so
    the state starts at zero and the first step is about lr in every coordinate.
    """

    slots = ("exp_avg", "exp_avg_sq")
    name = "fedadam"

    def __init__(self, named_groups: Mapping[str, Sequence[str]], lr: float, betas: Sequence[float], eps: float):
        super().__init__(named_groups, lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)

    def second_moment(self, v: Tensor, delta: Tensor) -> None:
        """Adam: v <- b2 v + (1 - b2) Delta^2."""
        v.mul_(self.beta2).addcmul_(delta, delta, value=1 - self.beta2)

    def rule(self, x: Tensor, delta: Tensor, state: dict[str, Tensor], t: int) -> None:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(delta, 1 - self.beta1)  # the operations of torch.optim.Adam, in its order
        self.second_moment(v, delta)
        step_size = self.lr / (1 - self.beta1**t)
        denom = (v.sqrt() / (1 - self.beta2**t) ** 0.5).add_(self.eps)
        x.addcdiv_(m, denom, value=-step_size)


class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021, after Zaheer et al. 2018): FedAdam with Yogi's additive second moment,

        v <- v - (1 - b2) Delta^2 sign(v - Delta^2)

    which grows v like Adam's but shrinks it by at most (1 - b2) Delta^2 per step. Same bias corrections as
    ``FedAdam``; from v = 0 its first step equals FedAdam's."""

    name = "fedyogi"

    def second_moment(self, v: Tensor, delta: Tensor) -> None:
        sq = delta * delta
        v.addcmul_(torch.sign(v - sq), sq, value=-(1 - self.beta2))


def make_server(
    name: str,
    named_groups: Mapping[str, Sequence[str]],
    lr: float = 1.0,
    momentum: float = 0.9,
    betas: Sequence[float] = (0.9, 0.99),
    eps: float = 1e-3,
) -> FedAvg:
    """The server update called ``name`` (``fedrun.config.SERVER_OPTIMIZERS``) over ``named_groups``."""
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimiser {name!r}; allowed: {', '.join(SERVER_OPTIMIZERS)}")
    if name == "fedavg":
        return FedAvg()
    if name in ("fedavgm", "nesterov"):
        return SGDMomentum(named_groups, lr, momentum, nesterov=name == "nesterov")
    if name in ("fedadam", "fedyogi"):
        return (FedAdam if name == "fedadam" else FedYogi)(named_groups, lr, betas, eps)
    raise AssertionError(f"server optimiser {name!r} is allowed but not built here")


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
