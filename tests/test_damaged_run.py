"""A run directory with a damaged side file, or a run that diverged or failed to start, never jams a re-run.

Issue 12, items 3, 4 and 5: each damaged file gives a warning naming it and is either repaired from the
checkpoint or stops the run with one line saying what to do; a diverged run stops with one line, writes no
DONE and keeps its last good checkpoint; a start that wrote no checkpoint does not block a corrected retry.
In process (``fedrun.train.train``) on the tiny preset: one base run of 2 rounds, copied for each damage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedrun.comm import read_comm_log

pytestmark = pytest.mark.timeout(600)


def _config(fmnist_root, out_dir, name, **overrides):
    from fedrun.config import apply_overrides
    from fedrun.presets import get_preset

    return apply_overrides(
        get_preset("tiny"),
        {"federation.seed": 7, "data.root": str(fmnist_root), "out_dir": str(out_dir), "name": name, **overrides},
    )


def _train(fmnist_root, out_dir, name, **overrides) -> Path:
    from fedrun.train import train

    return train(_config(fmnist_root, out_dir, name, **overrides))


def _models(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run / "models").glob("*.pt"))}


def _assert_same_models(a: Path, b: Path) -> None:
    ma, mb = _models(a), _models(b)
    assert ma.keys() == mb.keys() and ma
    for f in ma:
        assert all(torch.equal(ma[f][n], mb[f][n]) for n in ma[f]), f


@pytest.fixture(scope="module")
def base_run(fmnist_root, tmp_path_factory) -> Path:
    """An uninterrupted, finished run of 2 rounds (its checkpoints: rounds 1 and 2)."""
    return _train(fmnist_root, tmp_path_factory.mktemp("base"), "base")


@pytest.fixture
def copy(base_run, tmp_path):
    def make(name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(base_run, run)
        return run

    return make


def _rows(run: Path) -> list[tuple[int, int, int]]:
    return [(r["round"], r["paper_params_cum"], r["bytes_cum"]) for r in read_comm_log(run / "comm.jsonl")]


# -- item 4: damaged side files ----------------------------------------------------------------------------
def test_partial_last_line_of_comm_log_is_repaired(fmnist_root, base_run, copy, capsys):
    run = copy("comm")
    with (run / "comm.jsonl").open("a") as f:
        f.write('{"round": 3, "paper_par')  # a crash while appending round 3's row
    (run / "DONE").unlink()
    _train(fmnist_root, run.parent, "comm", **{"federation.rounds": 3})
    err = capsys.readouterr().err
    assert f"{run / 'comm.jsonl'}" in err and "warning" in err
    rows = _rows(run)
    assert [r[0] for r in rows] == [1, 2, 3] and rows[:2] == _rows(base_run)
    assert (run / "DONE").exists()


def test_stray_folder_in_checkpoints_is_ignored(fmnist_root, base_run, copy, capsys):
    run = copy("stray")
    shutil.copytree(run / "checkpoints" / "round-000002", run / "checkpoints" / "round-000004.bak")
    (run / "DONE").unlink()
    _train(fmnist_root, run.parent, "stray")
    err = capsys.readouterr().err
    assert "round-000004.bak" in err and "ignored" in err and "after round 2 of 2" in err
    assert (run / "checkpoints" / "round-000004.bak").is_dir()  # a user's folder is never pruned
    assert (run / "DONE").exists()
    _assert_same_models(base_run, run)


def test_empty_manifest_falls_back_to_the_previous_round(fmnist_root, base_run, copy, capsys):
    run = copy("manifest")
    for m in (run / "checkpoints" / "round-000002").glob("MANIFEST*.json"):
        m.write_text("{}")
    (run / "DONE").unlink()
    _train(fmnist_root, run.parent, "manifest")
    err = capsys.readouterr().err
    assert "round-000002 is unusable" in err and "MANIFEST" in err and "after round 1 of 2" in err
    _assert_same_models(base_run, run)  # round 2 run again, bit for bit


def test_broken_config_json_is_repaired_from_the_checkpoint(fmnist_root, base_run, copy, capsys):
    run = copy("config")
    (run / "config.json").write_text('{"model": ')
    (run / "DONE").unlink()
    _train(fmnist_root, run.parent, "config")
    err = capsys.readouterr().err
    assert f"{run / 'config.json'}" in err and "checkpoint" in err and "after round 2 of 2" in err
    assert json.loads((run / "config.json").read_text())["name"] == "config"
    _assert_same_models(base_run, run)


def test_broken_config_json_still_refuses_an_incompatible_resume(fmnist_root, copy):
    from fedrun.config import ConfigError

    run = copy("config2")
    (run / "config.json").write_text("")
    (run / "DONE").unlink()
    with pytest.raises(ConfigError, match=r"federation.method \('full' -> 'udec'\)"):
        _train(fmnist_root, run.parent, "config2", **{"federation.method": "udec"})


def test_unreadable_config_without_readable_checkpoint_stops_with_what_to_do(fmnist_root, copy):
    from fedrun.config import ConfigError

    run = copy("config3")
    (run / "config.json").write_text("[]")
    for p in (run / "checkpoints").glob("round-*/shared.pt"):
        p.write_bytes(b"junk")
    with pytest.raises(ConfigError, match="config.json") as e:
        _train(fmnist_root, run.parent, "config3", **{"federation.rounds": 3})
    assert "restore" in str(e.value) and "\n" not in str(e.value)


def test_empty_done_resumes_and_marks_the_run_done_again(fmnist_root, base_run, copy, capsys):
    run = copy("done")
    (run / "DONE").write_text("")
    _train(fmnist_root, run.parent, "done")
    err = capsys.readouterr().err
    assert f"{run / 'DONE'}" in err and "unreadable" in err
    assert json.loads((run / "DONE").read_text())["rounds"] == 2


def test_latest_naming_a_missing_round_warns(fmnist_root, base_run, copy, capsys):
    run = copy("latest")
    (run / "checkpoints" / "latest").write_text("round-000005")
    (run / "DONE").unlink()
    _train(fmnist_root, run.parent, "latest")
    err = capsys.readouterr().err
    assert "latest" in err and "round-000005" in err and "after round 2 of 2" in err


# -- item 5: a start that wrote no checkpoint does not block the corrected retry ----------------------------
def test_run_without_any_checkpoint_is_new(fmnist_root, tmp_path, capsys):
    run = tmp_path / "retry"
    run.mkdir()
    cfg = _config(fmnist_root, tmp_path, "retry", **{"optim.lr": 1e3})
    (run / "config.json").write_text(cfg.to_json())  # what a start that failed in round 1 leaves behind
    _train(fmnist_root, tmp_path, "retry", **{"federation.rounds": 1})
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 1e-4
    assert (run / "DONE").exists()


# -- item 3: divergence is an error --------------------------------------------------------------------------
def _poison(monkeypatch, in_round: int, what: str) -> None:
    """Make round ``in_round`` of client 1 diverge: a NaN loss, or a parameter that overflows to inf."""
    from fedrun.client import LocalTrainer, RoundResult

    real = LocalTrainer.train_round

    def train_round(self, client, rnd, trainable=None, anchored=None):
        res = real(self, client, rnd, trainable, anchored)
        if rnd == in_round and client.cid == 1:
            if what == "loss":
                return RoundResult(loss_sum=float("nan"), steps=res.steps, images=res.images)
            with torch.no_grad():
                next(iter(client.params.values())).view(-1)[0] = float("inf")
        return res

    monkeypatch.setattr(LocalTrainer, "train_round", train_round)


@pytest.mark.parametrize(
    "what, says",
    [("loss", "client 1's mean local loss is nan"), ("params", "client(s) [0, 1] hold non-finite parameters")],
)
def test_divergence_stops_without_done_and_keeps_the_last_good_checkpoint(
    fmnist_root, tmp_path, monkeypatch, what, says
):
    from fedrun.loop import DivergedError

    _poison(monkeypatch, 2, what)
    with pytest.raises(DivergedError) as e:
        _train(fmnist_root, tmp_path, "nan", **{"federation.rounds": 3})
    msg = str(e.value)
    assert "round 2" in msg and says in msg and "\n" not in msg, msg
    run = tmp_path / "nan"
    assert not (run / "DONE").exists()
    assert (run / "checkpoints" / "latest").read_text() == "round-000001"
    assert not (run / "checkpoints" / "round-000002").exists()
    assert all(
        torch.isfinite(t).all()
        for t in torch.load(run / "checkpoints" / "round-000001" / "client-0001.pt", weights_only=True)[
            "params"
        ].values()
    )


def test_lr_inf_fails_with_one_line_and_the_corrected_retry_starts_anew(repo_root, fmnist_root, tmp_path):
    from cli_subprocess import env_without_launcher

    base = [
        sys.executable,
        "-m",
        "fedrun",
        "train",
        "--preset",
        "tiny",
        "--seed",
        "7",
        "--data-root",
        str(fmnist_root),
        "--out-dir",
        str(tmp_path),
        "--name",
        "inf",
        "--rounds",
        "1",
    ]
    p = subprocess.run(
        [*base, "--lr", "inf"], cwd=repo_root, env=env_without_launcher(), capture_output=True, text=True, timeout=400
    )
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "fedrun: error: training diverged in round 1" in p.stderr
    assert not (tmp_path / "inf" / "DONE").exists()
    p = subprocess.run(base, cwd=repo_root, env=env_without_launcher(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "inf" / "DONE").exists()


def test_eval_refuses_non_finite_weights(tmp_path):
    from evaluation.errors import EvalError
    from evaluation.sample import load_weights

    model = torch.nn.Linear(2, 2)
    sd = {n: t.clone() for n, t in model.state_dict().items()}
    sd["weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "global.pt")
    with pytest.raises(EvalError, match="non-finite"):
        load_weights(model, tmp_path / "global.pt")
