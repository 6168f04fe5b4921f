"""The one module that owns the process group: init, backend choice, cleanup, start-up agreement checks.

Ranks are read from the environment torchrun exports (and submitit's ``TorchDistributedEnvironment().
export()`` on Slurm): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Without WORLD_SIZE, or with
WORLD_SIZE=1, there is no process group and every helper here degrades to the single-process answer, so
tests and laptops need no launcher. Backend: NCCL with CUDA, gloo without (every test runs on CPU).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.rendezvous import rendezvous

from fedrun.config import DEVICES, ConfigError


class DeviceNotAvailableError(ConfigError, RuntimeError):
    """The config asks for a device this machine lacks (cuda without CUDA): a bad input, printed as one line by the
    CLI (a ConfigError), raised where the device is chosen (a RuntimeError to callers of ``init_distributed``)."""


class SignatureMismatchError(RuntimeError):
    """Ranks disagree about something that must be identical everywhere (raised on every rank)."""


@dataclass
class DistContext:
    rank: int
    """This process's rank in the process group (0 without one)."""
    world_size: int
    """Number of ranks (1 without a process group)."""
    local_rank: int
    """Rank within this node: the CUDA device index."""
    backend: str | None
    """'nccl', 'gloo', or None for a single process."""
    device: torch.device
    """Where this rank's clients live."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank with shared side effects (logs, shared artefacts)."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"WORLD_SIZE > 1 but {name} is not set: launch with torchrun or export it")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def _pick_device(device: str, local_rank: int, distributed: bool) -> torch.device:
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"invalid device={device!r}: allowed: " + ", ".join(DEVICES))
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceNotAvailableError(f"invalid device={device!r}: CUDA is not available on this machine; "
                                      "allowed here: auto, cpu")
    # Under a launcher every rank takes its own GPU; an explicit index only counts for one process.
    if distributed or ":" not in device:
        return torch.device("cuda", local_rank)
    return torch.device(device)


def env_world_size() -> int:
    """The number of ranks the launcher started (WORLD_SIZE, 1 without one), known before any process group."""
    return _env_int("WORLD_SIZE", 1)


def pick_device(device: str | torch.device) -> torch.device:
    """The device ``init_distributed`` would choose for ``device`` (auto, cpu, cuda, cuda:1) in this process,
    without joining a process group: under torchrun each rank its LOCAL_RANK's GPU. A torch.device is kept."""
    if isinstance(device, torch.device):
        return device
    return _pick_device(str(device), _env_int("LOCAL_RANK", 0), distributed=_env_int("WORLD_SIZE", 1) > 1)


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistContext:
    """Join the process group described by the environment, or run as a single process.

    ``timeout_s`` bounds every collective, so a dead or diverging peer ends in an error, not a hang.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        dev = _pick_device(device, local_rank, distributed=False)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(0, 1, local_rank, None, dev)
    rank = _env_int("RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"WORLD_SIZE={world_size} but {name} is not set: launch with torchrun")
    dev = _pick_device(device, local_rank, distributed=True)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # torchrun --max-restarts keeps one rendezvous store across restarts of the group: without a
        # per-attempt prefix the restarted ranks read the dead ranks' gloo/NCCL addresses from the
        # previous attempt and fail with "Connection refused" (pytorch/pytorch#167288).
        store, _, _ = next(rendezvous("env://", rank, world_size, timeout=timedelta(seconds=timeout_s)))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"fedrun/attempt{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            # NCCL: bind the group to this rank's GPU now (eager init; no device guessing later)
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistContext(rank, world_size, local_rank, backend, dev)


def cleanup() -> None:
    """Destroy the process group if one is initialised (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    """Number of ranks of the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the initialised process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather_object(obj: object) -> list[object]:
    out: list[object] = [None] * world()
    if len(out) == 1:
        return [obj]
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if world() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` is ignored elsewhere)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_dict(part: Mapping[Any, Any]) -> dict[Any, Any]:
    """Union, on every rank, of every rank's dict (e.g. per-client losses keyed by client). A key present
    on two ranks is an error: each rank should report only its own clients."""
    merged: dict[Any, Any] = {}
    for r, d in enumerate(_all_gather_object(dict(part))):
        for key, value in d.items():  # type: ignore[attr-defined]
            if key in merged:
                raise ValueError(f"gather_dict: key {key!r} reported by several ranks (again by rank {r})")
            merged[key] = value
    return merged


def signature_hash(entries: list[tuple[str, tuple[int, ...], str]]) -> str:
    """SHA-256 of the (name, shape, dtype) entries, in order."""
    h = hashlib.sha256()
    for name, shape, dtype in entries:
        h.update(f"{name}|{tuple(int(s) for s in shape)}|{dtype}\n".encode())
    return h.hexdigest()


def check_signature(entries: list[tuple[str, tuple[int, ...], str]], what: str = "shared parameters") -> str:
    """Check that every rank has the same (name, shape, dtype) entries, in the same order.

    One all_gather on every rank, then the same comparison everywhere: on a mismatch every rank raises
    ``SignatureMismatchError`` with the same message, naming the differing rank(s) and the first differing
    entry. Returns the hash. A no-op check without a process group.
    """
    norm = [(str(n), tuple(int(s) for s in shape), str(dt)) for n, shape, dt in entries]
    mine = signature_hash(norm)
    # The entries themselves travel too (a few kB for a UNet) so the error can name the first difference.
    gathered = _all_gather_object((mine, len(norm), norm))
    ref_hash, ref_count, ref_entries = gathered[0]  # type: ignore[misc]
    bad = [r for r, (h, _, _) in enumerate(gathered) if h != ref_hash]  # type: ignore[misc]
    if not bad:
        return mine
    lines = []
    for r in bad:
        _, count, ents = gathered[r]  # type: ignore[misc]
        pairs = zip(ref_entries, ents, strict=False)  # lengths may differ: that is a mismatch too
        i = next((i for i, (a, b) in enumerate(pairs) if a != b), min(ref_count, count))
        have0 = ref_entries[i] if i < ref_count else "nothing"
        have_r = ents[i] if i < count else "nothing"
        lines.append(
            f"rank {r} ({count} entries vs {ref_count} on rank 0) first differs at entry {i}: "
            f"rank 0 has {have0}, rank {r} has {have_r}"
        )
    raise SignatureMismatchError(
        f"{what} differ across ranks: rank(s) {bad} differ from rank 0; " + "; ".join(lines)
    )


def all_gather_ints(values: list[int | None]) -> list[int]:
    """Combine per-rank partial knowledge: each rank fills the slots it knows (e.g. the sizes of the
    clients it hosts) and leaves None elsewhere. Raises ValueError, on every rank alike, when the lists
    differ in length, a slot is None everywhere, or two ranks fill a slot differently."""
    gathered: list[list[int | None]] = _all_gather_object(list(values))  # type: ignore[assignment]
    lengths = {len(v) for v in gathered}
    if len(lengths) != 1:
        raise ValueError(f"ranks passed lists of different lengths: {[len(v) for v in gathered]}")
    out: list[int] = []
    for i in range(len(values)):
        known = {r: v[i] for r, v in enumerate(gathered) if v[i] is not None}
        if not known:
            raise ValueError(f"slot {i} is not filled on any rank")
        if len(set(known.values())) > 1:
            raise ValueError(f"slot {i} is filled differently by the ranks: {known}")
        out.append(int(next(iter(known.values()))))
    return out


def all_gather_tensor(t: Tensor) -> list[Tensor]:
    """Every rank's ``t`` (same shape and dtype everywhere), in rank order, on the CPU; ``[t]`` alone."""
    if world() == 1:
        return [t]
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t)
    return [p.cpu() for p in parts]


@torch.no_grad()
def broadcast_state(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, bit for bit, in one broadcast.

    The tensors are packed as raw bytes, so any mix of dtypes travels in one flat uint8 buffer.
    """
    if world() == 1 or not tensors:
        return
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"broadcast_state needs tensors on one device, got {sorted(map(str, devices))}")
    chunks = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    flat = torch.cat(chunks) if len(chunks) > 1 else chunks[0].clone()
    dist.broadcast(flat, src=src)
    pos = 0
    for t, c in zip(tensors, chunks, strict=True):
        n = c.numel()
        # clone(): a fresh, aligned storage, so the byte slice can be reinterpreted as t's dtype.
        t.copy_(flat[pos : pos + n].clone().view(t.dtype).view(t.shape))
        pos += n


def hosted_clients(rank: int, world_size: int, num_clients: int) -> list[int]:
    """Clients hosted by ``rank``, round-robin: client k lives on rank k % world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} out of range for world_size={world_size}")
    if num_clients < world_size:
        raise ValueError(
            f"clients={num_clients} is smaller than the number of ranks {world_size}: "
            "every rank must host at least one client"
        )
    return list(range(rank, num_clients, world_size))
