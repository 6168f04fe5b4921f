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
from fedrun.cli import main as fedrun_main
from fedrun.config import DataConfig, FederationConfig, RunConfig


def make_run(
    root: Path,
    name: str,
    method: str,
    k: int,
    partition: str,
    seed: int,
    fid: dict | None = None,
    comm_cum: list[int] | None = None,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = RunConfig(
        federation=FederationConfig(clients=k, method=method, seed=seed),
        data=DataConfig(partition=partition),
        name=name,
    )
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
