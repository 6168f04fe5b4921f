"""FedAvg of parameter groups: the pure maths, and the one object that all-reduces it.

``weighted_average`` is the reference: a pure function of named tensors. ``Averager`` computes the same
average for clients spread over ranks with one all-reduced flat buffer per round, so there is no server:

    theta_g = sum_{k in C_g} w_k theta_k,g / sum_{k in C_g} w_k,    w_k = |D_k| / sum_j |D_j|

where C_g are the clients that contribute group g this round (``RoundPlan.contributors``). Every rank adds
up its hosted contributors into one flat buffer (one denominator slot per group, then all shared groups),
the buffer is summed over ranks, and every rank divides the identical sum by the identical denominator, so
all clients on all ranks end with bit-identical shared parameters. The buffer travels in a few buckets (one
asynchronous collective each, never one per tensor): a bucket is packed while the previous ones are on the
wire, and unpacked while the later ones still are. The training loop never calls ``torch.distributed``:
this module does.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fedrun.methods import GROUPS, RoundPlan

EXCHANGE_DTYPES = ("fp32", "bf16")
DEFAULT_BUCKET_BYTES = 2 * 2**20
"""Default bytes on the wire per collective (``Averager(bucket_bytes=...)``)."""


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
    """Wall time of the whole sync (pack, all-reduce, unpack, the last two overlapping)."""
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
        bucket_bytes: bytes on the wire per collective. The flat buffer is cut into buckets of about this
            size at parameter boundaries (a parameter is never split; the denominator slots lead the first
            bucket); None = one bucket. Each bucket is all-reduced asynchronously as soon as it is packed,
            and unpacked as soon as its sum arrives, so that packing and unpacking overlap the communication
            of the other buckets. Bucketing changes no rounding of this module: with two ranks the result is
            the same, bit for bit, whatever the buckets; with more, the backend may order a collective's sum
            by chunks that depend on its size, so bucketings can differ in the last bit (never between ranks).

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
        self._views: dict[str, Tensor] = {}
        self._ranges: dict[str, tuple[int, int]] = {}  # group -> [lo, hi) in the buffer
        self._names: list[str] = []  # the shared parameters in buffer order
        self._shapes: list[torch.Size] = []
        self._dtypes: list[torch.dtype] = []
        self._buckets: list[_Bucket] = []
        self._members: dict[str, tuple[int, int]] = {}  # group -> (first, count) in ``_names``
        self._scratch: Tensor | None = None  # bf16 only: a further contributor's change (made when needed)
        # bf16 only: last averaged value of every shared parameter (fp32), identical on every rank. Once a
        # group has been synced, its references are views of one flat tensor per group (``_ref_flat``), so
        # that the unpack updates them with one operation per bucket instead of one per parameter.
        self._reference: dict[str, Tensor] = {}
        self._ref_flat: dict[str, tuple[Tensor, tuple[torch.Size, ...]]] = {}

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
        contributors = [plan.contributors(g) for g in shared]
        expected = [math.fsum(self.weights[k] for k in c) for c in contributors]
        for g, c, den in zip(shared, contributors, expected, strict=True):
            if not den > 0:
                raise ValueError(f"group {g!r}: its contributors {c} all have 0 examples")

        hosted = sorted(client_params)
        bf16 = self.exchange_dtype == "bf16"
        first = self._shared_params(shared, client_params[hosted[0]])
        delta = bf16 and self._has_reference(shared, first)
        device = (first or list(client_params[hosted[0]].values()))[0].device
        buf = self._prepare(shared, first, delta, device)
        # Every hosted client receives every shared group: check them all before the first collective.
        params = {k: first if i == 0 else self._hosted(k, client_params[k]) for i, k in enumerate(hosted)}
        # bf16 changes: each group's reference as one flat fp32 tensor, laid out like the group in the buffer.
        refs = [self._group_reference(g) for g in shared] if delta else []
        # Per group, this rank's contributors and their weights, in client order.
        local = [[(k, self.weights[k]) for k in c if k in client_params] for c in contributors]
        ns = len(shared)
        world = self.world_size

        # Pack bucket i and launch its all-reduce; bucket i+1 is packed while bucket i is on the wire.
        handles = []
        for b, bucket in enumerate(self._buckets):
            if b == 0:
                # One denominator slot per group, at the head of the first bucket.
                buf[:ns].copy_(torch.tensor([sum(w for _, w in c) for c in local], dtype=torch.float64))
                if delta:
                    bucket.wire[:ns].copy_(buf[:ns])
            for part in bucket.parts:
                self._pack(part, local[part.group], params, refs[part.group] if delta else None)
            if world > 1:
                handles.append(
                    dist.all_reduce(bucket.wire, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
                )
        wire = self._send if delta else buf
        nbytes, ncoll = (wire.numel() * wire.element_size(), len(handles)) if world > 1 else (0, 0)

        # Wait for the buckets in order; each is unpacked while the later ones are still on the wire.
        waited, writing = 0, False
        try:
            for b, bucket in enumerate(self._buckets):
                if handles:
                    waited += 1
                    handles[b].wait()
                if b == 0:
                    # The denominators lead the first bucket: checked before any parameter is written.
                    dens = bucket.wire[:ns].tolist()
                    tol = 1e-2 if bf16 else 1e-5
                    for g, got, want in zip(shared, dens, expected, strict=True):
                        if abs(got - want) > tol * want:
                            raise RuntimeError(
                                f"round {plan.round}: summed FedAvg weight of {g!r} is {got:.6g} but this rank's "
                                f"plan expects {want:.6g}: ranks disagree about the round plan or the hosted "
                                "clients"
                            )
                    # Same sum, same divisor on every rank -> bit-identical result everywhere.
                    divisors = expected if bf16 else dens
                    if delta and buf.dtype == torch.float32:  # for addcdiv_, made once
                        divisors = torch.tensor(divisors, dtype=torch.float32, device=buf.device).unbind()
                    writing = True
                    if bf16 and not delta:  # values exchanged: they become the references
                        refs = [self._group_reference(g) for g in shared]
                for part in bucket.parts:
                    self._unpack(part, divisors[part.group], hosted, params, refs[part.group] if bf16 else None,
                                 delta)
        except BaseException:
            if writing and bf16:  # references half updated: the next sync exchanges values again
                self.reset_reference()
            raise
        finally:
            for h in handles[waited:]:  # after an error: let the collectives in flight finish with the buffer
                with contextlib.suppress(Exception):  # the first error is the one raised
                    h.wait()
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
        self, part: _Part, divisor: float | Tensor, hosted: list[int], params: dict[int, list[Tensor]],
        ref: Tensor | None, delta: bool,
    ) -> None:
        """Divide the part's all-reduced sum and write it into every hosted client (and the bf16 reference)."""
        seg, src = part.seg, part.views
        if part.wire is not seg:
            seg.copy_(part.wire)  # bf16 -> buffer dtype, exact
        if ref is not None:
            ref = ref[part.glo : part.glo + part.hi - part.lo]
        if delta and seg.dtype == torch.float32:
            # ref + sum / den in one pass: addcdiv rounds the quotient, then the sum, exactly like div_ then
            # add_ (IEEE division, then addition, which commutes).
            ref.addcdiv_(seg, divisor)  # divisor: a 0-dim fp32 tensor
            src = [self._reference[n] for n in part.names]
        else:
            seg.div_(divisor)  # one pass over the contiguous slice
            if delta:  # a float64 buffer: as many passes as before
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
            flat_ok = flat_ok and entry is not None and entry[1] == tuple(t.shape for t in first[pos : pos + count])
            pos += count
        if flat_ok:
            return True
        names = [n for g in shared for n in self.named_groups[g]]
        return all(
            (ref := self._reference.get(n)) is not None and ref.shape == t.shape
            for n, t in zip(names, first, strict=True)
        )

    def _group_reference(self, g: str) -> Tensor:
        """bf16: the group's reference as one flat fp32 tensor whose views are its parameters' references,
        in buffer order. Existing references of the right shape are kept; missing ones are left undefined:
        only a sync that exchanges values lacks one, and it asks after the all-reduce, to write them all."""
        lo, hi = self._ranges[g]
        first, count = self._members[g]
        names = self._names[first : first + count]
        shapes = tuple(self._shapes[first : first + count])
        device = self._buffer.device
        entry = self._ref_flat.get(g)
        if entry is not None and entry[1] == shapes and entry[0].device == device:
            return entry[0]
        flat = torch.empty(hi - lo, dtype=torch.float32, device=device)
        pos = 0
        for n, shape in zip(names, shapes, strict=True):
            view = flat[pos : pos + shape.numel()].view(shape)
            old = self._reference.get(n)
            if old is not None and old.shape == shape:
                view.copy_(old)
            self._reference[n] = view
            pos += shape.numel()
        self._ref_flat[g] = (flat, shapes)
        return flat

    def _scratch_for(self, part: _Part) -> tuple[Tensor, list[Tensor]]:
        """bf16, several contributors on this rank: room for one more client's change (made once)."""
        if self._scratch is None:
            self._scratch = torch.empty_like(self._buffer)
        seg = self._scratch[part.lo : part.hi]
        views, pos = [], 0
        for v in part.views:
            views.append(seg[pos : pos + v.numel()].view(v.shape))
            pos += v.numel()
        return seg, views

    def _prepare(self, shared: tuple[str, ...], first: list[Tensor], delta: bool, device: torch.device) -> Tensor:
        """The flat buffer for this layout (one denominator slot per group, then every shared parameter)
        and its buckets; rebuilt only when the layout changes."""
        shapes = [t.shape for t in first]
        dtypes = [t.dtype for t in first]
        layout = (shared, delta, device)
        if layout == self._layout and shapes == self._shapes and dtypes == self._dtypes:
            return self._buffer
        # Accumulate in the widest parameter dtype, at least fp32, so that one buffer serves every parameter.
        dtype = torch.float32
        for dt in dtypes:
            dtype = torch.promote_types(dtype, dt)
        ns = len(shared)
        total = ns + sum(s.numel() for s in shapes)
        buf = torch.empty(total, dtype=dtype, device=device)
        send = torch.empty(total, dtype=torch.bfloat16, device=device) if delta else None
        wire = send if send is not None else buf
        limit = total if self.bucket_bytes is None else max(1, self.bucket_bytes // wire.element_size())
        views: dict[str, Tensor] = {}
        ranges: dict[str, tuple[int, int]] = {}
        members: dict[str, tuple[int, int]] = {}
        names: list[str] = []
        buckets: list[_Bucket] = []
        open_parts: list[list] = []  # [group index, first, count, lo, hi, lo in group] of the open bucket
        bucket_lo, pos = 0, ns

        def close(hi: int) -> None:
            parts = []
            for gi, i, count, lo, phi, glo in open_parts:
                part_names = tuple(names[i : i + count])
                seg = buf[lo:phi]
                part_wire = wire[lo:phi] if send is not None else seg
                parts.append(_Part(gi, i, part_names, lo, phi, glo, seg, part_wire, [views[n] for n in part_names]))
            buckets.append(_Bucket(bucket_lo, hi, wire[bucket_lo:hi], tuple(parts)))
            open_parts.clear()

        for gi, g in enumerate(shared):
            group_lo = pos
            members[g] = (len(names), len(self.named_groups[g]))
            for n in self.named_groups[g]:
                shape = shapes[len(names)]
                size = shape.numel()
                views[n] = buf[pos : pos + size].view(shape)
                if open_parts and open_parts[-1][0] == gi:
                    open_parts[-1][2] += 1
                    open_parts[-1][4] = pos + size
                else:
                    open_parts.append([gi, len(names), 1, pos, pos + size, pos - group_lo])
                names.append(n)
                pos += size
                if pos - bucket_lo >= limit:  # cut at this parameter boundary
                    close(pos)
                    bucket_lo = pos
            ranges[g] = (group_lo, pos)
        if pos > bucket_lo:
            close(pos)
        self._layout, self._shapes, self._dtypes = layout, shapes, dtypes
        self._buffer, self._send, self._views, self._ranges = buf, send, views, ranges
        self._names, self._members, self._buckets, self._scratch = names, members, buckets, None
        return buf


def _check_param(params: Mapping[str, Tensor], name: str, shape: torch.Size, client: int) -> None:
    if name not in params:
        raise KeyError(f"client {client}: parameter {name!r} missing")
    got = tuple(params[name].shape)
    if got != tuple(shape):
        raise ValueError(f"client {client}: {name} has shape {got}, expected {tuple(shape)}")
