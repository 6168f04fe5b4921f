"""What the caller of ``fedrun.train.train`` may plug in. ``fedrun`` never imports ``evaluation``: the CLI
builds these from it and passes them in (``fedrun train --set fid_every=N``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedrun.config import RunConfig
    from unet import GaussianDiffusion

Scorer = Callable[["nn.Module", "GaussianDiffusion", int], float]
"""``score(model, diffusion, seed) -> FID`` of ``cfg.fid_samples`` samples of ``model`` (in eval mode)."""

ScorerFactory = Callable[["RunConfig", "torch.device", Path], Scorer]
"""``make(cfg, device, cache_dir) -> Scorer``, called once per rank that scores, before its first score; it
loads the reference statistics (``cfg.fid_ref``, default the dataset's test split) into the scorer."""
