"""The exchange's wire geometry (bucket cuts, runs, layouts) and adoption, computed by hand on tiny tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrun.exchange.adopt import adopt_parameters
from fedrun.exchange.layout import Layout, accumulation_dtype, cut_buckets, dense_strides, group_runs, signature

E, M, U = "encoder", "bottleneck", "decoder"
NAMED = {E: ["e.w", "e.b"], M: ["m.w"], U: ["d.w", "d.b"]}
SHAPES = {"e.w": (2, 3), "e.b": (2,), "m.w": (2, 2), "d.w": (1, 2), "d.b": (1,)}  # 6, 2, 4, 2, 1 elements
CPU = torch.device("cpu")


def tensors(names=None) -> list[torch.Tensor]:
    return [torch.zeros(SHAPES[n]) for n in (names or [n for g in (E, M, U) for n in NAMED[g]])]


def test_cut_buckets_by_hand():
    # A bucket closes at the first parameter boundary where it holds >= limit elements; the slots end the last.
    assert cut_buckets([6, 2, 4, 2, 1], 3, 4) == [(0, 6), (6, 12), (12, 18)]
    assert cut_buckets([6, 2, 4, 2, 1], 3, 8) == [(0, 8), (8, 18)]
    assert cut_buckets([6, 2, 4, 2, 1], 3, None) == [(0, 18)]
    assert cut_buckets([6, 2], 3, 4) == [(0, 6), (6, 11)]  # closes exactly at the last parameter: slots join it
    assert cut_buckets([1, 1], 2, 4) == [(0, 4)]
    assert cut_buckets([5], 1, 1) == [(0, 6)]  # a parameter is never split, whatever the limit
    assert cut_buckets([], 2, 1) == [(0, 2)]


def test_group_runs_by_hand():
    sizes, group_of = [6, 2, 4, 2, 1], [0, 0, 1, 2, 2]
    cuts = cut_buckets(sizes, 3, 4)
    # bucket 0: e.w; bucket 1: e.b, then m.w (another group); bucket 2: d.w + d.b (one run of the decoder)
    assert group_runs(cuts, sizes, group_of) == [[(0, 1)], [(1, 2), (2, 3)], [(3, 5)]]
    assert group_runs(cut_buckets(sizes, 3, None), sizes, group_of) == [[(0, 2), (2, 3), (3, 5)]]


def test_packed_layout_by_hand():
    lay = Layout((E, M, U), NAMED, tensors(), None, 16, CPU)  # 16 bytes = 4 fp32 elements per bucket
    assert lay.names == ("e.w", "e.b", "m.w", "d.w", "d.b") and not lay.aliased
    assert lay.buffer.numel() == 15 + 3 and lay.wire is lay.buffer and lay.numel == 15
    assert lay.ranges == {E: (0, 8), M: (8, 12), U: (12, 15)}
    assert [(b.lo, b.hi) for b in lay.buckets] == [(0, 6), (6, 12), (12, 18)]
    parts = [p for b in lay.buckets for p in b.parts]
    assert [(p.names, p.lo, p.hi, p.glo, p.first, p.stop, p.gfirst) for p in parts] == [
        (("e.w",), 0, 6, 0, 0, 1, 0),
        (("e.b",), 6, 8, 6, 1, 2, 1),
        (("m.w",), 8, 12, 0, 2, 3, 0),
        (("d.w", "d.b"), 12, 15, 0, 3, 5, 0),
    ]
    # every view lies in the buffer where the layout says
    for view, pos in zip(lay.views, (0, 6, 8, 12, 14), strict=True):
        assert view.data_ptr() == lay.buffer.data_ptr() + 4 * pos
    assert lay.wire_slots.data_ptr() == lay.buffer.data_ptr() + 4 * 15
    assert lay.group_signature(2) == ((torch.Size([1, 2]), (2, 1)), (torch.Size([1]), (1,)))


def test_bf16_wire_cuts_by_its_own_bytes():
    lay = Layout((E, M, U), NAMED, tensors(), torch.bfloat16, 16, CPU)  # 16 bytes = 8 bf16 elements
    assert lay.wire.dtype == torch.bfloat16 and lay.buffer.dtype == torch.float32
    assert [(b.lo, b.hi) for b in lay.buckets] == [(0, 8), (8, 18)]
    assert lay.buckets[0].parts[0].wire.data_ptr() == lay.wire.data_ptr()


def test_layout_keeps_memory_order_and_widest_dtype():
    conv = torch.zeros(3, 2, 2, 2).to(memory_format=torch.channels_last)
    assert dense_strides(conv) == (8, 1, 4, 2)  # NHWC stays NHWC
    assert dense_strides(torch.zeros(4, 6)[:, :3]) == (3, 1)  # not dense: packed contiguously
    assert signature([conv]) == ((torch.Size([3, 2, 2, 2]), (8, 1, 4, 2)),)
    assert accumulation_dtype([torch.zeros(1, dtype=torch.float16)]) == torch.float32
    assert accumulation_dtype([torch.zeros(1), torch.zeros(1, dtype=torch.float64)]) == torch.float64
    lay = Layout((U,), {U: ["c"]}, [conv], None, None, CPU)
    assert lay.views[0].stride() == (8, 1, 4, 2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.Linear(2, 1)  # declared first: adoption orders by GROUPS, not by the module
        self.e = nn.Linear(3, 2)
        self.m = nn.Linear(2, 2, bias=False)


NET = {E: ["e.weight", "e.bias"], M: ["m.weight"], U: ["d.weight", "d.bias"]}


def test_adopted_runs_are_suffixes_by_hand():
    net = Net()
    adopted = adopt_parameters(net, NET)
    assert adopted is not None and adopted.order == (E, M, U) and adopted.numel == 15
    assert adopted.starts == {E: 0, M: 8, U: 12} and adopted.flat.numel() == 15 + 3
    assert net.m.weight.data_ptr() == adopted.flat.data_ptr() + 4 * 8
    # The shared groups of every method are a suffix: their parameters and their slots are one run.
    for groups, (lo, hi) in (((U,), (12, 16)), ((M, U), (8, 17)), ((E, M, U), (0, 18))):
        run = adopted.run(groups)
        assert run.data_ptr() == adopted.flat.data_ptr() + 4 * lo and run.numel() == hi - lo
    assert adopted.run((E,)) is None and adopted.run((E, U)) is None
    names = [n for g in (M, U) for n in NET[g]]
    mine = dict(net.named_parameters())
    assert adopted.holds(names, [mine[n].data for n in names])
    assert not adopted.holds(names, [mine[n].detach().clone() for n in names])
    lay = Layout((M, U), NET, [mine[n] for n in names], None, None, CPU, buffer=adopted.run((M, U)))
    assert lay.aliased and lay.views[0].data_ptr() == net.m.weight.data_ptr()


def test_adopt_refuses_narrow_or_mixed_dtypes():
    assert adopt_parameters(Net().half(), NET) is None  # the packed path accumulates in fp32 at least
    net = Net()
    net.m.double()
    assert adopt_parameters(net, NET) is None
    with pytest.raises(KeyError, match="x.weight"):
        adopt_parameters(Net(), {**NET, U: ["x.weight"]})
