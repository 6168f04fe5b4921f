"""DP-FedAvg's pure pieces: clipping (hand-computed and norm bound), the distributed noise's variance, the
accountant against a direct dp-accounting computation, its budget check and its state."""

from __future__ import annotations

import math

import pytest
import torch

from fedrun.privacy.accountant import Accountant
from fedrun.privacy.dp import NoiseSource, clip_, clip_factor, l2_norm, noise_std

dp_accounting = pytest.importorskip("dp_accounting")


def test_clip_by_hand():
    a, b = torch.tensor([3.0]), torch.tensor([[4.0]])  # joint norm 5
    assert clip_([a, b], 1.0) == pytest.approx(0.2)
    assert a.item() == pytest.approx(0.6) and b.item() == pytest.approx(0.8)
    small = torch.tensor([0.3, 0.4])  # norm 0.5 <= 1: untouched, bit for bit
    before = small.clone()
    assert clip_([small], 1.0) == 1.0 and torch.equal(small, before)
    assert clip_factor(0.0, 2.0) == 1.0
    with pytest.raises(ValueError, match="norm nan"):
        clip_factor(float("nan"), 1.0)


@pytest.mark.parametrize("clip", [1e-3, 0.5, 7.0])
def test_every_clipped_update_has_norm_at_most_c(clip):
    g = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1.0, 1e3):
        update = [torch.randn(17, generator=g) * scale, torch.randn(3, 5, generator=g) * scale]
        clip_(update, clip)
        assert l2_norm(update) <= clip * (1 + 1e-6)


def test_noise_on_the_sum_has_variance_sigma2_c2():
    sigma, clip, n, numel = 1.3, 0.7, 4, 250_000
    std = noise_std(sigma, clip, n)
    assert std == pytest.approx(sigma * clip / 2)
    total = torch.zeros(numel, dtype=torch.float64)
    for _ in range(n):  # n clients, each its own source
        total += NoiseSource().add_(torch.zeros(numel), std).double()
    # The sample variance of 250k draws has a relative std of sqrt(2/250k) = 0.3%: 3% is ten of those.
    assert total.var().item() == pytest.approx(sigma**2 * clip**2, rel=0.03)
    assert abs(total.mean().item()) < 5 * sigma * clip / math.sqrt(numel)


def test_noise_is_not_derived_from_the_run_seed():
    draws = []
    for _ in range(2):
        torch.manual_seed(2023)  # the run seed every rank knows: it must not decide the noise
        draws.append(NoiseSource().add_(torch.zeros(64), 1.0))
    assert not torch.equal(draws[0], draws[1])


def _direct(population, sample, sigma, rounds, delta):
    """The same events, composed by dp-accounting directly: replace-one, sensitivity 2C -> sigma / 2."""
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(population, sample, dp_accounting.GaussianDpEvent(sigma / 2))
    acc.compose(event, rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("population, sample", [(5, 5), (20, 4)])
def test_epsilon_after_r_rounds_equals_dp_accounting(population, sample):
    acc = Accountant(1e-5, population, 1.1)
    assert acc.epsilon == 0.0
    for r in range(1, 7):
        acc.step(sample)
        assert acc.rounds == r
        assert acc.epsilon == pytest.approx(_direct(population, sample, 1.1, r, 1e-5), rel=0, abs=1e-9)


def test_all_clients_is_the_gaussian_mechanism():
    # m = K: dp-accounting reduces sampling to the Gaussian mechanism of multiplier sigma / 2.
    acc = Accountant(1e-6, 3, 2.0)
    for _ in range(4):
        acc.step(3)
    gauss = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gauss.compose(dp_accounting.GaussianDpEvent(1.0), 4)
    assert acc.epsilon == pytest.approx(gauss.get_epsilon(1e-6), abs=1e-9)
    # sampling fewer clients spends less
    sampled = Accountant(1e-6, 3, 2.0)
    for _ in range(4):
        sampled.step(1)
    assert sampled.epsilon < acc.epsilon


def test_budget_check_names_the_round_that_would_exceed_it():
    acc = Accountant(1e-5, 4, 1.0)
    budget = _direct(4, 4, 1.0, 3, 1e-5) + 1e-6  # rounds 1..3 fit, round 4 does not
    ran = 0
    while acc.epsilon_after_next(4) <= budget:
        acc.step(4)
        ran += 1
    assert ran == 3 and acc.epsilon <= budget < acc.epsilon_after_next(4)


def test_state_round_trip_continues_epsilon():
    acc = Accountant(1e-5, 10, 0.9)
    for _ in range(3):
        acc.step(10)
    state = acc.state_dict()
    assert state["history"] == [[3, 10, 10, 0.9]]  # run-length: plain numbers, JSON-able
    resumed = Accountant(1e-5, 10, 0.9)
    resumed.load_state_dict(state)
    assert resumed.rounds == 3 and resumed.epsilon == acc.epsilon
    resumed.step(10)
    assert resumed.epsilon == pytest.approx(_direct(10, 10, 0.9, 4, 1e-5), abs=1e-9)
    assert resumed.epsilon > acc.epsilon  # continues, not restarts
    # a changed sampling composes as its own run of rounds
    resumed.step(5)
    assert resumed.state_dict()["history"] == [[4, 10, 10, 0.9], [1, 10, 5, 0.9]]
