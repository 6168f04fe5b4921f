"""Stage 3 of the exchange, transport, in one process (the real collectives: test_dist_multiproc)."""

from __future__ import annotations

import pytest
import torch

from fedrun.exchange.layout import Layout
from fedrun.exchange.transport import Transport, wait_all


class Handle:
    def __init__(self, log: list, name: str, error: Exception | None = None) -> None:
        self.log, self.name, self.error = log, name, error

    def wait(self) -> None:
        self.log.append(self.name)
        if self.error is not None:
            raise self.error


def test_wait_all_waits_for_every_collective_and_raises_the_first_error():
    log: list[str] = []
    wait_all([Handle(log, "a"), Handle(log, "b")])
    assert log == ["a", "b"]
    log.clear()
    with pytest.raises(RuntimeError, match="first"):
        wait_all(
            [
                Handle(log, "a"),
                Handle(log, "b", RuntimeError("first")),
                Handle(log, "c", RuntimeError("2nd")),
                Handle(log, "d"),
            ]
        )
    assert log == ["a", "b", "c", "d"]  # the later ones may still be writing into the buffer: waited for


def test_one_process_fills_every_bucket_and_sends_nothing():
    t = Transport()
    assert t.world_size == 1
    lay = Layout(("decoder",), {"decoder": ["a", "b"]}, [torch.zeros(4), torch.zeros(2)], None, 16, torch.device("cpu"))
    filled = []
    assert t.send(lay.buckets, lambda b: filled.append((b.lo, b.hi))) == []
    assert filled == [(0, 4), (4, 7)]  # in order, the weight slot in the last bucket

    def broken(bucket):
        raise ValueError("fill failed")

    with pytest.raises(ValueError, match="fill failed"):
        t.send(lay.buckets, broken)
