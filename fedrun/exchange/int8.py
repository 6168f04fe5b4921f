"""Stage 3 for ``exchange_dtype='int8'``: the average change, quantised per block, by reduce-scatter + all-gather.

A sum of int8 codes with different scales is no int8 sum, so no all-reduce can add them. Instead (the
decomposition of a ring all-reduce, each half done by hand; ``fedrun.exchange.quant`` has the maths):

    1. quantise   every rank: y = its weighted change sum_{k hosted} p_k (theta_k - ref) + its residual,
                  int8 codes + one fp32 scale per block of 256; the residual becomes y - deq(y)
    2. all-to-all every rank sends shard j of its codes and scales (and its weight slots) to rank j
    3. reduce     rank j dequantises the shards it received and sums them in fp32, in rank order, adds its
                  own (owner's) residual, re-quantises the sum and keeps what that lost as that residual
    4. all-gather every rank receives every owner's quantised shard (and its slot sums): the average change,
                  identical on every rank, bit for bit, written into the layout's buffer

Both collectives carry ``Geometry.wire_bytes`` per rank (int8 codes, scales, slots): 25.4 % of the fp32
buffer plus less than one block per rank of padding, and a rank's wire moves about 2 (W-1)/W of it, as for
an all-reduce. It uses ``all_to_all_single`` and ``all_gather_single`` (``all_gather_into_tensor`` in older
torch) on uint8 tensors only: gloo supports both on CPU (torch 2.14, tested here with 2 and 3 ranks), NCCL
on GPUs (not run here). No bucketing: the two collectives carry all shared groups at once.

Error feedback is per *rank*: the rank quantises the exact fp32 sum of its hosted clients' weighted
changes once (several virtual clients on one rank share one int8 upload, so they share one residual), and
rank j also keeps the residual of re-quantising shard j. Both are in weighted units of the average change,
so a residual added in a later round (even one where the rank contributes nothing, as under USplit or
client sampling) is exactly the part of the average that earlier rounds lost. ``Int8Feedback`` is that
state; it lives in the checkpoint of the rank's lowest hosted client (``fedrun.client.ClientState``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fedrun.exchange.layout import Bucket, Layout
from fedrun.exchange.quant import BLOCK, Geometry, Residual, dequantise, quantise, reduce_shard

_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10


class Int8Feedback:
    """A rank's error feedback: the residual of its upload (``sender``, all values) and of re-quantising the
    shard it owns (``owner``). Made for one geometry, rank and set of hosted clients; a state saved under
    others (a resume on another number of ranks) is dropped with a warning, and feedback restarts at 0.

    ``enabled=False`` (``federation.error_feedback=false``, for comparison): every sync starts from residuals
    of 0, so what a quantisation loses is lost."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.key: list | None = None
        self.sender: Residual | None = None
        self.owner: Residual | None = None
        self._loaded: dict | None = None

    def residuals(self, key: list, geometry: Geometry, device: torch.device) -> tuple[Residual, Residual]:
        """The residuals for ``key`` (made at 0, or taken from the loaded state when it was saved for it)."""
        if self.key != key or self.sender is None or self.owner is None:
            self.sender, self.owner = Residual(geometry.padded, device), Residual(geometry.shard, device)
            loaded, self._loaded = self._loaded, None
            if loaded is not None and loaded["key"] == key:
                self.sender.error.copy_(loaded["sender"])
                self.owner.error.copy_(loaded["owner"])
            elif loaded is not None:
                warnings.warn(
                    f"int8 error feedback saved for {loaded['key']} does not fit this sync {key}: it restarts at 0",
                    stacklevel=3,
                )
            self.key = key
        if not self.enabled:
            self.sender.error.zero_()
            self.owner.error.zero_()
        return self.sender, self.owner

    def state_dict(self) -> dict | None:
        """Tensors and plain values (loadable with weights_only=True); None before the first int8 sync."""
        if self.sender is None or self.owner is None:
            return self._loaded
        return {"key": self.key, "sender": self.sender.error.cpu().clone(), "owner": self.owner.error.cpu().clone()}

    def load_state_dict(self, state: dict | None) -> None:
        """Keep ``state`` until the next int8 sync tells whether it fits (None: restart at 0)."""
        self.key, self.sender, self.owner, self._loaded = None, None, None, state


class Int8Transport:
    """The int8 sync over ``group`` (None = the default group if one is initialised, else one process, which
    quantises alike and sends nothing)."""

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, feedback: Int8Feedback) -> None:
        self.group, self.world, self.feedback = group, world_size, feedback
        self.rank = 0 if world_size == 1 else dist.get_rank(group)
        self._padded: dict[tuple[Geometry, torch.device], Tensor] = {}  # the upload, its padding kept at 0

    def reduce(self, layout: Layout, fill: Callable[[Bucket], None], hosted: Sequence[int]) -> int:
        """Fill every bucket (weighted changes and slots), then steps 1-4: the average change into the buffer,
        the summed weight slots into ``layout.wire_slots``. Returns the bytes per rank (0 on one process)."""
        for bucket in layout.buckets:
            fill(bucket)
        ns = len(layout.groups)
        geo = Geometry(layout.numel, ns, self.world)
        key = [self.world, self.rank, list(hosted), list(layout.groups), layout.numel]
        sender, owner = self.feedback.residuals(key, geo, layout.buffer.device)
        values = layout.buffer[: layout.numel]
        x = self._padded.get((geo, values.device))
        if x is None:
            x = self._padded[(geo, values.device)] = torch.zeros(geo.padded, dtype=torch.float32, device=values.device)
        x[: layout.numel].copy_(values)
        q, s = sender.compress(x)  # step 1
        send = self._chunks(geo, layout.wire_slots.to(torch.float32), s.view(self.world, -1), q.view(self.world, -1))
        recv = self._all_to_all(send)  # step 2
        slots, scales, codes = self._split(geo, recv)
        shard = reduce_shard(list(codes), list(scales))  # step 3
        q2, s2 = owner.compress(shard)
        sums = slots.double().sum(dim=0).to(torch.float32)  # this owner's slot sums, rank order
        mine = self._chunks(geo, sums, s2.view(1, -1), q2.view(1, -1))
        slots, scales, codes = self._split(geo, self._all_gather(mine[0]))  # step 4
        average = dequantise(codes.reshape(-1), scales.reshape(-1))
        values.copy_(average[: layout.numel])
        layout.wire_slots.copy_(_farthest_from_one(slots))
        return 0 if self.world == 1 else geo.wire_bytes

    # -- the byte chunks -----------------------------------------------------------------------------------
    @staticmethod
    def _chunks(geo: Geometry, slots: Tensor, scales: Tensor, codes: Tensor) -> Tensor:
        """One uint8 chunk per row (``Geometry``): [slots | scales of the row | codes of the row]; the same
        ``slots`` in every row."""
        rows = codes.shape[0]
        out = torch.empty(rows, geo.chunk_bytes, dtype=torch.uint8, device=codes.device)
        a, b = 4 * geo.slots, 4 * geo.slots + 4 * geo.blocks
        out[:, :a] = slots.reshape(1, geo.slots).contiguous().view(torch.uint8)
        out[:, a:b] = scales.contiguous().view(torch.uint8)
        out[:, b:] = codes.view(torch.uint8)
        return out

    @staticmethod
    def _split(geo: Geometry, chunks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(slots float32 [W, slots], scales float32 [W, blocks], codes int8 [W, shard]) of W chunks."""
        chunks = chunks.view(-1, geo.chunk_bytes)
        a, b = 4 * geo.slots, 4 * geo.slots + 4 * geo.blocks
        slots = chunks[:, :a].contiguous().view(torch.float32)
        scales = chunks[:, a:b].contiguous().view(torch.float32)
        codes = chunks[:, b:].contiguous().view(torch.int8)
        return slots, scales, codes

    def _all_to_all(self, send: Tensor) -> Tensor:
        if self.world == 1:
            return send
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def _all_gather(self, chunk: Tensor) -> Tensor:
        if self.world == 1:
            return chunk.view(1, -1)
        out = torch.empty(self.world * chunk.numel(), dtype=torch.uint8, device=chunk.device)
        _gather(out, chunk.contiguous().view(-1), group=self.group)
        return out.view(self.world, -1)


def _farthest_from_one(slot_sums: Tensor) -> Tensor:
    """Per group, of the owners' slot sums (one row each), the one farthest from 1: every rank sees the same
    rows, so every rank's weight check (``check_weight_sums``) decides alike, even if ranks disagreed."""
    worst = (slot_sums.double() - 1).abs().argmax(dim=0)
    return slot_sums.gather(0, worst[None, :])[0]


__all__ = ["BLOCK", "Int8Feedback", "Int8Transport", "quantise"]
