"""Ranks that fail one another through the real command line: a rank alone, a peer that never joins, dies or
stops answering. Each ends in one `fedrun: error:` line (exit 2 when refused before the process group forms,
1 at run time), never a hang or a traceback, and a refused start leaves nothing behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_subprocess import REPO, TINY, env_without_launcher, fedrun, one_error_line, rank_env
from multiproc import free_port


def test_fewer_clients_than_ranks_is_refused_before_the_process_group(tmp_path: Path, fmnist_root: Path):
    # Only rank 0 of 2 starts: had the check waited for the process group, it would wait dist_timeout_s (300 s).
    t0 = time.monotonic()
    p = fedrun(
        "train",
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--clients",
        "1",
        "--out-dir",
        str(tmp_path),
        "--set",
        "dist_timeout_s=300",
        timeout=120,
        **rank_env(0, 2, free_port()),
    )
    one_error_line(p, 2, "federation.clients=1", "fewer clients than the 2 ranks", "--clients >= 2")
    assert time.monotonic() - t0 < 100
    assert sorted(tmp_path.iterdir()) == []


def test_more_sampled_than_clients_is_refused_before_the_process_group(tmp_path: Path, fmnist_root: Path):
    # Only rank 0 of 2 starts: the config check comes before the process group would wait for rank 1.
    args = ["--clients", "2", "--set", "federation.sample_clients=3", "--set", "dist_timeout_s=300"]
    where = ["--data-root", str(fmnist_root), "--out-dir", str(tmp_path)]
    p = fedrun("train", *TINY, *where, *args, **rank_env(0, 2, free_port()))
    one_error_line(p, 2, "federation.sample_clients=3", "0 (all) to federation.clients=2")
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.multiproc
def test_a_rank_that_never_joins_is_one_line(tmp_path: Path, fmnist_root: Path):
    p = fedrun(
        "train",
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--out-dir",
        str(tmp_path),
        "--set",
        "dist_timeout_s=3",
        timeout=120,
        **rank_env(0, 2, free_port()),
    )
    one_error_line(p, 1, "rank 0: the process group did not form", "1/2 clients joined", "MASTER_PORT")
    assert sorted(tmp_path.iterdir()) == []


def _two_ranks_then(tmp_path: Path, fmnist_root: Path, what: signal.Signals) -> subprocess.CompletedProcess:
    """Start 2 ranks by hand, send ``what`` to rank 1 once rank 0 finished round 1; rank 0's result."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "fedrun",
        "train",
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--out-dir",
        str(tmp_path),
        "--rounds",
        "200",
        "--set",
        "dist_timeout_s=10",
    ]
    logs = [tmp_path / f"rank{r}.err" for r in (0, 1)]
    procs = [
        subprocess.Popen(
            args,
            cwd=REPO,
            env=env_without_launcher(**rank_env(r, 2, port)),
            stdout=subprocess.DEVNULL,
            stderr=open(logs[r], "w"),
        )
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 240
        while "round 1/200" not in logs[0].read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(what)
        rc = procs[0].wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, rc, "", logs[0].read_text())


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_dead_peer_is_one_line(tmp_path: Path, fmnist_root: Path):
    p = _two_ranks_then(tmp_path, fmnist_root, signal.SIGKILL)
    one_error_line(p, 1, "rank 0: lost contact with a peer rank", "resume from the newest checkpoint")


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_silent_peer_is_one_line_after_the_timeout(tmp_path: Path, fmnist_root: Path):
    p = _two_ranks_then(tmp_path, fmnist_root, signal.SIGSTOP)
    one_error_line(p, 1, "rank 0: a peer rank stopped answering", "dist_timeout_s", "resume from the newest checkpoint")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            lambda t: RuntimeError(
                "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed "
                "by peer [127.0.0.1]:11912. This is typically caused by a remote worker crashing."
            ),
            "rank 3: lost contact with a peer rank (Connection closed by peer [127.0.0.1]:11912); it probably "
            "crashed, see its log: start the same command on every rank again to resume from the newest checkpoint",
        ),
        (
            lambda t: RuntimeError(
                "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "10000ms for recv operation to complete"
            ),
            "rank 3: a peer rank stopped answering (Timed out waiting 10000ms for recv operation to complete; "
            "dist_timeout_s sets the wait): start the same command on every rank again to resume from the newest "
            "checkpoint",
        ),
        (
            lambda t: t.DistStoreError("Timed out after 6 seconds waiting for clients. 1/2 clients joined."),
            "rank 3: the process group did not form (Timed out after 6 seconds waiting for clients. 1/2 clients "
            "joined): start every rank with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT within dist_timeout_s",
        ),
        (lambda t: RuntimeError("[gloo/allreduce.cc:40] sizes of the input tensors differ"), None),  # a bug
        (lambda t: ValueError("a bug of ours"), None),
    ],
)
def test_run_failures_in_one_line_and_bugs_with_their_traceback(error, line: str | None, monkeypatch):
    import torch.distributed as tdist

    from fedrun.cli import run_failure

    monkeypatch.setenv("RANK", "3")
    assert run_failure(error(tdist)) == line
