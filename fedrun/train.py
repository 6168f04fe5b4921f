"""The federated training run: one function, the same under plain python, torchrun and Slurm.

Set up (process group, run directory, this rank's clients), resume from the newest intact checkpoint, run
the rounds, save the models for evaluation, mark the run DONE, clean up. What a round does is
``fedrun.loop.Run``; starting the same command on the same run directory continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from fedrun import dist, heap
from fedrun.agreement import check_run_config
from fedrun.build import image_shape
from fedrun.config import ConfigError, RunConfig
from fedrun.hooks import ScorerFactory
from fedrun.loop import Run
from fedrun.precision import amp_choice
from fedrun.privacy.run import check_before_start
from fedrun.threads import apply_threads, restore_threads


def train(cfg: RunConfig, scorer_factory: ScorerFactory | None = None) -> Path:
    """Run (or resume) the federated training described by ``cfg``; returns the run directory.

    ``scorer_factory`` scores FID during training (``cfg.fid_every > 0``); ``fedrun train`` passes one built
    from ``evaluation`` (fedrun itself never imports it).
    """
    if cfg.fid_every and scorer_factory is None:
        raise ConfigError(
            f"fid_every={cfg.fid_every}: FID during training needs the `fedrun train` CLI, which "
            "passes the scorer (or set fid_every=0 and run `fedrun eval` afterwards)"
        )
    rounds = cfg.federation.rounds
    K, W = cfg.federation.clients, dist.env_world_size()
    if K < W:  # before the process group: each rank says so at once instead of after the others joined
        raise ConfigError(
            f"invalid federation.clients={K}: fewer clients than the {W} ranks; "
            f"every rank hosts at least one client (use --clients >= {W})"
        )
    check_before_start(cfg)  # the privacy extra installed, a budget that fits a round: before the process group
    ctx = dist.init_distributed(cfg.device, cfg.dist_timeout_s)
    # Chosen on purpose (fedrun.threads): on a busy CPU the count swings a step's speed 5-10x.
    threads = apply_threads(cfg.threads)
    try:
        check_run_config(cfg)  # every rank the same run, before anything is read or written
        run = Run.open(cfg, ctx, scorer_factory)
        if run is None:  # finished already: nothing was built
            dist.leave()
            return Path(cfg.run_dir())
        run.sink.info(threads.describe())
        run.sink.info(heap.current().describe())  # set by the fedrun program or the Slurm task (fedrun.heap)
        # The rule StepConfig.from_config applies (fedrun.precision): a pure function of the config and the CPU.
        run.sink.info(amp_choice(cfg.optim.amp, ctx.device, image_shape(cfg)[1]).describe())
        with run:  # closes the sink, also on an error
            run.resume()
            last, stop = rounds, None
            for r in run.rounds():
                stop = run.privacy.stop_reason(r) if run.privacy else None
                if stop:  # a privacy budget: the rounds so far are checkpointed, the run ends here
                    last = r - 1
                    if run.last_checkpoint < last:
                        run.checkpoint(last)
                    run.sink.info(stop)
                    break
                run.round(r)
                if cfg.sample_every and r % cfg.sample_every == 0 and r != rounds:
                    run.sample_grids(r)
                if cfg.fid_every and r % cfg.fid_every == 0:
                    run.score(r)
                if r % cfg.checkpoint_every == 0 or r == rounds:
                    run.checkpoint(r)
                run.sink.flush()
            run.export_models()
            run.sample_grids(last, final=True)  # the last round's grids also go to samples/*.png
            # finish() meets every rank in a barrier after the last collective: the group can go (below)
            run.finish(last if stop else None, stop)
        return run.dir.root
    finally:
        dist.cleanup()
        restore_threads(threads)  # a caller's own setting (a test, a notebook) is left as it was
