"""End to end with ``federation.exchange_dtype=int8``: torchrun on 2 gloo ranks, 3 clients (rank 0 hosts two,
packed; rank 1 one, in place), stopped after round 2 and resumed, equals the uninterrupted run bit for bit
(the error feedback is in the checkpoint); comm.jsonl counts the int8 bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_subprocess import TINY, assert_bit_identical, load_models, run_fedrun

from fedrun import checkpoint as ckpt
from fedrun.build import build_model
from fedrun.comm import collective_bytes_per_round, read_comm_log
from fedrun.config import RunConfig
from fedrun.methods import plan_round
from unet import GROUPS, parameter_groups

pytestmark = [pytest.mark.timeout(900), pytest.mark.multiproc]


def _args(fmnist_root: Path, out: Path, name: str, method: str) -> list[str]:
    return [
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--out-dir",
        str(out),
        "--name",
        name,
        "--method",
        method,
        "--clients",
        "3",
        "--rounds",
        "4",
        "--max-local-steps",
        "4",
        "--set",
        "federation.exchange_dtype=int8",
        "--set",
        "optim.ema_decay=0.9",
    ]


def test_int8_resume_is_bit_identical(repo_root, fmnist_root, tmp_path, method="udec"):
    """UDec (the int8 goal); USplit's changing contributors are covered by tests/test_exchange_int8.py."""
    run_fedrun(repo_root, _args(fmnist_root, tmp_path, "ref", method), nproc=2)
    args = _args(fmnist_root, tmp_path, "resumed", method)
    run_fedrun(repo_root, [*args, "--rounds", "2"], nproc=2)  # stops after round 2 of 4
    rdir = tmp_path / "resumed" / "checkpoints" / "round-000002"
    # each rank's error feedback rides with its lowest hosted client: 0 on rank 0, 1 on rank 1 (2 has none)
    states = {k: ckpt.safe_load(ckpt.client_file(rdir, k)) for k in range(3)}
    assert states[0]["feedback"]["key"][:3] == [2, 0, [0, 2]] and states[1]["feedback"]["key"][:3] == [2, 1, [1]]
    assert "feedback" not in states[2]
    assert all(states[k]["feedback"]["sender"].abs().sum() > 0 for k in (0, 1))
    p = run_fedrun(repo_root, args, nproc=2)
    assert "resuming" in p.stderr and "after round 2 of 4" in p.stderr
    assert_bit_identical(load_models(tmp_path / "ref"), load_models(tmp_path / "resumed"))

    run = tmp_path / "ref"
    cfg = RunConfig.from_json((run / "config.json").read_text())
    model = build_model(cfg)
    groups, numel = parameter_groups(model), {n: p.numel() for n, p in model.named_parameters()}
    sizes = {g: sum(numel[n] for n in groups[g]) for g in GROUPS}
    rows = read_comm_log(run / "comm.jsonl")
    expected = [
        collective_bytes_per_round(plan_round(method, r, 3, cfg.federation.seed), sizes, "int8", world_size=2)
        for r in range(1, 5)
    ]
    fp32 = collective_bytes_per_round(plan_round(method, 1, 3, cfg.federation.seed), sizes, "fp32")
    assert [r["bytes"] for r in rows] == expected and expected[0] < 0.26 * fp32
