"""Exchange.adopt in a single process: a rank's single client keeps its parameters in the averager's flat
tensor, in group order, and syncs them in place (across ranks: test_dist_in_place)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrun.exchange import Exchange
from fedrun.methods import RoundPlan, plan_round

E, M, U = "encoder", "bottleneck", "decoder"


class Reordered(nn.Module):
    """Declares the decoder first and keeps a channels_last convolution in the encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.dec = nn.Linear(2, 1)
        self.enc = nn.Conv2d(2, 3, 2)  # weight (3, 2, 2, 2)
        self.mid = nn.Linear(2, 2, bias=False)
        self.to(memory_format=torch.channels_last)


REORDERED = {E: ["enc.weight", "enc.bias"], M: ["mid.weight"], U: ["dec.weight", "dec.bias"]}


def test_adopt_moves_parameters_into_one_flat_tensor_in_group_order():
    torch.manual_seed(0)
    net = Reordered()
    before = {n: (p, p.detach().clone(), p.stride()) for n, p in net.named_parameters()}
    avg = Exchange(REORDERED, [1])
    assert avg.adopt(net)
    flat = avg.adopted.flat
    order = [n for g in (E, M, U) for n in REORDERED[g]]
    pos = 0
    for n in order:
        p = dict(net.named_parameters())[n]
        param, value, stride = before[n]
        assert p is param and p.requires_grad  # the same Parameter object, still trainable
        assert torch.equal(p, value) and p.stride() == stride  # same values, same (channels_last) strides
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert p.data_ptr() == flat.data_ptr() + pos * flat.element_size()  # groups in GROUPS order
        pos += p.numel()
    assert flat.numel() == pos + 3 and torch.equal(flat[pos:], torch.zeros(3))  # one weight slot per group
    # Training writes straight into the flat tensor.
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.dec(net.mid(net.enc(torch.randn(1, 2, 3, 3)).mean((2, 3))[:, :2])).sum().backward()
    opt.step()
    pos = 0
    for n in order:
        p = dict(net.named_parameters())[n]
        assert torch.equal(flat.as_strided(p.shape, p.stride(), pos), p) and not torch.equal(p, before[n][1]), n
        pos += p.numel()


def test_adopt_refuses_mixed_dtypes_and_missing_names():
    net = Reordered()
    net.mid.double()
    ptr = net.enc.weight.data_ptr()
    assert not Exchange(REORDERED, [1]).adopt(net)
    assert net.enc.weight.data_ptr() == ptr  # nothing moved
    with pytest.raises(KeyError, match="dec.weight"):
        Exchange({**REORDERED, U: ["dec.weight"]}, [1]).adopt(nn.Linear(1, 1))


@pytest.mark.parametrize("exchange", ["fp32", "bf16"])
def test_adopted_single_client_sync_in_place(exchange):
    torch.manual_seed(1)
    net = Reordered()
    values = {n: p.detach().clone() for n, p in net.named_parameters()}
    avg = Exchange(REORDERED, [4], exchange_dtype=exchange)
    avg.adopt(net)
    mine = {n: p.data for n, p in net.named_parameters()}
    for r in (1, 2):  # bf16: values first, then changes against the reference
        stats = avg.sync(plan_round("full", r, 1, 0), {0: mine})
        assert stats.collectives == 0 and stats.bytes == 0
        assert avg.packed_layout is None  # in place: no packing buffer
        for n, p in net.named_parameters():
            assert torch.equal(p, values[n]), n  # the average of one client is itself
    if exchange == "bf16":
        assert all(torch.equal(avg.reference[n], values[n]) for n in values)


def test_adopted_sync_checks_weights_before_writing_and_falls_back_when_not_contiguous():
    net = Reordered()
    values = {n: p.detach().clone() for n, p in net.named_parameters()}
    avg = Exchange(REORDERED, [1, 1])
    avg.adopt(net)
    mine = {n: p.data for n, p in net.named_parameters()}
    with pytest.raises(RuntimeError, match="disagree"):  # client 1 is nowhere: the weights sum to 1/2
        avg.sync(plan_round("full", 1, 2, 0), {0: mine})
    assert all(torch.equal(p, values[n]) for n, p in net.named_parameters())  # nothing written
    # The encoder alone is not a suffix of the flat layout: the packed path does it, with the same result.
    solo = Exchange(REORDERED, [1])
    solo.adopt(net)
    mine = {n: p.data for n, p in net.named_parameters()}
    solo.sync(RoundPlan(1, (frozenset({E}),), False), {0: mine})
    assert solo.packed_layout is not None and solo.packed_layout.buffer.numel() == 1 + 3 * 2 * 2 * 2 + 3
    assert all(torch.equal(p, values[n]) for n, p in net.named_parameters())
    # Parameters replaced after adopt are not the flat tensor's views any more: packed path, still right.
    other = {n: t.clone() for n, t in mine.items()}
    solo.sync(plan_round("full", 2, 1, 0), {0: other})
    assert solo.packed_layout.buffer.numel() == 3 + sum(t.numel() for t in other.values())
