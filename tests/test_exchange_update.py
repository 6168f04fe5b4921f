"""Stages 2 and 4 of the exchange, each client's update and the server update, and the bf16 reference:
computed by hand on tiny tensors (values chosen so that every step is exact in fp32)."""

from __future__ import annotations

import pytest
import torch

from fedrun.exchange.layout import Layout, signature
from fedrun.exchange.reference import Reference
from fedrun.exchange.server import FedAvg, write_back
from fedrun.exchange.update import BF16_CHANGES, VALUES, choose_update, slot_tolerance

U = "decoder"
CPU = torch.device("cpu")


def one_part(values: list[float], wire=None) -> tuple[Layout, object]:
    """A layout of the decoder alone, one parameter ``w``, one bucket: its only part."""
    lay = Layout((U,), {U: ["w"]}, [torch.tensor(values)], wire, None, CPU)
    (bucket,) = lay.buckets
    (part,) = bucket.parts
    return lay, part


def test_choice_of_update():
    assert choose_update("fp32", True) is VALUES and choose_update("bf16", False) is VALUES
    assert choose_update("bf16", True) is BF16_CHANGES and BF16_CHANGES.wire_dtype == torch.bfloat16
    assert slot_tolerance(torch.bfloat16) == 1e-2 and slot_tolerance(torch.float32) == 1e-5


def test_values_weighted_sum_by_hand():
    # p = (1/4, 3/4): 1/4 * [1, 2] + 3/4 * [3, 6] = [2.5, 5]
    lay, part = one_part([0.0, 0.0])
    sources = {0: [torch.tensor([1.0, 2.0])], 1: [torch.tensor([3.0, 6.0])]}
    VALUES.accumulate(lay, part, [(0, 0.25), (1, 0.75)], sources, None)
    assert part.seg.tolist() == [2.5, 5.0] and part.wire is part.seg
    VALUES.accumulate(lay, part, [], sources, None)  # no hosted contributor: this rank adds zeros
    assert part.seg.tolist() == [0.0, 0.0]
    assert sources[0][0].tolist() == [1.0, 2.0]  # the clients are only read


def test_bf16_change_round_trip_by_hand():
    # ref = 10: bf16 spacing there is 2^-4, so the values themselves would round back to 10.
    ref = torch.tensor([10.0, 10.0])
    theta0 = ref + torch.tensor([2.0**-10, -(2.0**-9)])
    theta1 = ref + torch.tensor([3 * 2.0**-10, 0.0])
    lay, part = one_part([0.0, 0.0], torch.bfloat16)
    BF16_CHANGES.accumulate(lay, part, [(0, 0.5), (1, 0.5)], {0: [theta0], 1: [theta1]}, ref)
    # 1/2 (theta0 - ref) + 1/2 (theta1 - ref) = [2^-11 + 3 * 2^-11, -2^-10] = [2^-9, -2^-10]: exact in bf16
    assert part.wire.dtype == torch.bfloat16 and part.wire.float().tolist() == [2.0**-9, -(2.0**-10)]
    # after the (here trivial) all-reduce: the buffer gets the average change, the server adds it to ref
    BF16_CHANGES.decode(part)
    new = FedAvg().step(part.seg, ref, changes=True)
    assert new is ref and ref.tolist() == [10.0 + 2.0**-9, 10.0 - 2.0**-10]
    assert torch.tensor([10.0 + 2.0**-9]).bfloat16().item() == 10.0  # what sending values would have given


def test_bf16_change_rounds_once_to_8_significant_bits():
    # change 2^-10 (1 + 2^-8) needs 9 significant bits: halfway between two bf16 numbers, rounded to even
    ref = torch.tensor([0.5])
    lay, part = one_part([0.0], torch.bfloat16)
    BF16_CHANGES.accumulate(lay, part, [(0, 1.0)], {0: [ref + (2.0**-10 + 2.0**-18)]}, ref)
    assert part.seg.item() == 2.0**-10 + 2.0**-18  # the change itself is exact in fp32
    assert part.wire.float().item() == 2.0**-10  # error 2^-18 = half a unit in the last place (2^-8 relative)


def test_server_fedavg_by_hand():
    server, avg = FedAvg(), torch.tensor([2.5, 5.0])
    assert server.step(avg, None, changes=False) is avg  # values: the new value is the average
    ref = torch.zeros(2)
    assert server.step(avg, ref, changes=False) is avg and ref.tolist() == [2.5, 5.0]  # ... and the next reference
    assert server.step(torch.tensor([0.5, -1.0]), ref, changes=True).tolist() == [3.0, 4.0]  # ref + average change
    with pytest.raises(ValueError, match="no reference"):
        server.step(avg, None, changes=True)


def test_write_back_into_every_client():
    lay, part = one_part([0.0, 0.0])
    part.seg.copy_(torch.tensor([2.5, 5.0]))
    clients = [[torch.zeros(2)], [torch.ones(2)]]
    write_back(part, part.seg, part.views, clients, aliased=False)
    assert [c[0].tolist() for c in clients] == [[2.5, 5.0], [2.5, 5.0]]
    write_back(part, torch.tensor([7.0, 8.0]), None, clients, aliased=True)  # the client is the buffer
    assert part.seg.tolist() == [7.0, 8.0] and clients[0][0].tolist() == [2.5, 5.0]


def test_reference_stored_once_per_group():
    named = {"bottleneck": ["m"], U: ["a", "b"]}
    ref = Reference(named)
    assert not ref and len(ref) == 0
    conv = torch.arange(8.0).reshape(1, 2, 2, 2).to(memory_format=torch.channels_last)
    ref.set({"a": conv, "b": torch.tensor([9.0]), "m": torch.tensor([1.0, 2.0])})
    assert sorted(ref) == ["a", "b", "m"] and torch.equal(ref["a"], conv) and ref["b"].item() == 9.0
    with pytest.raises(KeyError, match="lacks parameter"):
        ref.set({"a": conv})  # half a group
    group = ref.get(U, signature([conv, torch.zeros(1)]), torch.float32, CPU)
    # NCHW values c * 4 + h * 2 + w in NHWC memory order ((h, w, c) = 000, 001, 010, ...), then b
    assert group.flat.tolist() == [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0, 9.0]
    assert ref["a"].data_ptr() == group.flat.data_ptr()  # one storage: the views are the Mapping's values
    contiguous = ref.get(U, signature([conv.contiguous(), torch.zeros(1)]), torch.float64, CPU)
    assert contiguous.flat.tolist() == [*range(8), 9.0] and torch.equal(ref["a"], conv.double())  # re-laid out
    assert ref.get(U, signature([torch.zeros(3), torch.zeros(1)]), torch.float32, CPU) is None  # other shapes
    made = ref.create("bottleneck", signature([torch.zeros(2)]), torch.float32, CPU)
    assert ref["m"].data_ptr() == made.flat.data_ptr()
    ref.clear()
    assert not ref and "a" not in ref
