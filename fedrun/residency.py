"""Where the states of a rank's clients live while they are not training, and how one is swapped in.

A rank hosting several clients trains them one after the other in one working module (``fedrun.client``).
``federation.resident`` decides where the others wait:

* ``device``: every client's parameters and EMA stay on the training device (no copy but the working
  module's own load and store); device memory grows with K.
* ``host``: they wait in host memory (pinned when CUDA is available, so the copies run at full PCIe speed)
  and a client's turn starts by copying its parameters into the working module and its EMA into one working
  EMA on the device, and ends by copying both back: device memory stays one client's working set whatever K.
* ``auto``: host on a GPU rank hosting more than one client, else device. On a CPU the host is the device,
  so keeping a second copy would only cost time; ``host`` forced there runs the very same swap path
  (copies host to host), which is how the tests check that it is bit-identical to ``device``.

What is not swapped here: the optimiser state (``optim.keep_state``) is kept on the host by
``fedrun.client`` already (copied out after each round, into each new Adam before the next one) and the
images follow ``data.placement``. A rank with a single client never swaps: that client's parameters are
the working module's own (``fedrun.exchange`` may have adopted them into its flat tensor, and nothing here
replaces a parameter's ``.data``: turns only copy values, so every alias stays valid).

The accounting (``on_device``, ``peak_on_device``, ``swaps``, ``swap_seconds``) is what the tests and
``benchmarks/bench_clients.py`` read: how many clients' states were on the device at once, and what the
copies cost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from fedrun.client import ClientState
from fedrun.config import PLACEMENTS


def choose_residency(policy: str, device: torch.device, hosted: int) -> str:
    """'device' or 'host' for ``federation.resident`` (see the module docstring): a single hosted client is
    always 'device' (its state is the working set); 'auto' is 'host' only on a GPU."""
    if policy not in PLACEMENTS:
        raise ValueError(f"invalid federation.resident={policy!r}: allowed: {', '.join(PLACEMENTS)}")
    if hosted <= 1:
        return "device"
    if policy == "auto":
        return "host" if device.type == "cuda" else "device"
    return policy


def state_bytes(client: ClientState) -> int:
    """Bytes of a client's swappable state: its parameters and EMA shadow (the optimiser state is extra)."""
    tensors = list(client.params.values()) + (list(client.ema.shadow.values()) if client.ema is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


class Residency:
    """Keeps a rank's waiting clients where ``where`` says and swaps one at a time into the working module.

    Args:
        model: the working module (its parameters are copied into, never replaced).
        device: the training device.
        where: 'device' or 'host' (``choose_residency``).
    """

    def __init__(self, model: nn.Module, device: torch.device, where: str) -> None:
        if where not in ("device", "host"):
            raise ValueError(f"Residency: where must be 'device' or 'host', got {where!r}")
        self.model, self.device, self.where = model, device, where
        self.pin = where == "host" and torch.cuda.is_available()
        # The Parameters themselves: a client whose params are these is swapped in, and copy_ of a tensor onto
        # itself is a no-op, so LocalTrainer's load and store cost nothing during a turn.
        self._module: dict[str, torch.Tensor] = dict(model.named_parameters())
        self._work_ema: dict[str, torch.Tensor] | None = None  # one EMA shadow on the device, made once
        self._parked: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]] = {}
        self.on_device: set[int] = set()
        """Clients whose state is on the training device now."""
        self.peak_on_device = 0
        """The most clients whose state was on the training device at once."""
        self.swaps = 0
        """Turns taken through host memory (one swap in and one out each)."""
        self.swap_seconds = 0.0
        """Wall time of those copies, waited for (CUDA: synchronised)."""

    @property
    def host(self) -> bool:
        return self.where == "host"

    @property
    def storage(self) -> torch.device:
        """Where waiting clients' tensors live: also where a checkpoint of one is loaded to."""
        return torch.device("cpu") if self.host else self.device

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        # The same strides as on the device (channels_last stays NHWC): a packed sync lays a parameter out in
        # its own memory order, and ranks whose clients wait in different places must lay it out alike.
        host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=self.pin)
        return host.copy_(t.detach())

    def park(self, client: ClientState) -> ClientState:
        """Put a new client's state where it waits (host: moved there, pinned on CUDA) and count it."""
        if self.host:
            client.params = {n: self._to_host(t) for n, t in client.params.items()}
            if client.ema is not None:
                client.ema.shadow = {n: self._to_host(t) for n, t in client.ema.shadow.items()}
        else:
            self.on_device.add(client.cid)
            self.peak_on_device = max(self.peak_on_device, len(self.on_device))
        return client

    @contextlib.contextmanager
    def turn(self, client: ClientState) -> Iterator[ClientState]:
        """``client`` swapped in for its turn (host; nothing moves when resident): its parameters alias the
        working module (so ``LocalTrainer.load`` and ``store`` copy nothing) and its EMA is the working EMA;
        both are copied back, and the client's own tensors restored, when the turn ends, also on an error."""
        if not self.host:
            yield client
            return
        if self.on_device:
            raise RuntimeError(f"client {client.cid}'s turn while {sorted(self.on_device)} is still swapped in")
        self._swap_in(client)
        try:
            yield client
        finally:
            self._swap_out(client)

    @torch.no_grad()
    def _swap_in(self, client: ClientState) -> None:
        t0 = time.perf_counter()
        host_params, host_ema = client.params, client.ema.shadow if client.ema is not None else None
        names = list(self._module)
        torch._foreach_copy_([self._module[n] for n in names], [host_params[n] for n in names], non_blocking=True)
        if client.ema is not None and host_ema is not None:
            if self._work_ema is None:
                self._work_ema = {n: torch.empty_like(t, device=self.device) for n, t in host_ema.items()}
            work = self._work_ema
            torch._foreach_copy_(list(work.values()), [host_ema[n] for n in work], non_blocking=True)
            client.ema.shadow = self._work_ema
        client.params = dict(self._module)
        self._parked[client.cid] = (host_params, host_ema)
        self.on_device.add(client.cid)
        self.peak_on_device = max(self.peak_on_device, len(self.on_device))
        self._wait()
        self.swap_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def _swap_out(self, client: ClientState) -> None:
        t0 = time.perf_counter()
        host_params, host_ema = self._parked.pop(client.cid)
        names = list(self._module)
        torch._foreach_copy_([host_params[n] for n in names], [self._module[n] for n in names], non_blocking=True)
        if client.ema is not None and host_ema is not None:
            torch._foreach_copy_([host_ema[n] for n in host_ema], [client.ema.shadow[n] for n in host_ema])
            client.ema.shadow = host_ema
        client.params = host_params
        self._wait()  # the host copies must be complete before anyone reads them (the exchange, a checkpoint)
        self.on_device.discard(client.cid)
        self.swaps += 1
        self.swap_seconds += time.perf_counter() - t0

    def _wait(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self, clients: int) -> str:
        """One line for the log: where this rank's waiting clients are kept."""
        if self.host:
            pinned = "pinned " if self.pin else ""
            return f"the states of its {clients} clients wait in {pinned}host memory, swapped in one at a time"
        return f"the states of its {clients} client(s) stay on the {self.device.type} device"
