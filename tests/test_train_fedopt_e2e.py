"""End to end through `torchrun -m fedrun train` (2 gloo ranks, 3 clients, one rank hosting two): client sampling,
a server optimiser, FedProx and int8 updates with error feedback together, stopped after round 2 and resumed,
equal the uninterrupted run bit for bit (the draws replay from (seed, round); the server state comes back from
rank 0's shared.pt on every rank)."""

from __future__ import annotations

import pytest
import torch
from cli_subprocess import TINY, assert_bit_identical, load_models, run_fedrun

from fedrun.checkpoint import round_dir, safe_load, shared_file
from fedrun.comm import read_comm_log
from fedrun.methods import sampled_clients

pytestmark = pytest.mark.timeout(900)

OPTIONS = [
    "--method",
    "udec",
    "--clients",
    "3",
    "--rounds",
    "4",
    "--max-local-steps",
    "4",
    "--set",
    "federation.sample_clients=2",
    "--set",
    "federation.server_optimizer=fedadam",
    "--set",
    "optim.prox_mu=0.01",
    "--set",
    "optim.ema_decay=0.9",
    "--set",
    "federation.exchange_dtype=int8",
]


@pytest.mark.multiproc
def test_sampled_fedadam_fedprox_int8_resume_is_bit_identical(repo_root, fmnist_root, tmp_path):
    args = [*TINY, "--data-root", str(fmnist_root), "--out-dir", str(tmp_path), *OPTIONS]
    run_fedrun(repo_root, [*args, "--name", "ref"], nproc=2)
    run_fedrun(repo_root, [*args, "--name", "cut", "--rounds", "2"], nproc=2)  # stops after round 2 of 4
    p = run_fedrun(repo_root, [*args, "--name", "cut"], nproc=2)
    assert "after round 2 of 4" in p.stderr
    ref, cut = load_models(tmp_path / "ref"), load_models(tmp_path / "cut")
    assert_bit_identical(ref, cut)

    rows = read_comm_log(tmp_path / "ref" / "comm.jsonl")
    assert [r["sampled"] for r in rows] == [list(sampled_clients(7, r, 3, 2)) for r in range(1, 5)]
    assert [r["sampled"] for r in read_comm_log(tmp_path / "cut" / "comm.jsonl")] == [r["sampled"] for r in rows]

    shared = safe_load(shared_file(round_dir(tmp_path / "ref", 4)))
    server = shared["server"]
    assert server["optimizer"] == "fedadam" and server["steps"] == {"decoder": 4}
    assert set(server["state"]) == {"exp_avg", "exp_avg_sq"}
    decoder = set(server["state"]["exp_avg"])
    assert decoder and all(n in ref["client0.pt"] for n in decoder)
    # every client holds the one shared decoder, the server's, sampled or not; the encoders stay their own
    models = [ref[f"client{k}.pt"] for k in range(3)]
    assert all(torch.equal(models[0][n], m[n]) for m in models[1:] for n in decoder)
    assert not all(torch.equal(models[0][n], models[1][n]) for n in models[0] if n not in decoder)
