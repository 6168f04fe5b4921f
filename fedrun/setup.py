"""What one rank trains: its clients' data, the working model, the local trainer and the exchange.

Every rank seeds and builds the same initial model, checks that the groups the method exchanges have the same
names, shapes and dtypes everywhere (a mismatch is an error, never a hang), and overwrites its parameters with
rank 0's: all clients start from the same full model (the paper). The FedAvg weights are the image counts of
all clients, gathered across ranks (a real deployment knows only its own clients' sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedrun import dist
from fedrun.agreement import check_signature
from fedrun.build import build_diffusion, build_model, image_shape
from fedrun.client import ClientState, LocalTrainer, StepConfig, choose_placement, derive_seed
from fedrun.config import ConfigError, RunConfig
from fedrun.data import ClientData, load_client_data
from fedrun.exchange import Exchange
from fedrun.exchange.server import make_server
from fedrun.methods import Method
from fedrun.output import Sink
from fedrun.privacy.run import build_privacy
from fedrun.residency import Residency, choose_residency
from unet import EMA, GaussianDiffusion, group_sizes, parameter_groups


@dataclass
class Hosted:
    """The clients one rank hosts, the one working module they take turns in, and how they train and exchange."""

    model: nn.Module
    """The working module (channels_last); a client's tensors are swapped in to train or sample it."""
    diffusion: GaussianDiffusion
    groups: dict[str, list[str]]
    """Parameter group -> its parameter names (``unet.parameter_groups``)."""
    group_sizes: dict[str, int]
    """Parameter group -> its number of scalars, plus "total" (``unet.group_sizes``)."""
    sizes: list[int]
    """Images of every client 0..K-1, on every rank: the FedAvg weights."""
    clients: dict[int, ClientState]
    """The hosted clients by id, ascending (client k lives on rank k % world size)."""
    trainer: LocalTrainer
    exchange: Exchange
    residency: Residency
    """Where the clients wait between turns and how one is swapped in (``federation.resident``)."""

    @property
    def first(self) -> ClientState:
        """The lowest hosted client: rank 0's holds the global model after a full-model sync."""
        return next(iter(self.clients.values()))


def setup_clients(cfg: RunConfig, ctx: dist.DistContext, method: Method, sink: Sink) -> Hosted:
    """Load the hosted clients' data, build the identical initial model, the trainer and the exchange."""
    fed = cfg.federation
    hosted = dist.hosted_clients(ctx.rank, ctx.world_size, fed.clients)
    data, sizes = _load_data(cfg, hosted)
    model, diffusion, groups = _initial_model(cfg, method, ctx.device)
    # With DP the clients weigh alike (the sensitivity analysis; FederationConfig.fedavg_weighting).
    weights = sizes if fed.fedavg_weighting == "size" else [1] * fed.clients
    privacy = build_privacy(fed, hosted, sink.warn)  # secure aggregation's key exchange: every rank
    server = make_server(
        fed.server_optimizer, groups, fed.effective_server_lr, fed.server_momentum, fed.server_betas, fed.server_eps
    )
    # The packed buffer lives on the training device even when the clients wait in host memory (NCCL).
    exchange = Exchange(
        groups,
        weights,
        exchange_dtype=fed.exchange_dtype,
        privacy=privacy,
        server=server,
        device=ctx.device,
        error_feedback=fed.error_feedback,
    )
    if len(hosted) == 1:
        # One client per rank (the usual layout): its parameters live in the exchange's flat tensor, so a
        # round's sync scales and all-reduces them where they lie. Before the trainer: it may compile them.
        exchange.adopt(model)
    trainer = LocalTrainer(
        model,
        diffusion,
        StepConfig.from_config(cfg, ctx.device),
        ctx.device,
        alias_client=hosted[0] if len(hosted) == 1 else None,
    )
    images = _place_images(cfg, ctx, data, sink)
    del data  # host copies of images moved to the GPU are freed here
    residency = Residency(model, ctx.device, choose_residency(fed.resident, ctx.device, len(hosted)))
    # One client at a time: parked in host memory before the next is made (at most one extra on the device).
    clients = {
        k: residency.park(
            ClientState(
                cid=k,
                params=trainer.new_client_params(k),
                images=images[k],
                ema=EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None,
            )
        )
        for k in hosted
    }
    # int8: the rank's error feedback is saved and resumed with its lowest hosted client (one file per rank).
    clients[hosted[0]].feedback = exchange.feedback
    if residency.host:
        sink.info(f"rank {ctx.rank}: {residency.describe(len(hosted))}")
    return Hosted(
        model=model,
        diffusion=diffusion,
        groups=groups,
        group_sizes=group_sizes(model),
        sizes=sizes,
        clients=clients,
        trainer=trainer,
        exchange=exchange,
        residency=residency,
    )


def _load_data(cfg: RunConfig, hosted: list[int]) -> tuple[dict[int, ClientData], list[int]]:
    """The hosted clients' data, checked against the model's image shape, and every client's size."""
    K = cfg.federation.clients
    data, sizes = load_client_data(cfg.data, K, hosted, cfg.federation.seed)
    sizes = dist.all_gather_ints(
        [sizes[k] if k in hosted else None for k in range(K)] if sizes is not None else [None] * K, "client sizes"
    )
    channels, size = image_shape(cfg)
    for k in hosted:
        if tuple(data[k].images.shape[1:]) != (channels, size, size):
            raise ConfigError(
                f"client {k}'s images are {tuple(data[k].images.shape[1:])}, the model "
                f"expects {(channels, size, size)}: set data.image_size"
            )
    return data, sizes


def _initial_model(
    cfg: RunConfig, method: Method, device: torch.device
) -> tuple[nn.Module, GaussianDiffusion, dict[str, list[str]]]:
    """The same initial model on every rank, its diffusion process and its parameter groups."""
    torch.manual_seed(derive_seed(cfg.federation.seed, 0))  # identical initial model on every rank
    # channels_last: the 7x7 depthwise convolutions of the paper's UNet run their backward pass many
    # times faster in NHWC on CPU (oneDNN) and on GPU (cuDNN) than in NCHW.
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    diffusion = build_diffusion(cfg)
    groups = parameter_groups(model)
    named = dict(model.named_parameters())
    check_signature([(n, tuple(named[n].shape), str(named[n].dtype)) for g in method.ever_shared for n in groups[g]])
    # All clients start from the same full model (the paper), so broadcast everything once.
    dist.broadcast_state([p.data for p in model.parameters()])
    return model, diffusion, groups


def _place_images(
    cfg: RunConfig, ctx: dist.DistContext, data: dict[int, ClientData], sink: Sink
) -> dict[int, torch.Tensor]:
    """Each hosted client's images on the training device when they fit (no transfer per step), else on the
    host (pinned batch copies, ``fedrun.client``)."""
    nbytes = sum(d.images.numel() for d in data.values())
    place = choose_placement(cfg.data.placement, nbytes, ctx.device)
    if ctx.device.type == "cuda":
        # Every rank decides for itself (free memory differs); rank 0 says what each one chose.
        for rank, (n, where) in sorted(dist.gather_dict({ctx.rank: (nbytes, place)}, tuple[int, str]).items()):
            sink.info(
                f"rank {rank} keeps its {n / 2**20:.0f} MiB of images on the "
                f"{'GPU' if where == 'device' else 'host (pinned batches)'}"
            )
    return {k: d.images.to(ctx.device) if place == "device" else d.images for k, d in data.items()}
