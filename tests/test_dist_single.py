"""fedrun.dist in a single process: no launcher, no process group; its helpers then act on this rank alone,
and a launcher's missing or contradictory variables are refused by name."""

from __future__ import annotations

import pytest
import torch

from fedrun import agreement
from fedrun import dist as fdist


def test_single_process_without_launcher(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = fdist.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (0, 1, 0, None)
    assert ctx.device == torch.device("cpu") and ctx.is_main
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fdist.init_distributed(device="cpu").backend is None
    assert not torch.distributed.is_initialized()
    fdist.cleanup()  # safe without a group


def test_single_process_helpers():
    entries = [("a", (2, 3), "torch.float32")]
    assert agreement.check_signature(entries) == agreement.signature_hash(entries)
    assert agreement.check_signature(entries) != agreement.signature_hash([("a", (3, 2), "torch.float32")])
    assert fdist.all_gather_ints([3, 4]) == [3, 4]
    with pytest.raises(ValueError, match="slot 1"):
        fdist.all_gather_ints([3, None])
    t = torch.ones(2)
    fdist.broadcast_state([t])
    assert torch.equal(t, torch.ones(2))
    assert fdist.broadcast_json({"a": 1}) == {"a": 1}
    assert fdist.gather_dict({3: "x"}) == {3: "x"}
    fdist.barrier()


def test_env_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        fdist.init_distributed(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        fdist.init_distributed(device="cuda")
    assert fdist.init_distributed(device="auto").device == torch.device("cpu")


def test_hosted_clients_round_robin():
    assert fdist.hosted_clients(0, 2, 5) == [0, 2, 4]
    assert fdist.hosted_clients(1, 2, 5) == [1, 3]
    assert fdist.hosted_clients(2, 3, 3) == [2]
    with pytest.raises(ValueError) as err:
        fdist.hosted_clients(0, 4, 3)
    assert str(err.value) == (
        "clients=3 is smaller than the number of ranks 4: every rank must host at least one client"
    )
    with pytest.raises(ValueError, match="rank"):
        fdist.hosted_clients(2, 2, 4)
