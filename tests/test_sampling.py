"""Client sampling (``federation.sample_clients``): the draw, the plan it makes, and the exchange of a sampled
round, in one process and on real gloo ranks (the same draws and the same new values on every rank)."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from multiproc import spawn_ranks

from fedrun import dist as fdist
from fedrun.exchange import Exchange
from fedrun.exchange.server import make_server
from fedrun.methods import GROUPS, METHOD_NAMES, plan_round, sampled_clients

E, M, U = "encoder", "bottleneck", "decoder"


def test_each_client_is_drawn_at_rate_count_over_k():
    """Over 2,000 rounds each client's rate is within 4 sigma of q = m / K (binomial sigma)."""
    rounds, K, m = 2000, 7, 3
    counts = [0] * K
    for r in range(1, rounds + 1):
        drawn = sampled_clients(2023, r, K, m)
        assert len(drawn) == m and list(drawn) == sorted(set(drawn)) and all(0 <= k < K for k in drawn)
        for k in drawn:
            counts[k] += 1
    q = m / K
    sigma = math.sqrt(q * (1 - q) / rounds)
    for k, c in enumerate(counts):
        assert abs(c / rounds - q) <= 4 * sigma, (k, c / rounds, q, sigma)
    # and the rounds really differ: not one fixed subset
    assert len({sampled_clients(2023, r, K, m) for r in range(1, 50)}) > 10


def test_the_draw_is_a_pure_function_of_seed_and_round():
    assert sampled_clients(7, 3, 10, 4) == sampled_clients(7, 3, 10, 4)  # every rank, every resume
    assert len({sampled_clients(s, 3, 10, 4) for s in range(20)}) > 1  # the seed matters
    assert sampled_clients(7, 3, 10, 0) == sampled_clients(7, 3, 10, 10) == tuple(range(10))  # all
    with pytest.raises(ValueError, match="count=11"):
        sampled_clients(7, 3, 10, 11)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_sampling_all_is_the_plan_as_it_was(method):
    for r in (1, 2, 5):
        plain = plan_round(method, r, 5, 11)
        assert plan_round(method, r, 5, 11, 5) == plain and plain.sampled is None
        assert plain.participants == tuple(range(5))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_sampled_plan_gives_the_unsampled_nothing(method):
    for r in range(1, 30):
        plan = plan_round(method, r, 6, 11, 3)
        assert plan.sampled == sampled_clients(11, r, 6, 3) == plan.participants
        for k in range(6):
            if k not in plan.sampled:
                assert plan.assignments[k] == frozenset()
        # the groups shared are the method's: every one has a sampled contributor
        assert plan.shared_groups() == plan_round(method, r, 6, 11).shared_groups()
        for g in plan.shared_groups():
            assert set(plan.contributors(g)) <= set(plan.sampled)


def test_usplit_draws_its_roles_among_the_sampled():
    for r in range(1, 30):
        plan = plan_round("usplit", r, 5, 3, 2)
        a, b = plan.sampled
        # a pair: one the encoder, the other the decoder, the bottleneck with one of them
        assert [len(plan.assignments[k] & {E, U}) for k in (a, b)] == [1, 1]
        assert not (plan.assignments[a] & plan.assignments[b])
        assert plan.assignments[a] | plan.assignments[b] == set(GROUPS)
    roles = {plan_round("usplit", r, 5, 3, 3).assignments for r in range(1, 40)}
    assert len(roles) > 5  # drawn anew among the sampled every round


NAMED = {E: ["e"], M: ["m"], U: ["u"]}


def _client(v: float) -> dict[str, torch.Tensor]:
    return {"e": torch.full((3,), v), "m": torch.full((2,), v), "u": torch.full((4,), v)}


@pytest.mark.parametrize("method", ["full", "udec"])
def test_an_unsampled_client_does_not_move_the_average_but_receives_it(method):
    sizes = [10, 20, 30, 40]
    round_ = next(r for r in range(1, 100) if sampled_clients(5, r, 4, 2) == (0, 2))
    plan = plan_round(method, round_, 4, 5, 2)
    results = []
    for wild in (1.0, 1e6):  # what clients 1 and 3 hold changes nothing
        clients = {0: _client(2.0), 1: _client(wild), 2: _client(6.0), 3: _client(-wild)}
        Exchange(NAMED, sizes).sync(plan, clients)
        results.append(clients)
    for g, names in NAMED.items():
        if g not in plan.shared_groups():
            continue
        for n in names:
            # renormalised over the sampled: (10 * 2 + 30 * 6) / 40 = 5
            for clients in results:
                for k in range(4):
                    assert torch.allclose(clients[k][n], torch.full_like(clients[k][n], 5.0)), (k, n)
    if method == "udec":  # the local encoder of an unsampled client stays its own
        assert results[1][1]["e"].tolist() == [1e6] * 3


def _sampled_ranks(ctx: fdist.DistContext, rounds: int) -> dict:
    """3 clients on the ranks (round-robin), udec with 2 sampled and FedAdam: the draws and new values."""
    K = 3
    hosted = fdist.hosted_clients(ctx.rank, ctx.world_size, K)
    ex = Exchange(NAMED, [5, 7, 9], server=make_server("fedadam", NAMED, 0.1))
    clients = {k: _client(0.0) for k in hosted}
    ex.set_reference(clients[hosted[0]])
    draws, decoders = [], []
    for r in range(1, rounds + 1):
        plan = plan_round("udec", r, K, 13, 2)
        for k in hosted:
            if k in plan.participants:  # "training": a client-specific move
                for n, t in clients[k].items():
                    t.add_(0.1 * (k + 1) * r * (1 if n != "u" else -1))
        ex.sync(plan, clients)
        draws.append(list(plan.sampled))
        decoders.append({k: clients[k]["u"].tolist() for k in hosted})
    return {"draws": draws, "decoders": decoders, "steps": ex.optimizer.steps}


@pytest.mark.multiproc
def test_two_ranks_draw_alike_and_end_alike(tmp_path):
    rounds = 6
    results = spawn_ranks(2, partial(_sampled_ranks, rounds=rounds), tmp_path, timeout_s=90, label="sampling")
    assert results[0]["draws"] == results[1]["draws"]
    assert results[0]["draws"] == [list(sampled_clients(13, r, 3, 2)) for r in range(1, rounds + 1)]
    assert results[0]["steps"] == results[1]["steps"] == {U: rounds}
    for r in range(rounds):  # every client, sampled or not, holds the one new decoder
        values = [v for res in results for v in res["decoders"][r].values()]
        assert all(v == values[0] for v in values), r
    # the same as one process hosting every client (sums in another order: to rounding)
    alone = _sampled_ranks(SimpleNamespace(rank=0, world_size=1), rounds)  # no process group: one process
    for r in range(rounds):
        assert alone["draws"][r] == results[0]["draws"][r]
        torch.testing.assert_close(
            torch.tensor(alone["decoders"][r][0]), torch.tensor(results[0]["decoders"][r]["0"]), rtol=1e-5, atol=1e-6
        )
