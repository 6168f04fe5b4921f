"""Stage 3, transport: the sum over the ranks of a layout's wire, one asynchronous all-reduce per bucket.

Each bucket is filled (the client updates of its parts, and the weight slots in the last one) and its
all-reduce launched at once, so bucket i+1 is filled while bucket i is on the wire. Summing is all a
collective does here: the weights were normalised before (``fedrun.exchange.weights``), so the sum is the
average. With two ranks the sum a + b is the same whatever the buckets; with more, the backend may order a
collective's sum by chunks that depend on its size, so bucketings can differ in the last bit (never ranks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch.distributed as dist

from fedrun.exchange.layout import Bucket


def wait_all(handles: Sequence) -> None:
    """Wait for every collective in order. After a failure the later ones are still waited for (they may be
    writing into buffers the caller reuses), and the first error is raised."""
    for i, h in enumerate(handles):
        try:
            h.wait()
        except BaseException:
            for rest in handles[i + 1 :]:
                with contextlib.suppress(Exception):
                    rest.wait()
            raise


class Transport:
    """All-reduces (SUM) over ``group``: None = the default group if one is initialised, else one process
    (then nothing travels and a bucket's sum is itself)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    @property
    def world_size(self) -> int:
        if self.group is None and not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def send(self, buckets: Sequence[Bucket], fill: Callable[[Bucket], None]) -> list:
        """``fill(bucket)`` then launch its all-reduce, bucket by bucket; returns the handles (none on one
        process). If a fill fails, the collectives already launched are waited for before it raises."""
        alone = self.world_size == 1
        handles: list = []
        try:
            for bucket in buckets:
                fill(bucket)
                if not alone:
                    handles.append(dist.all_reduce(bucket.wire, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        except BaseException:
            for h in handles:
                with contextlib.suppress(Exception):
                    h.wait()
            raise
        return handles
