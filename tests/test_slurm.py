"""`fedrun submit` / `fedrun sweep` / requeue against a REAL Slurm cluster (gloo on CPU, preset tiny).

Start one with `sudo bash slurm/start_cluster.sh` (CI's .ci/run does). Without `sbatch` on PATH these
tests skip with that reason; with CI=true they fail instead, so CI can never pass by skipping them.

Every job is polled with a deadline and cancelled if the test fails, so a broken run never lingers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
ROUNDS = 6  # long enough that a requeue lands mid-run, short enough for 2 shared cores
# Local steps per round: after `scontrol requeue` the old step keeps running through Slurm's kill grace
# (submitit bypasses SIGTERM; KillWait + srun's wait, ~8 s here), so a run must outlast it to be resumed.
LOCAL_STEPS = 10
JOB_TIMEOUT_S = 150


# -- cluster, processes, jobs ----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    if shutil.which("sbatch") is None:
        why = "sbatch not on PATH (no Slurm here); start a local cluster: sudo bash slurm/start_cluster.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        pytest.fail(
            f"sbatch is installed but slurmctld does not answer ({ping.stdout.strip()} "
            f"{ping.stderr.strip()}): run `sudo bash slurm/start_cluster.sh`"
        )


@pytest.fixture
def jobs():
    """Job ids submitted by the test; all cancelled at the end (a no-op for finished jobs)."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _fedrun(*args: str) -> str:
    return _run([sys.executable, "-m", "fedrun", *args]).stdout


def _tiny(data_root: Path, rounds: int = ROUNDS) -> list[str]:
    return [
        "--preset",
        "tiny",
        "--set",
        "data.image_size=28",  # rounds of a few seconds (16x16 is 4.7x faster), so that a requeue lands mid-run
        "--data-root",
        str(data_root),
        "--rounds",
        str(rounds),
        "--max-local-steps",
        str(LOCAL_STEPS),
    ]


def _slurm_res(tasks: int = 2) -> list[str]:
    return ["--tasks-per-node", str(tasks), "--cpus-per-task", "1", "--time", "10"]


def _states(job_id: str, attempts: bool = False) -> dict[str, str]:
    """JobID -> State of the job (and of each array element), from accounting."""
    cmd = ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State"] + (["-D"] if attempts else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    rows = [line.split("|") for line in out.splitlines() if "|" in line]
    if attempts:
        return {f"{jid}#{i}": st.split()[0] for i, (jid, st) in enumerate(rows)}
    return {jid: st.split()[0] for jid, st in rows}


def _in_queue(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())


def _wait(job_id: str, folder: Path, n_elements: int = 1, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Until the job (every array element) has left the queue with a final state in sacct."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _in_queue(job_id):
            states = _states(job_id)
            if len(states) >= n_elements and all(s in FINAL for s in states.values()):
                return states
        time.sleep(1)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s; states {_states(job_id)}\n{_logs(folder)}")


def _logs(folder: Path, tail: int = 3000) -> str:
    parts = []
    for p in sorted(Path(folder).glob("*_log.*")):
        parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
    return "\n".join(parts) or f"(no logs in {folder})"


def _job_id(stdout: str) -> str:
    m = re.search(r"submitted (?:job|array) (\d+)", stdout)
    assert m, f"no job id in:\n{stdout}"
    return m.group(1)


def _same_params(a: Path, b: Path) -> None:
    import torch

    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ between {a} and {b}, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fmnist_root) -> Path:
    """The same 2-client run under torchrun (2 ranks): what every Slurm run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("torchrun")
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "fedrun",
            "train",
            *_tiny(fmnist_root),
            "--out-dir",
            str(out),
            "--name",
            "ref",
        ],
        timeout=240,
    )
    ref = out / "ref" / "models" / "global.pt"
    assert ref.exists() and (out / "ref" / "DONE").exists()
    return ref


# -- tests -----------------------------------------------------------------------------------------


def test_submit_two_clients_equals_torchrun(tmp_path, fmnist_root, reference, jobs):
    out = _fedrun("submit", *_tiny(fmnist_root), "--out-dir", str(tmp_path), "--name", "slurm", *_slurm_res(tasks=2))
    job_id = _job_id(out)
    jobs.append(job_id)
    run_dir = tmp_path / "slurm"
    assert f"run dir: {run_dir}" in out and "_0_log.out" in out and "_0_log.err" in out
    states = _wait(job_id, run_dir / "slurm")
    assert states == {job_id: "COMPLETED"}, _logs(run_dir / "slurm")
    assert (run_dir / "DONE").exists()
    # one Slurm task per client rank
    assert {p.name for p in (run_dir / "slurm").glob(f"{job_id}_*_log.out")} == {
        f"{job_id}_0_log.out",
        f"{job_id}_1_log.out",
    }
    _same_params(run_dir / "models" / "global.pt", reference)

    # submitting a finished run again submits nothing
    assert "already finished" in _fedrun(
        "submit", *_tiny(fmnist_root), "--out-dir", str(tmp_path), "--name", "slurm", *_slurm_res(tasks=2)
    )


def test_sweep_2x2_is_one_array_and_completes(tmp_path, fmnist_root, jobs):
    args = [
        "sweep",
        *_tiny(fmnist_root, rounds=1),
        "--out-dir",
        str(tmp_path),
        "--name",
        "grid",
        "--grid-set",
        "federation.method=full,udec",
        "--grid-set",
        "federation.seed=1,2",
        *_slurm_res(tasks=2),
        "--array-parallelism",
        "2",
    ]
    out = _fedrun(*args)
    array_id = _job_id(out)
    jobs.append(array_id)
    sweep_dir = tmp_path / "grid"
    states = _wait(array_id, sweep_dir / "slurm", n_elements=4, timeout=JOB_TIMEOUT_S + 60)
    assert states == {f"{array_id}_{i}": "COMPLETED" for i in range(4)}, _logs(sweep_dir / "slurm")

    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert manifest["array_job_id"] == array_id
    for i, run in enumerate(manifest["runs"]):
        assert run["array_index"] == i and run["job_id"] == f"{array_id}_{i}"
        assert (Path(run["run_dir"]) / "DONE").exists(), run
        saved = json.loads((Path(run["run_dir"]) / "config.json").read_text())
        assert saved["federation"]["method"] == run["overrides"]["federation.method"]
        assert saved["federation"]["seed"] == run["overrides"]["federation.seed"]
    assert [tuple(r["overrides"].values()) for r in manifest["runs"]] == [
        ("full", 1),
        ("full", 2),
        ("udec", 1),
        ("udec", 2),
    ]

    # re-running the sweep skips the finished runs and submits nothing
    again = _fedrun(*args)
    assert "nothing to submit" in again and again.count(" done ") == 4


@pytest.mark.parametrize("trigger", ["usr2", "scontrol"])
def test_requeue_mid_run_resumes_and_equals_uninterrupted(trigger, tmp_path, fmnist_root, reference, jobs):
    """usr2: submitit's timeout/preemption signal -> checkpoint() -> requeue (what a time limit does).
    scontrol: `scontrol requeue` of the running job -> the batch script runs again."""
    out = _fedrun(
        "submit",
        *_tiny(fmnist_root),
        "--out-dir",
        str(tmp_path),
        "--name",
        "rq",
        *_slurm_res(tasks=2),
        "--max-requeues",
        "2",
    )
    job_id = _job_id(out)
    jobs.append(job_id)
    run_dir = tmp_path / "rq"
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not latest.exists():
        assert time.monotonic() < deadline, f"no checkpoint in {JOB_TIMEOUT_S}s\n{_logs(run_dir / 'slurm')}"
        assert _in_queue(job_id), f"job ended before its first checkpoint\n{_logs(run_dir / 'slurm')}"
        time.sleep(0.05)
    if trigger == "usr2":
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    else:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    interrupted_after = latest.read_text().strip()
    assert not (run_dir / "DONE").exists(), "the run finished before the requeue: make ROUNDS larger"

    states = _wait(job_id, run_dir / "slurm")
    logs = _logs(run_dir / "slurm", tail=20000)
    assert states == {job_id: "COMPLETED"}, logs
    attempts = list(_states(job_id, attempts=True).values())
    assert attempts[0] == "REQUEUED" and attempts[-1] == "COMPLETED", (attempts, logs)
    if trigger == "usr2":
        assert "Calling checkpoint method" in logs and "Requeued job" in logs, logs
    resumed = re.findall(r"resuming .* after round (\d+)", logs)
    assert resumed and int(resumed[-1]) >= int(interrupted_after.split("-")[-1]), (interrupted_after, logs)
    assert (run_dir / "DONE").exists()
    _same_params(run_dir / "models" / "global.pt", reference)
