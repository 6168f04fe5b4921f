"""Across two hosts for real: torchrun (and Slurm, in test_multinode_slurm.py) over two network namespaces.

Hosts A and B are tests/netns.py's namespaces joined by a veth pair; one torchrun per host, ``--nnodes=2
--nproc_per_node=2``, c10d rendezvous on A, gloo bound to the link (GLOO_SOCKET_IFNAME). Every run is compared
bit for bit with the same run on one host with 4 ranks. Run as root (``sudo python -m pytest -m multinode``);
where namespaces cannot be made the tests skip with the reason, and fail with CI=true.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from cli_subprocess import assert_bit_identical, load_models
from netns import IFNAME, Host, NamespacesUnavailable, two_hosts
from netns_slurm import Cluster, ClusterError, two_node_cluster

pytestmark = [pytest.mark.multinode, pytest.mark.multiproc, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
RDZV_PORT = 29411
RUN_TIMEOUT_S = 300
# 4 clients, 3 rounds of 3 local steps at 28x28 (the tiny preset's 16x16 is 4.7x faster): a few seconds a round on
# 2 busy cores, time enough to lose a host between two checkpoints.
ARGS = ["--preset", "tiny", "--seed", "7", "--clients", "4", "--rounds", "3", "--max-local-steps", "3"]
ARGS += ["--set", "data.image_size=28"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    stack = ExitStack()
    try:
        pair = stack.enter_context(two_hosts())
    except NamespacesUnavailable as e:
        if in_ci():
            pytest.fail(f"CI=true but two hosts cannot be made here: {e}", pytrace=False)
        pytest.skip(f"two hosts cannot be made here: {e}")
    with stack:
        yield pair


def env(on_link: bool = True) -> dict[str, str]:
    """A run of its own (no process-group variables inherited), this checkout's code; on a host made here, gloo
    bound to the link (the real machine has no such interface)."""
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    keep.pop("MASTER_PORT", None)
    keep.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), keep.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    # Slurm jobs find torchrun on PATH: this interpreter's
    keep["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), keep.get("PATH", "")])
    if on_link:
        keep["GLOO_SOCKET_IFNAME"] = IFNAME
    return keep


def train_args(fmnist_root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [*ARGS, "--data-root", str(fmnist_root), "--out-dir", str(out), "--name", name, *extra]


def torchrun(max_restarts: int = 0, nodes: int = 2, rdzv_id: str = "") -> list[str]:
    if nodes == 1:
        launch = ["--standalone", "--nproc_per_node=4"]
    else:
        launch = [
            f"--nnodes={nodes}",
            "--nproc_per_node=2",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=hosta:{RDZV_PORT}",
            f"--rdzv_id={rdzv_id}",
        ]
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--max-restarts={max_restarts}"]


class Job:
    """One torchrun per host, their output in files (read while they run), every pid the test started known."""

    def __init__(self, hosts: tuple[Host, Host], cmd: list[str], log_dir: Path, **env_extra: str) -> None:
        self.cmd, self.log_dir, self.env = cmd, log_dir, {**env(), **env_extra}
        self.procs: dict[str, subprocess.Popen] = {}
        for h in hosts:
            self.start(h)

    def start(self, host: Host) -> None:
        n = sum(k.startswith(host.hostname) for k in self.procs)
        log = open(self.log_dir / f"{host.hostname}-{n}.log", "w")  # the child keeps its own copy of the descriptor
        p = host.popen(self.cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()
        self.procs[f"{host.hostname}-{n}"] = p

    def log(self, key: str) -> str:
        return (self.log_dir / f"{key}.log").read_text(errors="replace")

    def wait(self, key: str, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.procs[key].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{key} still running after {timeout:.0f}s:\n{self.log(key)[-4000:]}")

    def kill_all(self) -> None:
        for p in self.procs.values():
            for pid in [p.pid, *descendants(p.pid)]:
                _kill(pid)
            if p.poll() is None:
                p.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (its children, theirs...), read from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def lose_host(proc: subprocess.Popen) -> list[int]:
    """Host lost: every process the test started there (the agent and its workers) stopped at once, then killed."""
    pids = [proc.pid, *descendants(proc.pid)]
    assert len(pids) >= 3, f"expected the agent and its 2 workers, found pids {pids}"
    for pid in pids:  # SIGSTOP first: none of them sees another die and reacts (as when a machine dies)
        _kill(pid, signal.SIGSTOP)
    for pid in pids:
        _kill(pid)
    proc.wait(timeout=30)
    return pids


def link_bytes(host: Host) -> int:
    """Bytes sent plus received on the host's end of the link."""
    dev = host.run(["cat", "/proc/net/dev"], check=True).stdout  # this namespace's interfaces
    fields = next(line.split(":", 1)[1].split() for line in dev.splitlines() if line.strip().startswith(IFNAME + ":"))
    return int(fields[0]) + int(fields[8])  # received, transmitted


def wait_for(path: Path, job: Job, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for key, p in job.procs.items():
            assert p.poll() is None, f"{key} ended ({p.returncode}) before {path} appeared:\n{job.log(key)[-4000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout:.0f}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(fmnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same run on one host (no namespaces) with 4 ranks: what every two-host run must reproduce."""
    out = tmp_path_factory.mktemp("one_host")
    cmd = [*torchrun(nodes=1), "-m", "fedrun", "train", *train_args(fmnist_root, out, "ref")]
    res = subprocess.run(cmd, cwd=REPO, env=env(on_link=False), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-4000:]
    return load_models(out / "ref")


# -- tests ---------------------------------------------------------------------------------------------------


def test_two_hosts_equal_one_host(hosts, fmnist_root, tmp_path, reference):
    before = link_bytes(hosts[1])
    cmd = [*torchrun(rdzv_id="equal"), "-m", "fedrun", "train", *train_args(fmnist_root, tmp_path, "two")]
    job = Job(hosts, cmd, tmp_path)
    try:
        for key in list(job.procs):
            assert job.wait(key) == 0, job.log(key)[-4000:]
    finally:
        job.kill_all()
    assert "4 clients on 4 rank(s)" in job.log("hosta-0")
    # The ranks met over the link: 3 rounds of all-reduce of the whole model (3 MiB per rank) crossed it.
    assert link_bytes(hosts[1]) - before > 3 * 3 * 2**20
    assert_bit_identical(reference, load_models(tmp_path / "two"))


def wait_gone(pids: list[int], job: Job, key: str, timeout: float = RUN_TIMEOUT_S) -> None:
    """Until none of ``pids`` runs (``key``'s agent must outlive them)."""
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert job.procs[key].poll() is None, f"{key} ended ({job.procs[key].returncode}):\n{job.log(key)[-4000:]}"
        assert time.monotonic() < deadline, f"{key}'s workers {pids} still run after {timeout:.0f}s"
        time.sleep(0.1)


def test_host_lost_recovers_under_max_restarts(hosts, fmnist_root, tmp_path, reference):
    a, b = hosts
    args = train_args(fmnist_root, tmp_path, "lost", "--set", "dist_timeout_s=60")
    cmd = [*torchrun(max_restarts=1, rdzv_id="restart"), "-m", "fedrun", "train", *args]
    # A host that comes back must rejoin: its new agent cannot read the rendezvous store that agents share by
    # default (torch publishes its address in the first round only), so every attempt gets a store of its own.
    job = Job(hosts, cmd, tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    try:
        wait_for(tmp_path / "lost" / "checkpoints" / "latest", job)
        workers_a = descendants(job.procs["hosta-0"].pid)
        lost = lose_host(job.procs["hostb-0"])
        # A's workers lose their peers and fail; A's agent (alive) stops them and waits for a full rendezvous
        wait_gone(workers_a, job, "hosta-0")
        job.start(b)  # B is back: the same command
        assert job.wait("hosta-0") == 0, job.log("hosta-0")[-4000:]
        assert job.wait("hostb-1") == 0, job.log("hostb-1")[-4000:]
    finally:
        job.kill_all()
    assert not [pid for pid in lost if Path(f"/proc/{pid}").exists()]
    assert "resuming" in job.log("hosta-0")
    assert_bit_identical(reference, load_models(tmp_path / "lost"))


DIST_TIMEOUT_S = 30


def test_host_lost_without_restarts_fails_in_one_line_and_resumes(hosts, fmnist_root, tmp_path, reference):
    """B goes silent (its link down, as a machine that loses power), then its processes are killed: A's ranks wait
    at most dist_timeout_s, each prints one line, torchrun ends; the run resumes identically from its checkpoint."""
    a, b = hosts
    args = train_args(fmnist_root, tmp_path, "cut", "--set", f"dist_timeout_s={DIST_TIMEOUT_S}")
    job = Job(hosts, [*torchrun(rdzv_id="cut"), "-m", "fedrun", "train", *args], tmp_path)
    try:
        wait_for(tmp_path / "cut" / "checkpoints" / "latest", job)
        b.run(["ip", "link", "set", IFNAME, "down"], check=True)
        lose_host(job.procs["hostb-0"])
        # never a hang: A ends within dist_timeout_s (plus its agent stopping the workers)
        assert job.wait("hosta-0", timeout=DIST_TIMEOUT_S + 60) != 0
    finally:
        job.kill_all()
        b.run(["ip", "link", "set", IFNAME, "up"], check=True)
    log = job.log("hosta-0")
    errors = [line for line in log.splitlines() if line.startswith("fedrun: error:")]
    # One line per rank of A that got to print it (the agent stops the other once the first has failed).
    ranks = [e.split(":")[2].strip() for e in errors]
    assert ranks and len(set(ranks)) == len(ranks) and set(ranks) <= {"rank 0", "rank 1"}, log[-4000:]
    assert all("stopped answering" in e and "dist_timeout_s" in e for e in errors), errors

    # The checkpoint is intact: the same run on one host resumes from it and ends as if never interrupted.
    done = (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip()
    assert not (tmp_path / "cut" / "DONE").exists()
    cmd = [*torchrun(nodes=1), "-m", "fedrun", "train", *args]
    res = subprocess.run(cmd, cwd=REPO, env=env(on_link=False), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"after round {int(done.split('-')[-1])} of 3" in res.stderr
    assert_bit_identical(reference, load_models(tmp_path / "cut"))


# -- Slurm: a two-node cluster of its own on the two hosts (tests/netns_slurm.py) ------------------------------


@pytest.fixture(scope="module")
def cluster(hosts) -> Iterator[Cluster]:
    stack = ExitStack()
    try:
        c = stack.enter_context(two_node_cluster(hosts))
    except ClusterError as e:
        if in_ci():
            pytest.fail(f"CI=true but the two-node Slurm cluster did not start: {e}", pytrace=False)
        pytest.skip(f"two-node Slurm cluster not available: {e}")
    with stack:
        yield c


def wait_job(cluster: Cluster, job_id: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, str]:
    """Until the job has ended; its final fields."""
    deadline = time.monotonic() + timeout
    while (job := cluster.job(job_id)).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", None):
        if time.monotonic() > deadline:
            cluster.run(["scancel", job_id])
            pytest.fail(f"job {job_id} not finished after {timeout:.0f}s: {job}\n{cluster.logs()}")
        time.sleep(0.5)
    return job


def test_slurm_submit_two_nodes_equals_one_host(cluster, fmnist_root, tmp_path, reference):
    submit = [sys.executable, "-m", "fedrun", "submit", *train_args(fmnist_root, tmp_path, "sub")]
    res = cluster.run([*submit, "--nodes", "2", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10"],
                      env=cluster.env(env()), cwd=REPO)  # fmt: skip
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"submitted job (\d+): 4 rank\(s\) on 2 node\(s\)", res.stdout).group(1)
    job = wait_job(cluster, job_id)
    logs = "\n".join(
        p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "sub" / "slurm").glob("*_log.*"))
    )
    assert job["JobState"] == "COMPLETED", f"{job}\n{logs}"
    assert job["NodeList"] == "hosta,hostb" and job["NumNodes"] == "2"
    assert_bit_identical(reference, load_models(tmp_path / "sub"))


def test_sbatch_template_two_nodes_requeued_resumes_identically(cluster, fmnist_root, tmp_path, reference):
    """slurm/templates/multi_node.sbatch as a user submits it (CPU here: no GPUs, one CPU per torchrun), requeued
    with `scontrol requeue` after its first checkpoint: the batch script runs again and resumes."""
    run = tmp_path / "tpl"
    sbatch = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    script = REPO / "slurm" / "templates" / "multi_node.sbatch"
    cmd = [*sbatch, f"--output={tmp_path}/%x-%j.out", str(script), *train_args(fmnist_root, tmp_path, "tpl")]
    res = cluster.run(cmd, env=cluster.env({**env(), "FEDRUN_NPROC": "2"}), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (run / "checkpoints" / "latest").exists():
        assert cluster.job(job_id).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), cluster.job(job_id)
        assert time.monotonic() < deadline, f"no checkpoint after {RUN_TIMEOUT_S}s"
        time.sleep(0.05)
    assert cluster.run(["scontrol", "requeue", job_id]).returncode == 0
    assert not (run / "DONE").exists(), "the run finished before the requeue"
    job = wait_job(cluster, job_id)
    out = (tmp_path / f"fedrun-{job_id}.out").read_text(errors="replace")
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", f"{job}\n{out[-4000:]}"
    assert job["NodeList"] == "hosta,hostb"
    assert out.count("rendezvous hosta:") == 2 and re.search(r"resuming .* after round \d of 3", out), out[-4000:]
    assert_bit_identical(reference, load_models(run))
