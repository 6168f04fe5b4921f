"""Pure tests of slurm/sweep.py and slurm/submit.py: no cluster, no torch, no jobs.

Grid expansion, run names, the manifest, skipping finished/queued runs, dry-run output, errors. The submit
helpers one by one: test_submit_unit.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrun.cli import main, train_entry
from fedrun.presets import get_preset
from slurm import sweep as sw
from slurm.submit import (
    FederatedRun,
    SlurmOptions,
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
