"""Sweeps beyond one product: a list of grids, ``--local`` (the points run here, one after the other) and the
CPU Table 1's grid file (sweeps/cpu-table.yaml). No cluster, no training: ``train_fn`` is a fake."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedrun.cli import build_parser, main
from fedrun.client import local_steps
from fedrun.config import RunConfig
from fedrun.presets import get_preset
from fedrun.rundir import RunDir
from slurm import sweep as sw
from slurm.submit import SlurmOptions

REPO = Path(__file__).resolve().parents[1]
CPU_TABLE = REPO / "sweeps" / "cpu-table.yaml"


def test_a_list_of_grids_is_their_products_one_after_the_other(tmp_path: Path):
    f = tmp_path / "grid.yaml"
    f.write_text(
        "- federation.clients: [1]\n  federation.seed: [1, 2]\n"
        "- federation:\n    clients: [2, 5]\n    method: [udec]\n  federation.seed: [1]\n"
    )
    grids = sw.load_grid(f)
    assert grids == [
        {"federation.clients": [1], "federation.seed": [1, 2]},
        {"federation.clients": [2, 5], "federation.method": ["udec"], "federation.seed": [1]},
    ]
    assert sw.expand_grid(grids) == [
        {"federation.clients": 1, "federation.seed": 1},
        {"federation.clients": 1, "federation.seed": 2},
        {"federation.clients": 2, "federation.method": "udec", "federation.seed": 1},
        {"federation.clients": 5, "federation.method": "udec", "federation.seed": 1},
    ]
    # --grid-set adds its axes to every grid of the list
    assert sw.with_axes(grids, {"optim.lr": ["1e-3"]})[1]["optim.lr"] == ["1e-3"]
    assert sw.with_axes({"federation.seed": [1]}, {"optim.lr": ["1e-3"]}) == {
        "federation.seed": [1],
        "optim.lr": ["1e-3"],
    }


@pytest.mark.parametrize(
    "text, message",
    [("- federation.seed: [1]\n- just a string\n", "or a list of them"), ("[]\n", "or a list of them")],
)
def test_a_bad_list_of_grids_fails_with_one_line(tmp_path: Path, text: str, message: str):
    f = tmp_path / "grid.yaml"
    f.write_text(text)
    with pytest.raises(sw.GridError, match=message):
        sw.load_grid(f)
    with pytest.raises(sw.GridError, match="unknown config field 'federation.metod'"):
        sw.expand_grid([{"federation.seed": [1]}, {"federation.metod": ["full"]}])


def _fake_train(fail: set[int]):
    """A train_fn that records the configs it ran and marks them DONE, or raises for seeds in ``fail``."""
    ran: list[RunConfig] = []

    def train_fn(cfg: RunConfig) -> Path:
        ran.append(cfg)
        if cfg.federation.seed in fail:
            raise RuntimeError(f"seed {cfg.federation.seed} diverged")
        RunDir(cfg.run_dir()).root.mkdir(parents=True, exist_ok=True)
        RunDir(cfg.run_dir()).mark_done(cfg.federation.rounds)
        return cfg.run_dir()

    return train_fn, ran


def test_local_sweep_runs_the_points_in_order_and_a_failure_does_not_stop_it(tmp_path: Path, capsys):
    grid = {"federation.method": ["full", "udec"], "federation.seed": [1, 2]}
    train_fn, ran = _fake_train(fail={2})
    res = sw.run_sweep(get_preset("tiny"), grid, SlurmOptions(), train_fn, sweep_dir=tmp_path, local=True)
    assert [(c.federation.method, c.federation.seed) for c in ran] == [
        ("full", 1),
        ("full", 2),
        ("udec", 1),
        ("udec", 2),
    ]
    assert [p.status for p in res.points] == ["done", "failed", "done", "failed"]
    assert all(c.device == "cpu" for c in ran)  # no GPUs asked for, as a Slurm element would run it
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done", "failed", "done", "failed"]
    assert manifest["array_job_id"] is None and all(r["job_id"] is None for r in manifest["runs"])
    assert "seed-2 FAILED: RuntimeError: seed 2 diverged" in capsys.readouterr().err

    # started again: the finished runs are skipped, the failed ones run again
    train_fn, ran = _fake_train(fail=set())
    res = sw.run_sweep(get_preset("tiny"), grid, SlurmOptions(), train_fn, sweep_dir=tmp_path, local=True)
    assert [(c.federation.method, c.federation.seed) for c in ran] == [("full", 2), ("udec", 2)]
    assert [p.status for p in res.points] == ["done"] * 4


def test_cli_local_sweep_exits_1_when_a_run_failed(tmp_path: Path, capsys):
    train_fn, ran = _fake_train(fail={2})
    args = ["sweep", "--preset", "tiny", "--out-dir", str(tmp_path), "--name", "s", "--local"]
    parser = build_parser()
    ns = parser.parse_args([*args, "--grid-set", "federation.seed=1,2"])
    ns.train_fn = train_fn
    assert ns.func(ns) == 1
    out = capsys.readouterr().out
    assert "1 run(s) failed" in out and len(ran) == 2
    ns = parser.parse_args([*args, "--grid-set", "federation.seed=1"])
    ns.train_fn = train_fn
    assert ns.func(ns) == 0 and len(ran) == 2  # seed 1 is DONE: nothing ran
    assert main([*args, "--grid-set", "federation.seed=1", "--dry-run"]) == 0  # a dry run only plans


def test_the_cpu_table_grid_is_the_papers_comparison_at_one_budget(tmp_path: Path):
    points = sw.plan_sweep(get_preset("cpu-table"), sw.load_grid(CPU_TABLE), tmp_path, SlurmOptions())
    cfgs = [p.config for p in points]
    # every run has the centralised baseline's budget of local steps, over all its clients and rounds
    budgets = {c.federation.clients * c.federation.rounds * c.federation.max_local_steps for c in cfgs}
    assert len(budgets) == 1
    # ... and the cap is what binds: even a client of one image would take more steps in its local epochs
    fed = [c.federation for c in cfgs]
    assert all(local_steps(1, 32, f.local_epochs, f.max_local_steps) == f.max_local_steps for f in fed)
    cells = Counter((c.federation.clients, c.federation.method, c.data.partition) for c in cfgs)
    assert cells[(1, "full", "iid")] == 2 and sum(1 for k, *_ in cells if k == 1) == 1
    for k in (2, 5):
        for method in ("full", "usplit", "ulatdec", "udec"):
            for partition in ("iid", "label-skew"):
                assert cells[(k, method, partition)] == 2, (k, method, partition)
    assert len(points) == 2 + 2 * 4 * 2 * 2
    assert {c.federation.seed for c in cfgs} == {1, 2} and {c.data.beta for c in cfgs} == {0.5}
    # the runs score themselves (fid.json), so `fedrun report` can print the table straight after the sweep
    assert all(c.eval_samples > 0 and c.data.image_size == 16 for c in cfgs)
