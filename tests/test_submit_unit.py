"""Pure tests of slurm/submit.py's helpers: no cluster, no jobs. Time limits, sbatch options, tasks per node,
the rendezvous port and environment a Slurm task exports, the submitted callable, the executor's options.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from fedrun.cli import train_entry
from fedrun.config import ConfigError
from fedrun.presets import get_preset
from slurm import sweep as sw
from slurm.submit import (
    FederatedRun,
    SlurmOptions,
    SubmitError,
    export_distributed_env,
    master_port,
    parse_sbatch_options,
    parse_time,
    prepare_config,
    resolve_tasks_per_node,
)


@pytest.mark.parametrize(
    "text, minutes", [("90", 90), ("45:30", 46), ("1:30:00", 90), ("2-00:00:00", 2880), ("1-12", 2160), ("0:00:10", 1)]
)
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


def test_parse_time_rejects_garbage():
    with pytest.raises(SubmitError, match="--time"):
        parse_time("ten minutes")


def test_parse_sbatch_options():
    assert parse_sbatch_options(["constraint=a100", "--exclusive", "mail_type=END"]) == {
        "constraint": "a100",
        "exclusive": True,
        "mail-type": "END",
    }
    with pytest.raises(SubmitError):
        parse_sbatch_options(["=x"])


def test_tasks_per_node_defaults_and_checks():
    assert resolve_tasks_per_node(SlurmOptions(gpus_per_node=4), 8) == 4
    assert resolve_tasks_per_node(SlurmOptions(), 5) == 5  # CPU: a rank per client
    assert resolve_tasks_per_node(SlurmOptions(nodes=2), 5) == 2  # ceil would give 3 x 2 > 5 -> floor
    assert resolve_tasks_per_node(SlurmOptions(tasks_per_node=1), [2, 5]) == 1
    with pytest.raises(SubmitError, match="only 2 clients"):
        resolve_tasks_per_node(SlurmOptions(gpus_per_node=4), 2)


def test_prepare_config_absolute_dir_and_cpu(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = prepare_config(get_preset("tiny"), SlurmOptions())
    assert cfg.out_dir == str(tmp_path.resolve() / "runs") and cfg.device == "cpu"
    assert prepare_config(get_preset("tiny"), SlurmOptions(gpus_per_node=1)).device == "auto"


def test_master_port_depends_only_on_the_job_id():
    assert master_port("123") == master_port(123) == master_port("123")
    assert master_port("123") != master_port("124")
    # below the ephemeral range (32768-60999 by default), where any outgoing connection could hold the port
    assert all(20000 <= master_port(i) < 32768 for i in range(200))
    assert len({master_port(i) for i in range(200)}) > 150


def test_export_distributed_env_from_slurm_variables(monkeypatch):
    for k, v in {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "MASTER_PORT": "1",
        "RANK": "0",
        "SUBMITIT_EXECUTOR": "slurm",
    }.items():
        monkeypatch.setenv(k, v)
    # export_distributed_env writes these: register them so monkeypatch removes them afterwards
    for k in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "OMP_NUM_THREADS"):
        monkeypatch.setenv(k, "placeholder")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    import os

    env = export_distributed_env()
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "4" and os.environ["LOCAL_RANK"] == "1"
    assert os.environ["MASTER_ADDR"] == "gpu07"  # the job's first node hosts the rendezvous
    assert os.environ["MASTER_PORT"] == str(master_port("4242"))  # stale value replaced, stable on requeue
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_federated_run_pickles_and_checkpoint_resubmits_itself():
    cfg = get_preset("tiny")
    task = FederatedRun(cfg.to_json(), train_entry)
    again = pickle.loads(pickle.dumps(task))
    assert again.config == cfg and again.train_fn is train_entry  # the entry travels by name
    delayed = task.checkpoint()
    assert isinstance(delayed.function, FederatedRun) and delayed.function.config == cfg
    assert delayed.function.train_fn is train_entry
    assert delayed.args == () and delayed.kwargs == {}


def test_config_error_is_a_config_error():
    assert issubclass(sw.GridError, ConfigError)


def test_executor_carries_requeues_and_extra_sbatch_options(tmp_path: Path):
    from slurm.submit import make_executor, sbatch_preview

    opts = SlurmOptions(
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=8,
        mem="64G",
        partition="gpu",
        account="proj",
        qos="high",
        max_requeues=7,
        sbatch={"constraint": "a100", "exclusive": True},
    )
    ex = make_executor(tmp_path, opts, tasks_per_node=4, name="fedrun-x")
    assert ex._executor.max_num_timeout == 7  # submitit requeues a timed-out job at most 7 times
    script = sbatch_preview(ex)
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--mem=64G",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=a100",
        "--exclusive",
        "--job-name=fedrun-x",
        "--time=60",
    ):
        assert f"#SBATCH {line}\n" in script, line
    # one failing task ends the step: its peers do not wait for it until their timeout
    assert re.search(r"^srun .*--kill-on-bad-exit=1 ", script, re.M), script
