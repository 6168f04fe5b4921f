"""The DDPM process: schedule values computed by hand, q_sample statistics, losses, samplers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unet import GaussianDiffusion, UNet


def _betas(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> list[float]:
    return [start + i * (end - start) / (T - 1) for i in range(T)]


def _abar(T: int = 1000) -> list[float]:
    out, prod = [], 1.0
    for b in _betas(T):
        prod *= 1.0 - b
        out.append(prod)
    return out


# ---------------------------------------------------------------- schedule


def test_schedule_values_by_hand() -> None:
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000 and d.loss_type == "huber"
    assert d.betas.dtype == torch.float32 and d.betas.device.type == "cpu" and d.betas.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert d.betas[999].item() == pytest.approx(0.02, rel=1e-6)
    abar = d.alphas_cumprod
    assert abar[0].item() == pytest.approx(1 - 1e-4, rel=1e-7)
    assert abar[1].item() == pytest.approx((1 - 1e-4) * (1 - 1e-4 - (0.02 - 1e-4) / 999), rel=1e-7)
    ref = _abar()
    assert abar[999].item() == pytest.approx(ref[999], rel=1e-5)
    assert abar[999].item() == pytest.approx(4.04e-5, rel=5e-3)
    assert abar[500].item() == pytest.approx(ref[500], rel=1e-5)
    assert d.alphas_cumprod_prev[0].item() == 1.0 and d.alphas_cumprod_prev[1].item() == abar[0].item()
    torch.testing.assert_close(d.sqrt_alphas_cumprod**2, abar)
    torch.testing.assert_close(d.sqrt_one_minus_alphas_cumprod**2, 1 - abar)


def test_posterior_variance_by_hand() -> None:
    d = GaussianDiffusion()
    b, abar = _betas(), _abar()
    assert d.posterior_variance[0].item() == 0.0
    for t in (1, 10, 999):
        expected = b[t] * (1 - abar[t - 1]) / (1 - abar[t])
        assert d.posterior_variance[t].item() == pytest.approx(expected, rel=1e-5)
    # sigma_t^2 = posterior variance is strictly below beta_t for t > 0.
    assert (d.posterior_variance[1:] < d.betas[1:]).all()


def test_schedule_cached_per_device() -> None:
    d = GaussianDiffusion(timesteps=10)
    on_cpu = d.on("cpu")
    assert d.on(torch.device("cpu")) is on_cpu
    assert on_cpu["betas"].dtype == torch.float32 and on_cpu["betas"].shape == (10,)


@pytest.mark.parametrize(
    "kwargs", [{"timesteps": 0}, {"beta_start": 0.0}, {"beta_start": 0.1, "beta_end": 0.01}, {"loss": "l1"}]
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GaussianDiffusion(**kwargs)


# ---------------------------------------------------------------- q_sample


def test_q_sample_exact_at_t0() -> None:
    d = GaussianDiffusion()
    x0 = torch.tensor([[0.5, -1.0]])
    noise = torch.tensor([[2.0, 1.0]])
    xt = d.q_sample(x0, torch.tensor([0]), noise)
    # sqrt(1 - 1e-4) x0 + sqrt(1e-4) noise
    s = math.sqrt(1 - 1e-4)
    torch.testing.assert_close(xt, torch.tensor([[s * 0.5 + 0.02, -s + 0.01]]))


def test_q_sample_statistics() -> None:
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    n = 100_000
    x0 = torch.full((n, 1, 1, 1), 0.8)
    abar = _abar()
    for t in (0, 300, 999):
        xt = d.q_sample(x0, torch.full((n,), t), torch.randn(x0.shape, generator=g))
        assert xt.mean().item() == pytest.approx(math.sqrt(abar[t]) * 0.8, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - abar[t], rel=0.02, abs=1e-5)


def test_q_sample_uses_each_examples_t() -> None:
    d = GaussianDiffusion()
    x0 = torch.ones(2, 3, 4, 4)
    xt = d.q_sample(x0, torch.tensor([0, 999]), torch.zeros_like(x0))
    assert torch.allclose(xt[0], torch.full((3, 4, 4), math.sqrt(_abar()[0])))
    assert torch.allclose(xt[1], torch.full((3, 4, 4), math.sqrt(_abar()[999])))


# ---------------------------------------------------------------- training loss


class _Const(nn.Module):
    """Predicts a constant, and records the timesteps it was called with."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = value
        self.ts: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.ts.append(t)
        return torch.full_like(x, self.value)


def test_loss_types_by_hand() -> None:
    x0 = torch.zeros(1, 1, 2, 2)
    noise = torch.tensor([[[[0.5, -2.0], [3.0, 0.0]]]])
    t = torch.tensor([7])
    # Model predicts 0: huber = mean(0.5 * 0.25, 2 - 0.5, 3 - 0.5, 0) = 4.125 / 4; l2 = (0.25 + 4 + 9) / 4.
    huber = GaussianDiffusion(loss="huber").training_loss(_Const(), x0, t=t, noise=noise)
    l2 = GaussianDiffusion(loss="l2").training_loss(_Const(), x0, t=t, noise=noise)
    assert huber.shape == () and huber.item() == pytest.approx(4.125 / 4)
    assert l2.item() == pytest.approx(13.25 / 4)


def test_loss_zero_for_the_true_noise() -> None:
    d = GaussianDiffusion()
    x0 = torch.randn(3, 1, 4, 4)
    noise = torch.randn(3, 1, 4, 4)
    oracle = lambda xt, t: noise
    assert d.training_loss(oracle, x0, t=torch.tensor([0, 500, 999]), noise=noise).item() == 0.0


def test_loss_draws_t_and_noise_from_generator() -> None:
    d = GaussianDiffusion()
    x0 = torch.zeros(512, 1, 4, 4)
    m = _Const()
    a = d.training_loss(m, x0, generator=torch.Generator().manual_seed(1))
    b = d.training_loss(m, x0, generator=torch.Generator().manual_seed(1))
    c = d.training_loss(m, x0, generator=torch.Generator().manual_seed(2))
    assert a.item() == b.item() != c.item()
    t1, t2, t3 = m.ts
    assert torch.equal(t1, t2) and not torch.equal(t1, t3)
    assert t1.dtype == torch.long and t1.shape == (512,)
    assert 0 <= t1.min().item() and t1.max().item() <= 999
    assert t1.float().mean().item() == pytest.approx(499.5, abs=40)  # uniform over [0, 1000)
    # Predicting 0: the loss is the mean smooth-L1 of N(0, 1) noise, whose expectation is
    # 0.5 E[n^2; |n|<1] + E[|n|; |n|>1] - 0.5 P(|n|>1) = 0.5 (P1 - 2 phi1) + 2 phi1 - 0.5 (1 - P1) ~ 0.4247
    phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
    p1 = math.erf(1 / math.sqrt(2))
    expected = 0.5 * (p1 - 2 * phi1) + 2 * phi1 - 0.5 * (1 - p1)
    assert expected == pytest.approx(0.4247, abs=1e-4)
    assert a.item() == pytest.approx(expected, abs=0.03)  # 8192 draws: standard error ~0.005


def test_loss_backpropagates_through_unet() -> None:
    torch.manual_seed(0)
    model = UNet(dim=8, channels=1, dim_mults=(1, 2))
    loss = GaussianDiffusion().training_loss(model, torch.rand(2, 1, 8, 8) * 2 - 1)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.final_conv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- samplers


def _oracle(d: GaussianDiffusion, c: Tensor):
    """Exact noise predictor for data that is the single point c: (x_t - sqrt(abar) c) / sqrt(1 - abar)."""

    def model(x: Tensor, t: Tensor) -> Tensor:
        s = d.sqrt_alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        s1 = d.sqrt_one_minus_alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        return ((x.double() - s * c) / s1).float()

    return model


def test_samplers_recover_a_point_mass() -> None:
    # With the Bayes-optimal denoiser for a point mass, every sampler must land on that point.
    d = GaussianDiffusion()
    c = torch.tensor([0.25, -0.6, 0.9]).view(1, 3, 1, 1).double()
    model = _oracle(d, c)
    target = c.float().expand(4, 3, 2, 2)
    g = lambda: torch.Generator().manual_seed(0)
    out = d.p_sample_loop(model, (4, 3, 2, 2), "cpu", generator=g())
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    for steps, eta in ((10, 0.0), (50, 1.0)):
        out = d.ddim_sample_loop(model, (4, 3, 2, 2), "cpu", steps=steps, eta=eta, generator=g())
        torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


def test_sampler_output_is_clamped() -> None:
    d = GaussianDiffusion(timesteps=20)
    c = torch.tensor([1.7, -3.0]).view(1, 2, 1, 1).double()
    out = d.p_sample_loop(_oracle(d, c), (2, 2, 1, 1), "cpu", generator=torch.Generator().manual_seed(0))
    assert out[:, 0].eq(1.0).all() and out[:, 1].eq(-1.0).all()


def _toy_model(x: Tensor, t: Tensor) -> Tensor:
    # A smooth, t-dependent stand-in for a network.
    return 0.5 * torch.tanh(x) + torch.sin(t.float() / 7.0).view(-1, 1, 1, 1)


def test_ddim_full_steps_eta1_equals_ancestral() -> None:
    # Song et al.: with every timestep and eta = 1, DDIM's sigma_t^2 is the posterior variance and its mean
    # is the DDPM posterior mean, so both samplers run the same chain on the same noise draws.
    d = GaussianDiffusion(timesteps=100)
    shape = (3, 2, 4, 4)
    g = lambda: torch.Generator().manual_seed(3)
    anc = d.p_sample_loop(_toy_model, shape, "cpu", generator=g())
    ddim = d.ddim_sample_loop(_toy_model, shape, "cpu", steps=100, eta=1.0, generator=g())
    assert anc.abs().max() <= 1.0
    assert 0.2 < anc.std().item()  # a real spread of values, not a clamped constant
    torch.testing.assert_close(ddim, anc, atol=1e-4, rtol=0)
    # eta = 0 is a different (deterministic) chain.
    ddim0 = d.ddim_sample_loop(_toy_model, shape, "cpu", steps=100, eta=0.0, generator=g())
    assert not torch.allclose(ddim0, anc, atol=1e-2)


def test_ddim_timesteps() -> None:
    d = GaussianDiffusion()
    assert d.ddim_timesteps(5) == [999, 749, 500, 250, 0]
    assert d.ddim_timesteps(1000) == list(range(999, -1, -1))
    assert d.ddim_timesteps(1) == [999]
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            d.ddim_timesteps(bad)


def test_progress_called_every_step() -> None:
    d = GaussianDiffusion(timesteps=6)
    calls: list[tuple[int, int]] = []
    d.p_sample_loop(_toy_model, (1, 1, 2, 2), "cpu", progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 6) for i in range(1, 7)]
    calls.clear()
    d.ddim_sample_loop(_toy_model, (1, 1, 2, 2), "cpu", steps=3, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_sample_dispatch_and_determinism_with_tiny_unet() -> None:
    torch.manual_seed(0)
    model = UNet(dim=8, channels=1, dim_mults=(1, 2)).eval()
    d = GaussianDiffusion(timesteps=8)
    g = lambda seed: torch.Generator().manual_seed(seed)
    shape = (2, 1, 8, 8)
    anc = d.sample(model, shape, "cpu", generator=g(0))
    assert anc.shape == shape and torch.isfinite(anc).all() and anc.abs().max() <= 1.0
    assert torch.equal(anc, d.p_sample_loop(model, shape, "cpu", generator=g(0)))
    assert not torch.equal(anc, d.sample(model, shape, "cpu", generator=g(1)))
    ddim = d.sample(model, shape, "cpu", steps=4, generator=g(0))
    assert ddim.shape == shape and ddim.abs().max() <= 1.0
    assert torch.equal(ddim, d.ddim_sample_loop(model, shape, "cpu", steps=4, generator=g(0)))
    assert not torch.equal(ddim, anc)
    # Sampling never builds a graph.
    assert not anc.requires_grad and not ddim.requires_grad


def test_huber_matches_torch() -> None:
    # The "huber" loss is smooth-L1 with beta 1 (the paper's code), not Huber with another delta.
    pred, target = torch.tensor([0.2, 3.0]), torch.tensor([0.0, 0.0])
    assert F.smooth_l1_loss(pred, target).item() == pytest.approx((0.5 * 0.04 + 2.5) / 2)
    d = GaussianDiffusion(loss="huber")
    loss = d.training_loss(_Const(0.0), torch.zeros(1, 2), t=torch.tensor([0]), noise=-pred.view(1, 2))
    assert loss.item() == pytest.approx((0.5 * 0.04 + 2.5) / 2)


def test_posterior_mean_coefficients_equal_eq11_when_nothing_is_clipped() -> None:
    # coef1 x0_hat + coef2 x_t with x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is Ho et al.'s eq. 11.
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    for t in (0, 1, 10, 500, 999):
        abar = d._f64["alphas_cumprod"][t]
        beta = d._f64["betas"][t]
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        via_x0 = d._f64["posterior_mean_coef1"][t] * x0 + d._f64["posterior_mean_coef2"][t] * x
        eq11 = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
        torch.testing.assert_close(via_x0, eq11, atol=1e-9, rtol=1e-9)
    assert d._f64["posterior_mean_coef1"][0] == pytest.approx(1.0) and d._f64["posterior_mean_coef2"][0] == 0.0


def test_clip_x0_sampler_by_hand_and_equal_to_eq11_inside_the_range() -> None:
    d = GaussianDiffusion(timesteps=2)

    def big_eps(x: Tensor, t: Tensor) -> Tensor:  # at t = 1 predicts x0 far above 1, at t = 0 eps = 0
        return torch.where(t.view(-1, 1, 1, 1) == 1, -300.0, 0.0).expand_as(x)

    shape = (2, 1, 2, 2)
    out = d.p_sample_loop(big_eps, shape, "cpu", generator=torch.Generator().manual_seed(5), clip_x0=True)
    g = torch.Generator().manual_seed(5)
    s = d._f64
    x = torch.randn(shape, generator=g)
    for t in (1, 0):
        eps = -300.0 if t == 1 else 0.0
        x0 = ((x - eps * s["sqrt_one_minus_alphas_cumprod"][t]) / s["sqrt_alphas_cumprod"][t]).clamp(-1, 1)
        x = s["posterior_mean_coef1"][t] * x0 + s["posterior_mean_coef2"][t] * x
        if t > 0:
            x = x + math.sqrt(s["posterior_variance"][t]) * torch.randn(shape, generator=g)
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-6, rtol=0)
    unclipped = d.p_sample_loop(big_eps, shape, "cpu", generator=torch.Generator().manual_seed(5))
    assert unclipped.eq(1.0).all() and out.lt(1.0).any()  # unclipped, x_1 ran off to ~+40: all saturate
    # A point mass inside [-1, 1]: the oracle's x0 is never clipped, so both chains are the same.
    c = torch.tensor([0.25, -0.6, 0.9]).view(1, 3, 1, 1).double()
    d = GaussianDiffusion(timesteps=50)
    a = d.p_sample_loop(_oracle(d, c), (4, 3, 2, 2), "cpu", generator=torch.Generator().manual_seed(1))
    b = d.p_sample_loop(_oracle(d, c), (4, 3, 2, 2), "cpu", generator=torch.Generator().manual_seed(1), clip_x0=True)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
