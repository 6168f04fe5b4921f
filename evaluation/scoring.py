"""FID of a model: sample it, score the samples. ``fid_scorer`` is the ``fedrun.hooks.ScorerFactory`` that
the CLI hands to training (``fedrun train --set fid_every=N``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from evaluation.errors import EvalError
from evaluation.fid import Reference, Stats, fid_of_images
from evaluation.protocol import known_datasets
from evaluation.reference import reference_statistics, stats_cache_dir
from evaluation.sample import sample_images
from evaluation.sources import parse_source
from fedrun import dist
from fedrun.build import image_shape
from fedrun.output import rank_sink

if TYPE_CHECKING:
    from fedrun.config import RunConfig
    from fedrun.hooks import Scorer
    from unet import GaussianDiffusion


def fid_of_model(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    ref_stats: Stats | Reference | str,
    num_samples: int,
    *,
    image_shape: tuple[int, int, int],
    sampler: str = "ddpm",
    steps: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    inception_weights: str | os.PathLike[str] | None = None,
    fid_batch_size: int = 50,
    data_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> float:
    """FID of ``num_samples`` samples of ``model`` against ``ref_stats`` ((mu, sigma), a Reference or a source
    spec).

    For FID during training: samples in this process only (no collectives, so ranks holding different
    client models never mix their samples); the model's training flag is restored.
    """
    if isinstance(ref_stats, str):
        ref_stats = reference_statistics(
            ref_stats,
            device=device,
            weights=inception_weights,
            batch_size=fid_batch_size,
            data_root=data_root,
            progress=progress,
        )
    x = sample_images(
        model,
        diffusion,
        num_samples,
        image_shape,
        sampler=sampler,
        steps=steps,
        batch_size=batch_size,
        device=device,
        seed=seed,
        distributed=False,
        progress=progress,
    )
    return fid_of_images(
        x, ref_stats, batch_size=fid_batch_size, device=device, weights=inception_weights, progress=progress
    )


def default_reference(cfg: RunConfig) -> str:
    """The paper's reference: the test split of the run's dataset."""
    if cfg.data.dataset not in known_datasets():
        raise EvalError(
            f"no default reference for dataset {cfg.data.dataset!r}: pass --ref "
            "(a statistics .npz, an image folder, or e.g. fashion-mnist:test)"
        )
    return cfg.test_split()


def reference_of_run(
    cfg: RunConfig,
    ref: str,
    *,
    device: str | torch.device,
    cache_dirs: Iterable[str | os.PathLike[str]],
    data_root: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> Reference:
    """Reference statistics and features to score ``cfg``'s models against: a dataset split at the size the
    model saw (``cfg.data.image_size``), read from ``data_root`` (default ``cfg.data.root``); ``kw`` as
    ``reference_statistics`` takes it."""
    size = cfg.data.image_size if parse_source(ref).kind == "dataset" else None
    return reference_statistics(
        ref, data_root=data_root or cfg.data.root, image_size=size, device=device, cache_dirs=cache_dirs, **kw
    )


def fid_scorer(cfg: RunConfig, device: torch.device, cache_dir: Path) -> Scorer:
    """A ``fedrun.hooks.Scorer`` for FID during training: ``cfg.fid_samples`` samples (DDIM with
    ``cfg.sample_steps`` steps, else ancestral DDPM; x0 clipped with ``cfg.sample_clip``, as the grids) against
    ``cfg.fid_ref`` (default: the dataset's test split; its first ``cfg.fid_ref_num`` images when set).

    The reference statistics are loaded once, here; computed ones are cached under ``cache_dir/fid_stats``
    (``cache_dir``: fedrun's cache directory, e.g. ``evaluation.reference.default_cache_dir()``).
    """
    ref = cfg.fid_ref or default_reference(cfg)  # default_reference checks the dataset has a test split
    channels, size = image_shape(cfg)
    stats = reference_of_run(
        cfg,
        ref,
        device=device,
        cache_dirs=[stats_cache_dir(cache_dir)],
        sink=rank_sink(dist.rank() == 0),
        limit=cfg.fid_ref_num,
    )

    def score(model: nn.Module, diffusion: GaussianDiffusion, seed: int) -> float:
        return fid_of_model(
            model,
            diffusion,
            stats,
            cfg.fid_samples,
            image_shape=(channels, size, size),
            sampler=("ddim" if cfg.sample_steps else "ddpm") + ("-clip" if cfg.sample_clip else ""),
            steps=cfg.sample_steps,
            device=device,
            seed=seed,
        )

    return score
