"""The exchange of a round: FedAvg of the shared parameter groups of all clients, whatever rank hosts them.

One sync is four stages, each a module of its own:

    1. who takes part   ``weights``    p_k,g = w_k / sum_{j in C_g} w_j, and this rank's weight slots
    2. client update    ``update``     buffer = sum_{k hosted} p_k,g u_k,  u_k = theta_k or theta_k - ref
    3. transport        ``transport``  the wire (``layout``: buffer or its bf16 twin) summed over the ranks
                        (int8: ``int8``, quantised blocks by all-to-all + all-gather, with error feedback)
    4. server update    ``server``     theta_new = average (or ref + average change), into every client

There is no server: the weights are normalised before the collective, so the all-reduced sum IS the
average and every rank ends with the identical result, bit for bit. One slot per group travels with the
parameters and must sum to 1: ranks that disagree about the plan fail loudly instead of averaging wrong.

A rank's buffer is its own ("packed": several clients per rank, or parameters not adopted) or, after
``adopt``, the flat tensor its single client lives in ("in place": nothing is copied). Both are layouts
of the same geometry through the same stages: the results are bit-identical and ranks may mix the two.
The training loop never calls ``torch.distributed``: this package does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fedrun.config import EXCHANGE_DTYPES
from fedrun.exchange.adopt import Adopted, adopt_parameters
from fedrun.exchange.int8 import Int8Feedback, Int8Transport
from fedrun.exchange.layout import (
    Bucket,
    Layout,
    Signature,
    accumulation_dtype,
    client_tensors,
    layout_key,
    signature,
)
from fedrun.exchange.private import Privacy
from fedrun.exchange.reference import GroupReference, Reference
from fedrun.exchange.server import FedAvg, ServerOptimizer, write_back
from fedrun.exchange.transport import Transport, wait_all
from fedrun.exchange.update import CHANGE_DTYPES, QuantisedChanges, Update, choose_update, slot_tolerance
from fedrun.exchange.weights import RankShare, WeightSumError, check_weight_sums, data_shares, rank_share
from fedrun.methods import GROUPS, RoundPlan

DEFAULT_BUCKET_BYTES = 32 * 2**20
"""Default bytes on the wire per collective (``Exchange(bucket_bytes=...)``): the paper's UNet (12 MB) goes in
one collective, Ho et al.'s (143 MB) in five. Measured on 2 gloo ranks (BENCHMARKS.md): 2 MiB buckets made
the in-place sync of the 143 MB model 1.25-1.5x one flat all-reduce, 32 MiB 1.05-1.22x (per-collective cost
outweighs the overlap there)."""


@dataclass(frozen=True)
class SyncStats:
    """What one ``Exchange.sync`` did on this rank."""

    bytes: int
    """Bytes handed to the collective (numel * element_size of the all-reduced buffer; int8: the codes,
    scales and slots handed to the all-to-all, ``fedrun.exchange.quant.Geometry.wire_bytes``); 0 without one."""
    seconds: float
    """Wall time of the whole sync (update, all-reduce, server update; the updates overlap the wire)."""
    collectives: int
    """Number of collectives issued: one per bucket (int8: 2), 0 for a single process or nothing shared."""
    groups: tuple[str, ...] = ()
    """The groups averaged."""
    pseudo_grad_norm: float | None = None
    """With a server optimiser: ||ref - average|| over the shared groups, the step's pseudo-gradient."""


class Exchange:
    """Averages the shared parameter groups of all clients, whatever rank hosts them.

    Args:
        named_groups: group -> parameter names (e.g. ``unet.groups.parameter_groups(model)``).
        client_sizes: |D_k| for every client k of the federation (not only the hosted ones).
        group: the process group; None = the default group if one is initialised, else single process.
        exchange_dtype: ``"fp32"``, ``"bf16"`` to halve the bytes on the wire, or ``"int8"`` (about a quarter).
        bucket_bytes: bytes on the wire per collective: the shared parameters are cut into buckets of about
            this size at parameter boundaries (the weight slots end the last bucket); None = one bucket.
            Bucketing changes no rounding of this package (see ``fedrun.exchange.transport``).
        privacy: DP-FedAvg's clipping and noise and/or secure aggregation's masks (``fedrun.exchange.private``);
            every sync then sends changes against the reference (``set_reference`` first).
        server: the server update (``fedrun.exchange.server.make_server``); None = plain FedAvg.
        device: where a packed buffer lives; None = where the first hosted client's parameters are. Clients
            waiting in host memory (``fedrun.residency``) are then summed on the device (NCCL needs it).

    Failures: a packed sync checks the summed weights before it writes anything, so a sync that raises
    leaves every hosted client as it was. An in-place sync has scaled its parameters before the collective:
    if that collective or the check fails, the rank's shared parameters are no longer valid (the error says
    so) and the run must resume from its last checkpoint, which is what a restarted run does anyway.

    bf16: once every shared group has a reference (the last averaged value, identical on every rank, or one
    given to ``set_reference``), the wire carries the weighted changes theta_k - ref in bf16 and the new value
    is ref + average change (``fedrun.exchange.update``); a sync without one exchanges values in fp32 and
    makes them the reference. The weight slots travel in bf16 too and are checked to 1e-2 there.

    int8: the same changes, in fp32 on the rank, then quantised per block of 256 with error feedback and
    reduced by all-to-all + all-gather (``fedrun.exchange.int8``; its state is ``feedback``). Not bucketed.
    A server optimiser steps the reference along ref - average: it keeps the reference in fp32 too, and
    needs one from the start (``set_reference`` with the values every client starts from).
    """

    def __init__(
        self,
        named_groups: Mapping[str, Sequence[str]],
        client_sizes: Sequence[int],
        group: dist.ProcessGroup | None = None,
        exchange_dtype: str = "fp32",
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
        privacy: Privacy | None = None,
        server: FedAvg | None = None,
        device: torch.device | None = None,
        error_feedback: bool = True,
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
        if bucket_bytes is not None and (
            isinstance(bucket_bytes, bool) or int(bucket_bytes) != bucket_bytes or bucket_bytes <= 0
        ):
            raise ValueError(f"bucket_bytes must be a positive integer or None, got {bucket_bytes!r}")
        self.named_groups = {g: list(names) for g, names in named_groups.items()}
        self.client_sizes = [int(s) for s in client_sizes]
        self.shares = data_shares(self.client_sizes)
        self.exchange_dtype = exchange_dtype
        self.bucket_bytes = None if bucket_bytes is None else int(bucket_bytes)
        self.device = None if device is None else torch.device(device)
        self.transport = Transport(group)
        self.server = server if server is not None else FedAvg()
        self.optimizer = self.server if isinstance(self.server, ServerOptimizer) else None
        """The server optimiser, None for plain FedAvg."""
        self.feedback = Int8Feedback(error_feedback) if exchange_dtype == "int8" else None
        """int8: this rank's error feedback (checkpointed with its lowest hosted client; off: always 0)."""
        self._int8: Int8Transport | None = None
        self.reference = Reference(self.named_groups)
        """bf16, int8, privacy or a server optimiser: the last shared value of every shared parameter, identical
        on every rank."""
        self.privacy = privacy
        """DP clipping and noise, secure aggregation (``fedrun.exchange.private``): changes against the reference."""
        self.adopted: Adopted | None = None
        """After ``adopt``: the flat tensor the module's parameters live in."""
        self.packed_layout: Layout | None = None
        """The layout of the last packed sync (its own buffer), kept while the next ones match it."""
        self._in_place: dict[tuple, Layout] = {}  # (groups, wire dtype) -> aliased layout of ``adopted``
        self._in_place_sig: dict[tuple[str, ...], Signature] = {}  # groups -> signature of the adopted run
        self._names_of: dict[tuple[str, ...], list[str]] = {}

    @property
    def _sends_changes(self) -> bool:
        """Whether syncs send changes against a reference: bf16 and int8 (once it exists), always with privacy."""
        return self.exchange_dtype in CHANGE_DTYPES or self.privacy is not None

    @property
    def world_size(self) -> int:
        return self.transport.world_size

    def set_reference(self, params: Mapping[str, Tensor]) -> None:
        """bf16, int8, privacy or a server optimiser: values every client holds now, identical on every rank (e.g.
        the broadcast initial model), so that even the first sync exchanges changes (privacy needs them) and a
        server optimiser has its first step's ref. Call it on every rank alike."""
        if self._sends_changes or self.optimizer is not None:
            self.reference.set(params)

    def reset_reference(self) -> None:
        """Forget the bf16 reference (e.g. after loading parameters); the next sync is in fp32."""
        self.reference.clear()

    def adopt(self, module: nn.Module) -> bool:
        """Move the module's grouped parameters into one flat tensor, so that syncs work in place.

        Call it before an optimiser takes copies of anything, and never replace ``.data`` afterwards
        (``fedrun.exchange.adopt``). A sync whose only hosted client holds exactly these tensors (as a
        rank's single client aliases the module's) then scales them and all-reduces them where they lie.
        Returns False, and changes nothing, when the grouped parameters differ in dtype or device.
        """
        adopted = adopt_parameters(module, self.named_groups)
        if adopted is None:
            return False
        self.adopted, self._in_place, self._in_place_sig = adopted, {}, {}
        return True

    @torch.no_grad()
    def sync(
        self, plan: RoundPlan, client_params: Mapping[int, Mapping[str, Tensor]], fedavg: bool = False
    ) -> SyncStats:
        """Average this round's shared groups and write them, in place, into every hosted client.

        ``client_params`` maps each client hosted by this rank to its live parameters by name. Every rank
        must call ``sync`` with the same plan. Every hosted client receives every shared group (under
        USplit every group is shared, so every client gets the whole model); local groups are not touched,
        and neither are clients the plan did not sample, except that they too receive the shared groups.
        ``fedavg``: the plain average whatever the server optimiser, its state and fp32 reference untouched
        (the final average of the EMA copies, which are no server model).
        """
        start = time.perf_counter()
        share = rank_share(plan, self.shares, client_params)
        missing = [g for g in share.groups if g not in self.named_groups]
        if missing:
            raise ValueError(f"plan shares {missing} but the exchange knows no parameters for it")
        if not share.groups:
            return SyncStats(0, time.perf_counter() - start, 0, ())
        hosted = sorted(client_params)
        first = self._first(share.groups, client_params[hosted[0]])
        device = self.device or (first or list(client_params[hosted[0]].values()))[0].device
        run = self._adopted_run(share.groups, first, len(hosted))
        sig = self._signature(share.groups, first, run)
        server = self.server if not fedavg else FedAvg()
        refs = self._references(share.groups, sig, accumulation_dtype(first), device, server)
        if refs is None and server is self.optimizer:
            raise ValueError(f"{server.name}: no reference to step from; call set_reference on every rank first")
        private = self.privacy
        update = (
            choose_update(self.exchange_dtype, refs is not None)
            if private is None
            else private.kind(self.exchange_dtype, refs)
        )
        layout = self._layout(share.groups, first, sig, update, device, run)
        # Every hosted client receives every shared group: check them all before the first collective.
        sources = {k: first if i == 0 else client_tensors(layout, k, client_params[k]) for i, k in enumerate(hosted)}
        if private is not None and refs is not None:
            update = private.prepare(update, plan, share, layout, sources, refs)
        tol = slot_tolerance(layout.wire.dtype)
        alone = self.world_size == 1
        if alone:  # the local slots are the sums: check them before anything is written
            check_weight_sums(plan.round, share.groups, share.slots, tol, written=False)
        fill = partial(self._fill, layout, update, share, sources, refs)
        quantised = isinstance(update, QuantisedChanges)
        handles = [] if quantised else self.transport.send(layout.buckets, fill)
        written = layout.aliased
        try:
            int8_bytes = self._int8_reduce(layout, fill, hosted) if quantised else 0
            wait_all(handles)
            if not alone:
                check_weight_sums(plan.round, share.groups, update.decode_slots(layout.wire_slots), tol, written)
            written = True
            self._receive(layout, update, refs, [sources[k] for k in hosted], device, server)
        except BaseException as e:
            if written:  # references may be half updated: the next sync exchanges values again
                self.reset_reference()
            if layout.aliased and not isinstance(e, WeightSumError):  # that one says so itself
                e.add_note(
                    "this rank's shared parameters were scaled in place and are no longer valid: "
                    "resume from the last checkpoint"
                )
            raise
        if layout.buffer.is_cuda:
            torch.cuda.synchronize(layout.buffer.device)
        nbytes = int8_bytes if quantised or alone else layout.wire.numel() * layout.wire.element_size()
        collectives = 0 if alone else 2 if quantised else len(handles)
        norm = server.pseudo_grad_norm() if isinstance(server, ServerOptimizer) else None
        return SyncStats(nbytes, time.perf_counter() - start, collectives, share.groups, norm)

    def sync_once(self, plan: RoundPlan, client_params: Mapping[int, Mapping[str, Tensor]]) -> SyncStats:
        """A one-off sync outside the rounds (the EMA copies at the end of a run): plain FedAvg, so a server
        optimiser's state and reference are left alone, and for int8 fp32 values, leaving its reference and
        error feedback as they are (they belong to the rounds' parameters, not to these tensors)."""
        if self.exchange_dtype != "int8":
            return self.sync(plan, client_params, fedavg=True)
        self.exchange_dtype = "fp32"
        try:
            return self.sync(plan, client_params, fedavg=True)
        finally:
            self.exchange_dtype = "int8"

    # -- stages, per sync ---------------------------------------------------------------------------------
    def _int8_reduce(self, layout: Layout, fill: Callable[[Bucket], None], hosted: list[int]) -> int:
        """int8: fill the layout and reduce it (``Int8Transport.reduce``); the bytes per rank."""
        if self._int8 is None:
            assert self.feedback is not None
            self._int8 = Int8Transport(self.transport.group, self.world_size, self.feedback)
        return self._int8.reduce(layout, fill, hosted)

    def _references(
        self, groups: tuple[str, ...], sig: Signature, dtype: torch.dtype, device: torch.device, server: FedAvg
    ) -> list[GroupReference] | None:
        """bf16, int8, privacy or a server optimiser: every shared group's reference, laid out like its run;
        None unless all of them exist."""
        if not self._sends_changes and server is not self.optimizer:
            return None
        pos, refs = 0, []
        for g in groups:
            count = len(self.named_groups[g])
            ref = self.reference.get(g, sig[pos : pos + count], dtype, device)
            if ref is None:
                return None
            refs.append(ref)
            pos += count
        return refs

    def _fill(
        self,
        layout: Layout,
        update: Update,
        share: RankShare,
        sources: Mapping[int, list[Tensor]],
        refs: list[GroupReference] | None,
        bucket: Bucket,
    ) -> None:
        """Stage 2 for one bucket: every part's weighted update, then (last bucket) the weight slots."""
        for part in bucket.parts:
            ref = None if refs is None else refs[part.group].flat[part.glo : part.glo + part.hi - part.lo]
            update.accumulate(layout, part, share.contributors[part.group], sources, ref)
        if bucket is layout.buckets[-1]:
            layout.wire_slots.copy_(update.encode_slots(share.slots))

    def _receive(
        self,
        layout: Layout,
        update: Update,
        refs: list[GroupReference] | None,
        clients: list[list[Tensor]],
        device: torch.device,
        server: FedAvg,
    ) -> None:
        """Stage 4, after the check: every part's new value (the reference updated) into every client."""
        if refs is None and self.exchange_dtype in CHANGE_DTYPES:  # values exchanged: they become the references
            refs = [
                self.reference.create(g, layout.group_signature(i), layout.buffer.dtype, device)
                for i, g in enumerate(layout.groups)
            ]
        sigs = [layout.group_signature(i) for i in range(len(layout.groups))]
        server.begin(layout.groups, sigs, layout.buffer.dtype, device)
        for bucket in layout.buckets:
            for part in bucket.parts:
                update.decode(part)
                ref = refs[part.group] if refs is not None else None
                ref_seg = None if ref is None else ref.flat[part.glo : part.glo + part.hi - part.lo]
                new = server.step(part.seg, ref_seg, update.changes, part)
                views = part.views if new is part.seg else ref.views[part.gfirst : part.gfirst + part.stop - part.first]
                write_back(part, new, views, clients, layout.aliased)

    # -- layouts and clients ----------------------------------------------------------------------------
    def _adopted_run(self, groups: tuple[str, ...], first: list[Tensor], nhosted: int) -> Tensor | None:
        """The run of the adopted flat tensor that holds ``groups``, when the only hosted client is the
        adopted module (then the sync works in place), else None."""
        if nhosted != 1 or self.adopted is None:
            return None
        run = self.adopted.run(groups)
        return run if run is not None and self.adopted.holds(self._names(groups), first) else None

    def _signature(self, groups: tuple[str, ...], first: list[Tensor], run: Tensor | None) -> Signature:
        """``signature(first)``; in place it cannot change, so it is made once per set of groups."""
        if run is None:
            return signature(first)
        if groups not in self._in_place_sig:
            self._in_place_sig[groups] = signature(first)
        return self._in_place_sig[groups]

    def _layout(
        self,
        groups: tuple[str, ...],
        first: list[Tensor],
        sig: Signature,
        update: Update,
        device: torch.device,
        run: Tensor | None,
    ) -> Layout:
        """The aliased layout of the adopted ``run``, else the packed one (rebuilt only when its key changes)."""
        wire = update.wire_dtype
        if run is not None:
            key = (groups, wire)
            if key not in self._in_place:
                self._in_place[key] = Layout(
                    groups, self.named_groups, first, wire, self.bucket_bytes, device, buffer=run, sig=sig
                )
            return self._in_place[key]
        if self.packed_layout is None or self.packed_layout.key != layout_key(groups, first, sig, wire):
            self.packed_layout = Layout(groups, self.named_groups, first, wire, self.bucket_bytes, device, sig=sig)
        return self.packed_layout

    def _names(self, groups: tuple[str, ...]) -> list[str]:
        """The parameters of ``groups``, in layout order (made once per set of groups)."""
        names = self._names_of.get(groups)
        if names is None:
            names = self._names_of[groups] = [n for g in groups for n in self.named_groups[g]]
        return names

    def _first(self, groups: tuple[str, ...], params: Mapping[str, Tensor]) -> list[Tensor]:
        """The first hosted client's shared parameters, in layout order (they define the layout)."""
        try:
            return [params[n] for n in self._names(groups)]
        except KeyError:
            missing = next((n, g) for g in groups for n in self.named_groups[g] if n not in params)
            raise KeyError(f"parameter {missing[0]!r} of group {missing[1]!r} missing from the hosted client") from None
