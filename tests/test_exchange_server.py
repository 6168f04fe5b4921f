"""Stage 4 with a server optimiser: FedAvgM, Nesterov (DiLoCo's outer step) and FedAdam against torch.optim on
the same pseudo-gradient, FedYogi by hand, over one and two rounds of a real single-process Exchange; their
state survives a checkpoint, and neither the layout (in place, packed, bucketed) nor bf16 changes the rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fedrun.exchange import Exchange
from fedrun.exchange.server import FedAvg, FedYogi, ServerOptimizer, make_server
from fedrun.methods import plan_round

E, M, U = "encoder", "bottleneck", "decoder"
GROUPS = {E: ["e.w", "e.b"], M: ["m.w"], U: ["u.w"]}
SHAPES = {"e.w": (3, 2), "e.b": (2,), "m.w": (4,), "u.w": (2, 2)}
SIZES = [1, 3]  # p = (1/4, 3/4): exact in fp32


def rand_params(seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=g) for n, s in SHAPES.items()}


def exchange_average(c0: dict[str, Tensor], c1: dict[str, Tensor]) -> dict[str, Tensor]:
    """The average the packed sync forms, in its order: copy, scale by p_0, add p_1 c_1 (stage 2)."""
    return {n: (c0[n] * 0.25).add_(c1[n], alpha=0.75) for n in c0}


def torch_reference(name: str, lr: float) -> type:
    def make(params):
        if name == "fedavgm":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        if name == "nesterov":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-3)

    return make


def two_rounds(name: str, lr: float, **kw) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], list]:
    """Two syncs of 2 hosted clients under FULL from a common start: the new shared values after each, the
    averages, and the server's pseudo-gradient norms."""
    start = rand_params(0)
    ex = Exchange(GROUPS, SIZES, server=make_server(name, GROUPS, lr, **kw))
    ex.set_reference(start)
    clients = {k: {n: t.clone() for n, t in start.items()} for k in (0, 1)}
    news, avgs, norms = [], [], []
    for rnd in (1, 2):
        for k, params in clients.items():  # "local training": each client moves its own way
            for n, t in rand_params(10 * rnd + k, 0.1).items():
                params[n].add_(t)
        avgs.append(exchange_average(clients[0], clients[1]))
        stats = ex.sync(plan_round("full", rnd, 2, 0), clients)
        norms.append(stats.pseudo_grad_norm)
        assert all(torch.equal(clients[0][n], clients[1][n]) for n in SHAPES)  # both receive the new value
        news.append({n: t.clone() for n, t in clients[0].items()})
    return news, avgs, norms


@pytest.mark.parametrize("name, lr", [("fedavgm", 1.0), ("nesterov", 0.7), ("fedadam", 0.01)])
def test_server_optimizer_equals_torch_optim_on_the_pseudo_gradient(name, lr):
    news, avgs, norms = two_rounds(name, lr)
    start = rand_params(0)
    params = {n: t.clone().requires_grad_() for n, t in start.items()}
    opt = torch_reference(name, lr)(list(params.values()))
    for rnd in range(2):
        deltas = {n: (p.detach() - avgs[rnd][n]) for n, p in params.items()}  # last shared minus the average
        for n, p in params.items():
            p.grad = deltas[n].clone()
        opt.step()
        for n, p in params.items():
            assert torch.equal(news[rnd][n], p.detach()), f"{name} round {rnd + 1}: {n}"
        expect = math.sqrt(sum(float(d.double().square().sum()) for d in deltas.values()))
        assert norms[rnd] == pytest.approx(expect, rel=1e-6)
    assert not torch.equal(news[1]["u.w"], avgs[1]["u.w"])  # the server step is no plain average


def test_fedyogi_by_hand():
    """Reddi et al. 2021, Algorithm 2 (FedYogi), with FedAdam's bias corrections, in float64 by hand."""
    lr, b1, b2, eps = 0.05, 0.9, 0.5, 1e-3  # a small beta2: some of round 2's v shrink
    news, avgs, _ = two_rounds("fedyogi", lr, betas=(b1, b2), eps=eps)
    x = {n: t.double() for n, t in rand_params(0).items()}
    m = {n: torch.zeros_like(t) for n, t in x.items()}
    v = {n: torch.zeros_like(t) for n, t in x.items()}
    shrunk = 0
    for t in (1, 2):
        for n in x:
            d = x[n] - avgs[t - 1][n].double()
            m[n] = b1 * m[n] + (1 - b1) * d
            shrunk += int((v[n] > d * d).sum())
            v[n] = v[n] - (1 - b2) * d * d * torch.sign(v[n] - d * d)
            x[n] = x[n] - lr / (1 - b1**t) * m[n] / (v[n].sqrt() / math.sqrt(1 - b2**t) + eps)
            torch.testing.assert_close(news[t - 1][n].double(), x[n], rtol=1e-5, atol=1e-7)
    assert shrunk > 0  # round 2 has coordinates where Yogi's v shrinks: it differs from Adam's there
    adam, _, _ = two_rounds("fedadam", lr, betas=(b1, b2), eps=eps)
    assert all(torch.equal(adam[0][n], news[0][n]) for n in x)  # from v = 0, the first steps agree
    assert not all(torch.equal(adam[1][n], news[1][n]) for n in x)


def test_fedavg_keeps_no_state_and_no_fp32_reference():
    server = make_server("fedavg", GROUPS)
    assert type(server) is FedAvg and not isinstance(server, ServerOptimizer)
    ex = Exchange(GROUPS, SIZES, server=server)
    ex.set_reference(rand_params(0))
    assert len(ex.reference) == 0 and ex.optimizer is None  # today's fp32 path: values only, nothing kept
    clients = {0: rand_params(1), 1: rand_params(2)}
    expect = exchange_average(clients[0], clients[1])
    assert ex.sync(plan_round("udec", 1, 2, 0), clients).pseudo_grad_norm is None
    assert torch.equal(clients[0]["u.w"], expect["u.w"]) and not torch.equal(clients[0]["e.w"], expect["e.w"])


def test_server_optimizer_needs_a_reference_and_acts_on_shared_groups_only():
    ex = Exchange(GROUPS, SIZES, server=make_server("fedadam", GROUPS, 0.01))
    clients = {0: rand_params(1), 1: rand_params(2)}
    before = {k: {n: t.clone() for n, t in c.items()} for k, c in clients.items()}
    with pytest.raises(ValueError, match="set_reference"):
        ex.sync(plan_round("udec", 1, 2, 0), clients)
    assert all(torch.equal(before[k][n], clients[k][n]) for k in clients for n in SHAPES)  # nothing written
    ex.set_reference(before[0])
    ex.sync(plan_round("udec", 1, 2, 0), clients)
    assert ex.optimizer.steps == {U: 1} and set(ex.optimizer.state["exp_avg"]) == {"u.w"}
    assert torch.equal(clients[1]["e.w"], before[1]["e.w"])  # UDec's encoder stays local


def test_a_plain_sync_leaves_the_server_alone():
    """``sync(fedavg=True)`` (the final average of the EMA copies): the average, no step, no state touched."""
    start = rand_params(0)
    ex = Exchange(GROUPS, SIZES, server=make_server("fedavgm", GROUPS, 1.0))
    ex.set_reference(start)
    ex.sync(plan_round("full", 1, 2, 0), {0: rand_params(1), 1: rand_params(2)})
    before = ex.optimizer.state_dict()
    ref = {n: t.clone() for n, t in ex.reference.items()}
    emas = {0: rand_params(3), 1: rand_params(4)}
    expect = exchange_average(emas[0], emas[1])
    assert ex.sync(plan_round("full", 2, 2, 0), emas, fedavg=True).pseudo_grad_norm is None
    assert all(torch.equal(emas[k][n], expect[n]) for k in emas for n in SHAPES)
    after = ex.optimizer.state_dict()
    assert after["steps"] == before["steps"] == {E: 1, M: 1, U: 1}
    assert all(torch.equal(after["state"]["momentum"][n], before["state"]["momentum"][n]) for n in SHAPES)
    assert all(torch.equal(ex.reference[n], ref[n]) for n in SHAPES)


def test_server_state_resumes_bit_identically():
    news, _, _ = two_rounds("fedadam", 0.01)
    start = rand_params(0)
    ex = Exchange(GROUPS, SIZES, server=make_server("fedadam", GROUPS, 0.01))
    ex.set_reference(start)
    clients = {k: {n: t.clone() for n, t in start.items()} for k in (0, 1)}

    def train(rnd: int) -> None:
        for k, params in clients.items():
            for n, t in rand_params(10 * rnd + k, 0.1).items():
                params[n].add_(t)

    train(1)
    ex.sync(plan_round("full", 1, 2, 0), clients)
    saved = ex.optimizer.state_dict()  # what a checkpoint holds, then a new process
    resumed = Exchange(GROUPS, SIZES, server=make_server("fedadam", GROUPS, 0.01))
    resumed.set_reference(clients[0])  # the checkpointed shared parameters are the last shared ones
    resumed.optimizer.load_state_dict(saved)
    train(2)
    resumed.sync(plan_round("full", 2, 2, 0), clients)
    assert all(torch.equal(clients[0][n], news[1][n]) for n in SHAPES)
    with pytest.raises(ValueError, match="fedadam"):
        make_server("fedyogi", GROUPS, 0.01).load_state_dict(saved)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3)  # a 4-d weight: channels_last changes its memory order
        self.b = nn.Linear(4, 4)


CONV_GROUPS = {U: ["a.weight", "a.bias", "b.weight", "b.bias"]}


@pytest.mark.parametrize("exchange_dtype", ["fp32", "bf16"])
def test_in_place_packed_and_bucketed_syncs_agree(exchange_dtype):
    """The rule is elementwise: an adopted channels_last module, a packed copy and tiny buckets step alike."""
    torch.manual_seed(0)
    module = Conv().to(memory_format=torch.channels_last)
    packed = {n: p.detach().clone() for n, p in module.named_parameters()}

    def exchange(bucket_bytes: int | None) -> Exchange:
        server = make_server("nesterov", CONV_GROUPS, 0.7)
        return Exchange(CONV_GROUPS, [1], exchange_dtype=exchange_dtype, bucket_bytes=bucket_bytes, server=server)

    runs = [exchange(None), exchange(64)]  # one bucket; a bucket per parameter
    adopted = exchange(None)
    assert adopted.adopt(module)
    live = {n: p.data for n, p in module.named_parameters()}
    copies = [{n: t.clone() for n, t in packed.items()} for _ in runs]
    for ex, params in [(adopted, live), *zip(runs, copies, strict=True)]:
        ex.set_reference(params)
    for rnd in (1, 2, 3):
        g = torch.Generator().manual_seed(rnd)
        noise = {n: 0.05 * torch.randn(t.shape, generator=g) for n, t in packed.items()}
        for ex, params in [(adopted, live), *zip(runs, copies, strict=True)]:
            for n, t in params.items():
                t.add_(noise[n])
            ex.sync(plan_round("udec", rnd, 1, 0), {0: params})
        for params in copies:
            assert all(torch.equal(live[n], params[n]) for n in live), f"round {rnd}"
    assert isinstance(adopted.optimizer, ServerOptimizer) and adopted.optimizer.steps == {U: 3}


def test_yogi_shrinks_by_at_most_its_share():
    yogi = FedYogi({U: ["w"]}, lr=1.0, betas=(0.9, 0.5), eps=1e-3)
    v = torch.tensor([4.0, 1.0, 0.0])
    yogi.second_moment(v, torch.tensor([1.0, 2.0, 3.0]))
    # v - 0.5 * d^2 * sign(v - d^2): 4 - 0.5 = 3.5; 1 + 0.5 * 4 = 3; 0 + 0.5 * 9 = 4.5
    assert v.tolist() == [3.5, 3.0, 4.5]
