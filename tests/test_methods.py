"""Methods as data: who contributes which group in round r."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedrun.methods import GROUPS, METHOD_NAMES, METHODS, RoundPlan, get_method, plan_round, plan_usplit

E, M, U = "encoder", "bottleneck", "decoder"


def test_registry_names_and_groups_order():
    assert set(METHODS) == {"full", "usplit", "ulatdec", "udec"}
    assert GROUPS == (E, M, U)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_full_everyone_everything(k):
    plan = plan_round("full", 3, k, seed=0)
    assert plan.round == 3 and plan.broadcast_all and plan.num_clients == k
    assert plan.assignments == (frozenset(GROUPS),) * k
    assert plan.shared_groups() == GROUPS and plan.local_groups() == ()
    assert plan.contributors(E) == list(range(k))


def test_ulatdec_and_udec_keep_encoder_local():
    lat = plan_round("ulatdec", 1, 3, seed=0)
    assert lat.assignments == (frozenset({M, U}),) * 3 and not lat.broadcast_all
    assert lat.shared_groups() == (M, U) and lat.local_groups() == (E,)
    assert lat.contributors(E) == [] and lat.contributors(U) == [0, 1, 2]
    dec = plan_round("udec", 7, 4, seed=0)
    assert dec.assignments == (frozenset({U}),) * 4 and not dec.broadcast_all
    assert dec.shared_groups() == (U,) and dec.local_groups() == (E, M)


def test_usplit_k5_follows_the_documented_draws():
    # Trace of the documented procedure with the raw draws of default_rng([2023, 1]):
    # permutation(5) = [0, 3, 1, 4, 2], then integers(2) = 0, 1, 1.
    rng = np.random.default_rng([2023, 1])
    assert rng.permutation(5).tolist() == [0, 3, 1, 4, 2]
    assert [int(rng.integers(2)) for _ in range(3)] == [0, 1, 1]
    # pair (0, 3): 0 encoder, 3 decoder, bottleneck -> first (0); pair (1, 4): 1 encoder, 4 decoder,
    # bottleneck -> second (4); odd client 2: bottleneck + ("encoder", "decoder")[1] = decoder.
    plan = plan_round("usplit", 1, 5, seed=2023)
    assert plan.assignments == (
        frozenset({E, M}),
        frozenset({E}),
        frozenset({M, U}),
        frozenset({U}),
        frozenset({M, U}),
    )
    assert plan.broadcast_all and plan.shared_groups() == GROUPS
    assert plan.contributors(M) == [0, 2, 4]


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7, 10])
def test_usplit_structure_every_round(k):
    seen = set()
    for r in range(1, 21):
        plan = plan_round("usplit", r, k, seed=11)
        roles = plan.assignments
        seen.add(roles)
        # every group has an assignee, so every client receives the whole model
        assert plan.shared_groups() == GROUPS
        # nobody gets both encoder and decoder (that only happens for K = 1)
        assert not any({E, U} <= g for g in roles)
        assert len(plan.contributors(E)) + len(plan.contributors(U)) == k
        if k % 2 == 0:
            assert [len(plan.contributors(g)) for g in GROUPS] == [k // 2] * 3
            assert sorted(len(g) for g in roles) == [1] * (k // 2) + [2] * (k // 2)
        else:
            # the odd client holds the bottleneck on top of the K//2 pairs' bottlenecks
            assert len(plan.contributors(M)) == k // 2 + 1
            assert sorted(len(g) for g in roles) == [1] * (k // 2) + [2] * (k // 2 + 1)
    assert len(seen) > 1, "roles must be drawn again every round"


def test_usplit_single_client_does_everything():
    plan = plan_round("usplit", 4, 1, seed=3)
    assert plan.assignments == (frozenset(GROUPS),)


def test_usplit_identical_for_same_seed_and_round_and_varies_with_seed():
    a = plan_usplit(5, 7, 99)
    assert a == plan_round("usplit", 5, 7, 99)
    others = {plan_round("usplit", 5, 7, s).assignments for s in range(10)}
    assert len(others) > 1


def test_plan_is_frozen():
    plan = plan_round("full", 1, 2, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.round = 1  # type: ignore[misc]


def test_unknown_method_names_value_and_allowed():
    with pytest.raises(ValueError) as err:
        plan_round("fedprox", 1, 2, 0)
    msg = str(err.value)
    assert "'fedprox'" in msg
    for name in ("full", "usplit", "ulatdec", "udec"):
        assert name in msg


def test_invalid_plans_rejected():
    with pytest.raises(ValueError, match="num_clients"):
        plan_round("full", 1, 0, 0)
    with pytest.raises(ValueError, match="unknown group"):
        RoundPlan(1, (frozenset({"head"}),), True)
    with pytest.raises(ValueError, match="numbered from 1"):
        RoundPlan(0, (frozenset({E}),), True)
    with pytest.raises(ValueError, match="unknown group"):
        plan_round("full", 1, 2, 0).contributors("head")


def test_trainable_groups():
    plan = plan_round("usplit", 1, 5, seed=2023)  # client 3: decoder only, client 2: bottleneck + decoder
    usplit, udec = METHODS["usplit"], METHODS["udec"]
    assert usplit.trainable(plan, 3, "all") == GROUPS
    assert usplit.trainable(plan, 3, "assigned") == (U,)
    assert usplit.trainable(plan, 2, "assigned") == (M, U)
    # 'assigned' is a USplit option: UDec clients still train their whole (personal) model
    assert udec.trainable(plan_round("udec", 1, 2, 0), 0, "assigned") == GROUPS
    with pytest.raises(ValueError, match="usplit_train"):
        usplit.trainable(plan, 0, "some")
    with pytest.raises(ValueError, match="client"):
        usplit.trainable(plan, 5, "all")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_facts_match_its_plans(name):
    """ever_shared is the union of what 40 rounds share; personalised iff some group is never shared."""
    m = get_method(name)
    for k in (1, 2, 3, 5):
        seen = set()
        for r in range(1, 41):
            seen |= set(m.plan(r, k, seed=7).shared_groups())
        if k > 1 or not m.split_roles:
            assert m.ever_shared == tuple(g for g in GROUPS if g in seen), (name, k)
        assert m.personalised == (set(seen) != set(GROUPS))
    labels = m.model_labels(3)
    assert labels == (["client0", "client1", "client2"] if m.personalised else ["global"])
    final = m.final_plan(15, 3, seed=7)
    assert final.shared_groups() == (m.ever_shared if m.personalised else GROUPS)
    assert all(final.contributors(g) == [0, 1, 2] for g in final.shared_groups())


def test_get_method_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown method 'fedavg'; allowed: full, usplit, ulatdec, udec"):
        get_method("fedavg")
