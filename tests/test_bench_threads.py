"""bench_step's thread sweep: ``--threads 1,2,auto`` measures the optimised step at each count in one run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import base_parser, parse_args, thread_counts
from fedrun.threads import available_cores

REPO = Path(__file__).resolve().parents[1]


def test_thread_counts_parse_lists_and_auto(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_counts("2") == [2] and thread_counts("1, 2,1") == [1, 2]
    assert thread_counts("auto") == [available_cores()]  # what fedrun train chooses for one process here
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_counts("1,auto") == [1, 3]
    for bad in ("0", "x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            thread_counts(bad)


def test_a_list_only_where_the_benchmark_sweeps():
    with pytest.raises(SystemExit):  # bench_sync, bench_bytes: one count
        parse_args(base_parser("x"), ["--threads", "1,2"])
    assert parse_args(base_parser("x"), ["--threads", "1,2"], thread_sweep=True).threads == [1, 2]


@pytest.mark.timeout(300)
def test_bench_step_measures_each_count_side_by_side(tmp_path):
    out = tmp_path / "step.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_step",
        "--quick",
        "--device",
        "cpu",
        "--archs",
        "paper-unet",
        "--threads",
        "1,2",
        "--no-other-amp",
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Intra-op threads: the optimised step at each count" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["config"]["threads"] == [1, 2]
    assert [(r["arch"], r["threads"]) for r in doc["threads"]] == [("paper-unet", 1), ("paper-unet", 2)]
    assert all(r["img_per_s"] > 0 for r in doc["threads"])
    # The table of modes runs at the first count and keeps its modes; --no-other-amp drops the step in
    # the other precision (test_benchmarks_smoke measures it).
    assert {r["mode"] for r in doc["results"]} == {"eager-fp32", "optimised"}
