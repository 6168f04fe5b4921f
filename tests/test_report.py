"""evaluation.report and evaluation.figure4: Table 1 and Figure 4 from a fake-but-valid sweep, numbers checked by
hand; unlike runs never merged; lists complete or saying how many more."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from evaluation import figure4 as F4
from evaluation import report as R
from evaluation.commands import listing
from fedrun.cli import main as fedrun_main
from fedrun.config import DataConfig, FederationConfig, RunConfig, apply_overrides


def make_run(
    root: Path,
    name: str,
    method: str,
    k: int,
    partition: str,
    seed: int,
    fid: dict | None = None,
    comm_cum: list[int] | None = None,
    overrides: dict | None = None,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = RunConfig(
        federation=FederationConfig(clients=k, method=method, seed=seed),
        data=DataConfig(partition=partition),
        name=name,
    )
    cfg = apply_overrides(cfg, overrides or {})
    (d / "config.json").write_text(cfg.to_json())
    if fid is not None:
        (d / "fid.json").write_text(json.dumps(fid))
    if comm_cum is not None:
        prev, lines = 0, []
        for r, cum in enumerate(comm_cum, start=1):
            lines.append(
                json.dumps(
                    {
                        "round": r,
                        "paper_params": cum - prev,
                        "paper_params_cum": cum,
                        "bytes": 8 * (cum - prev),
                        "bytes_cum": 8 * cum,
                        "sync_seconds": 0.1,
                    }
                )
            )
            prev = cum
        (d / "comm.jsonl").write_text("\n".join(lines) + "\n")
    return d


def single(f: float, raw: float | None = None) -> dict:
    out = {"fid": f, "fid_std": 0.0, "per_client": None, "protocol": {"num_samples": 1000}}
    if raw is not None:
        out["results"] = {
            "raw": {"fid": raw, "fid_std": 0.0, "per_client": None},
            "ema": {"fid": f, "fid_std": 0.0, "per_client": None},
        }
    return out


def clients(values: list[float]) -> dict:
    m = sum(values) / len(values)
    return {"fid": m, "fid_std": 0.0, "per_client": values, "protocol": {"num_samples": 1000}}


@pytest.fixture
def sweep(tmp_path) -> Path:
    s = tmp_path / "sweep"
    full2 = [89_889_450, 179_778_900]  # 2 P R K with P = 2,996,315: the paper's FULL, K = 2 after 15 rounds
    make_run(s, "full-k2-iid-s1", "full", 2, "iid", 1, single(40.0, raw=50.0), full2)
    make_run(s, "full-k2-iid-s2", "full", 2, "iid", 2, single(44.0, raw=48.0), full2)
    make_run(s, "full-k2-lskew-s1", "full", 2, "label-skew", 1, single(33.0), full2)
    make_run(s, "a/deeper/udec-k2-iid-s1", "udec", 2, "iid", 1, clients([30.0, 50.0]), [47_540_000])
    make_run(s, "udec-k2-iid-s2", "udec", 2, "iid", 2, clients([40.0, 40.0]), [47_540_000])
    make_run(s, "usplit-k2-iid-s1", "usplit", 2, "iid", 1, single(37.0), [134_000_000])
    make_run(s, "usplit-k2-iid-s2", "usplit", 2, "iid", 2, single(39.0), [136_000_000])
    make_run(s, "central-s1", "full", 1, "iid", 1, single(43.0))  # no comm.jsonl
    make_run(s, "full-k5-iid-s1", "full", 5, "iid", 1, None, [100, 200, 300])  # not evaluated
    make_run(s, "udec-k5-iid-s1", "udec", 5, "iid", 1, None, [10, 20, 30])
    make_run(s, "udec-k5-iid-s2", "udec", 5, "iid", 2, None, [10, 22, 34])
    # Something inside a run that looks like a run (e.g. a copied config in its eval dir) is not one.
    make_run(s / "full-k2-iid-s1", "eval", "full", 2, "iid", 9, single(1000.0), [1])
    return s


def _row(rows, method, k):
    (row,) = [r for r in rows if r["method"] == method and r["K"] == k]
    return row


def test_find_runs(sweep):
    runs = R.find_runs(sweep)
    assert len(runs) == 11  # the nested one is skipped
    assert all(r.path.name != "eval" for r in runs)
    central = [r for r in runs if r.path.name == "central-s1"][0]
    assert central.method == "centralised" and central.paper_params is None
    udec = [r for r in runs if r.path.name == "udec-k2-iid-s1"][0]
    assert udec.fid_values() == [30.0, 50.0] and udec.paper_params == 47_540_000


def test_table_numbers_by_hand(sweep):
    rows = R.table1(R.find_runs(sweep))
    assert [(r["method"], r["K"]) for r in rows] == [
        ("centralised", 1),
        ("full", 2),
        ("full", 5),
        ("usplit", 2),
        ("udec", 2),
        ("udec", 5),
    ]

    full2 = _row(rows, "full", 2)
    assert full2["N"] == pytest.approx(179.7789)
    assert (full2["iid"]["mean"], full2["iid"]["std"], full2["iid"]["runs"]) == (42.0, 2.0, 2)  # 40, 44
    assert (full2["label-skew"]["mean"], full2["label-skew"]["std"]) == (33.0, 0.0)
    assert full2["quantity-skew"]["mean"] is None

    udec2 = _row(rows, "udec", 2)  # pooled over clients and runs: 30, 50, 40, 40
    assert udec2["iid"]["mean"] == pytest.approx(40.0)
    assert udec2["iid"]["std"] == pytest.approx(math.sqrt((100 + 100 + 0 + 0) / 4))
    assert (udec2["iid"]["runs"], udec2["iid"]["values"]) == (2, 4)
    assert udec2["N"] == pytest.approx(47.54)

    usplit2 = _row(rows, "usplit", 2)  # N averaged over seeds (random roles): (134 + 136) / 2
    assert usplit2["N"] == pytest.approx(135.0)
    assert (usplit2["iid"]["mean"], usplit2["iid"]["std"]) == (38.0, 1.0)

    assert _row(rows, "centralised", 1)["N"] is None
    full5 = _row(rows, "full", 5)
    assert full5["N"] == pytest.approx(300 / 1e6) and full5["iid"]["mean"] is None and full5["runs"] == 1


def test_markdown_layout(sweep):
    md = R.table1_markdown(R.table1(R.find_runs(sweep)))
    lines = md.splitlines()
    assert lines[0] == "| method | K | N | IID | l-skew | q-skew |"
    assert "| centralised | 1 | – | 43.0 ± 0.0 | – | – |" in lines
    assert "| FULL | 2 | 179.78 | 42.0 ± 2.0 | 33.0 ± 0.0 | – |" in lines
    assert "| USplit | 2 | 135.00 | 38.0 ± 1.0 | – | – |" in lines
    assert "| UDec | 2 | 47.54 | 40.0 ± 7.1 | – | – |" in lines
    assert "| FULL | 5 | 0.00 | – | – | – |" in lines


def test_weights_selects_raw_results(sweep):
    rows = R.table1(R.find_runs(sweep), weights="raw")
    full2 = _row(rows, "full", 2)
    assert (full2["iid"]["mean"], full2["iid"]["std"]) == (49.0, 1.0)  # raw 50 and 48
    assert full2["label-skew"]["mean"] is None  # that run has no per-weights results


def test_csv(sweep, tmp_path):
    path = R.write_csv(R.table1(R.find_runs(sweep)), tmp_path / "t.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5  # cells with an FID: centralised iid, FULL-2 iid + l-skew, USplit-2 iid, UDec-2 iid
    udec = [r for r in rows if r["method"] == "udec"][0]
    assert udec["K"] == "2" and udec["partition"] == "iid" and udec["values"] == "4" and udec["runs"] == "2"
    assert float(udec["fid_mean"]) == pytest.approx(40.0)
    assert float(udec["fid_std"]) == pytest.approx(math.sqrt(50), abs=1e-6)
    assert float(udec["N_millions"]) == pytest.approx(47.54)


def test_figure4_curves_and_png(sweep, tmp_path):
    runs = R.find_runs(sweep)
    assert F4.default_figure_k(runs) == 5
    curves = F4.figure4_curves(runs, 5)
    assert curves == {"full": ([1, 2, 3], [100.0, 200.0, 300.0]), "udec": ([1, 2, 3], [10.0, 21.0, 32.0])}
    png = F4.figure4(runs, tmp_path / "f.png", clients=5)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (750, 525)
    with pytest.raises(R.EvalError, match="K=3"):
        F4.figure4(runs, tmp_path / "g.png", clients=3)


def test_cli_report(sweep, capsys):
    assert fedrun_main(["report", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "| FULL | 2 | 179.78 | 42.0 ± 2.0 | 33.0 ± 0.0 | – |" in out
    assert (sweep / "table1.csv").is_file() and (sweep / "figure4.png").is_file()
    assert "3 run(s) without fid.json" in err


def test_cli_report_errors(tmp_path, capsys):
    assert fedrun_main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert fedrun_main(["report", str(tmp_path / "empty")]) == 2
    assert "no runs" in capsys.readouterr().err


# -- unlike runs are never merged (issue 18 item 5) ------------------------------------------------


def test_five_full_k2_runs_with_different_settings_are_five_rows(tmp_path, capsys):
    """The reported case: five FULL K=2 runs that differ in a setting, and one K=5 run, none evaluated. It
    printed one row, listed five of the six runs without fid.json and left K=2 out of Figure 4 silently."""
    s = tmp_path / "sweep"
    lrs = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3]
    for i, lr in enumerate(lrs):
        make_run(s, f"full-k2-lr{i}", "full", 2, "iid", 1, None, [10, 20], {"optim.lr": lr})
    make_run(s, "full-k5", "full", 5, "iid", 1, None, [50, 100], {"optim.lr": 1e-4})
    runs = R.find_runs(s)
    assert R.key_fields(runs) == ["optim.lr"]
    rows = R.table1(runs)
    assert [(r["method"], r["K"], r["settings"]) for r in rows] == [("full", 2, {"optim.lr": lr}) for lr in lrs] + [
        ("full", 5, {"optim.lr": 1e-4})
    ]

    assert fedrun_main(["report", str(s)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "| method | K | optim.lr | N | IID | l-skew | q-skew |" in lines
    assert "| FULL | 2 | 0.0005 | 0.00 | – | – | – |" in lines
    assert sum(line.startswith("| FULL | 2 |") for line in lines) == 5
    assert "runs differ in optim.lr" in err
    assert "6 run(s) without fid.json" in err and all(f"full-k2-lr{i}" in err for i in range(5))
    assert "not shown: 5 runs with K=2" in err
    assert F4.left_out(runs, 5) == ["5 runs with K=2"]
    assert F4.left_out(runs, 2) == ["1 run with K=5"]
    assert list(F4.figure4_curves(runs, 2)) == [f"full (optim.lr={lr:g})" for lr in lrs]
    with open(s / "table1.csv") as f:
        assert next(csv.reader(f))[:4] == ["method", "K", "optim.lr", "N_millions"]


def test_only_settings_that_split_a_row_become_columns(tmp_path):
    """Where a run runs and what it logs never splits a row, nor 5 against 5.0, nor a field that differs only
    between rows (the centralised baseline's own step budget); the evaluation protocol does."""
    s = tmp_path / "sweep"
    make_run(s, "central", "full", 1, "iid", 1, single(40.0), None, {"federation.max_local_steps": 100})
    make_run(
        s,
        "a",
        "full",
        2,
        "iid",
        1,
        single(41.0),
        [1],
        {
            "federation.max_local_steps": 50,
            "device": "cpu",
            "out_dir": "x",
            "data.root": "/a",
            "federation.local_epochs": 5,
        },
    )
    make_run(
        s,
        "b",
        "full",
        2,
        "iid",
        2,
        single(43.0),
        [1],
        {
            "federation.max_local_steps": 50,
            "device": "cuda",
            "out_dir": "y",
            "data.root": "/b",
            "federation.local_epochs": 5.0,
        },
    )
    runs = R.find_runs(s)
    assert R.key_fields(runs) == []
    assert _row(R.table1(runs), "full", 2)["iid"]["mean"] == 42.0  # the two seeds of one setting: one cell

    half = {**single(50.0), "protocol": {"num_samples": 500}}
    make_run(s, "c", "full", 2, "iid", 3, half, [1], {"federation.max_local_steps": 50})
    runs = R.find_runs(s)
    assert R.key_fields(runs) == ["eval.num_samples"]
    rows = R.table1(runs)
    assert [(r["K"], r["settings"], r["iid"]["mean"]) for r in rows] == [
        (1, {"eval.num_samples": 1000.0}, 40.0),
        (2, {"eval.num_samples": 500.0}, 50.0),
        (2, {"eval.num_samples": 1000.0}, 42.0),
    ]


def test_headline_weights_that_differ_split_rows(tmp_path):
    s = tmp_path / "sweep"
    make_run(s, "a", "full", 2, "iid", 1, {**single(40.0), "headline_weights": "ema"}, [1])
    make_run(s, "b", "full", 2, "iid", 2, {**single(60.0), "headline_weights": "raw"}, [1])
    runs = R.find_runs(s)
    assert R.key_fields(runs) == ["eval.weights"]
    assert R.key_fields(runs, weights="raw") == []  # asked for raw: the same weights everywhere


def test_lists_are_complete_or_say_how_many_more(tmp_path, capsys):
    assert listing([f"r{i}" for i in range(10)]) == ", ".join(f"r{i}" for i in range(10))
    assert listing([f"r{i}" for i in range(12)]) == ", ".join(f"r{i}" for i in range(10)) + ", ... (and 2 more)"
    s = tmp_path / "sweep"
    for i in range(12):
        make_run(s, f"run{i:02d}", "full", 2, "iid", i, None, [1, 2])
    assert fedrun_main(["report", str(s)]) == 0
    err = capsys.readouterr().err
    assert "12 run(s) without fid.json" in err and "run09" in err and "run10" not in err
    assert "(and 2 more)" in err


def test_figure4_names_rounds_not_every_run_reached(tmp_path):
    s = tmp_path / "sweep"
    make_run(s, "a", "full", 2, "iid", 1, None, [10, 20, 30])
    make_run(s, "b", "full", 2, "iid", 2, None, [10, 20])  # stopped after round 2
    runs = R.find_runs(s)
    assert F4.figure4_curves(runs, 2) == {"full": ([1, 2], [10.0, 20.0])}
    assert F4.left_out(runs, 2) == ["rounds of full after round 2 (not reached by all 2 of its runs)"]
    with Image.open(F4.figure4(runs, tmp_path / "f.png", clients=2)) as im:
        assert im.size == (750, 525)


# -- KID and the pooled samples --------------------------------------------------------------------


def scored(fids: list[float], kids: list[float], pooled: tuple[float, float] | None = None) -> dict:
    """fid.json's numbers: one model (one value each) or one per client, with the pooled samples' scores."""
    many = len(fids) > 1
    return {
        "fid": sum(fids) / len(fids),
        "fid_std": 0.0,
        "per_client": fids if many else None,
        "kid": sum(kids) / len(kids),
        "kid_std": 0.0,
        "kid_per_client": kids if many else None,
        "pooled": None if pooled is None else {"fid": pooled[0], "kid": pooled[1], "kid_std": 0.0},
        "protocol": {"num_samples": 1000},
    }


def test_kid_and_pooled_scores_in_the_table(tmp_path, capsys):
    s = tmp_path / "sweep"
    make_run(s, "full-s1", "full", 2, "iid", 1, scored([41.0], [0.05]), [100])
    make_run(s, "udec-s1", "udec", 2, "iid", 1, scored([30.0, 50.0], [0.010, 0.030], (38.0, 0.018)), [40])
    make_run(s, "udec-s2", "udec", 2, "iid", 2, scored([40.0, 40.0], [0.020, 0.020], (42.0, 0.022)), [40])
    rows = R.table1(R.find_runs(s))
    udec = _row(rows, "udec", 2)["iid"]
    assert udec["kid"]["mean"] == pytest.approx(0.02) and udec["kid"]["values"] == 4
    assert udec["kid"]["std"] == pytest.approx(math.sqrt((1e-4 + 1e-4) / 4))  # 0.01, 0.03, 0.02, 0.02
    assert (udec["pooled_fid"]["mean"], udec["pooled_fid"]["std"]) == (40.0, 2.0)
    assert udec["pooled_kid"]["mean"] == pytest.approx(0.02) and udec["pooled_kid"]["std"] == pytest.approx(0.002)
    assert _row(rows, "full", 2)["iid"]["pooled_fid"]["mean"] is None

    assert fedrun_main(["report", str(s)]) == 0
    out = capsys.readouterr().out.splitlines()
    fid_at, kid_at = out.index("FID:"), out.index("KID x 10^3:")
    assert "| UDec | 2 | 0.00 | 40.0 ± 7.1 (pooled 40.0 ± 2.0) | – | – |" in out[fid_at:kid_at]
    assert "| FULL | 2 | 0.00 | 41.0 ± 0.0 | – | – |" in out[fid_at:kid_at]
    assert "| UDec | 2 | 0.00 | 20.0 ± 7.1 (pooled 20.0 ± 2.0) | – | – |" in out[kid_at:]
    assert "| FULL | 2 | 0.00 | 50.0 ± 0.0 | – | – |" in out[kid_at:]
    with open(s / "table1.csv") as f:
        udec_csv = [r for r in csv.DictReader(f) if r["method"] == "udec"][0]
    assert float(udec_csv["kid_mean"]) == pytest.approx(0.02) and float(udec_csv["pooled_fid_mean"]) == 40.0


def test_runs_scored_without_kid_are_named(sweep, capsys):
    assert fedrun_main(["report", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "KID x 10^3" not in out  # no run of this sweep has a KID
    assert "8 evaluated run(s) without KID" in err
