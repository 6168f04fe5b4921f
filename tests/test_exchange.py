"""Averaging maths (hand-computed) and the Exchange in a single process (multi-rank: test_dist_multiproc;
the stages one by one: test_exchange_*.py; adopted parameters: test_exchange_adopt.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrun.exchange import Exchange, SyncStats
from fedrun.exchange.layout import cut_buckets
from fedrun.exchange.weights import weighted_average
from fedrun.methods import RoundPlan, plan_round

E, M, U = "encoder", "bottleneck", "decoder"


# -- weighted_average ----------------------------------------------------------------------------


def test_weighted_average_two_states_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    out = weighted_average([a, b], [1, 3])
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5, (0 + 3*4)/4 = 3
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[3.0]]))
    # weights are normalised inside: scaling them changes nothing
    assert torch.equal(weighted_average([a, b], [10.0, 30.0])["w"], out["w"])


def test_weighted_average_three_states_and_zero_weight():
    states = [{"x": torch.tensor([0.0])}, {"x": torch.tensor([3.0])}, {"x": torch.tensor([6.0])}]
    assert weighted_average(states, [1, 1, 2])["x"].item() == pytest.approx(3.75)  # (0 + 3 + 12) / 4
    assert weighted_average(states, [0, 2, 0])["x"].item() == 3.0
    assert weighted_average(states[:1], [5])["x"].item() == 0.0


def test_weighted_average_keeps_dtype_and_does_not_alias_inputs():
    a = {"x": torch.tensor([1.0], dtype=torch.float64)}
    out = weighted_average([a], [1])
    assert out["x"].dtype == torch.float64
    out["x"].add_(1)
    assert a["x"].item() == 1.0


@pytest.mark.parametrize(
    "states, weights, match",
    [
        ([], [], "at least one"),
        ([{"x": torch.zeros(1)}], [1, 2], "weights"),
        ([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}], [1, 1], "different parameter names"),
        ([{"x": torch.zeros(1)}, {"x": torch.zeros(1)}], [1, -1], ">= 0"),
        ([{"x": torch.zeros(1)}, {"x": torch.zeros(1)}], [0, 0], "total weight"),
        ([{"x": torch.zeros(1)}, {"x": torch.zeros(2)}], [1, 1], "shape"),
    ],
)
def test_weighted_average_rejects(states, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average(states, weights)


def test_weighted_average_rejects_integer_tensors():
    with pytest.raises(TypeError):
        weighted_average([{"n": torch.tensor([1])}], [1])


# -- Exchange, one process hosting every client ----------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 2)  # 8 parameters
        self.mid = nn.Linear(2, 2, bias=False)  # 4
        self.dec = nn.Linear(2, 1)  # 3


GROUP_NAMES = {E: ["enc.weight", "enc.bias"], M: ["mid.weight"], U: ["dec.weight", "dec.bias"]}
OFFSET = {"enc.weight": 0.0, "enc.bias": 10.0, "mid.weight": 20.0, "dec.weight": 30.0, "dec.bias": 40.0}


def clients(values: list[float]) -> list[Tiny]:
    """Client k has every parameter filled with values[k] + a per-parameter offset."""
    models = [Tiny() for _ in values]
    with torch.no_grad():
        for m, v in zip(models, values, strict=True):
            for n, p in m.named_parameters():
                p.fill_(v + OFFSET[n])
    return models


def params(models: list[Tiny]) -> dict[int, dict[str, torch.Tensor]]:
    return {k: dict(m.named_parameters()) for k, m in enumerate(models)}


def value(model: Tiny, name: str) -> torch.Tensor:
    return dict(model.named_parameters())[name].detach()


def test_full_average_by_hand_written_in_place():
    models = clients([1.0, 2.0, 4.0])
    ptrs = [p.data_ptr() for m in models for p in m.parameters()]
    avg = Exchange(GROUP_NAMES, client_sizes=[1, 1, 2])
    stats = avg.sync(plan_round("full", 1, 3, 0), params(models))
    # w = (.25, .25, .5): .25*1 + .25*2 + .5*4 = 2.75
    for m in models:
        for n in OFFSET:
            assert torch.equal(value(m, n), torch.full_like(value(m, n), 2.75 + OFFSET[n]))
    assert [p.data_ptr() for m in models for p in m.parameters()] == ptrs  # written in place
    assert all(p.requires_grad for m in models for p in m.parameters())
    assert stats == SyncStats(bytes=0, seconds=stats.seconds, collectives=0, groups=(E, M, U))


def test_udec_averages_decoder_and_leaves_local_groups_untouched():
    models = clients([1.0, 2.0, 4.0])
    avg = Exchange(GROUP_NAMES, client_sizes=[1, 1, 2])
    avg.sync(plan_round("udec", 1, 3, 0), params(models))
    for k, m in enumerate(models):
        own = [1.0, 2.0, 4.0][k]
        for n in ("dec.weight", "dec.bias"):
            assert torch.equal(value(m, n), torch.full_like(value(m, n), 2.75 + OFFSET[n]))
        for n in ("enc.weight", "enc.bias", "mid.weight"):
            assert torch.equal(value(m, n), torch.full_like(value(m, n), own + OFFSET[n]))


def test_usplit_each_part_over_its_assignees_everyone_gets_all():
    models = clients([1.0, 2.0, 4.0])
    plan = RoundPlan(1, (frozenset({E, M}), frozenset({U}), frozenset({M, U})), True, "usplit")
    Exchange(GROUP_NAMES, client_sizes=[1, 1, 2]).sync(plan, params(models))
    expect = {
        "enc.weight": 1.0,  # client 0 alone
        "enc.bias": 1.0,
        "mid.weight": (0.25 * 1 + 0.5 * 4) / 0.75,  # clients 0, 2 -> 3.0
        "dec.weight": (0.25 * 2 + 0.5 * 4) / 0.75,  # clients 1, 2 -> 3.333...
        "dec.bias": (0.25 * 2 + 0.5 * 4) / 0.75,
    }
    for m in models:
        for n, v in expect.items():
            torch.testing.assert_close(value(m, n), torch.full_like(value(m, n), v + OFFSET[n]))
    # bit-identical on every client, not just close
    for m in models[1:]:
        for n in OFFSET:
            assert torch.equal(value(m, n), value(models[0], n))


def test_matches_weighted_average_on_random_states():
    torch.manual_seed(0)
    models = [Tiny() for _ in range(4)]
    before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    sizes = [529, 14, 46087, 11898]
    plan = plan_round("ulatdec", 3, 4, 0)
    Exchange(GROUP_NAMES, sizes).sync(plan, params(models))
    ref = weighted_average(before, sizes)
    for m, b in zip(models, before, strict=True):
        for n in ("mid.weight", "dec.weight", "dec.bias"):
            torch.testing.assert_close(value(m, n), ref[n], atol=1e-6, rtol=0)
        for n in ("enc.weight", "enc.bias"):
            assert torch.equal(value(m, n), b[n])


def test_flat_buffer_reused_while_layout_unchanged():
    models = clients([1.0, 2.0])
    avg = Exchange(GROUP_NAMES, [1, 1])
    avg.sync(plan_round("usplit", 1, 2, 5), params(models))
    buf = avg.packed_layout.buffer
    assert buf is not None and buf.numel() == 15 + 3  # 15 parameters + one denominator slot per group
    avg.sync(plan_round("usplit", 2, 2, 5), params(models))
    avg.sync(plan_round("full", 3, 2, 5), params(models))
    assert avg.packed_layout.buffer is buf
    avg.sync(plan_round("udec", 4, 2, 5), params(models))  # a different layout: decoder only
    assert avg.packed_layout.buffer is not buf and avg.packed_layout.buffer.numel() == 3 + 1


def test_float64_parameters_average_in_float64():
    models = [Tiny().double() for _ in range(2)]
    before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    avg = Exchange(GROUP_NAMES, [1, 2])
    avg.sync(plan_round("full", 1, 2, 0), params(models))
    assert avg.packed_layout.buffer.dtype == torch.float64
    ref = weighted_average(before, [1, 2])
    assert torch.allclose(value(models[0], "enc.weight"), ref["enc.weight"], atol=1e-14, rtol=0)


def test_bf16_exchanges_changes_not_values():
    # Parameters near 10: bf16 spacing there is 2^-4 = 0.0625, so sending values in bf16 would err by up to
    # 0.03; sending the round's changes (~1e-3) errs by ~1e-3 * 2^-9.
    models = clients([10.0, 10.0])
    avg = Exchange(GROUP_NAMES, client_sizes=[1, 3], exchange_dtype="bf16")
    avg.sync(plan_round("full", 1, 2, 0), params(models))  # no reference yet: fp32, exact
    assert avg.packed_layout.wire is avg.packed_layout.buffer
    for m in models:
        assert value(m, "enc.weight")[0, 0].item() == 10.0
    torch.manual_seed(1)
    with torch.no_grad():
        for m in models:  # "local training": small changes
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
    before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    ref = weighted_average(before, [1, 3])
    avg.sync(plan_round("full", 2, 2, 0), params(models))
    assert avg.packed_layout.wire is not avg.packed_layout.buffer and avg.packed_layout.wire.dtype == torch.bfloat16
    naive = 0.0
    for n in OFFSET:
        err = (value(models[0], n) - ref[n]).abs().max().item()
        assert err < 2e-5, (n, err)
        naive = max(naive, (ref[n].bfloat16().float() - ref[n]).abs().max().item())
        assert torch.equal(value(models[1], n), value(models[0], n))
    assert naive > 1e-3  # what sending values in bf16 would have cost


def test_bf16_set_reference_makes_first_sync_bf16():
    models = clients([0.5, 0.5])
    avg = Exchange(GROUP_NAMES, [1, 1], exchange_dtype="bf16")
    avg.set_reference({n: p for n, p in models[0].named_parameters()})
    with torch.no_grad():
        value(models[0], "dec.bias").add_(0.002)
        value(models[1], "dec.bias").add_(0.004)
    avg.sync(plan_round("udec", 1, 2, 0), params(models))
    assert avg.packed_layout.wire is not avg.packed_layout.buffer and avg.packed_layout.wire.dtype == torch.bfloat16
    got = value(models[0], "dec.bias").item()
    assert abs(got - (40.5 + 0.003)) < 1e-5
    avg.reset_reference()
    avg.sync(plan_round("udec", 2, 2, 0), params(models))
    assert avg.packed_layout.wire is avg.packed_layout.buffer


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="both"):
        Exchange({E: ["a"], U: ["a"]}, [1])
    with pytest.raises(ValueError, match="unknown group"):
        Exchange({"head": ["a"]}, [1])
    with pytest.raises(ValueError, match="exchange_dtype"):
        Exchange(GROUP_NAMES, [1], exchange_dtype="fp8")
    with pytest.raises(ValueError, match="client_sizes"):
        Exchange(GROUP_NAMES, [0, 0])
    models = clients([1.0, 2.0])
    avg = Exchange(GROUP_NAMES, [1, 1])
    with pytest.raises(ValueError, match="clients"):
        avg.sync(plan_round("full", 1, 3, 0), params(models))
    with pytest.raises(ValueError, match="out of range"):
        avg.sync(plan_round("full", 1, 2, 0), {0: params(models)[0], 5: params(models)[1]})
    p = params(models)
    del p[1]["dec.bias"]
    with pytest.raises(KeyError, match="dec.bias"):
        avg.sync(plan_round("full", 1, 2, 0), p)
    p = params(models)
    p[1]["dec.bias"] = torch.zeros(2)  # a receiver with the wrong shape is refused before anything moves
    with pytest.raises(ValueError, match="client 1: dec.bias has shape"):
        avg.sync(plan_round("udec", 1, 2, 0), p)
    assert value(models[0], "dec.bias").item() == 1.0 + OFFSET["dec.bias"]
    zero = Exchange(GROUP_NAMES, [0, 1])
    with pytest.raises(ValueError, match="0 examples"):
        zero.sync(RoundPlan(1, (frozenset({U}), frozenset()), False), params(models))


def test_missing_contributor_detected_by_the_denominator_check():
    # One process must host every client; a missing one shows as a wrong summed weight, not a silent error.
    models = clients([1.0, 2.0])
    avg = Exchange(GROUP_NAMES, [1, 1])
    with pytest.raises(RuntimeError, match="disagree"):
        avg.sync(plan_round("full", 1, 2, 0), {0: params(models)[0]})


# -- buckets ------------------------------------------------------------------------------------------


def test_buckets_cut_at_parameter_boundaries_weight_slots_last():
    models = clients([1.0, 2.0])
    avg = Exchange(GROUP_NAMES, [1, 1], bucket_bytes=16)  # 4 fp32 elements: a bucket closes past 16 bytes
    avg.sync(plan_round("full", 1, 2, 0), params(models))
    # [enc.weight (6)], [enc.bias (2) + mid.weight (4)], [dec.weight (2) + dec.bias (1) + 3 weight slots]
    assert [(b.lo, b.hi) for b in avg.packed_layout.buckets] == [(0, 6), (6, 12), (12, 18)]
    assert [[p.names for p in b.parts] for b in avg.packed_layout.buckets] == [
        [("enc.weight",)],
        [("enc.bias",), ("mid.weight",)],
        [("dec.weight", "dec.bias")],
    ]
    assert avg.packed_layout.ranges == {E: (0, 8), M: (8, 12), U: (12, 15)}
    # The slots, the last group's first, hold the summed normalised weights: 1 each.
    assert avg.packed_layout.buffer[15:].tolist() == [1.0, 1.0, 1.0]
    # A bucket closing exactly at the last parameter takes the slots along (no bucket of slots alone).
    assert cut_buckets([6, 2], 3, avg.bucket_bytes // 4) == [(0, 6), (6, 11)]
    assert cut_buckets([1, 1], 2, avg.bucket_bytes // 4) == [(0, 4)]
    assert Exchange(GROUP_NAMES, [1, 1], bucket_bytes=None).bucket_bytes is None
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="bucket_bytes"):
            Exchange(GROUP_NAMES, [1, 1], bucket_bytes=bad)


@pytest.mark.parametrize("exchange", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["full", "usplit", "ulatdec", "udec"])
def test_buckets_bit_identical_to_one_bucket_single_process(method, exchange):
    torch.manual_seed(3)
    start = [{n: p.detach().clone() for n, p in Tiny().named_parameters()} for _ in range(3)]
    results = []
    for bucket_bytes in (None, 4, 24):
        models = [Tiny() for _ in range(3)]
        avg = Exchange(GROUP_NAMES, [5, 1, 9], exchange_dtype=exchange, bucket_bytes=bucket_bytes)
        g = torch.Generator().manual_seed(7)
        for r in range(1, 4):  # bf16: round 1 exchanges values, rounds 2-3 changes
            with torch.no_grad():
                for m, s in zip(models, start, strict=True):
                    for n, p in m.named_parameters():
                        p.copy_(s[n] if r == 1 else p + 1e-3 * torch.randn(p.shape, generator=g))
            stats = avg.sync(plan_round(method, r, 3, 0), params(models))
            assert stats.collectives == 0 and stats.bytes == 0  # one process: no collective, same maths
        results.append([{n: value(m, n).clone() for n in OFFSET} for m in models])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            for n in OFFSET:
                assert torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)), n


@pytest.mark.parametrize("exchange", ["fp32", "bf16"])
def test_denominator_check_before_any_parameter_is_written(exchange):
    models = clients([1.0, 2.0])
    avg = Exchange(GROUP_NAMES, [1, 1], exchange_dtype=exchange, bucket_bytes=4)
    before = [{n: value(m, n).clone() for n in OFFSET} for m in models]
    for attempt in range(2):  # bf16: without a reference (values), then with one (changes)
        with pytest.raises(RuntimeError, match="disagree"):
            avg.sync(plan_round("full", 1, 2, 0), {0: params(models)[0]})
        for m, b in zip(models, before, strict=True):
            for n in OFFSET:
                assert torch.equal(value(m, n), b[n])
        if attempt == 0:
            assert not avg.reference  # no reference made from the failed sync
            avg.set_reference(dict(models[0].named_parameters()))
        else:  # the reference given is kept
            assert exchange == "fp32" or all(torch.equal(avg.reference[n], before[0][n]) for n in OFFSET)
    avg.sync(plan_round("full", 2, 2, 0), params(models))  # a good sync afterwards
    assert (avg.packed_layout.wire is not avg.packed_layout.buffer) == (exchange == "bf16")
    assert value(models[1], "dec.bias").item() == pytest.approx(1.5 + OFFSET["dec.bias"], abs=1e-2)
