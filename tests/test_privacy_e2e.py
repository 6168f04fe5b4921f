"""Privacy through the real entry points: a DP run that stops at its budget (DONE says why, epsilon as
dp-accounting computes it), a resume whose epsilon continues, a 2-rank run with secure aggregation equal to
the plain run within the fixed-point quantum, and the refused combinations as one line before any process
group starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_subprocess import TINY, fedrun, load_models, one_error_line, rank_env, run_fedrun
from multiproc import free_port

from fedrun.comm import read_comm_log
from fedrun.rundir import RunDir

dp_accounting = pytest.importorskip("dp_accounting")
pytest.importorskip("cryptography")

pytestmark = pytest.mark.timeout(900)

DP = ["--set", "federation.dp_clip=0.001", "--set", "federation.dp_noise_multiplier=1.5"]


def _epsilon(rounds: int, clients: int = 3, sigma: float = 1.5, delta: float = 1e-5) -> float:
    """dp-accounting directly: all K clients each round, replace-one (sensitivity 2C -> sigma / 2)."""
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(clients, clients, dp_accounting.GaussianDpEvent(sigma / 2))
    acc.compose(event, rounds)
    return float(acc.get_epsilon(delta))


@pytest.mark.slow
def test_dp_run_stops_before_the_round_that_exceeds_its_budget(repo_root, fmnist_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    budget = (_epsilon(2) + _epsilon(3)) / 2  # rounds 1-2 fit, round 3 would not
    args = [*TINY, "--data-root", str(fmnist_root), "--out-dir", str(tmp_path), "--name", "b", "--clients", "3"]
    args += ["--rounds", "4", *DP, "--set", f"federation.dp_epsilon_budget={budget!r}"]
    p = run_fedrun(repo_root, args)
    run = tmp_path / "b"
    done = json.loads((run / "DONE").read_text())
    assert done["rounds"] == 4 and done["stopped_after"] == 2 and "privacy budget: round 3" in done["reason"]
    rows = read_comm_log(run / "comm.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["epsilon"] == pytest.approx(_epsilon(r["round"]), abs=1e-9) and r["delta"] == 1e-5
    assert sorted(d.name for d in (run / "checkpoints").glob("round-*")) == ["round-000001", "round-000002"]
    assert "global.pt" in load_models(run)
    assert "round 2/4" in p.stderr and "| eps " in p.stderr and "privacy budget" in p.stderr
    acc = EventAccumulator(str(RunDir(run).tb))
    acc.Reload()
    assert [e.step for e in acc.Scalars("privacy/epsilon")] == [1, 2]
    again = run_fedrun(repo_root, args)  # finished: the same command does nothing
    assert "nothing to do" in again.stderr


@pytest.mark.slow
def test_resume_continues_the_accountant(repo_root, fmnist_root, tmp_path):
    base = [*TINY, "--data-root", str(fmnist_root), "--out-dir", str(tmp_path), "--name", "r", "--clients", "3", *DP]
    run_fedrun(repo_root, [*base, "--rounds", "1"])
    p = run_fedrun(repo_root, [*base, "--rounds", "2"])
    assert "resuming" in p.stderr
    rows = read_comm_log(tmp_path / "r" / "comm.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    # restarted, round 2 would spend _epsilon(1) again
    assert rows[1]["epsilon"] == pytest.approx(_epsilon(2), abs=1e-9) and rows[1]["epsilon"] > _epsilon(1) + 1e-3
    saved = torch.load(tmp_path / "r" / "checkpoints" / "round-000002" / "shared.pt", weights_only=True)
    assert saved["privacy"]["history"] == [[2, 3, 3, 1.5]]


@pytest.mark.slow
@pytest.mark.multiproc
def test_secure_aggregation_run_equals_the_plain_run(repo_root, fmnist_root, tmp_path):
    # One round: the whole path (train, masked sync, save) once. After a second round the local training of
    # parameters that differ by a quantum (Adam divides by sqrt(v)) may amplify it past any fixed bound.
    base = [*TINY, "--data-root", str(fmnist_root), "--out-dir", str(tmp_path), "--clients", "3", "--rounds", "1"]
    run_fedrun(repo_root, [*base, "--name", "plain"], nproc=2)
    p = run_fedrun(repo_root, [*base, "--name", "sec", "--set", "federation.secure_aggregation=true"], nproc=2)
    assert "Traceback" not in p.stderr
    quantum = 1.0 * 2.0**-30  # the default range without DP
    plain, sec = load_models(tmp_path / "plain")["global.pt"], load_models(tmp_path / "sec")["global.pt"]
    worst = 0.0
    for n, a in plain.items():
        # 3 clients' roundings to the quantum, plus fp32's rounding of two different sums (values vs ref + change)
        allowed = 3 * quantum + 4 * torch.finfo(torch.float32).eps * a.abs()
        gap = (sec[n] - a).abs()
        assert bool((gap <= allowed).all()), (n, float(gap.max()))
        worst = max(worst, float(gap.max()))
    assert worst > 0  # they did take different paths
    rows = {name: read_comm_log(tmp_path / name / "comm.jsonl") for name in ("plain", "sec")}
    assert [r["bytes"] for r in rows["sec"]] == [2 * r["bytes"] for r in rows["plain"]]  # int64 vs fp32


@pytest.mark.parametrize(
    "sets, needles",
    [
        (["federation.dp_clip=1", "federation.weighting=size"], ["federation.weighting='size'", "uniform"]),
        (["federation.secure_aggregation=true", "federation.exchange_dtype=bf16"], ["exchange_dtype='bf16'", "fp32"]),
        (["federation.secure_aggregation=true", "federation.exchange_dtype=int8"], ["exchange_dtype='int8'", "fp32"]),
        (["federation.dp_clip=1", "federation.exchange_dtype=int8"], ["exchange_dtype='int8'", "fp32, bf16"]),
        (["federation.dp_clip=1", "optim.ema_decay=0.9"], ["optim.ema_decay=0.9", "accountant"]),
        (["federation.dp_epsilon_budget=3"], ["federation.dp_epsilon_budget=3", "dp_clip"]),
        (["federation.dp_clip=1", "federation.dp_epsilon_budget=0.01"], ["one round already spends epsilon"]),
    ],
)
def test_bad_privacy_combinations_are_one_line_before_the_process_group(tmp_path: Path, sets, needles):
    # Only rank 0 of 2 starts: had a check waited for the process group, it would wait dist_timeout_s.
    args = [x for s in sets for x in ("--set", s)]
    p = fedrun(
        "train",
        *TINY,
        "--out-dir",
        str(tmp_path),
        *args,
        "--set",
        "dist_timeout_s=300",
        timeout=120,
        **rank_env(0, 2, free_port()),
    )
    one_error_line(p, 2, *needles)
    assert sorted(tmp_path.iterdir()) == []
