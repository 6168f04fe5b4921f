"""Stage 1 of the exchange, who takes part: FedAvg's normalised weights, computed by hand."""

from __future__ import annotations

import pytest

from fedrun.exchange.weights import check_weight_sums, data_shares, fedavg_weights, rank_share
from fedrun.methods import RoundPlan, plan_round

E, M, U = "encoder", "bottleneck", "decoder"
# USplit with K = 3: client 0 uploads encoder + bottleneck, client 1 the decoder, client 2 bottleneck + decoder.
USPLIT = RoundPlan(1, (frozenset({E, M}), frozenset({U}), frozenset({M, U})), True, "usplit")


def test_data_shares_by_hand():
    assert data_shares([1, 1, 2]) == (0.25, 0.25, 0.5)
    assert data_shares([0, 3]) == (0.0, 1.0)
    for bad in ([], [0, 0], [2, -1]):
        with pytest.raises(ValueError, match="client_sizes"):
            data_shares(bad)


def test_usplit_weights_by_hand():
    # w = (1/4, 1/4, 1/2). Encoder: C = {0}, p = 1. Bottleneck: C = {0, 2}, p = (1/4, 1/2) / (3/4) = (1/3, 2/3).
    # Decoder: C = {1, 2}, p = (1/3, 2/3) likewise.
    p = fedavg_weights(USPLIT, data_shares([1, 1, 2]))
    assert list(p) == [E, M, U]  # GROUPS order
    assert p[E] == {0: 1.0}
    assert p[M] == pytest.approx({0: 1 / 3, 2: 2 / 3}, rel=1e-15) and list(p[M]) == [0, 2]
    assert p[U] == pytest.approx({1: 1 / 3, 2: 2 / 3}, rel=1e-15)
    for weights in p.values():
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-15)


def test_full_and_udec_weights_by_hand():
    # sizes 10, 30, 60: every client contributes everything, p = w = (0.1, 0.3, 0.6).
    p = fedavg_weights(plan_round("full", 1, 3, 0), data_shares([10, 30, 60]))
    assert p == {g: pytest.approx({0: 0.1, 1: 0.3, 2: 0.6}, rel=1e-15) for g in (E, M, U)}
    assert list(fedavg_weights(plan_round("udec", 1, 3, 0), data_shares([10, 30, 60]))) == [U]


def test_weights_rejected():
    with pytest.raises(ValueError, match="plan has 3 clients, the exchange 2"):
        fedavg_weights(USPLIT, (0.5, 0.5))
    with pytest.raises(ValueError, match="'encoder': its contributors \\[0\\] all have 0 examples"):
        fedavg_weights(USPLIT, data_shares([0, 1, 1]))


def test_rank_share_by_hand():
    # Two ranks, round robin: rank 0 hosts clients 0 and 2, rank 1 hosts client 1 (p from the USplit test).
    shares = data_shares([1, 1, 2])
    r0, r1 = rank_share(USPLIT, shares, {0, 2}), rank_share(USPLIT, shares, [1])
    assert r0.groups == r1.groups == (E, M, U)
    assert r0.contributors == (
        (((0, 1.0),), ((0, pytest.approx(1 / 3)), (2, pytest.approx(2 / 3))), ((2, pytest.approx(2 / 3)),))
    )
    assert r1.contributors == ((), (), ((1, pytest.approx(1 / 3)),))
    assert r0.slots == pytest.approx((1.0, 1.0, 2 / 3)) and r1.slots == pytest.approx((0.0, 0.0, 1 / 3))
    # The slots of all ranks sum to 1 per group: what check_weight_sums verifies after the all-reduce.
    check_weight_sums(1, r0.groups, [a + b for a, b in zip(r0.slots, r1.slots, strict=True)], 1e-5, False)
    with pytest.raises(ValueError, match="at least one client"):
        rank_share(USPLIT, shares, [])
    with pytest.raises(ValueError, match=r"hosted client\(s\) \[3\] out of range"):
        rank_share(USPLIT, shares, [0, 3])


def test_check_weight_sums_messages():
    check_weight_sums(4, (M, U), (1.0, 0.995), 1e-2, written=False)  # bf16 slots: within 1e-2
    with pytest.raises(RuntimeError) as err:
        check_weight_sums(4, (M, U), (1.0, 0.5), 1e-5, written=False)
    assert str(err.value) == (
        "round 4: the FedAvg weights of 'decoder' sum to 0.5 over the ranks, not 1: "
        "ranks disagree about the round plan or the hosted clients"
    )
    with pytest.raises(RuntimeError, match="no longer valid: resume from the last checkpoint"):
        check_weight_sums(4, (U,), (1.5,), 1e-5, written=True)
