"""Local training of one client. No collectives here: the exchange belongs to fedrun.exchange.

A rank owns one working ``nn.Module``; each client it hosts keeps its own parameter tensors,
EMA, optimiser state and data position. Training a client swaps its tensors into the working
module with ``copy_`` (no reallocation), trains, and copies them back. A rank hosting a single
client aliases the module's own parameters and copies nothing.

Randomness is derived, not carried: the data order of local epoch e of client k and the noise of
round r of client k come from generators seeded by (seed, k, e) and (seed, k, r). A resumed run
therefore replays exactly the same batches and noise as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedrun.build import image_shape
from fedrun.config import PLACEMENTS, RunConfig
from fedrun.precision import amp_choice
from unet import EMA, GaussianDiffusion

if TYPE_CHECKING:
    from fedrun.exchange.int8 import Int8Feedback


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class ClientState:
    """Everything that makes client k resumable."""

    cid: int
    params: dict[str, torch.Tensor]
    images: torch.Tensor  # uint8 [N, C, H, W], on the training device
    ema: EMA | None = None
    opt_state: dict[str, dict[str, torch.Tensor]] | None = None
    epoch: int = 0  # local epoch the next batch comes from
    offset: int = 0  # examples of that epoch's permutation already used
    last_loss: float = float("nan")
    perm: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation): derived, never checkpointed
    feedback: Int8Feedback | None = None  # int8 exchange: the rank's error feedback, on its lowest client

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    # -- checkpoint state (tensors and plain values only: loadable with weights_only=True) -------
    def state_dict(self) -> dict:
        return {
            "cid": self.cid,
            "params": {n: t.detach().cpu().clone() for n, t in self.params.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "opt_state": self.opt_state,
            "epoch": self.epoch,
            "offset": self.offset,
            "last_loss": self.last_loss,
            **({"feedback": self.feedback.state_dict()} if self.feedback is not None else {}),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["cid"] != self.cid:
            raise ValueError(f"checkpoint holds client {sd['cid']}, expected {self.cid}")
        with torch.no_grad():
            for n, t in self.params.items():
                t.copy_(sd["params"][n])
        if self.ema is not None and sd["ema"] is not None:
            self.ema.load_state_dict(sd["ema"])
        self.opt_state = sd["opt_state"]
        self.epoch, self.offset, self.last_loss = sd["epoch"], sd["offset"], sd["last_loss"]
        if self.feedback is not None:  # a checkpoint without it (another exchange dtype): restart at 0
            self.feedback.load_state_dict(sd.get("feedback"))


@dataclass
class StepConfig:
    """How a client trains locally (from ``RunConfig.optim`` and ``federation``)."""

    lr: float
    batch_size: int
    local_epochs: float
    max_local_steps: int | None
    keep_opt_state: bool
    amp_dtype: torch.dtype | None  # None = fp32 (fedrun.precision chooses it)
    seed: int
    compile: bool = False
    prox_mu: float = 0.0  # FedProx: > 0 adds (mu/2) ||theta - theta_shared||^2 over the anchored parameters

    @classmethod
    def from_config(cls, cfg: RunConfig, device: torch.device) -> StepConfig:
        fed, opt = cfg.federation, cfg.optim
        return cls(
            lr=opt.lr,
            batch_size=opt.batch_size,
            local_epochs=fed.local_epochs,
            max_local_steps=fed.max_local_steps,
            keep_opt_state=opt.keep_state,
            amp_dtype=amp_choice(opt.amp, device, image_shape(cfg)[1]).dtype,
            seed=fed.seed,
            compile=opt.compile,
            prox_mu=opt.prox_mu,
        )


@dataclass
class RoundResult:
    loss_sum: float
    steps: int
    images: int


def choose_placement(placement: str, nbytes: int, device: torch.device, free_bytes: int | None = None) -> str:
    """'device' or 'host' for ``nbytes`` of training images (``data.placement``). 'auto' keeps them on a GPU
    when they take at most half of its free memory (``free_bytes``; None = ask CUDA), else on the host; a
    CPU run always trains from host memory, which is then its device."""
    if placement not in PLACEMENTS:
        raise ValueError(f"invalid placement={placement!r}: allowed: {', '.join(PLACEMENTS)}")
    if device.type != "cuda":
        return "device"
    if placement != "auto":
        return placement
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= free_bytes // 2 else "host"


def local_steps(size: int, batch_size: int, local_epochs: float, cap: int | None) -> int:
    """Optimiser steps of one client in one round: E epochs of ceil(N / B) batches, capped."""
    steps = max(1, math.ceil(local_epochs * math.ceil(size / batch_size)))
    return min(steps, cap) if cap else steps


class LocalTrainer:
    """Trains hosted clients one after the other on one working module."""

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        step: StepConfig,
        device: torch.device,
        alias_client: int | None = None,
    ) -> None:
        self.model = model
        self.diffusion = diffusion
        self.cfg = step
        self.device = device
        self.alias_client = alias_client
        # torch.compile wraps the same module: parameters are shared, swapping clients still works.
        self.step_model = torch.compile(model) if step.compile else model
        self.names = [n for n, _ in model.named_parameters()]
        self._param = dict(model.named_parameters())

    # -- state swapping -------------------------------------------------------------------------
    def new_client_params(self, cid: int) -> dict[str, torch.Tensor]:
        """Client storage: the module's own tensors when aliased, else a copy."""
        if cid == self.alias_client:
            return {n: p.data for n, p in self._param.items()}
        return {n: p.detach().clone() for n, p in self._param.items()}

    @torch.no_grad()
    def load(self, client: ClientState) -> None:
        if client.cid != self.alias_client:
            for n, p in self._param.items():
                p.copy_(client.params[n])

    @torch.no_grad()
    def store(self, client: ClientState) -> None:
        if client.cid != self.alias_client:
            for n, p in self._param.items():
                client.params[n].copy_(p)

    # -- data -----------------------------------------------------------------------------------
    def _batch_indices(self, client: ClientState) -> torch.Tensor:
        """Next batch of client's data order, on the device of its images. Epochs are permutations drawn on
        the CPU from (seed, k, e), so the order is the same wherever the images are kept; each is drawn once
        per epoch and moved to the images' device once."""
        n, b = client.size, self.cfg.batch_size
        if client.offset >= n:
            client.epoch, client.offset = client.epoch + 1, 0
        cached = client.perm
        if cached is None or cached[0] != client.epoch:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 1, client.cid, client.epoch))
            cached = (client.epoch, torch.randperm(n, generator=g).to(client.images.device))
            client.perm = cached
        idx = cached[1][client.offset : client.offset + b]
        client.offset += b
        return idx

    def _batch(self, client: ClientState) -> torch.Tensor:
        """The next batch as float in [-1, 1], channels_last, on the training device. Images kept on the
        host are gathered there, pinned (PyTorch's caching host allocator reuses the pinned blocks once
        their copies are done) and copied without waiting."""
        x = client.images[self._batch_indices(client)]
        if x.device != self.device:
            if self.device.type == "cuda":
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
        return x.float().div_(127.5).sub_(1.0).contiguous(memory_format=torch.channels_last)

    # -- one round ------------------------------------------------------------------------------
    def train_round(
        self, client: ClientState, rnd: int, trainable: set[str] | None = None, anchored: set[str] | None = None
    ) -> RoundResult:
        """Train `client` for one round. `trainable`: parameter names to optimise (None = all). `anchored`: with
        ``prox_mu`` > 0, the (shared) parameters FedProx holds near their values at the start of the round."""
        self.load(client)
        model = self.model
        model.train()
        names = [n for n in self.names if trainable is None or n in trainable]
        for n, p in self._param.items():
            p.requires_grad_(trainable is None or n in trainable)
        params = [self._param[n] for n in names]
        prox = [self._param[n] for n in names if anchored is not None and n in anchored] if self.cfg.prox_mu else []
        anchors = [p.detach().clone() for p in prox]  # theta_shared: what the client received
        opt = torch.optim.Adam(params, lr=self.cfg.lr, **_fused_kwargs(self.device))
        if self.cfg.keep_opt_state and client.opt_state:
            _load_opt_state(opt, {n: self._param[n] for n in names}, client.opt_state)

        # Noise, timesteps and dropout of (client, round) come from seeds, not carried state.
        rseed = derive_seed(self.cfg.seed, 2, client.cid, rnd)
        torch.manual_seed(rseed)
        gen = torch.Generator(device=self.device).manual_seed(rseed)
        steps = local_steps(client.size, self.cfg.batch_size, self.cfg.local_epochs, self.cfg.max_local_steps)
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        amp = (
            torch.autocast(self.device.type, dtype=self.cfg.amp_dtype)
            if self.cfg.amp_dtype is not None
            else contextlib.nullcontext()
        )
        for _ in range(steps):
            x0 = self._batch(client)
            seen += int(x0.shape[0])
            with amp:
                loss = self.diffusion.training_loss(self.step_model, x0, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if prox:
                add_proximal_grad(prox, anchors, self.cfg.prox_mu)
            opt.step()
            if client.ema is not None:
                client.ema.update(model)
            loss_sum += loss.detach().float()  # no host sync inside the loop
        if self.cfg.keep_opt_state:
            client.opt_state = _save_opt_state(opt, {n: self._param[n] for n in names})
        for p in self._param.values():
            p.requires_grad_(True)
        self.store(client)
        total = float(loss_sum.item())
        client.last_loss = total / steps
        return RoundResult(loss_sum=total, steps=steps, images=seen)


def proximal_term(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's term (Li et al. 2020, eq. 2): (mu/2) sum_i ||theta_i - anchor_i||^2, differentiable."""
    return mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))


@torch.no_grad()
def add_proximal_grad(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> None:
    """p.grad += mu (p - anchor): the gradient of ``proximal_term``, added after the loss's backward instead of
    the term joining the loss (the same step without a second graph; the logged loss stays the diffusion loss).
    A parameter without a gradient gets the term's alone."""
    have = [(p, a) for p, a in zip(params, anchors, strict=True) if p.grad is not None]
    if have:
        diff = torch._foreach_sub([p for p, _ in have], [a for _, a in have])
        torch._foreach_add_([p.grad for p, _ in have], diff, alpha=mu)
    for p, a in zip(params, anchors, strict=True):
        if p.grad is None:
            p.grad = mu * (p - a)


def _fused_kwargs(device: torch.device) -> dict:
    # fused Adam: one kernel for all parameters on GPU; foreach (the default) on CPU.
    return {"fused": True} if device.type == "cuda" else {}


def _save_opt_state(opt: torch.optim.Optimizer, named: dict[str, nn.Parameter]) -> dict:
    out = {}
    for n, p in named.items():
        st = opt.state.get(p)
        if st:
            out[n] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else torch.tensor(v)) for k, v in st.items()}
    return out


def _load_opt_state(opt: torch.optim.Optimizer, named: dict[str, nn.Parameter], state: dict) -> None:
    # Keyed by parameter name, so a different trainable set (USplit 'assigned') still lines up.
    for n, p in named.items():
        if n in state:
            # Adam keeps `step` on the CPU unless fused/capturable, which want it on the parameter's device.
            fused = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
            opt.state[p] = {k: v.to(p.device) if (k != "step" or fused) else v.clone() for k, v in state[n].items()}
