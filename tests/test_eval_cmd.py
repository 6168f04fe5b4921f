"""`fedrun eval`, `fedrun fid`, `fedrun report` wiring; evaluate_run / fid_of_model on tiny real models; KID and
the pooled samples of a personalised method in fid.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import fid as F
from evaluation import inception as Inc
from evaluation import kid as K
from evaluation import sources as Src
from evaluation.commands import run_eval, run_fid, run_report
from evaluation.evaluate import evaluate_run
from evaluation.scoring import fid_of_model
from fedrun.build import build_diffusion, build_model
from fedrun.cli import build_parser
from fedrun.cli import main as fedrun_main
from fedrun.config import apply_overrides
from fedrun.presets import get_preset
from fedrun.rundir import RunDir


def _tiny_run(root: Path, method: str = "full", ema: bool = False) -> Path:
    """A finished-looking run dir: config.json of the tiny preset and freshly initialised models."""
    cfg = apply_overrides(get_preset("tiny"), {"federation.method": method})
    run = root / f"run-{method}"
    (run / "models").mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    labels = ["client0", "client1"] if method in ("udec", "ulatdec") else ["global"]
    for i, label in enumerate(labels):
        for suffix in ("", "_ema") if ema else ("",):
            torch.manual_seed(100 * i + len(suffix))  # every model different
            model = build_model(cfg)
            state = {n: p.detach() for n, p in model.named_parameters()}
            torch.save(state, run / "models" / f"{label}{suffix}.pt")
    (run / "DONE").write_text("{}")
    return run


def _scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_register_adds_the_three_subcommands():
    parser = build_parser()
    a = parser.parse_args(["eval", "RUN", "--sampler", "ddim", "--steps", "5", "--weights", "raw"])
    assert a.func is run_eval and a.steps == 5 and a.weights == "raw" and a.stage == "all"
    assert a.num_samples is None and a.seed is None  # None: the protocol's defaults (1000, 0), or the saved one
    a = parser.parse_args(["fid", "A", "B", "--limit", "10"])
    assert a.func is run_fid and a.sources == ["A", "B"] and a.limit == 10 and not a.save_stats
    assert parser.parse_args(["fid", "--save-stats", "A", "o.npz", "--num", "3"]).limit == 3
    a = parser.parse_args(["report", "SWEEP"])
    assert a.func is run_report and a.csv is None
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "RUN", "--sampler", "euler"])


def _env(repo_root: Path, torch_home: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo_root) + os.pathsep + env.get("PYTHONPATH", "")
    env["TORCH_HOME"] = str(torch_home)
    return env


def test_missing_weights_offline_clear_message_no_traceback(tmp_path, repo_root):
    """`python -m fedrun fid` with an empty TORCH_HOME: one clear line, exit code 2, no download attempt."""
    for name in ("a", "b"):
        np.savez(tmp_path / f"{name}.npz", x=np.zeros((3, 1, 8, 8), np.uint8))
    cmd = [sys.executable, "-m", "fedrun", "fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    p = subprocess.run(
        cmd, cwd=repo_root, env=_env(repo_root, tmp_path / "empty_home"), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert Inc.WEIGHTS_FILENAME in p.stderr and str(tmp_path / "empty_home" / "hub" / "checkpoints") in p.stderr
    assert "--inception-weights" in p.stderr
    assert "Downloading" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fid_command_on_npz_sources_and_save_stats(tmp_path, torch_home, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=g)
    b = (a.int() // 2).to(torch.uint8)  # darker copies
    np.savez(tmp_path / "a.npz", x=a.numpy())
    np.savez(tmp_path / "b.npz", x=b.numpy())

    assert fedrun_main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--device", "cpu"]) == 0
    printed = float(capsys.readouterr().out.split("FID:")[1])
    stats_a, stats_b = F.statistics(Inc.inception_features(a)), F.statistics(Inc.inception_features(b))
    expected = F.frechet_distance(*stats_a, *stats_b)
    assert printed == pytest.approx(expected, rel=1e-9) and printed > 1

    # --save-stats with --num: statistics of the first 4 images, in pytorch-fid's format.
    out = tmp_path / "a4.npz"
    assert fedrun_main(["fid", "--save-stats", str(tmp_path / "a.npz"), str(out), "--num", "4"]) == 0
    with np.load(out) as f:
        assert int(f["n"]) == 4
        np.testing.assert_allclose(f["mu"], F.statistics(Inc.inception_features(a[:4]))[0], atol=1e-6)
        trace = float(np.trace(f["sigma"]))
    assert fedrun_main(["fid", "--save-stats", str(tmp_path / "a.npz"), str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err

    # Two statistics files need no network at all (not even the weights).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    assert fedrun_main(["fid", str(out), str(out)]) == 0
    assert abs(float(capsys.readouterr().out.split("FID:")[1])) < 1e-9 * trace  # 0 up to rounding

    assert fedrun_main(["fid", str(tmp_path / "nope"), str(out)]) == 2
    assert "not an image folder" in capsys.readouterr().err


def test_fid_of_model(torch_home, fid_stats_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    cfg = get_preset("tiny")
    model = build_model(cfg).train()
    kw = dict(image_shape=(1, 28, 28), sampler="ddim", steps=2, batch_size=4, seed=3)
    v = fid_of_model(model, build_diffusion(cfg), F.load_stats(fid_stats_path), 4, **kw)
    assert np.isfinite(v) and v > 100  # an untrained model's noise is far from Fashion-MNIST
    assert model.training  # restored for the training loop
    # A spec string works as the reference too and gives the same number for the same seed.
    assert fid_of_model(model, build_diffusion(cfg), str(fid_stats_path), 4, **kw) == pytest.approx(v)


@pytest.mark.slow
def test_eval_tiny_full_run_writes_fid_json_tb_and_samples(tmp_path, torch_home, fid_stats_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    run = _tiny_run(tmp_path)
    rc = fedrun_main(
        [
            "eval",
            str(run),
            "--num-samples",
            "8",
            "--sampler",
            "ddim",
            "--steps",
            "5",
            "--ref",
            str(fid_stats_path),
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    out = json.loads((run / "fid.json").read_text())
    assert f"FID (raw): {out['fid']:.2f}" in printed
    assert f"(mean sample pixel {out['results']['raw']['mean_pixel']['global']:.1f} of 255)" in printed
    assert out["headline_weights"] == "raw" and list(out["results"]) == ["raw"]  # no EMA files
    assert np.isfinite(out["fid"]) and out["fid"] > 0 and out["fid_std"] == 0.0 and out["per_client"] is None
    assert out["protocol"] == {
        **out["protocol"],
        "num_samples": 8,
        "reference": str(fid_stats_path),
        "sampler": "ddim",
        "steps": 5,
        "weights": ["raw"],
        "seed": 1,
    }
    assert "15.5" in out["protocol"]["note"]
    with np.load(run / "eval" / "samples_global_raw.npz") as f:
        x = f["x"]
    assert x.shape == (8, 1, 16, 16) and x.dtype == np.uint8  # the tiny preset's size
    assert (run / "eval" / "grid_global_raw.png").is_file()
    # The FID in the file is the FID of the saved samples.
    ref = F.load_stats(fid_stats_path)
    assert out["fid"] == pytest.approx(F.fid_of_images(torch.from_numpy(x), ref), rel=1e-9)
    assert _scalars(RunDir(run).scores_tb) == {"fid/raw": [pytest.approx(out["fid"])]}


@pytest.mark.slow
def test_eval_udec_run_reports_one_fid_per_client_raw_and_ema(tmp_path, torch_home, fid_stats_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    run = _tiny_run(tmp_path, method="udec", ema=True)
    out = evaluate_run(
        run,
        num_samples=6,
        ref=str(fid_stats_path),
        sampler="ddim",
        steps=3,
        weights=None,
        device="cpu",
        batch_size=6,
        seed=0,
    )
    assert list(out["results"]) == ["raw", "ema"] and out["headline_weights"] == "ema"
    for kind in ("raw", "ema"):
        r = out["results"][kind]
        assert len(r["per_client"]) == 2 and r["per_client"][0] != r["per_client"][1]
        assert r["fid"] == pytest.approx(np.mean(r["per_client"]))
        assert r["fid_std"] == pytest.approx(np.std(r["per_client"]))
    assert out["fid"] == out["results"]["ema"]["fid"]
    assert out["per_client"] == out["results"]["ema"]["per_client"]
    assert json.loads((run / "fid.json").read_text()) == out
    files = sorted(p.name for p in (run / "eval").iterdir())
    assert files == sorted(
        f"{kind}_{c}_{w}.{ext}"
        for c in ("client0", "client1")
        for w in ("raw", "ema")
        for kind, ext in (("grid", "png"), ("samples", "npz"))
    )
    tags = _scalars(RunDir(run).scores_tb)
    assert set(tags) == {
        "fid/raw",
        "fid/ema",
        "fid/raw/client0",
        "fid/raw/client1",
        "fid/ema/client0",
        "fid/ema/client1",
    }
    assert tags["fid/ema/client1"] == [pytest.approx(out["results"]["ema"]["per_client"][1])]


@pytest.mark.slow
def test_eval_stage_sample_then_score_equals_one_go(tmp_path, torch_home, fid_stats_path, monkeypatch, capsys):
    """Sample where there are no Inception weights (a GPU node), score elsewhere: the same fid.json numbers."""
    run = _tiny_run(tmp_path, ema=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    assert fedrun_main(["eval", str(run), "--stage", "score", "--device", "cpu"]) == 2
    assert "--stage sample" in capsys.readouterr().err  # nothing sampled yet
    args = ["--num-samples", "6", "--sampler", "ddim", "--steps", "3", "--batch-size", "6", "--seed", "4"]
    assert fedrun_main(["eval", str(run), "--stage", "sample", "--device", "cpu", *args]) == 0
    assert "--stage score" in capsys.readouterr().err
    rec = json.loads((run / "eval" / "samples.json").read_text())
    assert rec["files"] == {"raw": {"global": "samples_global_raw.npz"}, "ema": {"global": "samples_global_ema.npz"}}
    assert rec["protocol"]["num_samples"] == 6 and rec["protocol"]["steps"] == 3 and rec["protocol"]["seed"] == 4
    assert not (run / "fid.json").exists()

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert fedrun_main(["eval", str(run), "--stage", "score", "--sampler", "ddpm", "--device", "cpu"]) == 2
    assert "differs from the saved samples' ddim" in capsys.readouterr().err
    assert fedrun_main(["eval", str(run), "--stage", "score", "--ref", str(fid_stats_path), "--device", "cpu"]) == 0
    apart = json.loads((run / "fid.json").read_text())
    assert apart["protocol"]["sampled_apart"] and apart["protocol"]["steps"] == 3
    for kind in ("raw", "ema"):  # mean pixel of the samples, recorded at both stages
        x = np.load(run / "eval" / f"samples_global_{kind}.npz")["x"]
        assert rec["mean_pixel"][kind]["global"] == apart["results"][kind]["mean_pixel"]["global"]
        assert apart["results"][kind]["mean_pixel"]["global"] == pytest.approx(x.mean(), abs=1e-3)

    again = _tiny_run(tmp_path / "again", ema=True)
    one_go = evaluate_run(
        again, num_samples=6, ref=str(fid_stats_path), sampler="ddim", steps=3, device="cpu", batch_size=6, seed=4
    )
    for kind in ("raw", "ema"):
        assert apart["results"][kind]["fid"] == pytest.approx(one_go["results"][kind]["fid"], rel=1e-9)
    assert {k: v for k, v in apart["protocol"].items() if k != "sampled_apart"} == one_go["protocol"]


def test_eval_errors_are_one_line(tmp_path, capsys, monkeypatch, torch_home):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    assert fedrun_main(["eval", str(tmp_path), "--device", "cpu"]) == 2
    assert "no config.json" in capsys.readouterr().err
    run = _tiny_run(tmp_path)
    assert fedrun_main(["eval", str(run), "--weights", "ema", "--device", "cpu"]) == 2
    assert "--weights raw" in capsys.readouterr().err
    assert fedrun_main(["eval", str(run), "--ref", str(tmp_path / "none.npz"), "--device", "cpu"]) == 2
    assert "not an image folder" in capsys.readouterr().err
    assert fedrun_main(["eval", str(run), "--steps", "5", "--device", "cpu"]) == 2  # ddpm takes no --steps
    assert "ddim" in capsys.readouterr().err
    assert fedrun_main(["eval", str(run), "--cuda-graphs", "--device", "cpu"]) == 2  # before the reference
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid device=cpu for CUDA graphs: allowed: a CUDA device" in err
    assert not (run / "fid.json").exists() and not list(run.glob("eval/*.npz"))


@pytest.fixture(scope="module")
def ref_with_features(tmp_path_factory, fmnist_root, torch_home) -> Path:
    """Statistics and features of 20 real test images (a few seconds of Inception): a reference that gives KID."""
    ref = Src.source_statistics(
        "fashion-mnist:test",
        data_root=fmnist_root,
        limit=20,
        progress=False,
        weights=torch_home / "hub" / "checkpoints" / Inc.WEIGHTS_FILENAME,
    )
    return F.save_reference(tmp_path_factory.mktemp("ref") / "test20.npz", ref)


@pytest.mark.slow
def test_eval_udec_run_scores_kid_and_the_pooled_samples_of_all_clients(
    tmp_path, torch_home, ref_with_features, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    run = _tiny_run(tmp_path, method="udec")
    assert (
        fedrun_main(
            [
                "eval",
                str(run),
                "--num-samples",
                "6",
                "--sampler",
                "ddim",
                "--steps",
                "3",
                "--ref",
                str(ref_with_features),
                "--device",
                "cpu",
                "--batch-size",
                "6",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    out = json.loads((run / "fid.json").read_text())
    ref = F.load_reference(ref_with_features)
    r = out["results"]["raw"]
    samples = [torch.from_numpy(np.load(run / "eval" / f"samples_client{k}_raw.npz")["x"]) for k in (0, 1)]
    feats = [Inc.inception_features(x, progress=False) for x in samples]
    for k, f in enumerate(feats):  # each client's KID: its 6 samples against the 20 test images
        expected = K.kid(f, ref.features)
        assert r["kid_models"][f"client{k}"] == {
            "kid": pytest.approx(expected.mean, rel=1e-9),
            "kid_std": pytest.approx(expected.std, rel=1e-6, abs=1e-12),
            "subset_size": 6,
        }
    assert r["kid"] == pytest.approx(np.mean(r["kid_per_client"])) and len(r["kid_per_client"]) == 2
    assert r["kid_std"] == pytest.approx(np.std(r["kid_per_client"]))
    # The pooled samples: all 12 samples of both clients scored as one set.
    pooled = np.concatenate(feats)
    assert r["pooled"]["num_samples"] == 12
    assert r["pooled"]["fid"] == pytest.approx(F.frechet_distance(*F.statistics(pooled), *ref.stats), rel=1e-9)
    assert r["pooled"]["kid"] == pytest.approx(K.kid(pooled, ref.features).mean, rel=1e-9)
    assert r["pooled"]["kid_subset_size"] == 12
    assert out["pooled"] == r["pooled"] and out["kid"] == r["kid"] and "kid_note" not in out
    assert out["protocol"]["kid"]["subsets"] == K.KID_SUBSETS
    assert f"KID (raw): {r['kid']:.5f} ± {r['kid_std']:.5f} over 2 clients" in printed
    assert f"pooled samples of all 2 clients (raw, 12 samples): FID {r['pooled']['fid']:.2f}" in printed


@pytest.mark.slow
def test_eval_against_mu_sigma_only_statistics_says_why_there_is_no_kid(
    tmp_path, torch_home, ref_with_features, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    ref = F.load_reference(ref_with_features)
    plain = F.save_stats(tmp_path / "plain.npz", ref.mu, ref.sigma)
    run = _tiny_run(tmp_path)
    out = evaluate_run(run, num_samples=4, ref=str(plain), sampler="ddim", steps=2, device="cpu", batch_size=4)
    assert out["kid"] is None and out["results"]["raw"]["kid_models"] is None and out["pooled"] is None
    assert "KID needs the reference's Inception features" in out["kid_note"] and np.isfinite(out["fid"])
    # With the features the same samples (same seed) get the same FID and a KID too.
    again = evaluate_run(
        _tiny_run(tmp_path / "again"),
        num_samples=4,
        ref=str(ref_with_features),
        sampler="ddim",
        steps=2,
        device="cpu",
        batch_size=4,
    )
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-9) and again["kid"] is not None
    assert again["kid_std"] == again["results"]["raw"]["kid_models"]["global"]["kid_std"]  # one model: subsets'
