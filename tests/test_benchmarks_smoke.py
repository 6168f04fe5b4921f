"""Smoke tests of the benchmark scripts: each runs once with its smallest settings, as a subprocess through
its real command line, and writes JSON with the expected keys and positive ratios.

No timing assertions: the numbers of a --quick run on a shared CPU mean nothing; BENCHMARKS.md has the real
ones. The three runs together take well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]


def run_bench(module: str, tmp_path: Path, *args: str, targets: bool = True) -> dict:
    out = tmp_path / f"{module}.json"
    # One thread: spinning OpenMP threads on a busy 2-core machine (CI, parallel tests) crawl.
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--device", "cpu", "--json", str(out), *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert not targets or "PASS" in p.stdout or "FAIL" in p.stdout, p.stdout  # one line per target
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == module
    assert {"cpu", "cpu_cores", "date", "torch", "device"} <= set(doc["device"])
    assert doc["results"], "no results"
    assert doc["ratios"], "no ratios"
    for name, r in doc["ratios"].items():
        assert isinstance(r, float) and math.isfinite(r) and r > 0, (name, r)
    for t in doc["targets"]:
        assert {"name", "value", "op", "limit", "passed"} <= set(t)
        assert isinstance(t["passed"], bool)
    return doc


def test_bench_step(tmp_path):
    doc = run_bench("bench_step", tmp_path, "--archs", "paper-unet", "--ema", "0.999")
    chosen = doc["config"]["amp"]["paper-unet"]  # fedrun.precision's pick on this CPU
    other = "fp32" if chosen == "bf16" else "bf16"
    modes = {(r["arch"], r["mode"], r["precision"]) for r in doc["results"]}
    assert modes == {
        ("paper-unet", "eager-fp32", "fp32"),
        ("paper-unet", "optimised", chosen),
        ("paper-unet", "optimised+ema", chosen + "+ema"),
        ("paper-unet", f"optimised-{other}", other),
    }
    assert all(r["img_per_s"] > 0 for r in doc["results"])
    assert doc["ratios"]["paper-unet/eager-fp32"] == 1.0
    assert doc["bf16_vs_fp32"]["paper-unet"] > 0  # both precisions measured side by side
    # On CPU: the optimised step is not slower than eager fp32, and auto's precision not slower than the other.
    step, amp = doc["targets"]
    assert "paper-unet" in step["name"] and step["op"] == ">="
    assert f"picks {chosen}" in amp["name"] and amp["op"] == ">="


@pytest.mark.multiproc
def test_bench_sync(tmp_path):
    doc = run_bench("bench_sync", tmp_path)
    dtypes = ("fp32", "bf16", "int8")
    assert set(doc["ratios"]) == {f"{m}/{d}" for m in ("full", "usplit", "ulatdec", "udec") for d in dtypes}
    assert doc["config"]["backend"] == "gloo" and doc["config"]["world_size"] == 2
    for r in doc["results"]:
        if r["exchange_dtype"] == "int8":  # against one fp32 all-reduce of the same parameters: ~4x its bytes
            assert 0.25 < r["bytes"] / r["flat_bytes"] < 0.26
        else:
            assert r["bytes"] == r["flat_bytes"] > 0
        assert min(r["in_place_median_s"], r["packed_median_s"], r["flat_median_s"], r["local_median_s"]) > 0
        assert r["packed_collectives"] >= 1
    assert len(doc["targets"]) == 8  # fp32 and bf16 per method; int8 is reported without a target


@pytest.mark.multiproc
def test_bench_bytes(tmp_path):
    doc = run_bench("bench_bytes", tmp_path)
    ratios = doc["ratios"]
    assert ratios["paper-unet/full/fp32"] == 1.0
    assert ratios["paper-unet/full/bf16"] == pytest.approx(0.5, rel=1e-6)
    assert 0.25 < ratios["paper-unet/full/int8"] < 0.26  # 260 bytes per 256 values
    assert ratios["paper-unet/udec/int8"] <= 0.065  # issue 14's goal
    assert ratios["paper-unet/udec/fp32"] < ratios["paper-unet/ulatdec/fp32"] < 1.0
    # The real syncs handed exactly the computed bytes to the collective.
    assert all(r["match"] for r in doc["results"])
    assert all(t["passed"] for t in doc["targets"])


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_bench_clients(tmp_path, fmnist_root):
    doc = run_bench("bench_clients", tmp_path, "--data-root", str(fmnist_root), "--resident", "host")
    rows = {(r["clients"], r["rank"]): r for r in doc["results"]}
    assert set(rows) == {(1, 0), (4, 0), (4, 1), (6, 0), (6, 1)}
    # The module's accounting: one hosted client is the working set; through the host, one state at a time.
    assert rows[(1, 0)]["where"] == "device" and rows[(1, 0)]["peak_on_device"] == 1
    assert all(r["where"] == "host" and r["peak_on_device"] == 1 for k, r in rows.items() if k[0] > 1)
    assert rows[(6, 0)]["hosted"] == 3 and all(r["device_peak_mib"] == -1 for r in rows.values())  # CPU: n/a
    assert doc["swap"]["swap_s"] > 0 and doc["swap"]["epoch_s"] > 0


def test_bench_sample(tmp_path):
    try:
        import diffusers  # noqa: F401

        have = True
    except Exception:  # the bench extra is optional: then only the project's modes run
        have = False
    doc = run_bench("bench_sample", tmp_path, targets=have)
    modes = {r["mode"] for r in doc["results"]}
    assert {"project", "project-bf16"} <= modes
    assert "project-graphs" not in modes and "the CUDA graphs modes (CUDA only)" in doc["config"]["skipped"]
    assert ({"diffusers", "diffusers-bf16", "diffusers+cl"} <= modes) == have
    if have:  # both samplers ran the same chain from the same noise (up to rounding)
        assert doc["max_abs_diff"]["project/diffusers"] <= 2
        assert len(doc["targets"]) == 3


def test_bench_sample_as_run(tmp_path):
    pytest.importorskip("diffusers", reason="the bench extra is optional: this benchmark compares against its loop")
    doc = run_bench("bench_sample_as_run", tmp_path)
    by_mode = {r["mode"]: r for r in doc["results"]}
    assert set(by_mode) == {"project", "diffusers", "project+system-heap", "diffusers+cl", "diffusers+keep-heap"}
    # each mode ran in its own process under its own malloc setting (keep applies where glibc is the malloc)
    if sys.platform.startswith("linux"):
        assert [by_mode[m]["heap_applied"] for m in ("project", "diffusers+keep-heap")] == [True, True]
    assert not any(by_mode[m]["heap_applied"] for m in ("diffusers", "project+system-heap", "diffusers+cl"))
    assert doc["ratios"]["diffusers"] == 1.0 and len(doc["targets"]) == 2


def test_bench_amp(tmp_path):
    from fedrun.precision import choose_amp, cpu_flags

    doc = run_bench("bench_amp", tmp_path)
    (row,) = doc["results"]  # the quick grid: one row
    assert (row["size"], row["dim_mults"], row["batch"]) == (16, [1, 2], 2)
    assert row["fp32_img_per_s"] > 0 and row["bf16_img_per_s"] > 0
    assert row["bf16_vs_fp32"] == pytest.approx(row["bf16_img_per_s"] / row["fp32_img_per_s"])
    # The pick is the rule's for this CPU and image side, and the one target compares it with the other.
    assert row["auto_picks"] == choose_amp("auto", "cpu", cpu_flags(), 16).precision
    (t,) = doc["targets"]
    assert f"auto picks {row['auto_picks']}" in t["name"] and t["op"] == ">="
    expected = row["bf16_vs_fp32"] if row["auto_picks"] == "bf16" else 1 / row["bf16_vs_fp32"]
    assert t["value"] == pytest.approx(expected)


def test_bench_heap(tmp_path):
    doc = run_bench("bench_heap", tmp_path, "--workloads", "sample")  # 2 child processes (the suite's time)
    rows = {r["workload"]: r for r in doc["results"]}
    assert set(rows) == {"sample"}
    for r in rows.values():  # each setting ran in its own child processes, as asked
        assert r["keep"]["applied"] is (sys.platform.startswith("linux")) and r["system"]["applied"] is False
        assert r["system_vs_keep_time"] == pytest.approx(r["system"]["seconds"] / r["keep"]["seconds"])
    assert len(doc["targets"]) == len(rows)
