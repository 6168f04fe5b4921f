"""The federated training run: one function, the same under plain python, torchrun and Slurm.

Data flow of one round r (1-based)::

    every hosted client: local training (fedrun.client)          -> no communication
    averager.sync(plan_r, hosted client parameters)              -> one all-reduce (fedrun.averaging)
    gather per-client losses to rank 0, log, checkpoint           -> rank 0 writes shared files,
                                                                     every rank its own clients

Starting the same command on the same run directory resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedrun import checkpoint as ckpt
from fedrun import dist
from fedrun.exchange import Exchange as Averager
from fedrun.build import build_diffusion, build_model, image_shape
from fedrun.client import (
    ClientState,
    LocalTrainer,
    StepConfig,
    choose_placement,
    derive_seed,
    local_steps,
)
from fedrun.comm import CommLog, paper_round_count
from fedrun.config import ConfigError, RunConfig
from fedrun.data import load_client_data
from fedrun.methods import METHODS, get_method, plan_round
from fedrun.progress import Progress
from fedrun.tracking import NullTracker, TensorBoardTracker
from unet import EMA, GROUPS, parameter_groups

# Fields that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = {
    "data.root", "data.download", "data.placement", "federation.rounds", "out_dir", "name", "checkpoint_every",
    "keep_checkpoints", "sample_every", "num_samples", "sample_steps", "fid_every", "fid_samples", "fid_ref",
    "device",
    "dist_timeout_s", "preset", "optim.compile", "optim.amp",
}


def config_differences(saved: RunConfig, new: RunConfig) -> list[str]:
    """Fields that differ and are not allowed to change across a resume, as 'field (a -> b)'."""
    a, b = saved.to_flat_dict(), new.to_flat_dict()
    return [f"{k} ({a[k]!r} -> {b[k]!r})" for k in sorted(a)
            if k not in RESUMABLE_CHANGES and _norm(a[k]) != _norm(b.get(k))]


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def shared_group_union(method: str, num_clients: int, seed: int) -> list[str]:
    """Groups the method ever exchanges (signature-checked at start)."""
    groups: set[str] = set()
    for r in range(1, 3):
        groups |= set(plan_round(method, r, num_clients, seed).shared_groups())
    return [g for g in GROUPS if g in groups]


def amp_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.optim.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if mode == "bf16" else None


def train(cfg: RunConfig) -> Path:
    """Run (or resume) the federated training described by `cfg`; returns the run directory."""
    if cfg.federation.method not in METHODS:
        raise ConfigError(f"invalid federation.method={cfg.federation.method!r}")
    ctx = dist.init_distributed(cfg.device, cfg.dist_timeout_s)
    try:
        return _train(cfg, ctx)
    finally:
        dist.cleanup()


def _train(cfg: RunConfig, ctx: dist.DistContext) -> Path:
    run_dir = cfg.run_dir()
    fed = cfg.federation
    K = fed.clients
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if ctx.is_main else (lambda m: None)

    if K < ctx.world_size:
        raise ConfigError(f"invalid federation.clients={K}: fewer clients than the {ctx.world_size} ranks; "
                          f"every rank hosts at least one client (use --clients >= {ctx.world_size})")
    # -- run directory: refuse an incompatible resume before anything is built -------------------
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        diffs = config_differences(RunConfig.from_json(cfg_path.read_text()), cfg)
        if diffs:
            raise ConfigError(f"cannot resume {run_dir}: its config differs in " + ", ".join(diffs)
                              + "; choose another --name/--out-dir")
    done = run_dir / "DONE"
    if done.exists() and json.loads(done.read_text()).get("rounds") == fed.rounds:
        log(f"fedrun: {run_dir} already finished {fed.rounds} rounds; nothing to do")
        return run_dir
    if ctx.is_main:
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_bytes(cfg_path, cfg.to_json().encode())
        done.unlink(missing_ok=True)
    dist.barrier()

    # -- clients, data, model ------------------------------------------------------------------
    device = ctx.device
    hosted = dist.hosted_clients(ctx.rank, ctx.world_size, K)
    data, sizes = load_client_data(cfg.data, K, hosted, fed.seed)
    sizes = dist.all_gather_ints([sizes[k] if k in hosted else None for k in range(K)]
                                 if sizes is not None else [None] * K)
    channels, size = image_shape(cfg)
    for k in hosted:
        if tuple(data[k].images.shape[1:]) != (channels, size, size):
            raise ConfigError(f"client {k}'s images are {tuple(data[k].images.shape[1:])}, the model "
                              f"expects {(channels, size, size)}: set data.image_size")

    torch.manual_seed(derive_seed(fed.seed, 0))  # identical initial model on every rank
    # channels_last: the 7x7 depthwise convolutions of the paper's UNet run their backward pass many
    # times faster in NHWC on CPU (oneDNN) and on GPU (cuDNN) than in NCHW.
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    diffusion = build_diffusion(cfg)
    groups = parameter_groups(model)
    shared = shared_group_union(fed.method, K, fed.seed)
    named = dict(model.named_parameters())
    dist.check_signature([(n, tuple(named[n].shape), str(named[n].dtype)) for g in shared for n in groups[g]])
    # All clients start from the same full model (the paper), so broadcast everything once.
    dist.broadcast_state([p.data for p in model.parameters()])

    step_cfg = StepConfig(lr=cfg.optim.lr, batch_size=cfg.optim.batch_size, local_epochs=fed.local_epochs,
                          max_local_steps=fed.max_local_steps, keep_opt_state=cfg.optim.keep_state,
                          amp_dtype=amp_dtype(cfg, device), seed=fed.seed, compile=cfg.optim.compile)
    averager = Averager(groups, sizes, exchange_dtype=fed.exchange_dtype)
    if len(hosted) == 1:
        # One client per rank (the usual layout): its parameters live in the averager's flat tensor, so a
        # round's sync scales and all-reduces them where they lie. Before the trainer: it may compile them.
        averager.adopt(model)
    trainer = LocalTrainer(model, diffusion, step_cfg, device,
                           alias_client=hosted[0] if len(hosted) == 1 else None)
    # Images on the training device when they fit (no transfer per step), else on the host.
    nbytes = sum(data[k].images.numel() for k in hosted)
    place = choose_placement(cfg.data.placement, nbytes, device)
    if device.type == "cuda":  # every rank decides for itself, and says so
        print(f"fedrun: rank {ctx.rank} keeps its {nbytes / 2**20:.0f} MiB of images on the "
              f"{'GPU' if place == 'device' else 'host (pinned batches)'}", file=sys.stderr, flush=True)
    clients: dict[int, ClientState] = {}
    for k in hosted:
        clients[k] = ClientState(
            cid=k, params=trainer.new_client_params(k),
            images=data[k].images.to(device) if place == "device" else data[k].images,
            ema=EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None)
    del data

    group_sizes = {g: sum(named[n].numel() for n in groups[g]) for g in GROUPS}

    # -- resume ----------------------------------------------------------------------------------
    start_round, counters = 0, {"paper_params_cum": 0, "bytes_cum": 0}
    found = dist.broadcast_object(ckpt.find_resumable(run_dir) if ctx.is_main else None)
    if found is not None:
        start_round, rdir = found
        shared_state = ckpt.safe_load(Path(rdir) / "shared.pt")
        counters = shared_state["counters"]
        for k in hosted:
            clients[k].load_state_dict(ckpt.safe_load(ckpt.client_file(Path(rdir), k), map_location=device))
        log(f"fedrun: resuming {run_dir} after round {start_round} of {fed.rounds}")
    # bf16 exchange sends changes against the last averaged values, identical on every rank: the initial
    # model, or after a resume the checkpointed (already averaged) shared parameters.
    averager.set_reference(clients[hosted[0]].params)
    comm_log = CommLog(run_dir / "comm.jsonl" if ctx.is_main else None, truncate_after=start_round,
                       paper_params_cum=counters["paper_params_cum"], bytes_cum=counters["bytes_cum"])
    tracker = (TensorBoardTracker(run_dir / "tb", purge_step=start_round + 1) if ctx.is_main
               else NullTracker())
    steps_per_round = {k: local_steps(c.size, step_cfg.batch_size, fed.local_epochs, fed.max_local_steps)
                       for k, c in clients.items()}
    progress = Progress(total_rounds=fed.rounds, start_round=start_round, enabled=ctx.is_main,
                        steps_per_round=sum(steps_per_round.values()))
    if start_round == 0:
        log(f"fedrun: {fed.method} | {K} clients on {ctx.world_size} rank(s) | sizes {sizes} | "
            f"{sum(group_sizes.values()):,} parameters | run dir {run_dir}")

    # -- rounds ----------------------------------------------------------------------------------
    for rnd in range(start_round + 1, fed.rounds + 1):
        plan = plan_round(fed.method, rnd, K, fed.seed)
        t0 = time.perf_counter()
        losses: dict[int, float] = {}
        images = 0
        for k in hosted:
            trainable = None
            if fed.method == "usplit" and fed.usplit_train == "assigned":
                trainable = {n for g in get_method(fed.method).trainable(plan, k, fed.usplit_train) for n in groups[g]}
            res = trainer.train_round(clients[k], rnd, trainable)
            losses[k] = res.loss_sum / res.steps
            images += res.images
            progress.advance_steps(res.steps)
        t_compute = time.perf_counter() - t0
        stats = averager.sync(plan, {k: clients[k].params for k in hosted})
        t_sync = time.perf_counter() - t0 - t_compute

        paper = paper_round_count(plan, group_sizes, first_round=(rnd == 1))
        # One gather per round brings every rank's losses, images and bytes to rank 0.
        per_rank = dist.gather_dict({ctx.rank: (losses, images, stats.bytes)}).values()
        all_losses = {k: v for rank_losses, _, _ in per_rank for k, v in rank_losses.items()}
        all_images = sum(n for _, n, _ in per_rank)
        bytes_all = sum(b for _, _, b in per_rank)
        row = comm_log.append(rnd, paper_params=paper, bytes_moved=stats.bytes, sync_seconds=t_sync)
        if ctx.is_main:
            mean_loss = float(np.mean(list(all_losses.values())))
            for k, v in sorted(all_losses.items()):
                tracker.scalar(f"client/{k}/loss", v, rnd)
            tracker.scalar("round/loss", mean_loss, rnd)
            tracker.scalar(f"comm/paper_params_cum/{fed.method}", row["paper_params_cum"], rnd)
            tracker.scalar(f"comm/bytes_cum/{fed.method}", row["bytes_cum"], rnd)
            tracker.scalar("comm/bytes_all_ranks", bytes_all, rnd)
            tracker.scalar("time/compute_s", t_compute, rnd)
            tracker.scalar("time/sync_s", t_sync, rnd)
            tracker.scalar("throughput/images_per_s", all_images / max(t_compute + t_sync, 1e-9), rnd)
        progress.end_round(rnd, loss=float(np.mean(list(all_losses.values()))),
                           images_per_s=all_images / max(t_compute + t_sync, 1e-9), sync_s=t_sync)

        if cfg.sample_every and rnd % cfg.sample_every == 0 and rnd != fed.rounds:
            _log_samples(cfg, ctx, model, diffusion, trainer, clients, hosted, tracker, rnd, run_dir)
        if cfg.fid_every and rnd % cfg.fid_every == 0:
            _log_fid(cfg, ctx, model, diffusion, trainer, clients, hosted, tracker, rnd, run_dir)
        if rnd % cfg.checkpoint_every == 0 or rnd == fed.rounds:
            _checkpoint(run_dir, rnd, cfg, ctx, clients, comm_log)
        tracker.flush()

    # -- end: models for evaluation, sample grids, DONE -----------------------------------------
    _save_models(cfg, ctx, model, trainer, clients, hosted, averager, run_dir)
    _log_samples(cfg, ctx, model, diffusion, trainer, clients, hosted, tracker, fed.rounds, run_dir,
                 final=True)
    tracker.close()
    progress.close()
    dist.barrier()
    if ctx.is_main:
        ckpt.atomic_write_bytes(run_dir / "DONE", json.dumps({"rounds": fed.rounds,
                                                              "time": time.time()}).encode())
        log(f"fedrun: done; outputs in {run_dir} (tensorboard --logdir {run_dir / 'tb'})")
    return run_dir


def _checkpoint(run_dir: Path, rnd: int, cfg: RunConfig, ctx: dist.DistContext,
                clients: dict[int, ClientState], comm_log: CommLog) -> None:
    rdir = ckpt.round_dir(run_dir, rnd)
    for k, c in clients.items():
        ckpt.atomic_save(c.state_dict(), ckpt.client_file(rdir, k))
    if ctx.is_main:
        ckpt.atomic_save({"round": rnd, "config": cfg.to_json(), "counters": comm_log.counters()},
                         rdir / "shared.pt")
    dist.barrier()  # every client file is on disk before the round is declared complete
    if ctx.is_main:
        ckpt.finalize(run_dir, rnd, cfg.federation.clients, cfg.keep_checkpoints)
    dist.barrier()


def personalised(method: str) -> bool:
    """UDec/ULatDec leave one model per client (encoder stays local)."""
    return method in ("udec", "ulatdec")


def _save_models(cfg, ctx, model, trainer, clients, hosted, averager, run_dir: Path) -> None:
    """Evaluation hook: models/global.pt (FULL/USplit) or models/client{k}.pt (UDec/ULatDec).

    EMA: each client's EMA follows its own local steps and is never exchanged during training.
    At the end the EMA copies are averaged once with the method's rule (FULL/USplit: every group
    over every client -> global_ema.pt; UDec/ULatDec: the shared groups), so the saved EMA model
    has the same structure as the raw one.
    """
    method = cfg.federation.method
    K = cfg.federation.clients
    if cfg.optim.ema_decay:
        ema_method = method if personalised(method) else "full"
        ema_plan = plan_round(ema_method, cfg.federation.rounds, K, cfg.federation.seed)
        ema_params = {k: clients[k].ema.shadow for k in hosted}
        averager.sync(ema_plan, ema_params)
    if personalised(method):
        for k in hosted:
            ckpt.atomic_save({n: t.detach().cpu() for n, t in clients[k].params.items()},
                             run_dir / "models" / f"client{k}.pt")
            if clients[k].ema is not None:
                ckpt.atomic_save({n: t.cpu() for n, t in clients[k].ema.shadow.items()},
                                 run_dir / "models" / f"client{k}_ema.pt")
    elif ctx.is_main:
        c = clients[hosted[0]]  # after a full-model sync every client holds the global model
        ckpt.atomic_save({n: t.detach().cpu() for n, t in c.params.items()}, run_dir / "models" / "global.pt")
        if c.ema is not None:
            ckpt.atomic_save({n: t.cpu() for n, t in c.ema.shadow.items()}, run_dir / "models" / "global_ema.pt")
    dist.barrier()


def _each_model(cfg, ctx, model, trainer, clients, hosted):
    """Put each model this rank scores into the working module (EMA weights when kept); yields its client.

    The global model is scored once, on rank 0; UDec/ULatDec clients each on their own rank. The working
    module's tensors are restored afterwards: they may be a client's own (aliased) parameters.
    """
    who = hosted if personalised(cfg.federation.method) else ([hosted[0]] if ctx.is_main else [])
    stash = [p.detach().clone() for p in model.parameters()]
    try:
        for k in who:
            trainer.load(clients[k])
            if clients[k].ema is not None:
                clients[k].ema.copy_to(model)
            model.eval()
            yield k
    finally:
        with torch.no_grad():
            for p, saved in zip(model.parameters(), stash, strict=True):
                p.copy_(saved)


@torch.no_grad()
def _log_samples(cfg, ctx, model, diffusion, trainer, clients, hosted, tracker, rnd, run_dir,
                 final: bool = False) -> None:
    """Sample grids: the global model on rank 0, or every client's model (UDec/ULatDec)."""
    from torchvision.utils import make_grid, save_image

    channels, size = image_shape(cfg)
    n = cfg.num_samples
    grids: dict[int, np.ndarray] = {}
    for k in _each_model(cfg, ctx, model, trainer, clients, hosted):
        g = torch.Generator(device=ctx.device).manual_seed(derive_seed(cfg.federation.seed, 3, k))
        x = diffusion.sample(model, (n, channels, size, size), ctx.device, steps=cfg.sample_steps,
                             generator=g)
        grid = make_grid((x.float().cpu() + 1) / 2, nrow=int(math.ceil(math.sqrt(n))), padding=2)
        grids[k] = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        if final:
            name = f"final_client{k}.png" if personalised(cfg.federation.method) else "final.png"
            save_image(grid, run_dir / "samples" / name)
    all_grids = dist.gather_dict(grids)
    if ctx.is_main:
        for k, img in sorted(all_grids.items()):
            tag = f"samples/client{k}" if personalised(cfg.federation.method) else "samples/global"
            tracker.image(tag, img, rnd)


def _log_fid(cfg, ctx, model, diffusion, trainer, clients, hosted, tracker, rnd, run_dir: Path) -> None:
    """FID every `fid_every` rounds: the global model on rank 0, or every client's model where it lives."""
    from evaluation.commands import fid_of_model
    from evaluation.fid import reference_statistics

    ref = cfg.fid_ref or f"{cfg.data.dataset}:test"
    channels, size = image_shape(cfg)
    scores: dict[int, float] = {}
    stats = None
    for k in _each_model(cfg, ctx, model, trainer, clients, hosted):
        if stats is None:
            stats = reference_statistics(ref, data_root=cfg.data.root, cache_dirs=[run_dir / "eval"],
                                         image_size=size, device=ctx.device)
        scores[k] = fid_of_model(model, diffusion, stats, cfg.fid_samples, image_shape=(channels, size, size),
                                 sampler="ddim" if cfg.sample_steps else "ddpm", steps=cfg.sample_steps,
                                 device=ctx.device, seed=derive_seed(cfg.federation.seed, 4, k))
    scores = dist.gather_dict(scores)
    if ctx.is_main:
        if personalised(cfg.federation.method):
            for k, v in sorted(scores.items()):
                tracker.scalar(f"fid/train/client{k}", v, rnd)
        tracker.scalar("fid/train", float(np.mean(list(scores.values()))), rnd)
        print(f"fedrun: round {rnd}: FID {np.mean(list(scores.values())):.2f} ({len(scores)} model(s), "
              f"{cfg.fid_samples} samples vs {ref})", file=sys.stderr, flush=True)
