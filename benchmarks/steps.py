"""The two training steps ``bench_step`` compares, built as closures that take turns (``common.time_interleaved``).

``eager_fp32``: the paper's step. ``optimised``: ``fedrun.client.LocalTrainer`` as ``fedrun.train`` sets it up.
``bench_amp`` and ``bench_heap`` time ``optimised`` too. Models: ``ARCHS`` (the project's two UNets and, when
``diffusers`` is installed, its ``UNet2DModel`` in the DDPM CIFAR-10 configuration).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fedrun.client import ClientState, LocalTrainer, StepConfig
from unet import EMA, GaussianDiffusion, create_model

# arch -> (image size, channels, images per client: the dataset split over 2 clients)
ARCHS: dict[str, tuple[int, int, int]] = {
    "paper-unet": (28, 1, 30_000),  # paper-fmnist: Fashion-MNIST 60k / 2
    "ddpm-unet": (32, 3, 25_000),  # ddpm-cifar10: CIFAR-10 50k / 2
    "diffusers": (32, 3, 25_000),  # diffusers UNet2DModel, DDPM CIFAR-10 config
}
# google/ddpm-cifar10-32's config.json (35,746,307 parameters, the same network as unet.DDPMUNet).
DIFFUSERS_DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    resnet_time_scale_shift="default",
    time_embedding_type="positional",
)


class DiffusersEps(nn.Module):
    """``UNet2DModel`` behind the project's ``model(x_t, t) -> eps`` interface."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(**DIFFUSERS_DDPM_CIFAR10)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:  # ImportError, or a diffusers that does not import with this torch
        return False
    return True


def build(arch: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # every mode starts from the same weights
    if arch == "diffusers":
        model = DiffusersEps()
    else:
        size, channels, _ = ARCHS[arch]
        model = create_model(arch, image_size=size, channels=channels)
    return model.to(device)


def eager_fp32(
    arch: str,
    images: torch.Tensor,
    batch: int,
    warmup: int,
    iters: int,
    diffusion: GaussianDiffusion,
    device: torch.device,
) -> Callable[[], None]:
    """The paper's step: fp32, NCHW, default Adam, the loss read back to the host every step."""
    model = build(arch, device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1)
    state = {"perm": torch.randperm(images.shape[0], device=device, generator=gen), "pos": 0}
    losses: list[float] = []

    def steps(n: int) -> None:
        for _ in range(n):
            if state["pos"] + batch > images.shape[0]:
                state["perm"], state["pos"] = torch.randperm(images.shape[0], device=device, generator=gen), 0
            idx = state["perm"][state["pos"] : state["pos"] + batch]
            state["pos"] += batch
            x0 = images[idx].float().div_(127.5).sub_(1.0)
            loss = diffusion.training_loss(model, x0, generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())

    steps(warmup)
    return lambda: steps(iters)


def optimised(
    arch: str,
    images: torch.Tensor,
    batch: int,
    warmup: int,
    iters: int,
    diffusion: GaussianDiffusion,
    device: torch.device,
    amp: torch.dtype | None,
    compile_model: bool = False,
    ema_decay: float | None = None,
    model: nn.Module | None = None,
) -> Callable[[], None]:
    """The project's step: LocalTrainer, set up as fedrun.train does; one round = ``iters`` steps.
    ``model``: the network to train (default: ``build(arch)``)."""
    # channels_last on every device, as fedrun.setup builds the working model.
    model = (model if model is not None else build(arch, device)).to(device, memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    cfg = StepConfig(
        lr=1e-4, batch_size=batch, local_epochs=1e9, max_local_steps=warmup, keep_opt_state=False, amp_dtype=amp, seed=0
    )
    trainer = LocalTrainer(net, diffusion, cfg, device, alias_client=0)
    client = ClientState(
        cid=0, params=trainer.new_client_params(0), images=images, ema=EMA(model, ema_decay) if ema_decay else None
    )
    rounds = iter(range(1, 1 << 30))
    trainer.train_round(client, next(rounds))  # warmup (and compilation)
    cfg.max_local_steps = iters

    def run() -> None:
        res = trainer.train_round(client, next(rounds))
        if not math.isfinite(res.loss_sum):
            raise RuntimeError(f"{arch}: non-finite loss {res.loss_sum}")

    return run


def at_threads(fn: Callable[[], None], n: int) -> Callable[[], None]:
    """``fn`` run with ``n`` intra-op threads: modes at different counts can take turns in one process."""

    def run() -> None:
        torch.set_num_threads(n)
        fn()

    return run
