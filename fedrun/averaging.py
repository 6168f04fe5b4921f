"""FedAvg of parameter groups: the pure maths, and the one object that all-reduces it.

``weighted_average`` is the reference: a pure function of named tensors. ``Averager`` computes the same
average for clients spread over ranks with a single all-reduce per round, so there is no server:

    theta_g = sum_{k in C_g} w_k theta_k,g / sum_{k in C_g} w_k,    w_k = |D_k| / sum_j |D_j|

where C_g are the clients that contribute group g this round (``RoundPlan.contributors``). Every rank adds
up its hosted contributors into one flat buffer (all shared groups, then one denominator slot per group),
the buffer is summed over ranks, and every rank divides the identical sum by the identical denominator, so
all clients on all ranks end with bit-identical shared parameters. The training loop never calls
``torch.distributed``: this module does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fedrun.methods import GROUPS, RoundPlan

EXCHANGE_DTYPES = ("fp32", "bf16")


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """sum_k w_k states[k] / sum_k w_k for every parameter name (FedAvg, eq. 1 of McMahan et al.).

    Accumulates in float64 and returns each tensor in the dtype of ``states[0]``. Raises ValueError on an
    empty list, a length mismatch, differing names or shapes, a negative weight or a total weight <= 0.
    """
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"total weight must be > 0, got {total}")
    names = set(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != names:
            diff = sorted(names.symmetric_difference(s))
            raise ValueError(f"state {i} has different parameter names than state 0: {diff[:5]}")
    out: dict[str, Tensor] = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            raise TypeError(f"{name}: cannot average a {first.dtype} tensor")
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for i, (s, w) in enumerate(zip(states, weights, strict=True)):
            if s[name].shape != first.shape:
                raise ValueError(f"{name}: shape {tuple(s[name].shape)} in state {i} != {tuple(first.shape)}")
            acc.add_(s[name].detach().double(), alpha=w / total)
        out[name] = acc.to(first.dtype)
    return out


@dataclass(frozen=True)
class SyncStats:
    """What one ``Averager.sync`` did on this rank."""

    bytes: int
    """Bytes handed to the collective (numel * element_size of the all-reduced buffer); 0 without one."""
    seconds: float
    """Wall time of the whole sync (pack, all-reduce, unpack)."""
    collectives: int
    """Number of collectives issued (1, or 0 for a single process or nothing shared)."""
    groups: tuple[str, ...] = ()
    """The groups averaged."""


class Averager:
    """Averages the shared parameter groups of all clients, whatever rank hosts them.

    Args:
        named_groups: group -> parameter names (e.g. ``unet.groups.parameter_groups(model)``).
        client_sizes: |D_k| for every client k of the federation (not only the hosted ones).
        group: the process group; None = the default group if one is initialised, else single process.
        exchange_dtype: ``"fp32"``, or ``"bf16"`` to halve the bytes on the wire.

    bf16 precision: bf16 keeps 8 significant bits, so sending the weights themselves would perturb every
    shared parameter by up to 2^-9 of its magnitude each round. Instead, once a reference exists (the last
    averaged value, identical on every rank, or one given to ``set_reference``), the buffer carries the
    weighted *changes* theta_k - ref, and the new value is ref + average change in fp32: the error is 2^-9
    of what a client's training changed in one round. A group without a reference (the first sync, unless
    ``set_reference`` was called) is exchanged in fp32 for that round. The denominator slots travel in bf16
    too; they are only checked there, the division uses the exact denominators, known to every rank.
    The result is the right average whatever the values (ref only has to be identical on every rank, which
    the averager guarantees); it is precise when they are near the reference, as after a round of training.
    """

    def __init__(
        self,
        named_groups: Mapping[str, Sequence[str]],
        client_sizes: Sequence[int],
        group: dist.ProcessGroup | None = None,
        exchange_dtype: str = "fp32",
    ) -> None:
        unknown = set(named_groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown group(s) {sorted(unknown)}; allowed: {', '.join(GROUPS)}")
        seen: dict[str, str] = {}
        for g, names in named_groups.items():
            for n in names:
                if n in seen:
                    raise ValueError(f"parameter {n!r} is in both {seen[n]!r} and {g!r}")
                seen[n] = g
        if exchange_dtype not in EXCHANGE_DTYPES:
            allowed = ", ".join(EXCHANGE_DTYPES)
            raise ValueError(f"unknown exchange_dtype {exchange_dtype!r}; allowed: {allowed}")
        if not client_sizes or any(s < 0 for s in client_sizes) or sum(client_sizes) <= 0:
            raise ValueError(f"client_sizes must be >= 0 with a positive total, got {list(client_sizes)}")
        self.named_groups = {g: list(names) for g, names in named_groups.items()}
        self.client_sizes = [int(s) for s in client_sizes]
        total = sum(self.client_sizes)
        self.weights = [s / total for s in self.client_sizes]
        self.exchange_dtype = exchange_dtype
        self._group = group
        # Flat buffer and its per-parameter views; rebuilt only when the layout changes.
        self._layout: tuple | None = None
        self._buffer: Tensor | None = None
        self._send: Tensor | None = None
        self._views: dict[str, Tensor] = {}
        self._ranges: dict[str, tuple[int, int]] = {}  # group -> [lo, hi) in the buffer
        # bf16 only: last averaged value of every shared parameter (fp32), identical on every rank.
        self._reference: dict[str, Tensor] = {}

    @property
    def world_size(self) -> int:
        if self._group is None and not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self._group)

    def set_reference(self, params: Mapping[str, Tensor]) -> None:
        """bf16 only: values every client holds now, identical on every rank (e.g. the broadcast initial
        model), so that even the first sync exchanges changes in bf16. Call it on every rank alike."""
        if self.exchange_dtype != "bf16":
            return
        for name, t in params.items():
            self._reference[name] = t.detach().to(torch.float32, copy=True)

    def reset_reference(self) -> None:
        """Forget the bf16 reference (e.g. after loading parameters); the next sync is in fp32."""
        self._reference.clear()

    @torch.no_grad()
    def sync(self, plan: RoundPlan, client_params: Mapping[int, Mapping[str, Tensor]]) -> SyncStats:
        """Average this round's shared groups and write them, in place, into every hosted client.

        ``client_params`` maps each client hosted by this rank to its live parameters by name. Every rank
        must call ``sync`` with the same plan. Every hosted client receives every shared group (under
        USplit every group is shared, so every client gets the whole model); local groups are not touched.
        """
        start = time.perf_counter()
        if plan.num_clients != len(self.weights):
            raise ValueError(f"plan has {plan.num_clients} clients, the averager {len(self.weights)}")
        if not client_params:
            raise ValueError("a rank must host at least one client")
        bad = [k for k in client_params if not 0 <= k < plan.num_clients]
        if bad:
            raise ValueError(f"hosted client(s) {bad} out of range for {plan.num_clients} clients")
        shared = plan.shared_groups()
        missing = [g for g in shared if g not in self.named_groups]
        if missing:
            raise ValueError(f"plan shares {missing} but the averager knows no parameters for it")
        if not shared:
            return SyncStats(0, time.perf_counter() - start, 0, ())
        # Exact denominators, from data every rank has: used to check the all-reduced ones (ranks that
        # disagree on the plan would otherwise average silently wrong) and as the bf16 divisor.
        expected = [math.fsum(self.weights[k] for k in plan.contributors(g)) for g in shared]
        for g, den in zip(shared, expected, strict=True):
            if not den > 0:
                raise ValueError(f"group {g!r}: its contributors {plan.contributors(g)} all have 0 examples")

        hosted = sorted(client_params)
        delta = self.exchange_dtype == "bf16" and all(
            n in self._reference for g in shared for n in self.named_groups[g]
        )
        buf = self._prepare(shared, client_params[hosted[0]], delta)
        # Every hosted client receives every shared group: check them all before the collective.
        for k in hosted:
            for g in shared:
                for n in self.named_groups[g]:
                    _check_param(client_params[k], n, self._views[n].shape, k)
        buf.zero_()
        offset = buf.numel() - len(shared)
        for i, g in enumerate(shared):
            names = self.named_groups[g]
            local_den = 0.0
            for k in plan.contributors(g):
                if k not in client_params:
                    continue
                w = self.weights[k]
                local_den += w
                # One multi-tensor kernel per (group, client), not one per parameter.
                views = [self._views[n] for n in names]
                params = [client_params[k][n].detach() for n in names]
                if delta:
                    # (theta_k - ref) first, in fp32: small changes survive the bf16 cast.
                    params = torch._foreach_sub([q.float() for q in params], [self._reference[n] for n in names])
                torch._foreach_add_(views, params, alpha=w)
            buf[offset + i] = local_den

        nbytes, ncoll = self._all_reduce(buf)

        dens = buf[offset:].tolist()
        tol = 1e-2 if self.exchange_dtype == "bf16" else 1e-5
        for g, got, want in zip(shared, dens, expected, strict=True):
            if abs(got - want) > tol * want:
                raise RuntimeError(
                    f"round {plan.round}: summed FedAvg weight of {g!r} is {got:.6g} but this rank's plan "
                    f"expects {want:.6g}: ranks disagree about the round plan or the hosted clients"
                )
        for i, g in enumerate(shared):
            names = self.named_groups[g]
            lo, hi = self._ranges[g]
            seg = buf[lo:hi]
            # Same tensor, same divisor on every rank -> bit-identical result everywhere.
            seg.div_(expected[i] if self.exchange_dtype == "bf16" else dens[i])
            views = [self._views[n] for n in names]
            if delta:
                torch._foreach_add_(views, [self._reference[n] for n in names])
            if self.exchange_dtype == "bf16":
                for n, v in zip(names, views, strict=True):
                    ref = self._reference.get(n)
                    if ref is not None and ref.shape == v.shape:
                        ref.copy_(v)
                    else:
                        self._reference[n] = v.to(torch.float32, copy=True)
            for k in hosted:
                torch._foreach_copy_([client_params[k][n] for n in names], views)
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        return SyncStats(nbytes, time.perf_counter() - start, ncoll, shared)

    # -- internals --------------------------------------------------------------------------
    def _prepare(self, shared: tuple[str, ...], params: Mapping[str, Tensor], delta: bool) -> Tensor:
        """The flat buffer for this layout: every shared parameter, then one slot per group."""
        entries = []
        for g in shared:
            for n in self.named_groups[g]:
                if n not in params:
                    raise KeyError(f"parameter {n!r} of group {g!r} missing from the hosted client")
                entries.append((n, tuple(params[n].shape), params[n].dtype))
        device = params[entries[0][0]].device if entries else next(iter(params.values())).device
        layout = (tuple(entries), shared, delta, device)
        if layout == self._layout and self._buffer is not None:
            return self._buffer
        # Accumulate in the widest parameter dtype, at least fp32, so that one buffer (one collective)
        # serves every parameter.
        dtype = torch.float32
        for _, _, dt in entries:
            dtype = torch.promote_types(dtype, dt)
        total = sum(math.prod(shape) for _, shape, _ in entries) + len(shared)
        buf = torch.empty(total, dtype=dtype, device=device)
        views: dict[str, Tensor] = {}
        ranges: dict[str, tuple[int, int]] = {}
        pos = 0
        for g in shared:
            lo = pos
            for n in self.named_groups[g]:
                size = math.prod(params[n].shape)
                views[n] = buf[pos : pos + size].view(params[n].shape)
                pos += size
            ranges[g] = (lo, pos)
        self._layout, self._buffer, self._views, self._ranges = layout, buf, views, ranges
        self._send = torch.empty(total, dtype=torch.bfloat16, device=device) if delta else None
        return buf

    def _all_reduce(self, buf: Tensor) -> tuple[int, int]:
        """Sum ``buf`` over ranks in place; returns (bytes handed to the collective, collectives)."""
        wire = self._send if self._send is not None else buf
        if wire is not buf:
            # Placement does not change the precision: the bf16 rounding happens even on one rank.
            wire.copy_(buf)
        if self.world_size > 1:
            dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self._group)
            nbytes, ncoll = wire.numel() * wire.element_size(), 1
        else:
            nbytes, ncoll = 0, 0
        if wire is not buf:
            buf.copy_(wire)
        return nbytes, ncoll


def _check_param(params: Mapping[str, Tensor], name: str, shape: torch.Size, client: int) -> None:
    if name not in params:
        raise KeyError(f"client {client}: parameter {name!r} missing")
    got = tuple(params[name].shape)
    if got != tuple(shape):
        raise ValueError(f"client {client}: {name} has shape {got}, expected {tuple(shape)}")
