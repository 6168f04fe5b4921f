"""FedProx (``optim.prox_mu``): the proximal term's gradient by hand on a two-parameter model, and what it does
to a client's local steps (the anchored, shared parameters stay near what the client received)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrun.client import ClientState, LocalTrainer, StepConfig, add_proximal_grad, proximal_term
from unet import GaussianDiffusion


def test_proximal_gradient_by_hand_on_two_parameters():
    # loss (a x + b - y)^2 at x = 2, y = 1, a = 0.5, b = 0.25: residual 0.25, dL/da = 2 r x = 1, dL/db = 2 r = 0.5
    a, b = torch.tensor(0.5, requires_grad=True), torch.tensor(0.25, requires_grad=True)
    anchors = [torch.tensor(0.25), torch.tensor(-0.5)]  # theta_shared
    mu = 0.1
    ((a * 2 + b - 1) ** 2).backward()
    assert (a.grad.item(), b.grad.item()) == (1.0, 0.5)
    add_proximal_grad([a, b], anchors, mu)
    # + mu (theta - theta_shared) = + 0.1 * (0.25, 0.75)
    assert a.grad.item() == pytest.approx(1.025, abs=1e-7) and b.grad.item() == pytest.approx(0.575, abs=1e-7)
    # the same as the term joining the loss: (mu/2) ||theta - theta_shared||^2 = 0.05 * (0.0625 + 0.5625)
    a2, b2 = torch.tensor(0.5, requires_grad=True), torch.tensor(0.25, requires_grad=True)
    term = proximal_term([a2, b2], anchors, mu)
    assert term.item() == pytest.approx(0.03125)
    ((a2 * 2 + b2 - 1) ** 2 + term).backward()
    assert torch.allclose(torch.stack([a.grad, b.grad]), torch.stack([a2.grad, b2.grad]))
    c = torch.tensor(3.0, requires_grad=True)  # a parameter without a gradient gets the term's alone
    add_proximal_grad([c], [torch.tensor(1.0)], mu)
    assert c.grad.item() == pytest.approx(0.2)


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(1, 1, 1)
        self.local = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.local(self.shared(x))


def _drift(mu: float) -> dict[str, float]:
    """How far each parameter moves in one round of 30 local steps with prox_mu = ``mu`` (``shared.*``
    anchored)."""
    torch.manual_seed(0)
    model = TwoConvs()
    step = StepConfig(0.05, 4, 1, 30, False, None, seed=3, prox_mu=mu)
    trainer = LocalTrainer(model, GaussianDiffusion(timesteps=10), step, torch.device("cpu"))
    images = torch.randint(0, 255, (16, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    client = ClientState(cid=0, params=trainer.new_client_params(0), images=images)
    start = {n: t.clone() for n, t in client.params.items()}
    trainer.train_round(client, 1, anchored={"shared.weight", "shared.bias"})
    return {n: float((client.params[n] - start[n]).abs().max()) for n in start}


def test_prox_mu_holds_the_anchored_parameters_near_what_was_received():
    free, held = _drift(0.0), _drift(100.0)
    for n in ("shared.weight", "shared.bias"):
        assert held[n] < 0.3 * free[n], (n, held[n], free[n])
    assert held["local.weight"] > 0.3 * free["local.weight"]  # the local ones are not anchored
    assert _drift(0.0) == free  # off: the same steps as without FedProx
