"""A two-node Slurm cluster of its own on tests/netns.py's hosts: slurmctld on A, one slurmd on A and one on B.

A separate instance from slurm/start_cluster.sh's single-node cluster, which it never touches: its own munged
(own key and socket), config folder, state, spool, log and pid files under one folder, its own ports and cluster
name, and daemons that only listen inside the namespaces. No accounting (no slurmdbd): job states are read with
``scontrol show job`` (finished jobs stay listed for MinJobAge). Clients need ``SLURM_CONF`` (``Cluster.env``) and
must run on a host (``Cluster.run``): nothing outside the namespaces can reach the daemons.

Every daemon is a child of the test (``-D``/``-F``, foreground), stopped on exit by its pid; jobs are cancelled
first, and tests/netns.py kills whatever still runs in the namespaces (job steps) before removing them.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from netns import Host

CTLD_PORT, SLURMD_PORT = 6917, 6918  # not the single-node cluster's 6817/6818 (the namespaces would allow them)
CPUS = 8  # advertised per node (config_overrides): two 2-task jobs fit at once on a 2-core machine
WAIT_S = 90


class ClusterError(RuntimeError):
    """The cluster did not come up; the message carries the daemons' log tails."""


@dataclass
class Cluster:
    hosts: tuple[Host, Host]
    base: Path
    conf: Path
    munge_socket: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, **(extra or {}), "SLURM_CONF": str(self.conf)}

    def run(self, cmd: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        """``cmd`` on host A (where every client command must run) with this cluster's SLURM_CONF."""
        return self.hosts[0].run(cmd, env=env or self.env(), **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, NodeList...); {} once the job is forgotten."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def logs(self, tail: int = 2000) -> str:
        parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.base.glob("log/*"))]
        return "\n".join(parts)


def _conf(cluster: str, base: Path, hosts: Sequence[Host], munge_socket: Path, mem_mb: int) -> str:
    a = hosts[0]
    nodes = "\n".join(
        f"NodeName={h.hostname} NodeAddr={h.addr} CPUs={CPUS} RealMemory={mem_mb} State=UNKNOWN" for h in hosts
    )
    return f"""# Written by tests/netns_slurm.py: a two-node cluster inside two network namespaces.
ClusterName={cluster}
SlurmctldHost={a.hostname}({a.addr})
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged; a requeued job is eligible again after cred_expire seconds (default 120).
AuthInfo=socket={munge_socket},cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=600
KillWait=3
InactiveLimit=0
Waittime=0
{nodes}
PartitionName=multi Nodes={",".join(h.hostname for h in hosts)} Default=YES MaxTime=INFINITE State=UP
"""


def _until(what: str, ok, cluster: Cluster, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        for name, p in cluster.procs.items():
            if p.poll() is not None:
                raise ClusterError(f"{name} exited ({p.returncode}) while waiting for {what}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.3)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=15)


def _start(cluster: Cluster, stack: ExitStack, name: str, argv: list[str]) -> None:
    log = open(cluster.base / "log" / f"{name}.out", "w")  # the child keeps its own copy of the descriptor
    p = subprocess.Popen(argv, env=cluster.env(), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    cluster.procs[name] = p
    stack.callback(_stop, p)


@contextmanager
def two_node_cluster(hosts: tuple[Host, Host]) -> Iterator[Cluster]:
    """The cluster, ready (both nodes idle); everything stopped and its folder removed on exit."""
    for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
        if shutil.which(tool) is None:
            raise ClusterError(f"`{tool}` not found: apt-get install slurm-wlm munge")
    token = secrets.token_hex(3)
    base = Path(f"/tmp/fedrun-netns-slurm-{os.getpid()}-{token}")
    with ExitStack() as stack:
        base.mkdir(mode=0o711)  # munged wants its socket's folder searchable by all
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        for sub in ("state", "log", "run", "munge", *(f"spool/{h.hostname}" for h in hosts)):
            (base / sub).mkdir(parents=True)
        key = base / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        sock = base / "munge.sock"
        mem_mb = int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
        conf = base / "slurm.conf"
        conf.write_text(_conf(f"fedrun-netns-{token}", base, hosts, sock, mem_mb))
        cluster = Cluster(hosts, base, conf, sock)
        # munged on the real host: a Unix socket, reached from both namespaces through the shared filesystem.
        m = base / "munge"
        _start(cluster, stack, "munged", [
            "munged", "-F", f"--socket={sock}", f"--key-file={key}", f"--pid-file={m}/munged.pid",
            f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed",
        ])  # fmt: skip
        _until("munged", sock.exists, cluster)
        a, b = hosts
        _start(cluster, stack, "slurmctld", a.argv(["slurmctld", "-D", "-f", str(conf)]))
        _until("slurmctld", lambda: cluster.run(["scontrol", "ping"]).stdout.count("UP") > 0, cluster)
        for h in hosts:
            _start(cluster, stack, f"slurmd-{h.hostname}", h.argv(["slurmd", "-D", "-N", h.hostname, "-f", str(conf)]))

        def idle() -> bool:
            out = cluster.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split()
            return sorted(zip(out[::2], out[1::2], strict=True)) == [(a.hostname, "idle"), (b.hostname, "idle")]

        _until("both nodes idle", idle, cluster)
        # Runs first on exit (before the daemons stop): no job outlives the cluster.
        stack.callback(lambda: cluster.run(["scancel", "--full", "--quiet", "--user=root"]))
        yield cluster
