"""Submit one federated run to Slurm through submitit: one Slurm task per client rank.

Every task runs the training entry the caller passes in (the CLI's ``fedrun.cli.train_entry``, what
``fedrun train`` runs under torchrun: ``fedrun.train.train`` with FID during training when asked); this
package never imports upwards, so the entry is injected, and pickled by reference. Only the way the
torch.distributed environment is found differs: here it is derived from the Slurm job
(``SLURM_PROCID``, ``SLURM_NTASKS``, the first host of ``SLURM_JOB_NODELIST``), so a job may span nodes.

Requeue: the submitted callable is a ``submitit.helpers.Checkpointable``. On submitit's timeout signal
(USR2, ``signal_delay_s`` before the time limit) rank 0 calls ``checkpoint()``, which resubmits the same
callable; the job is requeued under the same job id and ``train()`` resumes from the newest complete
round checkpoint in the run directory. ``scontrol requeue`` (or preemption) restarts the batch script,
which also lands in ``train()``'s resume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

from fedrun.config import RunConfig
from fedrun.heap import apply_heap
from fedrun.rundir import RunDir

TrainFn = Callable[[RunConfig], Path]
"""What a Slurm task runs: ``train_fn(cfg) -> run directory``, a module-level function (pickled by name)."""


class SubmitError(ValueError):
    """A submission cannot be made as asked; the message says why in one line."""


@dataclass
class SlurmOptions:
    """Resources and policies of the Slurm job (one run, or each element of a sweep's array)."""

    nodes: int = 1
    """Nodes per run."""
    gpus_per_node: int = 0
    """GPUs per node; 0 = a CPU run (gloo)."""
    tasks_per_node: int | None = None
    """Client ranks per node; None = gpus_per_node, or for CPU runs enough to give every client a rank."""
    cpus_per_task: int | None = None
    """CPUs per rank (also its OMP_NUM_THREADS); None = the cluster's default."""
    mem: str | None = None
    """Memory per node, in sbatch syntax (e.g. '64G'); None = the cluster's default."""
    time_min: int = 60
    """Time limit of one attempt, in minutes."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None
    """Slurm job name; None = 'fedrun-<run name>'."""
    max_requeues: int = 3
    """How many times a timed-out job requeues itself (submitit's max_num_timeout; preemptions don't count)."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which Slurm sends USR2 (checkpoint and requeue)."""
    array_parallelism: int | None = None
    """Sweeps: at most this many array elements run at once; None = Slurm's default."""
    sbatch: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options (key without dashes -> value), e.g. {'constraint': 'a100'}."""

    def __post_init__(self) -> None:
        for name in ("nodes", "time_min", "signal_delay_s"):
            if getattr(self, name) < 1:
                raise SubmitError(f"invalid {name}={getattr(self, name)!r}: must be >= 1")
        if self.gpus_per_node < 0 or self.max_requeues < 0:
            raise SubmitError("gpus_per_node and max_requeues must be >= 0")
        for name in ("tasks_per_node", "cpus_per_task", "array_parallelism"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SubmitError(f"invalid {name}={v!r}: must be >= 1")


# -- small parsers (command-line values) ------------------------------------------------------------


def parse_time(text: str | int) -> int:
    """Slurm time syntax -> minutes: '90', '1:30:00', '2-00:00:00', '45:00' (mm:ss)."""
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise SubmitError(f"invalid --time {s!r}: expected minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if c is not None:
        minutes = a * 60 + b + c / 60
    elif b is not None:
        minutes = a * 60 + b if days is not None else a + b / 60  # D-HH:MM, else MM:SS
    else:
        minutes = a * 60 if days is not None else a
    return max(1, math.ceil(minutes + (days or 0) * 24 * 60))


def parse_sbatch_options(items: list[str] | None) -> dict[str, Any]:
    """['constraint=a100', '--exclusive'] -> {'constraint': 'a100', 'exclusive': True}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not key:
            raise SubmitError(f"invalid --sbatch {item!r}: expected KEY=VALUE, e.g. constraint=a100")
        out[key] = value.strip() if sep else True
    return out


# -- resources --------------------------------------------------------------------------------------


def resolve_tasks_per_node(opts: SlurmOptions, clients: list[int] | int) -> int:
    """Ranks per node, checked against every run's number of clients (a rank hosts >= 1 client)."""
    ks = [clients] if isinstance(clients, int) else list(clients)
    if opts.tasks_per_node is not None:
        tpn = opts.tasks_per_node
    elif opts.gpus_per_node > 0:
        tpn = opts.gpus_per_node  # one rank per GPU
    else:
        tpn = max(1, min(ks) // opts.nodes)  # a rank per client, as far as they divide over the nodes
    ranks = tpn * opts.nodes
    if ranks > min(ks):
        raise SubmitError(
            f"{ranks} ranks ({opts.nodes} node(s) x {tpn} task(s)) but only {min(ks)} clients: "
            "a rank hosts at least one client; lower --tasks-per-node/--nodes"
        )
    if opts.gpus_per_node and tpn > opts.gpus_per_node:
        raise SubmitError(f"--tasks-per-node {tpn} exceeds --gpus-per-node {opts.gpus_per_node}")
    return tpn


def prepare_config(cfg: RunConfig, opts: SlurmOptions) -> RunConfig:
    """The config the job runs: absolute out_dir (jobs may start elsewhere), CPU when no GPUs."""
    changes: dict[str, Any] = {"out_dir": str(Path(cfg.out_dir).expanduser().resolve())}
    if opts.gpus_per_node == 0 and cfg.device == "auto":
        changes["device"] = "cpu"  # no GPU was requested: gloo, even where the node has GPUs
    return dataclasses.replace(cfg, **changes)


def executor_parameters(opts: SlurmOptions, tasks_per_node: int, name: str) -> dict[str, Any]:
    """AutoExecutor.update_parameters(...) for these options."""
    params: dict[str, Any] = {
        "name": opts.job_name or name,
        "timeout_min": opts.time_min,
        "nodes": opts.nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": opts.cpus_per_task,
        "gpus_per_node": opts.gpus_per_node or None,
        "slurm_mem": opts.mem,
        "slurm_partition": opts.partition,
        "slurm_account": opts.account,
        "slurm_qos": opts.qos,
        "slurm_signal_delay_s": opts.signal_delay_s,
        "slurm_array_parallelism": opts.array_parallelism,
        # A task that fails ends its job step at once: its peers would otherwise wait for it until
        # dist_timeout_s (or, before the process group, the 600 s rendezvous) and hold the allocation.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_additional_parameters": dict(opts.sbatch) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def make_executor(
    folder: Path, opts: SlurmOptions, tasks_per_node: int, name: str, preview: bool = False
) -> submitit.AutoExecutor:
    """submitit's Slurm executor for these options; ``preview``: one that only renders the sbatch script."""
    if preview and submitit.SlurmExecutor.affinity() <= 0:
        # submitit refuses to build its Slurm executor without srun on PATH; a dry run only renders the script,
        # which needs no Slurm, so pretend for the constructor alone (nothing is submitted through it).
        with mock.patch.object(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1)):
            return make_executor(folder, opts, tasks_per_node, name)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=opts.max_requeues)
    executor.update_parameters(**executor_parameters(opts, tasks_per_node, name))
    return executor


def sbatch_preview(executor: submitit.AutoExecutor, array_size: int = 1) -> str:
    """The sbatch script that submitting would write (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit's own renderer: exactly what runs

    slurm_ex = executor._executor
    params = dict(slurm_ex.parameters)
    if array_size > 1:
        params["map_count"] = array_size
    return _make_sbatch_string(command=slurm_ex._submitit_command_str, folder=slurm_ex.folder, **params)


def require_sbatch() -> None:
    """Submitting needs sbatch, and srun for the script it submits (submitit refuses to start without it)."""
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
    if missing:
        raise SubmitError(
            f"{' and '.join(missing)} not found on PATH: run on a Slurm login node (or start a local "
            "cluster with `sudo bash slurm/start_cluster.sh`), or use --dry-run"
        )


# -- what runs inside each Slurm task ---------------------------------------------------------------


# Rendezvous ports lie below Linux's ephemeral range (ip_local_port_range, 32768-60999 by default): a port in it
# can be held by any process's outgoing connection on the node, and an array task whose port was taken that way
# failed with EADDRINUSE in the Slurm sweep test.
PORT_RANGE = (20000, 32768)


def master_port(job_id: str | int) -> int:
    """Rendezvous port from the job id: identical on every task and after a requeue (same id), in PORT_RANGE."""
    lo, hi = PORT_RANGE
    return lo + random.Random(f"fedrun-{job_id}").randrange(hi - lo)


def export_distributed_env() -> TorchDistributedEnvironment:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from the Slurm job (what torchrun sets)."""
    # The raw job id (SLURM_JOB_ID) is unique per array element and survives a requeue.
    os.environ["MASTER_PORT"] = str(master_port(submitit.JobEnvironment().raw_job_id))
    # Leave CUDA_VISIBLE_DEVICES alone: train() picks cuda:LOCAL_RANK among the node's GPUs (as torchrun).
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    # torchrun's convention: one intra-op thread per rank unless told otherwise (here: the task's CPUs).
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    return env


class FederatedRun(Checkpointable):
    """The submitted callable: one federated run; every Slurm task of the job calls it.

    It holds the config as JSON (never a pickled dataclass), so a requeued job rebuilds it with the
    code installed at that time, and the training entry ``train_fn`` (pickled by its module and name). All
    training state lives in the run directory's checkpoints.
    """

    def __init__(self, config_json: str, train_fn: TrainFn) -> None:
        self.config_json = config_json
        self.train_fn = train_fn

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_json(self.config_json)

    def __call__(self) -> str:
        apply_heap()  # as the fedrun program does at start (fedrun.heap); submitit's process is not that program
        env = export_distributed_env()
        cfg = self.config
        if env.rank == 0:
            print(
                f"fedrun: rank 0 of {env.world_size}, rendezvous {env.master_addr}:{env.master_port}, "
                f"run dir {cfg.run_dir()}",
                flush=True,
            )
        return str(self.train_fn(cfg))  # torch is imported in the task, never at submission

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # Nothing to save here: train() checkpoints every `checkpoint_every` rounds and resumes
        # from the newest complete one; the work since then is redone.
        print("fedrun: timeout/preemption signal: requeueing; the run resumes from its latest checkpoint", flush=True)
        return DelayedSubmission(FederatedRun(self.config_json, self.train_fn))


# -- submission -------------------------------------------------------------------------------------


@dataclass
class Submission:
    job_id: str
    run_dir: Path
    stdout: Path
    stderr: Path
    job: Any = None


def submit(cfg: RunConfig, opts: SlurmOptions, train_fn: TrainFn, dry_run: bool = False) -> Submission | str | None:
    """Submit one run of ``train_fn(cfg)``. Returns the Submission, the sbatch preview (dry_run), or None if
    already DONE."""
    cfg = prepare_config(cfg, opts)
    run_dir = cfg.run_dir()
    tpn = resolve_tasks_per_node(opts, cfg.federation.clients)
    if not dry_run:
        if RunDir(run_dir).is_done(cfg.federation.rounds):
            return None
        require_sbatch()
    executor = make_executor(run_dir / "slurm", opts, tpn, f"fedrun-{run_dir.name}", preview=dry_run)
    if dry_run:  # needs no Slurm: the script only
        return sbatch_preview(executor)
    job = executor.submit(FederatedRun(cfg.to_json(), train_fn))
    return Submission(job.job_id, run_dir, job.paths.stdout, job.paths.stderr, job)
