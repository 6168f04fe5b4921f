"""Pure tests of slurm/sweep.py and slurm/submit.py: no cluster, no torch, no jobs.

Grid expansion, run names, the manifest, skipping finished/queued runs, dry-run output, errors.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from fedrun.cli import main, train_entry
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

GRID = {"federation.method": ["full", "udec"], "federation.seed": [1, 2]}


# -- grid ------------------------------------------------------------------------------------------


def test_expand_grid_is_the_product_in_key_order():
    points = sw.expand_grid(GRID)
    assert points == [
        {"federation.method": "full", "federation.seed": 1},
        {"federation.method": "full", "federation.seed": 2},
        {"federation.method": "udec", "federation.seed": 1},
        {"federation.method": "udec", "federation.seed": 2},
    ]


def test_grid_set_splits_values_but_not_bracketed_tuples():
    grid = sw.parse_grid_sets(["federation.method=full,udec", "model.dim_mults=[1,2],[1,2,4]", "federation.clients=5"])
    assert grid == {
        "federation.method": ["full", "udec"],
        "model.dim_mults": ["[1,2]", "[1,2,4]"],
        "federation.clients": ["5"],
    }
    with pytest.raises(sw.GridError, match="expected FIELD=V1,V2"):
        sw.parse_grid_sets(["federation.method"])


def test_load_grid_yaml_flat_nested_and_scalars(tmp_path: Path):
    f = tmp_path / "grid.yaml"
    f.write_text("federation:\n  method: [full, udec]\n  clients: 5\ndata.partition: [iid, label-skew]\n")
    assert sw.load_grid(f) == {
        "federation.method": ["full", "udec"],
        "federation.clients": [5],
        "data.partition": ["iid", "label-skew"],
    }
    f.write_text("- just\n- a list\n")
    with pytest.raises(sw.GridError, match="expected a mapping"):
        sw.load_grid(f)
    with pytest.raises(sw.GridError, match="file not found"):
        sw.load_grid(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"federation.metod": ["full"]}, "unknown config field 'federation.metod'"),
        ({"method": ["full"]}, r"did you mean federation.method\?"),
        ({"federation.seed": []}, "non-empty list"),
        ({"name": ["a", "b"]}, "cannot vary"),
        ({}, "empty grid"),
    ],
)
def test_bad_grid_fails_with_a_clear_error(grid, message):
    with pytest.raises(sw.GridError, match=message):
        sw.expand_grid(grid)


def test_bad_value_names_the_grid_point(tmp_path: Path):
    with pytest.raises(sw.GridError, match=r"grid point .*'bogus'.*federation.method"):
        sw.plan_sweep(get_preset("tiny"), {"federation.method": ["bogus"]}, tmp_path, SlurmOptions())


def test_values_are_normalised_to_the_config_types(tmp_path: Path):
    grid = {"optim.lr": ["1e-4", 0.0001], "data.subset": ["none"]}
    with pytest.raises(sw.GridError, match="same run name"):
        sw.plan_sweep(get_preset("tiny"), grid, tmp_path, SlurmOptions())
    grid = {"federation.seed": ["1"], "model.dim_mults": ["[1,2]"], "data.subset": ["none"]}
    (p,) = sw.plan_sweep(get_preset("tiny"), grid, tmp_path, SlurmOptions())
    assert p.overrides == {"federation.seed": 1, "model.dim_mults": [1, 2], "data.subset": None}
    assert p.run_dir.name == "seed-1_dim_mults-1-2_subset-none"


def test_run_names_are_short_stable_and_distinct():
    assert sw.run_name({"federation.method": "full", "federation.seed": 1}) == "method-full_seed-1"
    assert sw.run_name({"model.dim_mults": [1, 2, 4]}) == "dim_mults-1-2-4"
    assert sw.run_name({"optim.lr": 0.0001, "data.subset": None}) == "lr-0.0001_subset-none"
    names = {sw.run_name(p) for p in sw.expand_grid(GRID)}
    assert len(names) == 4


# -- plan, skip, manifest --------------------------------------------------------------------------


def test_plan_skips_finished_and_queued_runs(tmp_path: Path):
    opts = SlurmOptions()
    points = sw.plan_sweep(get_preset("tiny"), GRID, tmp_path, opts)
    assert [p.status for p in points] == ["todo"] * 4
    assert all(p.run_dir.parent == tmp_path.resolve() for p in points)
    assert points[2].config.federation.method == "udec" and points[2].config.federation.seed == 1
    assert points[0].config.device == "cpu"  # no GPUs requested -> gloo

    points[1].run_dir.mkdir(parents=True)
    (points[1].run_dir / "DONE").write_text(json.dumps({"rounds": 2}))
    points[2].run_dir.mkdir(parents=True)
    (points[2].run_dir / "DONE").write_text(json.dumps({"rounds": 1}))  # finished fewer rounds: resume
    manifest = sw.manifest_dict(tmp_path, GRID, get_preset("tiny"), points, "41", {})
    manifest["runs"][3]["job_id"] = "41_3"
    manifest["runs"][0]["job_id"] = "41_0"
    sw.write_manifest(tmp_path, manifest)

    asked = []

    def active(ids):
        asked.append(sorted(ids))
        return {"41_3"}  # 41_0 has left the queue (failed/cancelled) -> resubmit

    points = sw.plan_sweep(get_preset("tiny"), GRID, tmp_path, opts, active=active)
    assert [p.status for p in points] == ["todo", "done", "todo", "active"]
    assert asked == [["41_0", "41_3"]]


class _FakeJob:
    def __init__(self, job_id: str):
        self.job_id = job_id


class _FakeExecutor:
    """Stands in for submitit's executor: batch() packs submissions into one array '77'."""

    def __init__(self):
        self.submitted: list[FederatedRun] = []
        self.batches = 0

    def batch(self):
        import contextlib

        self.batches += 1
        return contextlib.nullcontext()

    def submit(self, fn):
        self.submitted.append(fn)
        return _FakeJob(f"77_{len(self.submitted) - 1}")


def test_run_sweep_submits_one_array_and_writes_the_manifest(tmp_path: Path, monkeypatch):
    fake = _FakeExecutor()
    monkeypatch.setattr(sw, "make_executor", lambda *a, **k: fake)
    monkeypatch.setattr(sw, "require_sbatch", lambda: None)
    base = get_preset("tiny")
    done_dir = tmp_path / "sweep" / "method-full_seed-2"
    done_dir.mkdir(parents=True)
    (done_dir / "DONE").write_text("{}")

    res = sw.run_sweep(
        base, GRID, SlurmOptions(tasks_per_node=2), train_entry, sweep_dir=tmp_path / "sweep", active=lambda ids: set()
    )
    assert fake.batches == 1 and len(fake.submitted) == 3
    assert res.array_job_id == "77"
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())
    runs = manifest["runs"]
    assert [(r["index"], r["array_index"], r["job_id"], r["status"]) for r in runs] == [
        (0, 0, "77_0", "submitted"),
        (1, None, None, "done"),
        (2, 1, "77_1", "submitted"),
        (3, 2, "77_2", "submitted"),
    ]
    assert runs[3]["overrides"] == {"federation.method": "udec", "federation.seed": 2}
    assert runs[3]["run_dir"] == str((tmp_path / "sweep" / "method-udec_seed-2").resolve())
    assert manifest["sbatch"]["tasks_per_node"] == 2 and manifest["array_job_id"] == "77"
    # what each array element runs is exactly its point's config
    cfg = fake.submitted[2].config
    assert (cfg.federation.method, cfg.federation.seed) == ("udec", 2)
    assert cfg.run_dir() == Path(runs[3]["run_dir"])

    # a second sweep over the same directory: nothing finished meanwhile, but all are still queued
    fake2 = _FakeExecutor()
    monkeypatch.setattr(sw, "make_executor", lambda *a, **k: fake2)
    res = sw.run_sweep(
        base,
        GRID,
        SlurmOptions(tasks_per_node=2),
        train_entry,
        sweep_dir=tmp_path / "sweep",
        active=lambda ids: set(ids),
    )
    assert res.array_job_id is None and fake2.submitted == []
    assert [p.status for p in res.points] == ["active", "done", "active", "active"]


def test_dry_run_prints_grid_and_array_sbatch_without_writing(tmp_path: Path, capsys):
    rc = main(
        [
            "sweep",
            "--preset",
            "tiny",
            "--out-dir",
            str(tmp_path),
            "--name",
            "t1",
            "--grid-set",
            "federation.method=full,udec",
            "--grid-set",
            "federation.seed=1,2",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--array-parallelism",
            "2",
            "--time",
            "0:10:00",
            "--sbatch",
            "constraint=cpu",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "4 run(s)" in out and "method-udec_seed-2" in out and "federation.seed=2" in out
    assert "#SBATCH --array=0-3%2" in out
    assert "#SBATCH --ntasks-per-node=2" in out and "#SBATCH --cpus-per-task=1" in out
    assert "#SBATCH --time=10" in out and "#SBATCH --constraint=cpu" in out
    assert "#SBATCH --signal=USR2@120" in out
    assert not (tmp_path / "t1").exists()  # a dry run writes nothing


def test_local_dry_run_says_it_would_run_here_without_a_script(tmp_path: Path, capsys):
    args = ["sweep", "--preset", "tiny", "--out-dir", str(tmp_path), "--grid-set", "federation.seed=1,2,3"]
    assert main([*args, "--local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 run(s)" in out and "would run 3 run(s) here, one after the other" in out
    assert "#SBATCH" not in out and not any(tmp_path.iterdir())


def test_cli_bad_grid_field_exits_2_with_one_line(tmp_path: Path, capsys):
    rc = main(
        ["sweep", "--preset", "tiny", "--out-dir", str(tmp_path), "--grid-set", "federation.metod=full", "--dry-run"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown config field 'federation.metod'" in err and "Traceback" not in err


def test_submit_dry_run_and_too_many_ranks(tmp_path: Path, capsys):
    rc = main(
        [
            "submit",
            "--preset",
            "tiny",
            "--out-dir",
            str(tmp_path),
            "--name",
            "r",
            "--nodes",
            "1",
            "--tasks-per-node",
            "2",
            "--max-requeues",
            "5",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "#SBATCH --ntasks-per-node=2" in out and "--array" not in out
    assert f"{tmp_path.resolve()}/r/slurm/%j_%t_log.out" in out
    rc = main(["submit", "--preset", "tiny", "--out-dir", str(tmp_path), "--tasks-per-node", "3", "--dry-run"])
    assert rc == 2 and "only 2 clients" in capsys.readouterr().err


# -- submit helpers --------------------------------------------------------------------------------


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
