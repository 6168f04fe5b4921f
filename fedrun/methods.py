"""The four FedDiffuse training methods as data: who contributes which parameter group in round r.

A method is a frozen ``Method``: its name, its plan function ``(round, num_clients, seed) -> RoundPlan``,
whether it leaves one model per client, the groups it ever shares and what a client trains. This module is
the one owner of what a method means: config validates against ``METHOD_NAMES``, training, sampling and
evaluation ask the ``Method``. Nothing here trains, averages or communicates. The averager reads a plan
to know what to all-reduce and who receives it, the trainer reads
it to know what to train, and ``comm`` reads it to count what the paper's star topology would send.

Rounds are numbered from 1, as in the paper. USplit's roles are drawn from
``np.random.default_rng([seed, round])``, so every rank derives the same plan from the same (seed, round)
without any communication. Client sampling (``federation.sample_clients``) is part of the plan too: the
clients of a round come from ``sampled_clients(seed, round, K, count)`` (its own stream of the same seeds),
the method plans among them, and the others contribute nothing that round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from unet import GROUPS  # the UNet's parameter groups, in model order (docs/feddiffuse.md, section 1)

USPLIT_TRAIN = ("all", "assigned")

SAMPLING_STREAM = 0x53414D50
"""Third seed word of the sampling draw: keeps it apart from USplit's roles, drawn from (seed, round) alone."""


def sampled_clients(seed: int, round: int, num_clients: int, count: int) -> tuple[int, ...]:
    """The clients that take part in ``round``, ascending: ``count`` of the ``num_clients`` drawn uniformly
    without replacement from ``default_rng([seed, round, SAMPLING_STREAM])``; every client when ``count`` is 0
    or ``num_clients``. A pure function: every rank, and a resumed run, draws the same. Each client takes part
    with probability q = count / num_clients in a round, independently of the other rounds."""
    if not 0 <= count <= num_clients:
        raise ValueError(f"count={count} must be from 0 (all) to num_clients={num_clients}")
    if count in (0, num_clients):
        return tuple(range(num_clients))
    rng = np.random.default_rng([seed, round, SAMPLING_STREAM])
    return tuple(sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False)))


@dataclass(frozen=True)
class RoundPlan:
    """What happens at the averaging step of one round."""

    round: int
    """Round index, from 1."""
    assignments: tuple[frozenset[str], ...]
    """For each client k (index into the tuple), the groups it uploads/contributes to the average."""
    broadcast_all: bool
    """True: every client receives the whole averaged model (FULL, USplit). False: clients receive only
    the averaged groups and keep the rest local (ULatDec, UDec)."""
    method: str = ""
    """Name of the method that made the plan (informational: what a plan means is the Method's)."""
    sampled: tuple[int, ...] | None = None
    """The clients drawn to take part (ascending), None = every client; the others contribute nothing."""

    def __post_init__(self) -> None:
        if self.round < 1:
            raise ValueError(f"round={self.round} must be >= 1 (rounds are numbered from 1)")
        if not self.assignments:
            raise ValueError("a round plan needs at least one client")
        for k, groups in enumerate(self.assignments):
            unknown = set(groups) - set(GROUPS)
            if unknown:
                allowed = ", ".join(GROUPS)
                raise ValueError(f"client {k}: unknown group(s) {sorted(unknown)}; allowed: {allowed}")
        if self.sampled is not None:
            s = self.sampled
            if not s or list(s) != sorted(set(s)) or not 0 <= s[0] <= s[-1] < self.num_clients:
                raise ValueError(f"sampled={s}: distinct clients 0..{self.num_clients - 1}, ascending")
            idle = [k for k, groups in enumerate(self.assignments) if groups and k not in s]
            if idle:
                raise ValueError(f"client(s) {idle} contribute but were not sampled")

    @property
    def participants(self) -> tuple[int, ...]:
        """The clients that train and may contribute this round: the sampled ones, or all."""
        return tuple(range(self.num_clients)) if self.sampled is None else self.sampled

    @property
    def num_clients(self) -> int:
        return len(self.assignments)

    def contributors(self, group: str) -> list[int]:
        """Clients whose ``group`` enters this round's average, in client order."""
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; allowed: {', '.join(GROUPS)}")
        return [k for k, groups in enumerate(self.assignments) if group in groups]

    def shared_groups(self) -> tuple[str, ...]:
        """Groups averaged this round (at least one contributor), in GROUPS order."""
        return tuple(g for g in GROUPS if any(g in groups for groups in self.assignments))

    def local_groups(self) -> tuple[str, ...]:
        """Groups nobody contributes this round: they stay as each client trained them."""
        shared = self.shared_groups()
        return tuple(g for g in GROUPS if g not in shared)


PlanFn = Callable[[int, int, int], RoundPlan]
"""A method: ``(round, num_clients, seed) -> RoundPlan``."""


def _everyone(groups: tuple[str, ...], method: str, broadcast_all: bool) -> PlanFn:
    """A method in which every client contributes the same groups every round."""

    def plan(round: int, num_clients: int, seed: int) -> RoundPlan:
        return RoundPlan(round, (frozenset(groups),) * num_clients, broadcast_all, method)

    plan.__doc__ = f"{method}: every client contributes {', '.join(groups)} every round."
    return plan


def plan_usplit(round: int, num_clients: int, seed: int) -> RoundPlan:
    """USplit: shuffle the clients, pair consecutive ones; in a pair one contributes the encoder, the other
    the decoder, and the bottleneck goes to one of the two at random. With odd K the last client gets the
    bottleneck plus, at random, the encoder or the decoder; K = 1 does everything. Drawn anew every round
    from ``default_rng([seed, round])``, hence identical on every rank."""
    rng = np.random.default_rng([seed, round])
    order = [int(k) for k in rng.permutation(num_clients)]
    roles: list[set[str]] = [set() for _ in range(num_clients)]
    if num_clients == 1:
        roles[0] = set(GROUPS)
    for i in range(0, num_clients - 1, 2):
        enc, dec = order[i], order[i + 1]
        roles[enc].add("encoder")
        roles[dec].add("decoder")
        roles[(enc, dec)[int(rng.integers(2))]].add("bottleneck")
    if num_clients % 2 == 1 and num_clients > 1:
        last = order[-1]
        roles[last] |= {"bottleneck", ("encoder", "decoder")[int(rng.integers(2))]}
    return RoundPlan(round, tuple(frozenset(r) for r in roles), True, "usplit")


@dataclass(frozen=True)
class Method:
    """One FedDiffuse method: everything the rest of fedrun needs to know about it."""

    name: str
    plan_fn: PlanFn = field(repr=False)
    """``(round, num_clients, seed) -> RoundPlan``."""
    personalised: bool
    """True: some groups are never shared (the encoder), so every client ends with its own model (UDec,
    ULatDec); False: every client ends with the one global model (FULL, USplit)."""
    ever_shared: tuple[str, ...]
    """Every group some round of this method exchanges, in GROUPS order (signature-checked at start)."""
    split_roles: bool = False
    """True: clients contribute different groups in one round (USplit), so ``usplit_train='assigned'``
    restricts what each trains."""

    def plan(self, round: int, num_clients: int, seed: int, sample_clients: int = 0) -> RoundPlan:
        """The plan of ``round`` (from 1) for ``num_clients`` clients, of whom ``sample_clients`` take part
        (0 = all: the method's plan as it always was). With a sample, the method plans among the sampled
        clients (USplit draws its roles among them) and the others contribute nothing."""
        if num_clients < 1:
            raise ValueError(f"num_clients={num_clients} must be >= 1")
        chosen = sampled_clients(seed, round, num_clients, sample_clients)
        if len(chosen) == num_clients:
            return self.plan_fn(round, num_clients, seed)
        sub = self.plan_fn(round, len(chosen), seed)
        roles = [frozenset[str]()] * num_clients
        for i, k in enumerate(chosen):
            roles[k] = sub.assignments[i]
        return RoundPlan(round, tuple(roles), sub.broadcast_all, sub.method, sampled=chosen)

    def trainable(self, plan: RoundPlan, client: int, usplit_train: str) -> tuple[str, ...]:
        """Groups ``client`` trains in this round, in GROUPS order.

        ``usplit_train='all'`` (the paper's code): every group. ``'assigned'``: under USplit only the groups the
        client contributes; it has no effect on the other methods, whose clients always train the whole model.
        """
        if usplit_train not in USPLIT_TRAIN:
            raise ValueError(f"unknown usplit_train {usplit_train!r}; allowed: {', '.join(USPLIT_TRAIN)}")
        if not 0 <= client < plan.num_clients:
            raise ValueError(f"client={client} out of range for {plan.num_clients} clients")
        if usplit_train == "all" or not self.split_roles:
            return GROUPS
        return tuple(g for g in GROUPS if g in plan.assignments[client])

    def final_plan(self, round: int, num_clients: int, seed: int) -> RoundPlan:
        """How the EMA copies are averaged once at the end, so that the EMA models have the structure of the
        raw ones: every group over every client (a global model), or the method's own plan (personalised)."""
        return (self if self.personalised else METHODS["full"]).plan(round, num_clients, seed)

    def model_labels(self, num_clients: int) -> list[str]:
        """Names of the final models: ``['global']``, or ``['client0', ...]`` for a personalised method."""
        return [f"client{k}" for k in range(num_clients)] if self.personalised else ["global"]


METHODS: dict[str, Method] = {
    "full": Method("full", _everyone(GROUPS, "full", broadcast_all=True), personalised=False, ever_shared=GROUPS),
    "usplit": Method("usplit", plan_usplit, personalised=False, ever_shared=GROUPS, split_roles=True),
    "ulatdec": Method(
        "ulatdec",
        _everyone(("bottleneck", "decoder"), "ulatdec", broadcast_all=False),
        personalised=True,
        ever_shared=("bottleneck", "decoder"),
    ),
    "udec": Method(
        "udec", _everyone(("decoder",), "udec", broadcast_all=False), personalised=True, ever_shared=("decoder",)
    ),
}
"""Registry: method name -> Method."""

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
"""The allowed values of ``federation.method``."""


def get_method(name: str) -> Method:
    """The Method called ``name``; ValueError naming the allowed ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def plan_round(method: str, round: int, num_clients: int, seed: int, sample_clients: int = 0) -> RoundPlan:
    """The plan of ``round`` (from 1) for ``num_clients`` clients under ``method`` (``Method.plan``)."""
    return get_method(method).plan(round, num_clients, seed, sample_clients)
