"""End to end through the real entry points: `python -m fedrun train` and `torchrun -m fedrun train`.

Real processes, gloo on CPU, real Fashion-MNIST (a small subset), the tiny preset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_subprocess import TINY, assert_bit_identical, env_without_launcher, load_models, run_fedrun

from fedrun.comm import read_comm_log
from fedrun.rundir import RunDir

pytestmark = pytest.mark.timeout(600)


def test_single_process_run_writes_everything(repo_root, fmnist_root, tmp_path):
    p = run_fedrun(
        repo_root,
        [
            *TINY,
            "--data-root",
            str(fmnist_root),
            "--out-dir",
            str(tmp_path),
            "--name",
            "r",
            "--set",
            "optim.ema_decay=0.9",
        ],
    )
    run = tmp_path / "r"
    assert json.loads((run / "config.json").read_text())["federation"]["clients"] == 2
    rows = read_comm_log(run / "comm.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    # FULL: every client downloads and uploads the whole model each round (2 P K per round).
    P = sum(t.numel() for t in load_models(run)["global.pt"].values())
    assert rows[0]["paper_params"] == 2 * P * 2 and rows[1]["paper_params_cum"] == 8 * P
    assert {"global.pt", "global_ema.pt"} <= set(load_models(run))
    assert (run / "samples" / "final.png").stat().st_size > 100
    assert (run / "DONE").exists()
    assert "round 2/2" in p.stderr  # one log line per round when not on a terminal


def test_tensorboard_events_have_expected_tags(repo_root, fmnist_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_fedrun(
        repo_root,
        [
            *TINY,
            "--data-root",
            str(fmnist_root),
            "--out-dir",
            str(tmp_path),
            "--name",
            "tb",
            "--rounds",
            "3",
            "--set",
            "sample_every=2",
        ],
    )
    acc = EventAccumulator(str(RunDir(tmp_path / "tb").tb))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {
        "client/0/loss",
        "client/1/loss",
        "round/loss",
        "comm/paper_params_cum/full",
        "comm/bytes_cum/full",
        "time/compute_s",
        "time/sync_s",
    }
    assert expected <= scalars, expected - scalars
    for tag in expected:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3], tag
    assert "samples/global" in acc.Tags()["images"]
    cum = [e.value for e in acc.Scalars("comm/paper_params_cum/full")]
    assert cum[0] < cum[1] < cum[2]


def test_incompatible_resume_is_refused(repo_root, fmnist_root, tmp_path):
    base = [*TINY, "--data-root", str(fmnist_root), "--out-dir", str(tmp_path), "--name", "x", "--rounds", "1"]
    run_fedrun(repo_root, base)
    p = run_fedrun(repo_root, [*base, "--method", "udec", "--clients", "3"], check=False)
    assert p.returncode == 2
    assert "federation.clients (2 -> 3)" in p.stderr and "federation.method ('full' -> 'udec')" in p.stderr
    assert "Traceback" not in p.stderr


def test_corrupt_newest_checkpoint_uses_previous(repo_root, fmnist_root, tmp_path):
    args = [*TINY, "--data-root", str(fmnist_root), "--out-dir", str(tmp_path)]
    run_fedrun(repo_root, [*args, "--name", "ref", "--rounds", "3"])
    run_fedrun(repo_root, [*args, "--name", "cut", "--rounds", "2"])
    newest = tmp_path / "cut" / "checkpoints" / "round-000002" / "client-0001.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    p = run_fedrun(repo_root, [*args, "--name", "cut", "--rounds", "3"])
    assert "round-000002 is unusable" in p.stderr and "resuming" in p.stderr and "after round 1" in p.stderr
    assert_bit_identical(load_models(tmp_path / "ref"), load_models(tmp_path / "cut"))


@pytest.mark.multiproc
def test_torchrun_udec_virtual_clients_writes_comm_file(repo_root, fmnist_root, tmp_path):
    run_fedrun(
        repo_root,
        [
            *TINY,
            "--data-root",
            str(fmnist_root),
            "--out-dir",
            str(tmp_path),
            "--name",
            "u",
            "--method",
            "udec",
            "--clients",
            "4",
            "--rounds",
            "3",
        ],
        nproc=2,
    )
    run = tmp_path / "u"
    models = load_models(run)
    assert set(models) == {f"client{k}.pt" for k in range(4)}
    from fedrun.build import build_model
    from fedrun.config import RunConfig
    from unet import parameter_groups

    groups = parameter_groups(build_model(RunConfig.from_json((run / "config.json").read_text())))
    m0 = models["client0.pt"]
    for k in range(1, 4):
        mk = models[f"client{k}.pt"]
        assert all(torch.equal(m0[n], mk[n]) for n in groups["decoder"]), "decoder must be shared"
        assert not all(torch.equal(m0[n], mk[n]) for n in groups["encoder"]), "encoder must stay local"
    P = sum(t.numel() for t in m0.values())
    U = sum(m0[n].numel() for n in groups["decoder"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = read_comm_log(run / "comm.jsonl")
    assert [r["paper_params"] for r in rows] == [4 * (P + U), 4 * 2 * U, 4 * 2 * U]
    assert rows[-1]["paper_params_cum"] == 4 * (P + U + 2 * U * 2)  # K (P + U + 2U(R-1))
    assert rows[0]["bytes"] > 0 and rows[-1]["bytes_cum"] == sum(r["bytes"] for r in rows)
    # The round waits for its slowest rank: at least rank 0's training, at most rank 0's training plus its sync
    # (which waited for it); rank 1 starts each round no later than rank 0, which logs the round first.
    acc = EventAccumulator(str(RunDir(run).tb))
    acc.Reload()
    mine, sync, slowest = (
        [e.value for e in acc.Scalars(f"time/{t}")] for t in ("compute_s", "sync_s", "compute_s_slowest_rank")
    )
    assert len(slowest) == 3
    for c, s, m in zip(mine, sync, slowest, strict=True):
        assert c <= m <= c + s + 0.25, (c, s, m)


@pytest.fixture(scope="module")
def reference_run(repo_root, fmnist_root, tmp_path_factory):
    """Uninterrupted: 2 gloo ranks, 3 clients (one rank hosts two), 4 rounds."""
    out = tmp_path_factory.mktemp("ref")
    args = [
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--out-dir",
        str(out),
        "--name",
        "ref",
        "--clients",
        "3",
        "--rounds",
        "4",
        "--max-local-steps",
        "8",
        "--set",
        "optim.ema_decay=0.9",
        "--set",
        "optim.keep_state=true",
    ]
    run_fedrun(repo_root, args, nproc=2)
    return args, load_models(out / "ref")


@pytest.mark.multiproc
def test_resume_is_bit_identical(repo_root, tmp_path, reference_run):
    args, ref = reference_run
    args = [a if a != "ref" else "resumed" for a in args]
    args[args.index("--out-dir") + 1] = str(tmp_path)
    run_fedrun(repo_root, [*args, "--rounds", "2"], nproc=2)  # stops after round 2 of 4
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "round-000002"
    p = run_fedrun(repo_root, args, nproc=2)  # the same command continues
    assert "resuming" in p.stderr and "after round 2 of 4" in p.stderr
    assert_bit_identical(ref, load_models(tmp_path / "resumed"))


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


@pytest.mark.multiproc
def test_kill_9_of_a_rank_restarts_and_finishes_identically(repo_root, tmp_path, reference_run):
    args, ref = reference_run
    args = [a if a != "ref" else "killed" for a in args]
    args[args.index("--out-dir") + 1] = str(tmp_path)
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "-m",
        "fedrun",
        "train",
        *args,
        "--set",
        "dist_timeout_s=60",
    ]
    proc = subprocess.Popen(
        cmd, cwd=repo_root, env=env_without_launcher(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # mid-run, between checkpoints
        _out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert "resuming" in err, err[-3000:]
    assert_bit_identical(ref, load_models(run))
