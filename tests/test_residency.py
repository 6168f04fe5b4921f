"""Clients waiting in host memory (``federation.resident``, ``fedrun.residency``): the swap path gives the same
bits as keeping every client on the device, and holds one client's state on the device at a time.

On a CPU the host is the device, so ``host`` forced there runs the same copies a GPU run makes (host to host
instead of host to device); what is checked is the arithmetic and the accounting, not memory figures (those
are ``benchmarks/bench_clients.py``'s).
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import pytest
import torch

from fedrun import dist as fdist
from fedrun.build import build_diffusion, build_model
from fedrun.client import ClientState, LocalTrainer, StepConfig
from fedrun.config import ConfigError, apply_overrides
from fedrun.exchange import Exchange
from fedrun.loop import Run
from fedrun.methods import get_method
from fedrun.presets import get_preset
from fedrun.residency import Residency, choose_residency
from unet import EMA, parameter_groups

pytestmark = pytest.mark.timeout(600)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_choose_residency_table():
    assert choose_residency("auto", CPU, 50) == "device"  # the host is the device: no second copy
    assert choose_residency("auto", CUDA, 50) == "host"
    assert choose_residency("auto", CUDA, 1) == "device"  # a single client is the working set
    assert choose_residency("host", CPU, 2) == "host"  # forced: the swap path runs on a CPU too
    assert choose_residency("host", CUDA, 1) == "device"
    assert choose_residency("device", CUDA, 50) == "device"
    with pytest.raises(ValueError, match="federation.resident='gpu'"):
        choose_residency("gpu", CPU, 2)


def test_bad_resident_value_is_one_line():
    with pytest.raises(ConfigError, match=r"federation\.resident.*allowed: auto, device, host"):
        apply_overrides(get_preset("tiny"), {"federation.resident": "pinned"})


def _tiny_rank(where: str, clients: int, rounds: int) -> dict:
    """One process training ``clients`` clients in turn for ``rounds`` rounds of FedAvg, states ``where``."""
    small = {"optim.keep_state": True, "optim.ema_decay": 0.9, "data.image_size": 8, "federation.max_local_steps": 1}
    cfg = apply_overrides(get_preset("tiny"), small)
    torch.manual_seed(0)
    model = build_model(cfg).to(memory_format=torch.channels_last)
    # Adopted as a rank with one client would be (its parameters moved into the exchange's flat tensor): turns
    # must leave that aliasing intact, since they only copy values into the module.
    adopter = Exchange(parameter_groups(model), [1])
    assert adopter.adopt(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    step = StepConfig.from_config(cfg, CPU)
    trainer = LocalTrainer(model, build_diffusion(cfg), step, CPU)
    residency = Residency(model, CPU, where)
    g = torch.Generator().manual_seed(1)
    states = {
        k: residency.park(
            ClientState(
                cid=k,
                params=trainer.new_client_params(k),
                images=torch.randint(0, 256, (6 + k, 1, 8, 8), dtype=torch.uint8, generator=g),
                ema=EMA(model, 0.9),
            )
        )
        for k in range(clients)
    }
    exchange = Exchange(parameter_groups(model), [c.size for c in states.values()], device=CPU)
    plan = get_method("full").plan(1, clients, 7)
    peaks = []
    for rnd in range(1, rounds + 1):
        for c in states.values():
            with residency.turn(c):
                # swapped in, the only one; resident, every client is on the device all along
                assert residency.on_device == ({c.cid} if where == "host" else set(states))
                trainer.train_round(c, rnd)
            peaks.append(len(residency.on_device))
        exchange.sync(plan, {k: c.params for k, c in states.items()})
    return {
        "states": states,
        "residency": residency,
        "peaks": peaks,
        "ptrs_kept": ptrs == [p.data_ptr() for p in model.parameters()]
        and adopter.adopted.holds(list(dict(model.named_parameters())), list(model.parameters())),
        "module": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def _flat(state: dict) -> dict[str, torch.Tensor]:
    out = {f"p/{n}": t for n, t in state["params"].items()}
    out.update({f"ema/{n}": t for n, t in state["ema"]["shadow"].items()})
    out.update({f"opt/{n}/{k}": v for n, st in (state["opt_state"] or {}).items() for k, v in st.items()})
    return out


def test_host_turns_equal_resident_and_keep_one_state_on_the_device():
    K, R = 3, 2
    dev, host = _tiny_rank("device", K, R), _tiny_rank("host", K, R)
    for k in range(K):
        a, b = _flat(dev["states"][k].state_dict()), _flat(host["states"][k].state_dict())
        assert a.keys() == b.keys() and any(n.startswith("opt/") for n in a)
        for n in a:
            assert torch.equal(a[n], b[n]), f"client {k}: {n} differs"
    # The accounting: resident, all K are on the device; through the host, one at a time and none between turns.
    assert dev["residency"].peak_on_device == K and dev["residency"].swaps == 0
    assert host["residency"].peak_on_device == 1 and host["residency"].swaps == K * R
    assert host["peaks"] == [0] * (K * R) and dev["peaks"] == [K] * (K * R)
    # Turns copy values only: the working module's storage never moved (an adopted flat tensor stays valid) ...
    assert dev["ptrs_kept"] and host["ptrs_kept"]
    # ... and a waiting client's tensors are its own, not the working module's.
    module_ptrs = {p.data_ptr() for p in host["module"].values()}
    for c in host["states"].values():
        assert not module_ptrs & {t.data_ptr() for t in c.params.values()}
        # laid out as on the device (channels_last kept): a packed sync of mixed ranks lines up element by element
        assert all(c.params[n].stride() == t.stride() for n, t in host["module"].items())


def test_a_failing_turn_still_swaps_out():
    cfg = get_preset("tiny")
    model = build_model(cfg)
    residency = Residency(model, CPU, "host")
    c = residency.park(
        ClientState(
            cid=3,
            params={n: p.detach().clone() for n, p in model.named_parameters()},
            images=torch.zeros(1, 1, 28, 28, dtype=torch.uint8),
        )
    )
    own = c.params
    with pytest.raises(RuntimeError, match="boom"), residency.turn(c):
        raise RuntimeError("boom")
    assert c.params is own and residency.on_device == set()


# -- 100 clients on 2 real gloo ranks, through the training loop --------------------------------------------


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for n in sorted(tensors):
        h.update(n.encode())
        h.update(tensors[n].detach().cpu().numpy().tobytes())  # values in logical order, whatever the strides
    return h.hexdigest()


def _train(ctx: fdist.DistContext, cfg) -> dict:
    """What ``fedrun.train.train`` does after the process group is up, without sampling; per hosted client a
    digest of its state, and this rank's residency accounting."""
    run = Run.open(cfg, ctx)
    assert run is not None
    with run:
        run.resume()
        for r in run.rounds():
            run.round(r)
        run.checkpoint(cfg.federation.rounds)  # once, at the end: 50 clients' files per rank
        run.export_models()
        run.finish()
    res = run.hosted.residency
    return {
        "digests": {str(k): _digest(_flat(c.state_dict())) for k, c in run.hosted.clients.items()},
        "where": res.where,
        "peak": res.peak_on_device,
        "swaps": res.swaps,
    }


def _hundred_clients_body(ctx: fdist.DistContext, root: str, data_root: str) -> dict:
    base = {
        "federation.clients": 100,
        "federation.max_local_steps": 1,
        "federation.seed": 7,
        "optim.keep_state": True,
        "optim.ema_decay": 0.9,
        "data.root": data_root,
        "out_dir": root,
        "sample_every": 0,
        "data.image_size": 8,  # 88k parameters: 100 clients' checkpoints stay small
    }
    tiny = get_preset("tiny")
    out = {"device": _train(ctx, apply_overrides(tiny, {**base, "name": "dev", "federation.resident": "device"}))}
    # Through the host, interrupted after round 1 and resumed (checkpoints load into host memory).
    host = {**base, "name": "host", "federation.resident": "host"}
    _train(ctx, apply_overrides(tiny, {**host, "federation.rounds": 1}))
    out["host"] = _train(ctx, apply_overrides(tiny, host))
    return out


def test_hundred_clients_on_two_ranks_host_equals_resident(fmnist_root: Path, tmp_path: Path):
    from multiproc import spawn_ranks

    body = partial(_hundred_clients_body, root=str(tmp_path), data_root=str(fmnist_root))
    results = spawn_ranks(2, body, tmp_path, timeout_s=500, label="100 clients, host vs device")
    for res in results:
        dev, host = res["device"], res["host"]
        assert len(dev["digests"]) == 50 and dev["digests"] == host["digests"]
        assert (dev["where"], dev["peak"], dev["swaps"]) == ("device", 50, 0)
        assert (host["where"], host["peak"], host["swaps"]) == ("host", 1, 50)  # the resumed round 2
    # The exported models too (FedAvg: every client ends with the global model).
    for f in ("global.pt", "global_ema.pt"):
        a = torch.load(tmp_path / "dev" / "models" / f, weights_only=True)
        b = torch.load(tmp_path / "host" / "models" / f, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
