"""Every rank agrees on the whole run, or nothing starts (issue 12, item 2).

Pure checks of the digest and the message first; then real gloo processes: three spawned ranks of which one
differs (the same line on every rank), and two real ``fedrun train`` ranks started like separate sites with a
different ``--lr`` or ``--rounds``: both stop within seconds, exit 2 with one line naming the field, and write
nothing. Ranks that differ only in ``SITE_FIELDS`` train to the end.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pytest
from multiproc import spawn_ranks
from sites import run_sites

from fedrun import agreement
from fedrun import dist as fdist
from fedrun.config import RunConfig, apply_overrides, field_names
from fedrun.rundir import RESUMABLE_CHANGES

TINY = ["--preset", "tiny", "--seed", "7", "--device", "cpu"]


def test_site_fields_are_real_fields_and_the_rest_is_hashed():
    assert set(agreement.SITE_FIELDS) <= set(field_names())
    assert all(reason for reason in agreement.SITE_FIELDS.values())  # each says why it may differ
    base = RunConfig()
    site = apply_overrides(
        base,
        {
            "data.root": "/elsewhere",
            "out_dir": "/other",
            "name": "mine",
            "device": "cpu",
            "optim.amp": "fp32",
            "data.placement": "host",
            "dist_timeout_s": 5,
            "threads": 3,
        },
    )
    assert agreement.run_digest(site) == agreement.run_digest(base)
    # `--local-epochs 5` (a float) is the preset's 5 (an int): the same run
    assert agreement.run_digest(apply_overrides(base, {"federation.local_epochs": "5"})) == agreement.run_digest(base)
    for field, value in (
        ("optim.lr", "3e-4"),
        ("federation.rounds", "3"),
        ("checkpoint_every", "2"),
        ("fid_ref", "mnist:test"),
        ("model.dim_mults", "1,2"),
    ):
        assert agreement.run_digest(apply_overrides(base, {field: value})) != agreement.run_digest(base), field
    # What a resume may change and what may differ between ranks are two questions: the rounds are one only.
    assert "federation.rounds" in RESUMABLE_CHANGES and "federation.rounds" not in agreement.SITE_FIELDS


def test_mismatch_message_names_fields_values_and_ranks():
    a = agreement.run_fields(RunConfig())
    b = agreement.run_fields(apply_overrides(RunConfig(), {"optim.lr": "3e-4", "federation.rounds": "3"}))
    msg = agreement.mismatch_message([a, a, b])
    assert (
        "federation.rounds (15 on ranks 0, 1, 3 on rank 2); optim.lr (0.0001 on ranks 0, 1, 0.0003 on rank 2)" in msg
    ), msg
    assert "\n" not in msg and "data.root" in msg  # says what may differ
    assert "model.arch" not in msg
    lying = agreement.mismatch_message([a, {**a, "x" * 500: "y" * 500}])
    assert len(lying) < 1000  # what a peer chose is cut short


def _config_scenario(ctx: fdist.DistContext) -> dict:
    over = {"optim.lr": "3e-4", "federation.local_epochs": "2"} if ctx.rank == 2 else {}
    cfg = apply_overrides(RunConfig(), {**over, "data.root": f"/site{ctx.rank}", "device": "cpu"})
    start = time.monotonic()
    try:
        agreement.check_run_config(cfg)
        return {"error": None}
    except agreement.RunMismatchError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_three_ranks_one_differs_same_line_everywhere(tmp_path):
    results = spawn_ranks(3, partial(_config_scenario), tmp_path, timeout_s=60, label="config agreement")
    lines = [r["error"] for r in results]
    assert lines[0] is not None and lines[0] == lines[1] == lines[2]
    assert "federation.local_epochs (5 on ranks 0, 1, 2 on rank 2)" in lines[0]
    assert "optim.lr (0.0001 on ranks 0, 1, 0.0003 on rank 2)" in lines[0] and "data.root (" not in lines[0]
    assert all(r["seconds"] < 5 for r in results)


def _train(fmnist_root: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "fedrun",
        "train",
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--out-dir",
        str(out_dir),
        "--name",
        "run",
        *extra,
    ]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "flag, value, field, shown",
    [
        ("--lr", "3e-4", "optim.lr", "0.0001 on rank 0, 0.0003 on rank 1"),
        ("--rounds", "3", "federation.rounds", "2 on rank 0, 3 on rank 1"),
    ],
)
def test_two_sites_with_different_runs_stop_at_once(repo_root, tmp_path, flag, value, field, shown):
    """No data is read before the check, so a missing data set cannot hide the mismatch (nor is one needed)."""
    out = tmp_path / "runs"
    data = tmp_path / "no-data"
    sites = run_sites([_train(data, out), _train(data, out, flag, value)], tmp_path, timeout_s=200, repo_root=repo_root)
    for r, site in enumerate(sites):
        assert site.rc == 2, (r, site.rc, site.stderr[-3000:])
        assert "Traceback" not in site.stderr, site.stderr[-3000:]
        assert len(site.error_lines) == 1, site.stderr[-3000:]
        line = site.error_lines[0]
        assert line.startswith("fedrun: error: the ranks were started with different runs"), line
        assert f"{field} ({shown})" in line, line
        # Far below dist_timeout_s (600 s): not a timeout. Most of it is starting Python and torch on a busy
        # machine; the check itself takes well under a second (test_three_ranks_one_differs_same_line_everywhere).
        assert site.seconds < 180
    assert sites[0].error_lines == sites[1].error_lines
    assert not out.exists(), sorted(p.relative_to(out) for p in out.rglob("*"))  # nothing written


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_two_sites_differing_only_in_site_fields_train(repo_root, fmnist_root, tmp_path):
    out = tmp_path / "runs"
    site1 = [
        "--set",
        "data.placement=host",
        "--set",
        "dist_timeout_s=120",
        "--set",
        "optim.amp=fp32",
        "--data-root",
        str(fmnist_root),
    ]  # the same data, spelt as another site would
    sites = run_sites(
        [_train(fmnist_root, out), _train(Path(str(fmnist_root) + "/."), out, *site1)],
        tmp_path,
        timeout_s=240,
        repo_root=repo_root,
    )
    for site in sites:
        assert site.rc == 0, site.stderr[-3000:]
    assert (out / "run" / "DONE").is_file()
