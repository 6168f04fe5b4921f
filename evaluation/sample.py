"""Sampling for evaluation: batched DDPM/DDIM, spread over ranks, saved as PNG grids and uint8 .npz.

Seeding is per batch, not per rank: batch i (images i*B .. (i+1)*B-1) draws all its noise from a
generator seeded with (seed, i). Rank r samples batches r, r+W, r+2W, ...; the batches are gathered and
put back in order. So the images depend on (seed, batch size), not on how many ranks drew them: one GPU
and eight GPUs give the same samples (up to the device's arithmetic).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from evaluation.errors import EvalError
from evaluation.graphs import GraphedForward, check_graphs
from evaluation.protocol import DEFAULT_DDIM_STEPS, SAMPLERS, WEIGHT_CHOICES, WEIGHT_KINDS
from fedrun import dist
from fedrun.images import image_grid, save_png
from fedrun.methods import Method
from fedrun.output import steps as progress_steps
from fedrun.rundir import RunDir

if TYPE_CHECKING:
    from unet import GaussianDiffusion


def sampler_steps(sampler: str, steps: int | None) -> int | None:
    """What ``GaussianDiffusion.sample`` takes: None for ancestral DDPM over all T steps, else DDIM steps."""
    if sampler not in SAMPLERS:
        raise EvalError(f"invalid sampler={sampler!r}: allowed: {', '.join(SAMPLERS)}")
    if sampler in ("ddpm", "ddpm-clip"):
        if steps is not None:
            raise EvalError(f"--steps applies to --sampler ddim; {sampler} always runs all T steps")
        return None
    steps = DEFAULT_DDIM_STEPS if steps is None else int(steps)
    if steps < 1:
        raise EvalError(f"invalid steps={steps}: allowed: >= 1")
    return steps


def batch_seed(seed: int, index: int) -> int:
    """Independent 63-bit seed of batch ``index`` under ``seed`` (numpy SeedSequence mixing)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def to_uint8(x: Tensor) -> Tensor:
    """Model range [-1, 1] -> uint8 0..255 (clamped, rounded): what a PNG of the sample holds."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def for_sampling(model: nn.Module) -> nn.Module:
    """``model`` with its weights in channels_last, as ``fedrun eval`` samples it (and as training holds it).

    The paper UNet's 7x7 depthwise convolutions run much faster in NHWC (oneDNN on CPU, cuDNN on GPU): its
    forward pass, all that sampling runs, was 1.28x faster on a Xeon CPU (``bench_sample``: diffusers+cl vs
    diffusers). The samples change only by rounding: the same sums in another order.
    """
    return model.to(memory_format=torch.channels_last)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    num_samples: int,
    image_shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    distributed: bool | None = None,
    progress: bool = True,
    amp: torch.dtype | None = None,
    graphs: bool = False,
) -> Tensor:
    """``num_samples`` images, uint8 [N, C, H, W] on the CPU, from ``diffusion.sample`` with ``model``.

    image_shape: (C, H, W). sampler: 'ddpm' (ancestral, all T steps; the paper's annotated-diffusion
    sampler), 'ddpm-clip' (the same with x_0 clipped to [-1, 1] at every step, as Ho et al.'s code and
    diffusers' DDPMScheduler), 'ddim' (``steps``, default 50) or 'ddim-clip' (the same, x_0 clipped). With a
    process group (``distributed`` None = use one if initialised) every rank samples its share of the batches
    and all ranks return the full, ordered set (all_gather). The model is put in eval mode for sampling and its
    training flag restored afterwards. ``amp``: autocast dtype of the network (e.g. torch.bfloat16; None = fp32,
    the protocol's); the chain's own arithmetic stays fp32. ``graphs``: replay the network from CUDA graphs
    (``evaluation.graphs``; CUDA only, the same kernels, so the same samples).
    """
    ddim_steps = sampler_steps(sampler, steps)
    if num_samples < 1 or batch_size < 1:
        raise EvalError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
    device = torch.device(device)
    if graphs:
        check_graphs(device)
    rank, world = (dist.rank(), dist.world()) if distributed in (None, True) else (0, 1)
    shape = tuple(int(s) for s in image_shape)
    num_batches = math.ceil(num_samples / batch_size)
    mine = list(range(rank, num_batches, world))
    steps_per_batch = ddim_steps if ddim_steps is not None else int(getattr(diffusion, "num_timesteps", 1))
    calls = len(mine) * steps_per_batch

    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    # A graph must not read autocast's cached weight casts, which autocast frees on exit (evaluation.graphs).
    autocast = contextlib.nullcontext()
    if amp is not None:
        autocast = torch.autocast(device.type, dtype=amp, cache_enabled=not graphs)
    net = GraphedForward(model) if graphs else model
    # The progress counts network evaluations, on rank 0 only.
    bar_on = progress and rank == 0 and calls > 0
    with progress_steps(calls, "sampling", unit="step", enabled=bar_on) as bar, autocast:
        try:
            for i in mine:
                n = min(batch_size, num_samples - i * batch_size)
                g = torch.Generator(device=device).manual_seed(batch_seed(seed, i))
                x = diffusion.sample(
                    net,
                    (n, *shape),
                    device,
                    steps=ddim_steps,
                    generator=g,
                    progress=lambda *_: bar.update(1),
                    clip_x0=sampler.endswith("-clip"),
                )
                out.append(to_uint8(x).cpu())  # [n, C, H, W] uint8
        finally:
            model.train(was_training)
    local = torch.cat(out) if out else torch.empty((0, *shape), dtype=torch.uint8)
    if world == 1:
        return local
    return _gather_batches(local, mine, num_samples, batch_size, world, shape)


def _gather_batches(
    local: Tensor, mine: list[int], num_samples: int, batch_size: int, world: int, shape: tuple[int, ...]
) -> Tensor:
    """Every rank's batches (padded to one size for the all_gather), put back in batch order."""
    num_batches = math.ceil(num_samples / batch_size)
    per_rank = math.ceil(num_batches / world)
    pad = torch.zeros((per_rank * batch_size, *shape), dtype=torch.uint8)
    pad[: local.shape[0]] = local
    out = torch.empty((num_samples, *shape), dtype=torch.uint8)
    for r, part in enumerate(dist.all_gather_tensor(pad)):
        for j, i in enumerate(range(r, num_batches, world)):
            n = min(batch_size, num_samples - i * batch_size)
            out[i * batch_size : i * batch_size + n] = part[j * batch_size : j * batch_size + n]
    return out


# ---------------------------------------------------------------------------------------------
# Files.


def save_npz(images: Tensor, path: str | os.PathLike[str]) -> Path:
    """uint8 [N, C, H, W] -> .npz with key ``x`` (what ``fedrun fid`` and ``evaluation.fid`` read)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise EvalError(f"expected uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=images.numpy())
    return path


def save_grid(images: Tensor, path: str | os.PathLike[str], max_images: int = 64, nrow: int | None = None) -> Path:
    """PNG grid (``fedrun.images.image_grid``) of the first ``max_images`` uint8 images, square by default."""
    x = images[:max_images].float() / 255.0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(x, nrow=nrow or max(1, math.ceil(math.sqrt(x.shape[0]))), padding=2), path)
    return path


# ---------------------------------------------------------------------------------------------
# Models of a finished run.


def run_model_files(
    run: RunDir, method: Method, num_clients: int, weights: str | None = None
) -> dict[str, list[tuple[str, Path]]]:
    """{weights kind: [(label, file)]} of a run's final models, labels from ``method.model_labels``.

    ``weights``: 'raw', 'ema', 'both', or None = both when the EMA files exist, else raw.
    """
    labels = method.model_labels(num_clients)
    files = {kind: [(lb, run.model_file(lb, ema=kind == "ema")) for lb in labels] for kind in WEIGHT_KINDS}
    have_ema = all(p.is_file() for _, p in files["ema"])
    if weights is None:
        kinds = list(WEIGHT_KINDS) if have_ema else ["raw"]
    elif weights == "both":
        kinds = list(WEIGHT_KINDS)
    elif weights in WEIGHT_KINDS:
        kinds = [weights]
    else:
        raise EvalError(f"invalid weights={weights!r}: allowed: {', '.join(WEIGHT_CHOICES)}")
    for kind in kinds:
        missing = [str(p) for _, p in files[kind] if not p.is_file()]
        if missing:
            hint = " (the run was trained without EMA: use --weights raw)" if kind == "ema" else ""
            raise EvalError(f"missing model file(s) in {run.models}: {', '.join(missing)}{hint}")
    return {k: files[k] for k in kinds}


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a plain state dict (``torch.save``'d, read with weights_only=True) into ``model``.

    Files hold parameters; buffers absent from the file keep the model's own values. Any unknown key
    or missing parameter is an error naming it.
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    bad = [n for n, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # a diverged model samples noise and scores as a result: refuse it
        raise EvalError(
            f"{path} has non-finite weights ({bad[0]} and {len(bad) - 1} more tensor(s)): the run "
            "diverged; train it again with a lower --lr"
        )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    params = {n for n, _ in model.named_parameters()}
    missing_params = [n for n in missing if n in params]
    if unexpected or missing_params:
        raise EvalError(
            f"{path} does not fit the run's model: unexpected {list(unexpected)[:3]}, missing {missing_params[:3]}"
        )
    return model
