"""CUDA graphs for sampling: the network's forward pass captured once per batch shape, then replayed every step.

A DDPM chain calls the same network on the same shapes a thousand times. At Fashion-MNIST's 28x28 a forward pass
of the paper UNet launches a few hundred small kernels, and on a GPU their launches, not their arithmetic, bound
a step; a captured graph launches them all at once. The kernels are the ones the eager pass runs, so the samples
do not change. ``sample_images(graphs=True)`` uses it; ``bench_sample --device cuda`` measures it beside the eager
sampler and checks the samples agree (``benchmarks/run_gpu.sh``). CUDA only: on a CPU there is nothing to replay.

The recipe is PyTorch's (docs: "CUDA Graphs", whole-network capture): warm up on a side stream, capture with
``torch.cuda.graph``, then copy each step's inputs into the captured ones, replay, and read the captured output.
Graphs of all shapes share one memory pool. Under autocast the weight-cast cache must be off
(``torch.autocast(cache_enabled=False)``), else the graph would read casts that autocast frees on exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evaluation.errors import EvalError

WARMUP = 3
"""Eager calls on a side stream before a capture (cuDNN / cuBLAS pick and cache their algorithms there)."""


class GraphsUnavailableError(EvalError):
    """CUDA graphs were asked for where there is no CUDA device (one line; ``fedrun eval`` exits 2)."""


def check_graphs(device: torch.device) -> None:
    """Raise one line unless ``device`` is a CUDA device of this process."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise GraphsUnavailableError(
            f"invalid device={device} for CUDA graphs: allowed: a CUDA device (they replay GPU kernels; "
            "on a CPU sample without them)"
        )


@dataclass
class _Captured:
    x: Tensor
    t: Tensor
    out: Tensor
    graph: torch.cuda.CUDAGraph


class GraphedForward:
    """``model(x, t)`` replayed from a CUDA graph per (shape, dtype, layout, autocast state) of its inputs.

    The returned tensor is the graph's own output buffer: the next call overwrites it. The samplers of
    ``unet.GaussianDiffusion`` use each step's output before the next call, as a sampling loop does.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (x.shape, x.dtype, x.stride(), t.shape, t.dtype, autocast)
        cap = self._graphs.get(key)
        if cap is None:
            cap = self._graphs[key] = self._capture(x, t)
        cap.x.copy_(x)
        cap.t.copy_(t)
        cap.graph.replay()
        return cap.out

    @property
    def captures(self) -> int:
        """Graphs captured so far (one per input shape seen)."""
        return len(self._graphs)

    def _capture(self, x: Tensor, t: Tensor) -> _Captured:
        check_graphs(x.device)
        sx, st = x.clone(), t.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.model(sx, st)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model(sx, st)
        self._pool = graph.pool()
        return _Captured(sx, st, out, graph)
