"""FedAvg of parameter groups: the pure maths, and the one object that all-reduces it.

``weighted_average`` is the reference: a pure function of named tensors. ``Averager`` computes the same
average for clients spread over ranks with one all-reduce per round, so there is no server:

    theta_g = sum_{k in C_g} p_k,g theta_k,g,    p_k,g = w_k / sum_{j in C_g} w_j,    w_k = |D_k|

where C_g are the clients that contribute group g this round (``RoundPlan.contributors``). The weights are
normalised before the collective, so the all-reduced sum IS the average: nothing is divided afterwards, and
every rank ends with the identical, bit for bit, result. One slot per group travels with the parameters and
must sum to 1: ranks that disagree about the plan fail loudly instead of averaging silently wrong.

Two ways to the same numbers:

* in place (one client per rank, the usual torchrun/Slurm layout): ``Averager.adopt(model)`` moves the
  model's parameters into one flat tensor laid out as the collective needs it (groups in GROUPS order, so
  every method's shared groups are one contiguous run, then the weight slots). A sync then scales that run
  by p_k and all-reduces it where it lies: no packing, no unpacking, one collective.
* packed (several clients per rank, or parameters not adopted): every rank adds up its hosted contributors
  into a flat buffer that travels in a few buckets (one asynchronous collective each, never one per tensor):
  a bucket is packed while the previous ones are on the wire, and unpacked while the later ones still are.

The training loop never calls ``torch.distributed``: this module does.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fedrun.methods import GROUPS, RoundPlan

EXCHANGE_DTYPES = ("fp32", "bf16")
DEFAULT_BUCKET_BYTES = 32 * 2**20
"""Default bytes on the wire per collective (``Averager(bucket_bytes=...)``): the paper's UNet (12 MB) goes in
one collective, Ho et al.'s (143 MB) in five. Measured on 2 gloo ranks (BENCHMARKS.md): 2 MiB buckets made
the in-place sync of the 143 MB model 1.25-1.5x one flat all-reduce, 32 MiB 1.05-1.22x (per-collective cost
outweighs the overlap there)."""


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
    """Wall time of the whole sync (pack or scale, all-reduce, unpack; packing overlaps the wire)."""
    collectives: int
    """Number of collectives issued: one per bucket, 0 for a single process or nothing shared."""
    groups: tuple[str, ...] = ()
    """The groups averaged."""


@dataclass(frozen=True, eq=False)
class _Part:
    """The parameters of one group that lie in one bucket: a contiguous run ``[lo, hi)`` of the flat buffer."""

    group: int  # index into the shared groups
    first: int  # index of its first parameter in the layout's parameter order
    names: tuple[str, ...]
    lo: int
    hi: int
    glo: int  # ``lo`` relative to the start of the group: where the part lies in the group's reference
    seg: Tensor  # buffer[lo:hi]
    wire: Tensor  # send[lo:hi] when changes travel in bf16, else ``seg``
    views: list[Tensor]  # one view of ``seg`` per parameter


@dataclass(frozen=True, eq=False)
class _Bucket:
    """One collective: ``wire`` (a contiguous slice of the wire buffer) and the parameters it carries."""

    lo: int
    hi: int
    wire: Tensor
    parts: tuple[_Part, ...]


class Averager:
    """Averages the shared parameter groups of all clients, whatever rank hosts them.

    Args:
        named_groups: group -> parameter names (e.g. ``unet.groups.parameter_groups(model)``).
        client_sizes: |D_k| for every client k of the federation (not only the hosted ones).
        group: the process group; None = the default group if one is initialised, else single process.
        exchange_dtype: ``"fp32"``, or ``"bf16"`` to halve the bytes on the wire.
        bucket_bytes: bytes on the wire per collective. The shared parameters are cut into buckets of about
            this size at parameter boundaries (a parameter is never split; the weight slots end the last
            bucket); None = one bucket. Each bucket is all-reduced asynchronously as soon as it is packed (or,
            in place, scaled), so that the local work overlaps the communication of the earlier buckets. Both
            paths lay the wire out alike (each parameter in its own memory order, groups in GROUPS order, the
            slots last) and cut it alike, so ranks on different paths (K not a multiple of W) still issue the
            same collectives. Bucketing changes no rounding of this module: with two ranks the result is the
            same, bit for bit, whatever the buckets; with more, the backend may order a collective's sum by
            chunks that depend on its size, so bucketings can differ in the last bit (never between ranks).

    Failures: the packed path checks the summed weights before it writes anything, so a sync that raises
    leaves every hosted client as it was. The in-place path has scaled its parameters before the collective:
    if that collective or the check fails, the rank's shared parameters are no longer valid (the error says
    so) and the run must resume from its last checkpoint, which is what a restarted run does anyway.

    bf16 precision: bf16 keeps 8 significant bits, so sending the weights themselves would perturb every
    shared parameter by up to 2^-9 of its magnitude each round. Instead, once a reference exists (the last
    averaged value, identical on every rank, or one given to ``set_reference``), the buffer carries the
    weighted *changes* theta_k - ref, and the new value is ref + average change in fp32: the error is 2^-9
    of what a client's training changed in one round. A group without a reference (the first sync, unless
    ``set_reference`` was called) is exchanged in fp32 for that round. The weight slots travel in bf16 too
    and are checked to 1e-2 there. The result is the right average whatever the values (ref only has to be
    identical on every rank, which the averager guarantees); it is precise when they are near the reference,
    as after a round of training.
    """

    def __init__(
        self,
        named_groups: Mapping[str, Sequence[str]],
        client_sizes: Sequence[int],
        group: dist.ProcessGroup | None = None,
        exchange_dtype: str = "fp32",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
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
        if bucket_bytes is not None and (isinstance(bucket_bytes, bool) or int(bucket_bytes) != bucket_bytes
                                         or bucket_bytes <= 0):
            raise ValueError(f"bucket_bytes must be a positive integer or None, got {bucket_bytes!r}")
        self.named_groups = {g: list(names) for g, names in named_groups.items()}
        self.client_sizes = [int(s) for s in client_sizes]
        total = sum(self.client_sizes)
        self.weights = [s / total for s in self.client_sizes]
        self.exchange_dtype = exchange_dtype
        self.bucket_bytes = None if bucket_bytes is None else int(bucket_bytes)
        self._group = group
        self._group_of = seen  # parameter name -> group
        # Flat buffer, its per-parameter views and its buckets; rebuilt only when the layout changes.
        self._layout: tuple | None = None
        self._buffer: Tensor | None = None
        self._send: Tensor | None = None
        self._ranges: dict[str, tuple[int, int]] = {}  # group -> [lo, hi) in the buffer
        self._names: list[str] = []  # the shared parameters in buffer order
        self._shapes: list[torch.Size] = []
        self._strides: list[tuple[int, ...]] = []
        self._dtypes: list[torch.dtype] = []
        self._buckets: list[_Bucket] = []
        self._members: dict[str, tuple[int, int]] = {}  # group -> (first, count) in ``_names``
        self._scratch: Tensor | None = None  # bf16 only: a further contributor's change (made when needed)
        # bf16 only: last averaged value of every shared parameter (fp32), identical on every rank. Once a
        # group has been synced, its references are views of one flat tensor per group (``_ref_flat``), so
        # that the unpack updates them with one operation per bucket instead of one per parameter.
        self._reference: dict[str, Tensor] = {}
        self._ref_flat: dict[str, tuple[Tensor, tuple[tuple[torch.Size, tuple[int, ...]], ...]]] = {}
        # In place (``adopt``): the adopted parameters' flat tensor, where each group lies in it, and the
        # address every adopted parameter must still have for a sync to work in place.
        self._flat: Tensor | None = None
        self._flat_numel = 0  # parameter elements; the weight slots follow
        self._flat_ranges: dict[str, tuple[int, int]] = {}
        self._flat_ptrs: dict[str, int] = {}
        self._flat_layout: dict[str, tuple[torch.Size, tuple[int, ...]]] = {}  # shape and strides
        self._flat_send: Tensor | None = None  # bf16 changes, laid out like ``_flat`` (made when needed)

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
            ref = self._reference.get(name)
            if ref is not None and ref.shape == t.shape and ref.device == t.device:
                ref.copy_(t.detach())  # in place: keeps the flat per-group reference
            else:
                self._reference[name] = t.detach().to(torch.float32, copy=True)
                self._ref_flat.pop(self._group_of.get(name, ""), None)

    def reset_reference(self) -> None:
        """Forget the bf16 reference (e.g. after loading parameters); the next sync is in fp32."""
        self._reference.clear()
        self._ref_flat.clear()

    @torch.no_grad()
    def adopt(self, module: nn.Module) -> bool:
        """Move the module's grouped parameters into one flat tensor, so that syncs work in place.

        The parameters stay the same ``nn.Parameter`` objects with the same values, shapes and strides
        (channels_last included); only their storage moves (``param.data`` becomes a view of the flat
        tensor), so call this before an optimiser takes copies of anything, and never replace ``.data``
        afterwards. Layout: the groups in GROUPS order, each in ``named_groups`` order, then one weight slot
        per group, so the shared groups of every method (a suffix of GROUPS: decoder; bottleneck + decoder;
        all) and their slots are one contiguous run. A sync whose only hosted client holds exactly these
        tensors (as a rank's single client aliases the module's) then scales that run by the client's FedAvg
        weight and all-reduces it where it lies, bucket by bucket: no packing, no unpacking, no buffer. Other
        syncs take the packed path; the results are bit-identical, and ranks may mix the two paths.

        Returns False, and changes nothing, when the grouped parameters differ in dtype or device.
        """
        named = dict(module.named_parameters())
        order = [g for g in GROUPS if g in self.named_groups]
        missing = [n for g in order for n in self.named_groups[g] if n not in named]
        if missing:
            raise KeyError(f"adopt: the module has no parameter(s) {missing[:5]} of the averager's groups")
        params = [named[n] for g in order for n in self.named_groups[g]]
        if len({(t.dtype, t.device) for t in params}) != 1 or not params[0].is_floating_point():
            return False
        numel = sum(t.numel() for t in params)
        flat = torch.zeros(numel + len(GROUPS), dtype=params[0].dtype, device=params[0].device)
        ranges: dict[str, tuple[int, int]] = {}
        ptrs: dict[str, int] = {}
        layout: dict[str, tuple[torch.Size, tuple[int, ...]]] = {}
        pos = 0
        for g in order:
            lo = pos
            for n in self.named_groups[g]:
                t = named[n]
                # empty_like keeps the strides of a dense tensor (channels_last too): the same layout, moved.
                view = flat.as_strided(t.shape, _dense_strides(t), pos)
                view.copy_(t.detach())
                t.data = view
                ptrs[n] = view.data_ptr()
                layout[n] = (view.shape, view.stride())
                pos += t.numel()
            ranges[g] = (lo, pos)
        self._flat, self._flat_numel, self._flat_ranges, self._flat_ptrs = flat, numel, ranges, ptrs
        self._flat_layout = layout
        self._flat_send = None
        return True

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
        # Normalised weights p_k = w_k / sum of the group's contributors' w, from data every rank has: the
        # all-reduced sum is then the average, and the summed weight slots must be 1.
        contributors = [plan.contributors(g) for g in shared]
        totals = [math.fsum(self.weights[k] for k in c) for c in contributors]
        for g, c, den in zip(shared, contributors, totals, strict=True):
            if not den > 0:
                raise ValueError(f"group {g!r}: its contributors {c} all have 0 examples")
        # Per group, this rank's contributors and their normalised weights, in client order.
        local = [[(k, self.weights[k] / den) for k in c if k in client_params]
                 for c, den in zip(contributors, totals, strict=True)]

        hosted = sorted(client_params)
        bf16 = self.exchange_dtype == "bf16"
        first = self._shared_params(shared, client_params[hosted[0]])
        delta = bf16 and self._has_reference(shared, first)
        if len(hosted) == 1 and self._adopted(shared, first):
            return self._sync_in_place(plan, shared, first, [sum(p for _, p in c) for c in local], delta, start)
        device = (first or list(client_params[hosted[0]].values()))[0].device
        buf = self._prepare(shared, first, delta, device)
        # Every hosted client receives every shared group: check them all before the first collective.
        params = {k: first if i == 0 else self._hosted(k, client_params[k]) for i, k in enumerate(hosted)}
        # bf16 changes: each group's reference as one flat fp32 tensor, laid out like the group in the buffer.
        refs = [self._layout_reference(g) for g in shared] if delta else []
        ns = len(shared)
        world = self.world_size

        # Pack bucket i and launch its all-reduce; bucket i+1 is packed while bucket i is on the wire. The
        # weight slots end the last bucket (the layout of the in-place path, so that ranks may mix the two).
        handles = []
        last = len(self._buckets) - 1
        for b, bucket in enumerate(self._buckets):
            for part in bucket.parts:
                self._pack(part, local[part.group], params, refs[part.group] if delta else None)
            if b == last:
                slots = torch.tensor([sum(w for _, w in c) for c in reversed(local)], dtype=torch.float64)
                buf[buf.numel() - ns :].copy_(slots)
                if delta:
                    bucket.wire[bucket.wire.numel() - ns :].copy_(slots)
            if world > 1:
                handles.append(
                    dist.all_reduce(bucket.wire, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
                )
        wire = self._send if delta else buf
        nbytes, ncoll = (wire.numel() * wire.element_size(), len(handles)) if world > 1 else (0, 0)

        # Wait for every bucket, check the summed weights, and only then write into the clients.
        writing = False
        try:
            _wait_all(handles)
            _check_weights(plan, shared, wire[wire.numel() - ns :].tolist()[::-1], bf16, written=False)
            writing = True
            if bf16 and not delta:  # values exchanged: they become the references
                refs = [self._layout_reference(g) for g in shared]
            for bucket in self._buckets:
                for part in bucket.parts:
                    self._unpack(part, hosted, params, refs[part.group] if bf16 else None, delta)
        except BaseException:
            if writing and bf16:  # references half updated: the next sync exchanges values again
                self.reset_reference()
            raise
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        return SyncStats(nbytes, time.perf_counter() - start, ncoll, shared)

    # -- internals --------------------------------------------------------------------------
    def _pack(
        self, part: _Part, contributors: list[tuple[int, float]], params: dict[int, list[Tensor]],
        ref: Tensor | None,
    ) -> None:
        """Write sum_k w_k theta_k (with ``ref``: sum_k w_k (theta_k - ref)) over this rank's contributors
        into the part's slice of the buffer, and of the wire buffer."""
        if not contributors:
            part.wire.zero_()
            return
        seg, views = part.seg, part.views
        lo, hi = part.first, part.first + len(part.names)
        if ref is not None:
            ref = ref[part.glo : part.glo + part.hi - part.lo]
        for j, (k, w) in enumerate(contributors):
            src = params[k][lo:hi]
            # One multi-tensor kernel per (part, client), as before, so that every sum rounds alike.
            if ref is None:
                if j == 0:
                    # Zero, then add: as cheap as copy-then-scale (the zeroing only writes), and exact down
                    # to the sign of a zero (0 + w * -0 = +0, whereas w * -0 = -0).
                    seg.zero_()
                torch._foreach_add_(views, src, alpha=w)
            elif seg.dtype == torch.float32:
                # (theta_k - ref) first, in fp32: small changes survive the bf16 cast. The first contributor's
                # change is made in place and scaled (w * d rounds like 0 + w * d), with no temporary.
                if j == 0:
                    torch._foreach_copy_(views, src)
                    seg.sub_(ref)
                    seg.mul_(w)
                else:
                    scratch, scratch_views = self._scratch_for(part)
                    torch._foreach_copy_(scratch_views, src)
                    scratch.sub_(ref)
                    torch._foreach_add_(views, scratch_views, alpha=w)
            else:  # a float64 buffer: the change in fp32, accumulated in float64
                if j == 0:
                    seg.zero_()
                changes = torch._foreach_sub([q.float() for q in src], [self._reference[n] for n in part.names])
                torch._foreach_add_(views, changes, alpha=w)
        if part.wire is not seg:
            part.wire.copy_(seg)  # the bf16 rounding happens even on one rank

    def _unpack(
        self, part: _Part, hosted: list[int], params: dict[int, list[Tensor]], ref: Tensor | None, delta: bool,
    ) -> None:
        """Write the part's all-reduced average into every hosted client (and the bf16 reference)."""
        seg, src = part.seg, part.views
        if ref is not None:
            ref = ref[part.glo : part.glo + part.hi - part.lo]
        if part.wire is not seg:
            seg.copy_(part.wire)  # bf16 -> buffer dtype, exact (then same-dtype ops: mixed ones are slow)
        if delta and seg.dtype == torch.float32:
            ref.add_(seg)  # ref + average change
            src = [self._reference[n] for n in part.names]
        elif delta:  # a float64 buffer
            refs = [self._reference[n] for n in part.names]
            torch._foreach_add_(src, refs)
            torch._foreach_copy_(refs, src)
        elif ref is not None:
            ref.copy_(seg)
        lo, hi = part.first, part.first + len(part.names)
        for k in hosted:
            torch._foreach_copy_(params[k][lo:hi], src)

    def _shared_params(self, shared: tuple[str, ...], params: Mapping[str, Tensor]) -> list[Tensor]:
        """The first hosted client's shared parameters, in buffer order (they define the layout)."""
        out = []
        for g in shared:
            for n in self.named_groups[g]:
                t = params.get(n)
                if t is None:
                    raise KeyError(f"parameter {n!r} of group {g!r} missing from the hosted client")
                out.append(t)
        return out

    def _hosted(self, client: int, params: Mapping[str, Tensor]) -> list[Tensor]:
        """A further client's shared parameters in buffer order, checked against the layout."""
        try:
            out = [params[n] for n in self._names]
        except KeyError:
            out = []
        if [t.shape for t in out] != self._shapes:
            for n, shape in zip(self._names, self._shapes, strict=True):
                _check_param(params, n, shape, client)
        return out

    def _has_reference(self, shared: tuple[str, ...], first: list[Tensor]) -> bool:
        """bf16: whether every shared parameter has a reference of its shape (then changes are sent)."""
        pos, flat_ok = 0, True
        for g in shared:  # fast path: the flat per-group references of the last sync fit
            count = len(self.named_groups[g])
            entry = self._ref_flat.get(g)
            flat_ok = flat_ok and entry is not None and tuple(s for s, _ in entry[1]) == tuple(
                t.shape for t in first[pos : pos + count])
            pos += count
        if flat_ok:
            return True
        names = [n for g in shared for n in self.named_groups[g]]
        return all(
            (ref := self._reference.get(n)) is not None and ref.shape == t.shape
            for n, t in zip(names, first, strict=True)
        )

    def _layout_reference(self, g: str) -> Tensor:
        """bf16, packed path: the group's flat reference, laid out like the group in the buffer."""
        first, count = self._members[g]
        layout = tuple(zip(self._shapes[first : first + count], self._strides[first : first + count], strict=True))
        return self._group_reference(g, layout, self._buffer.device)

    def _adopted_reference(self, g: str) -> Tensor:
        """bf16, in place: the group's flat reference, laid out like the group in the adopted flat tensor
        (same strides: element i of the reference belongs to element i of the parameters' memory)."""
        layout = tuple(self._flat_layout[n] for n in self.named_groups[g])
        return self._group_reference(g, layout, self._flat.device)

    def _group_reference(self, g: str, layout: tuple[tuple[torch.Size, tuple[int, ...]], ...],
                         device: torch.device) -> Tensor:
        """bf16: the group's reference as one flat fp32 tensor whose views (``layout``: shape and strides of
        each parameter, in ``named_groups`` order) are its parameters' references. Existing references of the
        right shape are kept, whatever layout they had; missing ones are left undefined: only a sync that
        exchanges values lacks one, and it asks after the all-reduce, to write them all."""
        entry = self._ref_flat.get(g)
        if entry is not None and entry[1] == layout and entry[0].device == device:
            return entry[0]
        flat = torch.empty(sum(s.numel() for s, _ in layout), dtype=torch.float32, device=device)
        pos = 0
        for n, (shape, stride) in zip(self.named_groups[g], layout, strict=True):
            view = flat.as_strided(shape, stride, pos)
            old = self._reference.get(n)
            if old is not None and old.shape == shape:
                view.copy_(old)
            self._reference[n] = view
            pos += shape.numel()
        self._ref_flat[g] = (flat, layout)
        return flat

    def _adopted(self, shared: tuple[str, ...], first: list[Tensor]) -> bool:
        """Whether the shared groups are a contiguous run of the adopted flat tensor and ``first`` (the only
        hosted client's shared parameters, in buffer order) are exactly its views."""
        if self._flat is None:
            return False
        order = [g for g in GROUPS if g in self.named_groups]
        if tuple(order[len(order) - len(shared) :]) != shared:
            return False
        names = (n for g in shared for n in self.named_groups[g])
        ptrs, dtype = self._flat_ptrs, self._flat.dtype
        return all(t.data_ptr() == ptrs[n] and t.dtype == dtype for n, t in zip(names, first, strict=True))

    def _sync_in_place(self, plan: RoundPlan, shared: tuple[str, ...], first: list[Tensor], factors: list[float],
                       delta: bool, start: float) -> SyncStats:
        """The sync of ``adopt``ed parameters: scale each shared group by this rank's normalised weight
        ``factors[i]`` (0 when its client does not contribute it) and all-reduce the run where it lies, in the
        packed path's buckets, each launched as soon as it is scaled. With bf16 and a reference, the weighted
        changes travel in bf16 and each group becomes reference + average change."""
        flat, numel, ns, world = self._flat, self._flat_numel, len(shared), self.world_size
        lo = self._flat_ranges[shared[0]][0]
        if world == 1:  # nothing to receive: check before anything is written (all factors must be 1)
            _check_weights(plan, shared, factors, False, written=False)
        ranges = [self._flat_ranges[g] for g in shared]
        if delta:
            if self._flat_send is None:
                self._flat_send = torch.zeros(flat.numel(), dtype=torch.bfloat16, device=flat.device)
            wire = self._flat_send[lo : numel + ns]
            refs = [self._adopted_reference(g) for g in shared]
        else:
            wire = flat[lo : numel + ns]
        slots = torch.tensor(factors[::-1], dtype=torch.float64)
        cuts = self._cuts([t.numel() for t in first], ns, wire.element_size())
        handles = []
        for b, (blo, bhi) in enumerate(cuts):
            blo, bhi = blo + lo, bhi + lo  # in the flat tensor
            for i, ((a, z), f) in enumerate(zip(ranges, factors, strict=True)):
                a, z = max(a, blo), min(z, bhi)
                if a >= z:
                    continue
                if delta:
                    if f == 0:
                        self._flat_send[a:z].zero_()
                    else:  # (theta - ref) in fp32, then w * change rounded once to bf16, as the packed path
                        # (same-dtype ops, then one cast: mixed-dtype kernels run ~10x slower on CPU)
                        flat[a:z].sub_(refs[i][a - ranges[i][0] : z - ranges[i][0]]).mul_(f)
                        self._flat_send[a:z].copy_(flat[a:z])
                elif f == 0:
                    flat[a:z].zero_()
                elif f != 1:
                    flat[a:z].mul_(f)
            if b == len(cuts) - 1:
                wire[wire.numel() - ns :].copy_(slots)
            if world > 1:
                handles.append(dist.all_reduce(wire[blo - lo : bhi - lo], op=dist.ReduceOp.SUM, group=self._group,
                                               async_op=True))
        _wait_all(handles)
        if world > 1:
            try:
                _check_weights(plan, shared, wire[wire.numel() - ns :].tolist()[::-1], delta, written=True)
            except RuntimeError:
                self.reset_reference()
                raise
        if delta:
            for (a, z), ref in zip(ranges, refs, strict=True):
                flat[a:z].copy_(self._flat_send[a:z])  # the average change (the cast from bf16 is exact)
                ref.add_(flat[a:z])  # reference + average change
                flat[a:z].copy_(ref)
        elif self.exchange_dtype == "bf16":  # values exchanged (no reference yet): they become the references
            for g, (a, z) in zip(shared, ranges, strict=True):
                self._adopted_reference(g).copy_(flat[a:z])
        if flat.is_cuda:
            torch.cuda.synchronize(flat.device)
        nbytes, ncoll = (wire.numel() * wire.element_size(), len(handles)) if world > 1 else (0, 0)
        return SyncStats(nbytes, time.perf_counter() - start, ncoll, shared)

    def _scratch_for(self, part: _Part) -> tuple[Tensor, list[Tensor]]:
        """bf16, several contributors on this rank: room for one more client's change (made once)."""
        if self._scratch is None:
            self._scratch = torch.empty_like(self._buffer)
        scratch = self._scratch
        # The same shapes, strides and offsets as the buffer's views: element i of the scratch belongs to
        # element i of the buffer and of the reference.
        views = [scratch.as_strided(v.shape, v.stride(), v.storage_offset()) for v in part.views]
        return scratch[part.lo : part.hi], views

    def _prepare(self, shared: tuple[str, ...], first: list[Tensor], delta: bool, device: torch.device) -> Tensor:
        """The flat buffer for this layout (every shared parameter, then one weight slot per group, the last
        group's first) and its buckets; rebuilt only when the layout changes."""
        shapes = [t.shape for t in first]
        dtypes = [t.dtype for t in first]
        # Each parameter lies in the buffer in its own memory order (channels_last stays NHWC), as it lies
        # in an adopted flat tensor: the element order on the wire is then the same on both paths.
        strides = [_dense_strides(t) for t in first]
        layout = (shared, delta, device, tuple(strides))
        if layout == self._layout and shapes == self._shapes and dtypes == self._dtypes:
            return self._buffer
        # Accumulate in the widest parameter dtype, at least fp32, so that one buffer serves every parameter.
        dtype = torch.float32
        for dt in dtypes:
            dtype = torch.promote_types(dtype, dt)
        ns = len(shared)
        sizes = [s.numel() for s in shapes]
        total = sum(sizes) + ns
        buf = torch.empty(total, dtype=dtype, device=device)
        send = torch.empty(total, dtype=torch.bfloat16, device=device) if delta else None
        wire = send if send is not None else buf
        names: list[str] = []
        groups: list[int] = []  # group index of every shared parameter
        members: dict[str, tuple[int, int]] = {}
        ranges: dict[str, tuple[int, int]] = {}
        pos = 0
        for gi, g in enumerate(shared):
            members[g] = (len(names), len(self.named_groups[g]))
            ranges[g] = (pos, pos + sum(sizes[len(names) : len(names) + members[g][1]]))
            names.extend(self.named_groups[g])
            groups.extend([gi] * members[g][1])
            pos = ranges[g][1]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        views = {n: buf.as_strided(shapes[i], strides[i], offsets[i]) for i, n in enumerate(names)}
        buckets: list[_Bucket] = []
        i = 0  # next parameter
        for lo, hi in self._cuts(sizes, ns, wire.element_size()):
            parts = []
            while i < len(names) and offsets[i] < hi:  # runs of one group's parameters inside [lo, hi)
                j = i
                while j + 1 < len(names) and offsets[j + 1] < hi and groups[j + 1] == groups[i]:
                    j += 1
                plo, phi = offsets[i], offsets[j + 1]
                seg = buf[plo:phi]
                part_names = tuple(names[i : j + 1])
                parts.append(_Part(groups[i], i, part_names, plo, phi, plo - ranges[shared[groups[i]]][0], seg,
                                   wire[plo:phi] if send is not None else seg, [views[n] for n in part_names]))
                i = j + 1
            buckets.append(_Bucket(lo, hi, wire[lo:hi], tuple(parts)))
        self._layout, self._shapes, self._dtypes, self._strides = layout, shapes, dtypes, strides
        self._buffer, self._send, self._ranges = buf, send, ranges
        self._names, self._members, self._buckets, self._scratch = names, members, buckets, None
        return buf

    def _cuts(self, sizes: list[int], ns: int, itemsize: int) -> list[tuple[int, int]]:
        """Bucket bounds [lo, hi) over [parameters of ``sizes`` | ns weight slots]: a bucket closes at the
        parameter boundary where it reaches ``bucket_bytes`` on the wire (a parameter is never split); the
        slots end the last bucket. Both paths cut alike, so every rank issues the same collectives."""
        total = sum(sizes) + ns
        limit = total if self.bucket_bytes is None else max(1, self.bucket_bytes // itemsize)
        cuts, lo, pos = [], 0, 0
        for size in sizes:
            pos += size
            if pos - lo >= limit:
                cuts.append((lo, pos))
                lo = pos
        if cuts and lo == pos:  # the slots join the bucket of the last parameter
            cuts[-1] = (cuts[-1][0], total)
        else:
            cuts.append((lo, total))
        return cuts


def _wait_all(handles: list) -> None:
    """Wait for every collective in order. After a failure the later ones are still waited for (they may be
    writing into buffers the caller reuses), and the first error is raised."""
    for i, h in enumerate(handles):
        try:
            h.wait()
        except BaseException:
            for rest in handles[i + 1 :]:
                with contextlib.suppress(Exception):
                    rest.wait()
            raise


def _dense_strides(t: Tensor) -> tuple[int, ...]:
    """The strides of ``t`` when it is dense (contiguous, channels_last, ...), else the contiguous ones:
    the layout of ``t`` packed without gaps."""
    return torch.empty_like(t, device="meta").stride()


def _check_weights(plan: RoundPlan, shared: tuple[str, ...], sums: list[float], bf16: bool, written: bool) -> None:
    """The all-reduced weight slots: each group's normalised weights must sum to 1 over all ranks."""
    tol = 1e-2 if bf16 else 1e-5
    for g, got in zip(shared, sums, strict=True):
        if abs(got - 1.0) > tol:
            msg = (f"round {plan.round}: the FedAvg weights of {g!r} sum to {got:.6g} over the ranks, not 1: "
                   "ranks disagree about the round plan or the hosted clients")
            if written:
                msg += ("; this rank's shared parameters were averaged in place and are no longer valid: "
                        "resume from the last checkpoint")
            raise RuntimeError(msg)


def _check_param(params: Mapping[str, Tensor], name: str, shape: torch.Size, client: int) -> None:
    if name not in params:
        raise KeyError(f"client {client}: parameter {name!r} missing")
    got = tuple(params[name].shape)
    if got != tuple(shape):
        raise ValueError(f"client {client}: {name} has shape {got}, expected {tuple(shape)}")
