"""The DDPM process (Ho et al. 2020): linear beta schedule, noise-prediction loss, ancestral + DDIM samplers.

The network is an argument, not a member (as in DiT / improved-diffusion): `training_loss(model, x0)`,
`p_sample_loop(model, ...)`. Indices t run over 0..T-1 as in the paper's (annotated-diffusion) code, so
the paper's x_t is our index t - 1: `alphas_cumprod[0] = 1 - beta_0` is the first noising step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GaussianDiffusion"]

Model = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[[int, int], object]

_SCHEDULE = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas",
    "posterior_variance",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


class GaussianDiffusion:
    """DDPM with a linear beta schedule.

    Args:
        timesteps: T, the number of noising steps.
        beta_start, beta_end: first and last beta of the linear schedule.
        loss: "huber" (F.smooth_l1_loss, what the paper's code trained Table 1 with) or "l2" (F.mse_loss,
            the paper's Algorithm 3).

    The schedule is computed in float64 and kept as float32 CPU tensors (attributes named in `_SCHEDULE`);
    `on(device)` returns copies on a device, cached per device. Samplers read per-step scalars from the
    float64 values.
    """

    LOSSES = ("huber", "l2")

    def __init__(
        self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, loss: str = "huber"
    ) -> None:
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        if loss not in self.LOSSES:
            raise ValueError(f"loss must be one of {self.LOSSES}, got {loss!r}")
        self.num_timesteps = timesteps
        self.loss_type = loss

        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat((torch.ones(1, dtype=torch.float64), abar[:-1]))
        schedule = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas": alphas.rsqrt(),
            # Variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7); 0 at t = 0.
            "posterior_variance": betas * (1.0 - abar_prev) / (1.0 - abar),
            # Its mean is coef1 x_0 + coef2 x_t (eq. 7).
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        self._f64: dict[str, list[float]] = {k: v.tolist() for k, v in schedule.items()}
        for name, value in schedule.items():
            setattr(self, name, value.float())
        self._cache: dict[torch.device, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ schedule access

    def on(self, device: torch.device | str) -> dict[str, Tensor]:
        """The float32 schedule tensors on `device` (copied once per device, then cached)."""
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = {k: getattr(self, k).to(device) for k in _SCHEDULE}
        return self._cache[device]

    def _gather(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        # schedule[name][t] reshaped to [B, 1, ..., 1] to broadcast against `like` ([B, ...]).
        values = self.on(t.device)[name][t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    # ------------------------------------------------------------------ training

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4). x0, noise: [B, ...], t: [B]."""
        a = self._gather("sqrt_alphas_cumprod", t, x0)
        b = self._gather("sqrt_one_minus_alphas_cumprod", t, x0)
        return a * x0 + b * noise

    def training_loss(
        self,
        model: Model,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Mean noise-prediction loss || eps - model(x_t, t) || (Ho et al. Algorithm 1), a scalar.

        t is drawn uniformly from [0, T) per example and noise from N(0, I) when not given, both with
        `generator` (which must live on x0's device).
        """
        _check_generator(generator, x0.device)
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        pred = model(self.q_sample(x0, t, noise), t)
        if self.loss_type == "huber":
            return F.smooth_l1_loss(pred, noise)
        return F.mse_loss(pred, noise)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        device: torch.device | str,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
        clip_x0: bool = False,
    ) -> Tensor:
        """Ancestral sampling over all T steps (Ho et al. Algorithm 2), output clamped to [-1, 1].

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_hat) + sigma_t z, with sigma_t^2 the
        posterior variance beta_t (1 - abar_{t-1}) / (1 - abar_t), as in the paper's annotated-diffusion
        code (Ho et al. report both choices give similar results); no noise is added at the last step.
        Intermediate states are not clipped (as in that code). ``clip_x0``: instead, as Ho et al.'s released
        code and diffusers' ``DDPMScheduler(clip_sample=True)`` do, estimate x_0 = (x_t - sqrt(1 - abar_t)
        eps_hat) / sqrt(abar_t), clip it to [-1, 1] and take the posterior mean coef1 x_0 + coef2 x_t (eq. 7),
        which equals eq. 11 whenever nothing is clipped. Put the model in eval mode first.
        `progress(i, T)` is called after step i = 1..T.
        """
        device = torch.device(device)
        _check_generator(generator, device)
        s = self._f64
        x = torch.randn(tuple(shape), device=device, generator=generator)  # x_T
        total = self.num_timesteps
        for i, t in enumerate(reversed(range(total)), start=1):
            eps = model(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long)).float()
            if clip_x0:
                x0 = ((x - s["sqrt_one_minus_alphas_cumprod"][t] * eps) / s["sqrt_alphas_cumprod"][t]).clamp(-1, 1)
                mean = s["posterior_mean_coef1"][t] * x0 + s["posterior_mean_coef2"][t] * x
            else:
                eps_coef = s["betas"][t] / s["sqrt_one_minus_alphas_cumprod"][t]
                mean = s["sqrt_recip_alphas"][t] * (x - eps_coef * eps)  # Ho et al. eq. 11
            if t > 0:
                z = torch.randn(x.shape, device=device, generator=generator)
                x = mean + math.sqrt(s["posterior_variance"][t]) * z
            else:
                x = mean
            if progress is not None:
                progress(i, total)
        return x.clamp(-1.0, 1.0)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spaced from T-1 down to 0 (descending, distinct)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.num_timesteps}], got {steps}")
        return torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        device: torch.device | str,
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
        clip_x0: bool = False,
    ) -> Tensor:
        """DDIM sampling (Song et al. 2021, eq. 12) on `ddim_timesteps(steps)`, output clamped to [-1, 1].

        eta = 0 is deterministic given x_T; eta = 1 with steps = T is ancestral sampling with the posterior
        variance, i.e. the same chain as `p_sample_loop` (same noise draws from the same generator).
        ``clip_x0``: clip the predicted x_0 to [-1, 1] at every step and re-derive eps_hat from it (GLIDE;
        diffusers' DDIMScheduler with clip_sample and use_clipped_model_output), which equals eq. 12 whenever
        nothing is clipped. An undertrained model predicts x_0 far outside [-1, 1] at high noise, and the
        unclipped chain then ends in saturated blobs (measured on the quickstart, issue 13).
        """
        device = torch.device(device)
        _check_generator(generator, device)
        s = self._f64
        ts = self.ddim_timesteps(steps)
        x = torch.randn(tuple(shape), device=device, generator=generator)
        for i, t in enumerate(ts):
            abar = s["alphas_cumprod"][t]
            abar_prev = s["alphas_cumprod"][ts[i + 1]] if i + 1 < len(ts) else 1.0
            eps = model(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long)).float()
            x0 = (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)  # predicted x_0
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                eps = (x - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
            # sigma_t(eta) from Song et al. eq. 16.
            sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
            direction = math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
            x = math.sqrt(abar_prev) * x0 + direction
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, device=device, generator=generator)
            if progress is not None:
                progress(i + 1, len(ts))
        return x.clamp(-1.0, 1.0)

    def sample(
        self,
        model: Model,
        shape: Sequence[int],
        device: torch.device | str,
        steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
        clip_x0: bool = False,
    ) -> Tensor:
        """Ancestral sampling over all T steps if `steps` is None (the paper), else DDIM with `steps`;
        ``clip_x0``: see ``p_sample_loop`` and ``ddim_sample_loop``."""
        if steps is None:
            return self.p_sample_loop(model, shape, device, generator=generator, progress=progress, clip_x0=clip_x0)
        return self.ddim_sample_loop(
            model, shape, device, steps=steps, eta=eta, generator=generator, progress=progress, clip_x0=clip_x0
        )


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, but the tensors are on {device}")
