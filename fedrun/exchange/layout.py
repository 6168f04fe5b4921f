"""The wire's geometry: where the shared parameters lie in one flat buffer, and how it is cut into buckets.

A layout of the groups G_1..G_n a round shares (in GROUPS order) is one flat buffer

    [ parameters of G_1 | ... | parameters of G_n | s_1 ... s_n ]

each parameter a contiguous run in its own memory order (a channels_last weight stays NHWC), each group's
parameters in ``named_groups`` order, then one weight slot s_i per group (``fedrun.exchange.weights``).
Buckets cut it at parameter boundaries (``cut_buckets``) and each bucket is one collective, so ranks whose
layouts have the same parameter sizes issue the same collectives, whichever buffer each of them uses:

* packed: the buffer is the layout's own; a rank's hosted clients are copied into it and out again;
* adopted: the buffer is the run of an adopted flat tensor (``fedrun.exchange.adopt``) that holds these
  groups, so the rank's single client *is* the buffer (``Layout.aliased``) and nothing is copied.

The wire is what the collective sums: the buffer itself, or a bf16 twin of it when changes travel in bf16.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Signature = tuple[tuple[torch.Size, tuple[int, ...]], ...]
"""Shape and strides of each parameter of a group, in order: how its run in a layout is laid out."""


@functools.lru_cache(maxsize=4096)
def _dense_strides(shape: torch.Size, stride: tuple[int, ...]) -> tuple[int, ...]:
    # empty_like keeps the strides of a dense tensor (channels_last too); a meta tensor allocates nothing.
    return torch.empty_like(torch.empty_strided(shape, stride, device="meta")).stride()


def dense_strides(t: Tensor) -> tuple[int, ...]:
    """The strides of ``t`` when it is dense (contiguous, channels_last, ...), else the contiguous ones:
    the layout of ``t`` packed without gaps, element i of the run being element i of its memory."""
    return _dense_strides(t.shape, tuple(t.stride()))


def signature(tensors: Sequence[Tensor]) -> Signature:
    """The run ``tensors`` occupy in a layout: each one's shape and dense strides."""
    return tuple((t.shape, dense_strides(t)) for t in tensors)


def accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The widest dtype among ``tensors`` and float32: one buffer then holds every parameter exactly."""
    dtype = torch.float32
    for dt in {t.dtype for t in tensors}:
        dtype = torch.promote_types(dtype, dt)
    return dtype


def cut_buckets(sizes: Sequence[int], slots: int, limit: int | None) -> list[tuple[int, int]]:
    """Bounds [lo, hi) of the buckets over [parameters of ``sizes`` | ``slots`` weight slots].

    A bucket closes at the first parameter boundary where it holds at least ``limit`` elements (a parameter
    is never split); the slots end the last bucket, never a bucket of their own. None = one bucket. E.g.
    sizes (6, 2), 3 slots, limit 4: [(0, 6), (6, 11)].
    """
    total = sum(sizes) + slots
    limit = total if limit is None else max(1, limit)
    cuts, lo, pos = [], 0, 0
    for size in sizes:
        pos += size
        if pos - lo >= limit:
            cuts.append((lo, pos))
            lo = pos
    if cuts and lo == pos:
        cuts[-1] = (cuts[-1][0], total)
    else:
        cuts.append((lo, total))
    return cuts


def group_runs(
    cuts: Sequence[tuple[int, int]], sizes: Sequence[int], group_of: Sequence[int]
) -> list[list[tuple[int, int]]]:
    """Per bucket, the runs [i, j) of consecutive parameters of one group that start inside it (buckets
    from ``cut_buckets(sizes, ...)``; ``group_of[i]``: the group of parameter i)."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    out, i = [], 0
    for _, hi in cuts:
        runs = []
        while i < len(sizes) and offsets[i] < hi:
            j = i + 1
            while j < len(sizes) and offsets[j] < hi and group_of[j] == group_of[i]:
                j += 1
            runs.append((i, j))
            i = j
        out.append(runs)
    return out


@dataclass(frozen=True, eq=False)
class Part:
    """The parameters ``first..stop-1`` of one group lying in one bucket: the run [lo, hi) of the buffer."""

    group: int  # index into the layout's groups
    first: int  # index of its first parameter among the layout's parameters
    stop: int
    gfirst: int  # index of its first parameter among its group's
    lo: int
    hi: int
    glo: int  # ``lo`` relative to the start of the group: where the part lies in the group's reference
    names: tuple[str, ...]
    seg: Tensor  # buffer[lo:hi]
    wire: Tensor  # wire[lo:hi] (``seg`` when the wire is the buffer)
    views: tuple[Tensor, ...]  # one view of ``seg`` per parameter


@dataclass(frozen=True, eq=False)
class Bucket:
    """One collective: the run [lo, hi) of the wire and the parts it carries."""

    lo: int
    hi: int
    wire: Tensor
    parts: tuple[Part, ...]


def layout_key(
    groups: tuple[str, ...], first: Sequence[Tensor], sig: Signature, wire_dtype: torch.dtype | None
) -> tuple:
    """What a packed layout depends on (``sig``: ``signature(first)``): a cached one serves a later sync
    with the same key."""
    device = first[0].device if first else None
    return groups, wire_dtype, device, sig, tuple(t.dtype for t in first)


class Layout:
    """The flat buffer of one set of shared groups, its wire, its per-parameter views and its buckets.

    Args:
        groups: the shared groups, in GROUPS order.
        named_groups: group -> parameter names.
        first: the shared parameters of the rank's first hosted client, in layout order (they give the
            shapes, dtypes and memory orders).
        wire_dtype: dtype on the wire; None = the buffer's.
        bucket_bytes: bytes on the wire per bucket; None = one bucket.
        device: where the buffer lives.
        buffer: an adopted run (then ``aliased``: the only hosted client is this buffer); None = allocate.
        sig: ``signature(first)`` when the caller has it.
    """

    def __init__(
        self,
        groups: tuple[str, ...],
        named_groups: Mapping[str, Sequence[str]],
        first: Sequence[Tensor],
        wire_dtype: torch.dtype | None,
        bucket_bytes: int | None,
        device: torch.device,
        buffer: Tensor | None = None,
        sig: Signature | None = None,
    ) -> None:
        self.groups = groups
        self.signature = signature(first) if sig is None else sig
        self.key = layout_key(groups, first, self.signature, wire_dtype)
        self.names = tuple(n for g in groups for n in named_groups[g])
        sizes = [s.numel() for s, _ in self.signature]
        numel, ns = sum(sizes), len(groups)
        self.aliased = buffer is not None
        if buffer is None:
            buffer = torch.empty(numel + ns, dtype=accumulation_dtype(first), device=device)
        if buffer.numel() != numel + ns:
            raise ValueError(f"layout buffer has {buffer.numel()} elements, its groups need {numel + ns}")
        self.buffer = buffer
        self.wire = buffer if wire_dtype in (None, buffer.dtype) else torch.empty_like(buffer, dtype=wire_dtype)
        self.numel = numel
        offsets = [0]  # offsets[i]: where parameter i starts in the buffer
        for size in sizes:
            offsets.append(offsets[-1] + size)
        base = buffer.storage_offset()
        self.views = tuple(
            buffer.as_strided(shape, stride, base + pos)
            for (shape, stride), pos in zip(self.signature, offsets, strict=False)
        )
        group_of: list[int] = []  # the group index of every parameter
        self._group_first: list[int] = []  # index of every group's first parameter
        for gi, g in enumerate(groups):
            self._group_first.append(len(group_of))
            group_of.extend([gi] * len(named_groups[g]))
        self._group_first.append(len(group_of))
        self.ranges = {
            g: (offsets[self._group_first[gi]], offsets[self._group_first[gi + 1]]) for gi, g in enumerate(groups)
        }
        """Group -> its run [lo, hi) in the buffer."""
        limit = None if bucket_bytes is None else bucket_bytes // self.wire.element_size()
        cuts = cut_buckets(sizes, ns, limit)
        self.buckets = tuple(
            Bucket(lo, hi, self.wire[lo:hi], tuple(self._part(group_of[i], i, j, offsets) for i, j in runs))
            for (lo, hi), runs in zip(cuts, group_runs(cuts, sizes, group_of), strict=True)
        )
        self._scratch: Tensor | None = None
        self._scratch_parts: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}

    def _part(self, group: int, i: int, j: int, offsets: Sequence[int]) -> Part:
        """The parameters [i, j) of one group, inside one bucket."""
        lo, hi, first = offsets[i], offsets[j], self._group_first[group]
        seg = self.buffer[lo:hi]
        wire = seg if self.wire is self.buffer else self.wire[lo:hi]
        return Part(group, i, j, i - first, lo, hi, lo - offsets[first], self.names[i:j], seg, wire, self.views[i:j])

    @property
    def wire_slots(self) -> Tensor:
        """The weight slots on the wire, one per group in ``groups`` order."""
        return self.wire[self.numel :]

    def group_signature(self, group: int) -> Signature:
        """How the run of ``groups[group]`` is laid out (its reference must be laid out alike)."""
        return self.signature[self._group_first[group] : self._group_first[group + 1]]

    def scratch(self, part: Part) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Room for one more client's update of ``part``, laid out like it: the segment and its views
        (same shapes, strides and offsets, so element i of the scratch belongs to element i of the part).
        Made once per layout, when a rank first has two contributors."""
        if self._scratch is None:
            self._scratch = torch.empty_like(self.buffer)
        found = self._scratch_parts.get(part.lo)
        if found is None:
            buf, shift = self._scratch, self._scratch.storage_offset() - self.buffer.storage_offset()
            views = tuple(buf.as_strided(v.shape, v.stride(), v.storage_offset() + shift) for v in part.views)
            found = self._scratch_parts[part.lo] = (buf[part.lo : part.hi], views)
        return found


def client_tensors(layout: Layout, client: int, params: Mapping[str, Tensor]) -> list[Tensor]:
    """A further hosted client's shared parameters in ``layout``'s order, checked against the layout."""
    out = []
    for n, (shape, _) in zip(layout.names, layout.signature, strict=True):
        t = params.get(n)
        if t is None:
            raise KeyError(f"client {client}: parameter {n!r} missing")
        if t.shape != shape:
            raise ValueError(f"client {client}: {n} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        out.append(t)
    return out
