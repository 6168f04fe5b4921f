"""The rounds of a federated run: ``Run`` owns everything a round touches, one method per step of the run.

Data flow of one round r (1-based)::

    every hosted client: local training (fedrun.client)        -> no communication
    exchange.sync(plan_r, hosted client parameters)            -> one all-reduce (fedrun.exchange)
    gather per-client losses to rank 0, log, checkpoint         -> rank 0 writes shared files,
                                                                   every rank its own clients

Only rank 0 has shared side effects: its sink prints and writes TensorBoard events, every other rank's sink
drops everything. Starting the same command on the same run directory resumes from the newest intact
checkpoint; the data order, noise and dropout of a round are derived from seeds, so a resumed run replays an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

from fedrun import checkpoint as ckpt
from fedrun import dist
from fedrun.build import image_shape
from fedrun.client import derive_seed, local_steps
from fedrun.comm import NO_COLLECTIVE, CommLog, paper_round_count, wire_text
from fedrun.config import RunConfig
from fedrun.finite import DivergedError, check_finite  # noqa: F401 - DivergedError: fedrun.loop's, as before
from fedrun.hooks import Scorer, ScorerFactory
from fedrun.images import image_grid, save_png
from fedrun.methods import GROUPS, RoundPlan, get_method
from fedrun.output import ConsoleSink, Sink, rank_sink
from fedrun.privacy.run import RunPrivacy, round_text
from fedrun.resume import agree_round, claim, gather_ints, load_server_state, resume_counters, server_state
from fedrun.rundir import RunDir, atomic_save, atomic_write_bytes
from fedrun.setup import setup_clients


@dataclass(frozen=True)
class RoundStats:
    """What one round did, over all ranks."""

    round: int
    loss: float
    """Mean over all clients of each client's mean local loss."""
    images_per_s: float
    """Training images of all clients per second of compute + sync."""
    compute_s: float
    """Local training of this rank's clients."""
    sync_s: float
    """This rank's exchange."""


class Run:
    """One rank's part of a federated run: its clients, their trainer and exchange, the run directory and the
    sink. ``Run.open`` checks the run directory first; a finished run builds nothing."""

    def __init__(
        self,
        cfg: RunConfig,
        ctx: dist.DistContext,
        run_dir: RunDir,
        sink: Sink,
        scorer_factory: ScorerFactory | None = None,
    ) -> None:
        self.cfg, self.ctx, self.dir, self.sink = cfg, ctx, run_dir, sink
        self.method = get_method(cfg.federation.method)
        self.labels = self.method.model_labels(cfg.federation.clients)
        self.hosted = setup_clients(cfg, ctx, self.method, sink)
        self.start_round = 0
        self.last_checkpoint = 0
        """The newest round checkpointed (or resumed from): kept when the run stops."""
        self.comm_log = CommLog()  # replaced by resume(), which knows the totals so far
        self.privacy = RunPrivacy.create(cfg.federation)  # DP's accountant (None: no DP, no secure aggregation)
        self._scorer_factory = scorer_factory
        self._scorer: Scorer | None = None

    @classmethod
    def open(cls, cfg: RunConfig, ctx: dist.DistContext, scorer_factory: ScorerFactory | None = None) -> Run | None:
        """Check and claim the run directory, then set this rank up; None when the run finished already."""
        run_dir = RunDir(cfg.run_dir())
        sink = rank_sink(ctx.is_main, run_dir.tb)
        try:
            if not claim(cfg, ctx.is_main, run_dir, sink.warn):
                sink.info(f"{run_dir.root} already finished {cfg.federation.rounds} rounds; nothing to do")
                sink.close()
                return None
            run = cls(cfg, ctx, run_dir, sink, scorer_factory)
            _start_run_dir(cfg, ctx, run_dir)  # only now: a start that fails leaves no run directory behind
            return run
        except BaseException:
            sink.close()
            raise

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.sink.close()  # also on an error: the bar ends and the events written so far are kept

    # -- rounds ----------------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the newest round every rank has intact, if any (every rank its own clients), then announce the
        rounds."""
        fed, h = self.cfg.federation, self.hosted
        needed = [ckpt.client_file(Path(), k).name for k in h.clients]
        needed += [ckpt.shared_file(Path()).name] if self.ctx.is_main else []
        self.start_round, rdir = agree_round(self.dir, needed, self.ctx.is_main, self._warn)
        counters = resume_counters(rdir, self.ctx.is_main)
        if self.privacy is not None:  # epsilon continues from the checkpoint's accountant
            self.privacy.resume(rdir, self.ctx.is_main)
        if rdir is not None:
            for k, client in h.clients.items():
                sd = ckpt.safe_load(ckpt.client_file(rdir, k), map_location=h.residency.storage)
                client.load_state_dict(sd)
            self.sink.info(f"resuming {self.dir.root} after round {self.start_round} of {fed.rounds}")
        self.last_checkpoint = self.start_round
        # bf16 exchange sends changes against the last shared values, and a server optimiser steps from them,
        # identical on every rank: the initial model, or after a resume the checkpointed shared parameters.
        h.exchange.set_reference(h.first.params)
        load_server_state(h.exchange, rdir, self.ctx.is_main, h.first.params)  # after the reference it steps from
        self.comm_log = CommLog(
            self.dir.comm_log if self.ctx.is_main else None,
            truncate_after=self.start_round,
            warn=self.sink.warn,
            **counters,
        )
        steps = sum(
            local_steps(c.size, self.cfg.optim.batch_size, fed.local_epochs, fed.max_local_steps)
            for c in h.clients.values()
        )
        self.sink.start_rounds(fed.rounds, self.start_round, steps)
        if self.start_round == 0:
            self.sink.info(
                f"{fed.method} | {fed.clients} client{'s' * (fed.clients != 1)} on {self.ctx.world_size} rank(s) | "
                f"sizes {h.sizes} | {h.group_sizes['total']:,} parameters | run dir {self.dir.root}"
            )
            self.sink.config(self.cfg.to_json(), self.cfg.to_flat_dict(), metrics=("round/loss", "fid/train"))

    def rounds(self) -> range:
        """The rounds still to run (from 1)."""
        return range(self.start_round + 1, self.cfg.federation.rounds + 1)

    def round(self, rnd: int) -> RoundStats:
        """Train every hosted client the round samples, exchange (every client receives), count and log round
        ``rnd``."""
        fed, h = self.cfg.federation, self.hosted
        plan = self.method.plan(rnd, fed.clients, fed.seed, fed.sample_clients)
        t0 = time.perf_counter()
        losses: dict[int, float] = {}
        images = 0
        for k, client in h.clients.items():
            if k not in plan.participants:  # not sampled: it neither trains nor contributes this round
                continue
            with h.residency.turn(client):  # host residency: swapped in for its turn (fedrun.residency)
                res = h.trainer.train_round(client, rnd, self._trainable(plan, k), self._anchored(plan))
            losses[k] = res.loss_sum / res.steps
            images += res.images
            self.sink.advance_steps(res.steps)
        compute_s = time.perf_counter() - t0
        sync = h.exchange.sync(plan, {k: c.params for k, c in h.clients.items()})
        sync_s = time.perf_counter() - t0 - compute_s
        check_finite(rnd, fed.clients, h.clients, losses, h.exchange.adopted, self.last_checkpoint)

        # One gather per round brings every rank's losses, images, bytes and training time to rank 0.
        per_rank = dist.gather_dict(
            {self.ctx.rank: (losses, images, sync.bytes, compute_s)},
            tuple[dict[int, float], int, int, float],
            "round losses",
        ).values()
        rank_losses, rank_images, rank_bytes, rank_compute_s = zip(*per_rank, strict=True)
        all_losses = {k: v for losses_of_rank in rank_losses for k, v in losses_of_rank.items()}
        paper = paper_round_count(plan, h.group_sizes, first_round=rnd == 1)
        collective = self.ctx.world_size > 1  # one process averages in memory: its 0 bytes mean none, not free
        priv = self.privacy.after_round(rnd, h.exchange.privacy, self.sink, self._warn) if self.privacy else {}
        row = self.comm_log.append(
            rnd,
            paper_params=paper,
            bytes_moved=sync.bytes,
            sync_seconds=sync_s,
            collective=collective,
            sampled=plan.sampled,
            extra=priv,
        )
        stats = RoundStats(
            rnd,
            loss=float(np.mean(list(all_losses.values()))),
            images_per_s=sum(rank_images) / max(compute_s + sync_s, 1e-9),
            compute_s=compute_s,
            sync_s=sync_s,
        )
        sink = self.sink
        for k, v in sorted(all_losses.items()):
            sink.scalar(f"client/{k}/loss", v, rnd)
        sink.scalar("round/loss", stats.loss, rnd)
        if plan.sampled is not None:
            sink.scalar("round/sampled_clients", len(plan.sampled), rnd)
        if sync.pseudo_grad_norm is not None:  # the same on every rank
            sink.scalar(f"server/pseudo_grad_norm/{fed.server_optimizer}", sync.pseudo_grad_norm, rnd)
        sink.scalar(f"comm/paper_params_cum/{fed.method}", row["paper_params_cum"], rnd)
        sink.scalar(f"comm/bytes_cum/{fed.method}", row["bytes_cum"], rnd)
        sink.scalar("comm/bytes_all_ranks", sum(rank_bytes), rnd)
        if not collective and rnd == 1:  # once per run: those 0s mean no collective, not a free one
            sink.text("comm/bytes", f"{NO_COLLECTIVE}: the clients are averaged in memory; comm/bytes_* stay 0", rnd)
        sink.scalar("time/compute_s", compute_s, rnd)
        sink.scalar("time/sync_s", sync_s, rnd)
        # The round ends with its slowest rank: above rank 0's compute_s, the rest of its sync_s is waiting.
        sink.scalar("time/compute_s_slowest_rank", max(rank_compute_s), rnd)
        sink.scalar("throughput/images_per_s", stats.images_per_s, rnd)
        comm = wire_text(sync.bytes, collective) + round_text(priv)
        sink.end_round(rnd, loss=stats.loss, images_per_s=stats.images_per_s, sync_s=sync_s, comm=comm)
        return stats

    def _anchored(self, plan: RoundPlan) -> set[str] | None:
        """FedProx (``optim.prox_mu`` > 0): the parameters of the groups the round shares, which the proximal
        term holds near the values received at the start of the round; None = no term."""
        if not self.cfg.optim.prox_mu:
            return None
        return {n for g in plan.shared_groups() for n in self.hosted.groups[g]}

    def _trainable(self, plan: RoundPlan, client: int) -> set[str] | None:
        """Parameter names ``client`` trains this round; None = the whole model."""
        groups = self.method.trainable(plan, client, self.cfg.federation.usplit_train)
        if groups == GROUPS:
            return None
        return {n for g in groups for n in self.hosted.groups[g]}

    def checkpoint(self, rnd: int) -> None:
        """Every rank writes and seals its part of round ``rnd`` in its own run directory (its clients' states;
        rank 0 also the shared state); the round counts once every rank reports its part sealed."""
        rdir = ckpt.round_dir(self.dir, rnd)
        files = {ckpt.client_file(rdir, k).name: c.state_dict() for k, c in self.hosted.clients.items()}
        if self.ctx.is_main:
            files[ckpt.shared_file(rdir).name] = {
                "round": rnd,
                "config": self.cfg.to_json(),
                "counters": self.comm_log.counters(),
                **({"privacy": self.privacy.state_dict()} if self.privacy else {}),
                **server_state(self.hosted.exchange),
            }
        try:
            ckpt.write_part(rdir, self.ctx.rank, files)
            sealed = 1
        except (OSError, RuntimeError) as e:  # a full disk, say: reported by every rank below, not a hang
            self._warn(f"could not write its part of checkpoint {rdir}: {e}")
            sealed = 0
        failed = [r for r, (ok,) in enumerate(gather_ints([sealed])) if not ok]
        if failed:
            raise RuntimeError(
                f"checkpoint of round {rnd} is incomplete: rank(s) {failed} could not write their "
                f"part (see their logs); the run keeps its checkpoints up to round "
                f"{self.last_checkpoint}"
            )
        if self.ctx.is_main:
            ckpt.mark_latest(self.dir, rnd)
        ckpt.prune(self.dir, rnd, self.cfg.keep_checkpoints)  # every rank its own run directory
        self.last_checkpoint = rnd

    def _warn(self, msg: str) -> None:
        """A warning about this rank's own files: rank 0's sink, or this rank's stderr (another site's log)."""
        if self.ctx.is_main:
            self.sink.warn(msg)
        else:
            ConsoleSink().warn(f"rank {self.ctx.rank}: {msg}")

    # -- models, samples, scores -----------------------------------------------------------------
    def export_models(self) -> None:
        """The evaluation hook: ``models/global[_ema].pt``, or ``models/client{k}[_ema].pt`` (personalised).

        Each client's EMA follows its own local steps and is never exchanged during training. Here the EMA
        copies are averaged once (plain FedAvg) with ``Method.final_plan`` (a global model: every group over
        every client; personalised: the shared groups), so the saved EMA model has the structure of the raw one.
        """
        fed, h = self.cfg.federation, self.hosted
        if self.cfg.optim.ema_decay:
            h.exchange.sync_once(
                self.method.final_plan(fed.rounds, fed.clients, fed.seed),
                {k: c.ema.shadow for k, c in h.clients.items()},  # plain FedAvg, whatever the server optimiser
            )
        # After a full-model sync every client holds the global model: rank 0 writes its first one.
        owners = list(h.clients.values()) if self.method.personalised else [h.first] if self.ctx.is_main else []
        for client in owners:
            label = self._label(client.cid)
            atomic_save({n: t.detach().cpu() for n, t in client.params.items()}, self.dir.model_file(label))
            if client.ema is not None:
                atomic_save({n: t.cpu() for n, t in client.ema.shadow.items()}, self.dir.model_file(label, ema=True))
        dist.barrier()

    def _models(self) -> Iterator[int]:
        """Put each model this rank samples into the working module (EMA weights when kept); yields its client.

        The global model is sampled once, on rank 0; personalised clients each on their own rank. The working
        module's tensors are restored afterwards: they may be a client's own (aliased) parameters.
        """
        h = self.hosted
        who = list(h.clients) if self.method.personalised else ([h.first.cid] if self.ctx.is_main else [])
        stash = [p.detach().clone() for p in h.model.parameters()]
        try:
            for k in who:
                h.trainer.load(h.clients[k])
                if h.clients[k].ema is not None:
                    h.clients[k].ema.copy_to(h.model)
                h.model.eval()
                yield k
        finally:
            with torch.no_grad():
                for p, saved in zip(h.model.parameters(), stash, strict=True):
                    p.copy_(saved)

    def _label(self, client: int) -> str:
        """The model label of ``client``'s model: its own, or 'global'."""
        return self.labels[client] if self.method.personalised else self.labels[0]

    @torch.no_grad()
    def sample_grids(self, rnd: int, final: bool = False) -> None:
        """A grid of ``num_samples`` samples of every model to TensorBoard; ``final``: also ``samples/*.png``."""
        channels, size = image_shape(self.cfg)
        n, device = self.cfg.num_samples, self.ctx.device
        steps, clip = self.cfg.sample_steps, self.cfg.sample_clip
        grids: dict[int, np.ndarray] = {}
        for k in self._models():
            g = torch.Generator(device=device).manual_seed(derive_seed(self.cfg.federation.seed, 3, k))
            x = self.hosted.diffusion.sample(
                self.hosted.model, (n, channels, size, size), device, steps=steps, generator=g, clip_x0=clip
            )
            grid = image_grid((x.float().cpu() + 1) / 2, nrow=int(math.ceil(math.sqrt(n))), padding=2)
            grids[k] = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            if final:
                self.dir.samples.mkdir(parents=True, exist_ok=True)  # each rank's own run directory
                save_png(grid, self.dir.sample_grid(self._label(k)))
        for k, img in sorted(dist.gather_arrays(grids, "sample grids").items()):
            self.sink.image(f"samples/{self._label(k)}", img, rnd)

    def score(self, rnd: int) -> None:
        """FID of every model (``cfg.fid_samples`` samples each), where it lives; the mean to the sink."""
        scores: dict[int, float] = {}
        for k in self._models():
            if self._scorer is None:  # reference statistics load once, on the ranks that score
                assert self._scorer_factory is not None, "train() refuses fid_every > 0 without a factory"
                self._scorer = self._scorer_factory(self.cfg, self.ctx.device, self.dir.eval)
            scores[k] = self._scorer(
                self.hosted.model, self.hosted.diffusion, derive_seed(self.cfg.federation.seed, 4, k)
            )
        scores = dist.gather_dict(scores, float, "FID scores")
        mean = float(np.mean(list(scores.values())))
        if self.method.personalised:
            for k, v in sorted(scores.items()):
                self.sink.scalar(f"fid/train/{self._label(k)}", v, rnd)
        self.sink.scalar("fid/train", mean, rnd)
        ref = self.cfg.training_fid_ref()
        self.sink.info(f"round {rnd}: FID {mean:.2f} ({len(scores)} model(s), {self.cfg.fid_samples} samples vs {ref})")

    def finish(self, stopped_after: int | None = None, reason: str | None = None) -> None:
        """Close the event files, then mark the run DONE once every rank has written its outputs (with the
        reason when it stopped early, after round ``stopped_after``)."""
        self.sink.close()
        dist.barrier()
        if self.ctx.is_main:
            self.dir.mark_done(self.cfg.federation.rounds, stopped_after, reason)
            self.sink.info(f"done; outputs in {self.dir.root} (tensorboard --logdir {self.cfg.out_dir})")


def _start_run_dir(cfg: RunConfig, ctx: dist.DistContext, run_dir: RunDir) -> None:
    """Rank 0 writes the config and clears DONE (a run with more rounds than it finished resumes), once data,
    partitions and the process group are up."""
    if ctx.is_main:
        run_dir.models.mkdir(parents=True, exist_ok=True)
        run_dir.samples.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir.config, cfg.to_json().encode())
        run_dir.clear_done()
    dist.barrier()
