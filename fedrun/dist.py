"""The one module that owns the process group: init, backend choice, cleanup, and what crosses it.

What crosses it is tensors, or plain values as JSON bytes in a uint8 tensor, checked on arrival against the
type the receiver expects (``fedrun.wire``); never a pickle, since a peer may belong to another institution.
The start-up checks that every rank agrees (config, parameter signature) are ``fedrun.agreement``'s.

Ranks are read from the environment torchrun exports (and submitit's ``TorchDistributedEnvironment().
export()`` on Slurm): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Without WORLD_SIZE, or with
WORLD_SIZE=1, there is no process group and every helper here degrades to the single-process answer, so
tests and laptops need no launcher. Backend: NCCL with CUDA, gloo without (every test runs on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Imported before any group forms, on purpose. torch.distributed.nn.functional binds `group=group.WORLD` into ten
# functions' defaults at its first import, and torch._dynamo imports it: dynamo comes in lazily, with the first
# optimizer a round builds (torch.optim's add_param_group), torchvision (fedrun resizes and reads image folders with
# it) or torch.compile. Imported after the group formed, it holds the default group:
# destroy_process_group then leaves gloo's threads running, and the interpreter's exit tears them down mid-loop. A
# rank that had finished its run died of SIGABRT ("terminate called without an active exception") in about one exit
# in four: 8 of 30 two-rank runs of a plain gloo script on a 2-core EPYC, 0 of 30 with this import first; in CI
# about one test in 700. Imported here the defaults are None, and cleanup() ends the group's threads
# (tests/test_dist_multiproc.py::test_two_ranks).
import torch.distributed.nn.functional  # noqa: F401, E402
from torch import Tensor
from torch.distributed.rendezvous import rendezvous

from fedrun import wire
from fedrun.config import DEVICES, ConfigError


class DeviceNotAvailableError(ConfigError, RuntimeError):
    """The config asks for a device this machine lacks (cuda without CUDA): a bad input, printed as one line by the
    CLI (a ConfigError), raised where the device is chosen (a RuntimeError to callers of ``init_distributed``)."""


class PeerError(RuntimeError):
    """Another rank disagrees with this one, or sent what no honest rank sends. Raised on every rank that sees
    it (all of them see the same gathered bytes), and printed by the CLI as one line."""


class SignatureMismatchError(PeerError):
    """Ranks disagree about something that must be identical everywhere (raised on every rank)."""


class PeerPayloadError(PeerError):
    """A peer's payload is not what this rank expects (not JSON, a wrong type or size): refused, never run."""


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
        raise DeviceNotAvailableError(
            f"invalid device={device!r}: CUDA is not available on this machine; allowed here: auto, cpu"
        )
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
        store, _, _ = next(rendezvous("env://", rank, world_size, timeout=timedelta(seconds=timeout_s)))
        dist.init_process_group(
            backend=backend,
            store=_attempt_store(store),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            # NCCL: bind the group to this rank's GPU now (eager init; no device guessing later)
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistContext(rank, world_size, local_rank, backend, dev)


def _attempt_store(store: dist.Store) -> dist.Store:
    """The store of this attempt of the group: keys of an earlier attempt must never be read."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # A store of this attempt's own (torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 starts one per
        # attempt; Slurm and plain env:// runs start once). No prefix: a restart count is each agent's own, so a
        # host that is replaced (its agent starts again at 0) would land in another namespace (pytorch#135712).
        return store
    # torchrun's agent keeps one store across restarts of the group: without a per-attempt prefix the
    # restarted ranks read the dead ranks' gloo/NCCL addresses from the previous attempt and fail with
    # "Connection refused" (pytorch/pytorch#167288).
    return dist.PrefixStore(f"fedrun/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def cleanup() -> None:
    """Destroy the process group if one is initialised (safe to call always). Its threads end here, not at the
    interpreter's exit (see the import of ``torch.distributed.nn.functional`` above)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave() -> None:
    """The success path's end: every rank meets, then the group is torn down, so no rank closes its gloo pairs
    while a peer still waits in the last collective. Not for error paths: there the peers may be gone and the
    barrier would wait for them; ``cleanup()`` is the one that is always safe."""
    barrier()
    cleanup()


def world() -> int:
    """Number of ranks of the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the initialised process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if world() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# -- values between ranks: tensors, or JSON bytes; never a pickle ------------------------------------------
# Ranks may belong to different institutions: torch's *_object collectives unpickle what a peer sends, which
# runs code the peer chose. Here a value travels as UTF-8 JSON in a uint8 tensor, after its length, and is
# parsed and checked against the type the receiver expects (fedrun.wire) before anyone uses it.


def _to_json_bytes(value: Any) -> bytes:
    """The one place an outgoing payload is serialised (tests/hostile_peer.py swaps it for a pickle)."""
    return wire.encode(value)


def _encoded(value: Any) -> bytes | Exception:
    """This rank's payload, or why it has none (sent as length -1: the peers stop instead of waiting)."""
    try:
        return _to_json_bytes(value)
    except (TypeError, ValueError) as e:
        return e


def _wire_tensor(t: Tensor) -> Tensor:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return t.to(torch.device("cuda", torch.cuda.current_device())) if dist.get_backend() == "nccl" else t


def _check_length(n: int, r: int, what: str) -> None:
    if n == -1:
        raise PeerPayloadError(f"rank {r} failed to send its {what}; see its log")
    if not 0 <= n <= wire.MAX_PAYLOAD_BYTES:
        raise PeerPayloadError(
            f"rank {r} announced {n} bytes of {what}; a rank accepts 0 to {wire.MAX_PAYLOAD_BYTES}: refused"
        )


def _padded(payload: bytes, size: int) -> Tensor:
    buf = torch.zeros(max(size, 1), dtype=torch.uint8)  # gloo and NCCL move no empty tensors
    if payload:
        buf[: len(payload)] = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())
    return buf


def _gather_bytes(payload: bytes | Exception, what: str) -> list[bytes]:
    """Every rank's bytes in rank order: two collectives, the lengths (int64), then the bytes padded to the
    longest. Every length is checked before anything is allocated for it; a rank without a payload re-raises
    its own error once the others know, and they stop too."""
    failed = isinstance(payload, Exception)
    lengths = [int(t) for t in all_gather_tensor(torch.tensor([-1 if failed else len(payload)]))]
    if failed:
        raise payload
    for r, n in enumerate(lengths):
        _check_length(n, r, what)
    parts = all_gather_tensor(_padded(payload, max(lengths)))
    return [p[:n].numpy().tobytes() for p, n in zip(parts, lengths, strict=True)]


def _broadcast_bytes(payload: bytes | Exception | None, src: int, what: str) -> bytes:
    """Rank ``src``'s bytes on every rank (``payload`` is ignored elsewhere): the length, then the bytes."""
    mine = rank() == src
    if mine and isinstance(payload, Exception) and world() == 1:
        raise payload
    if world() == 1:
        return payload  # type: ignore[return-value]
    length = _wire_tensor(torch.tensor([len(payload) if mine and isinstance(payload, bytes) else -1]))
    dist.broadcast(length, src=src)
    if mine and isinstance(payload, Exception):
        raise payload
    n = int(length.item())
    _check_length(n, src, what)
    buf = _wire_tensor(_padded(payload if mine else b"", n))  # type: ignore[arg-type]
    dist.broadcast(buf, src=src)
    return buf[:n].cpu().numpy().tobytes()


def _parse(raw: bytes, expected: Any, r: int, what: str) -> Any:
    try:
        return wire.parse(raw, expected)
    except wire.WireError as e:
        raise PeerPayloadError(
            f"rank {r} sent an invalid {what} ({e}): refused (does every rank run the same fedrun version?)"
        ) from None


def all_gather_json(value: Any, expected: Any = Any, what: str = "values") -> list[Any]:
    """Every rank's JSON-able ``value``, in rank order, each checked against the type hint ``expected``
    (``fedrun.wire.decode``: tuples and int keys come back as such). One clear ``PeerPayloadError`` for a
    payload that is not JSON of that type, on every rank alike."""
    return [_parse(raw, expected, r, what) for r, raw in enumerate(_gather_bytes(_encoded(value), what))]


def broadcast_json(value: Any, expected: Any = Any, src: int = 0, what: str = "value") -> Any:
    """Rank ``src``'s JSON-able ``value`` on every rank (ignored elsewhere), checked against ``expected``; rank
    ``src`` gets the same round-tripped value as the others."""
    payload = _encoded(value) if rank() == src else None
    return _parse(_broadcast_bytes(payload, src, what), expected, src, what)


def _merge(merged: dict[Any, Any], part: Mapping[Any, Any], r: int, what: str) -> None:
    for key, value in part.items():
        if key in merged:
            raise ValueError(f"{what}: key {key!r} reported by several ranks (again by rank {r})")
        merged[key] = value


def gather_dict(part: Mapping[int | str, Any], expected: Any = Any, what: str = "values") -> dict[Any, Any]:
    """Union, on every rank, of every rank's dict (e.g. per-client losses keyed by client), its values checked
    against ``expected``. Keys are ints (client or rank ids; JSON spells them as strings, they come back as
    ints) or names. A key present on two ranks is an error: each rank should report only its own clients."""
    merged: dict[Any, Any] = {}
    for r, d in enumerate(all_gather_json(dict(part), dict[int | str, expected], what)):  # type: ignore[valid-type]
        _merge(merged, d, r, what)
    return merged


def gather_arrays(part: Mapping[int, np.ndarray], what: str = "arrays") -> dict[int, np.ndarray]:
    """Union, on every rank, of every rank's numpy arrays keyed by int (sample grids by client): the shapes and
    dtypes travel as JSON, then the raw bytes of all arrays in one buffer, checked against them on arrival."""
    arrays = {int(k): np.ascontiguousarray(a) for k, a in part.items()}
    metas = all_gather_json(
        {k: (list(a.shape), a.dtype.str) for k, a in arrays.items()}, wire.ArrayMeta, f"{what} shapes"
    )
    raws = _gather_bytes(b"".join(a.tobytes() for a in arrays.values()), what)
    merged: dict[int, np.ndarray] = {}
    for r, (meta, buf) in enumerate(zip(metas, raws, strict=True)):
        try:
            _merge(merged, wire.arrays_from(meta, buf), r, what)
        except wire.WireError as e:
            raise PeerPayloadError(f"rank {r} sent invalid {what} ({e}): refused") from None
    return merged


def agree(digest: str) -> bool:
    """Whether every rank has the same hex SHA-256 ``digest``: one all_gather of its 32 bytes, the same answer
    on every rank (all compare the same gathered digests). The details travel only after a mismatch."""
    mine = torch.frombuffer(bytearray(bytes.fromhex(digest)), dtype=torch.uint8)
    return all(torch.equal(d, mine) for d in all_gather_tensor(mine))


def all_gather_ints(values: list[int | None], what: str = "slots") -> list[int]:
    """Combine per-rank partial knowledge: each rank fills the slots it knows (e.g. the sizes of the
    clients it hosts) and leaves None elsewhere. Raises ValueError, on every rank alike, when the lists
    differ in length, a slot is None everywhere, or two ranks fill a slot differently."""
    gathered: list[list[int | None]] = all_gather_json(list(values), list[int | None], what)
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
