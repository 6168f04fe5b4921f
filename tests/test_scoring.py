"""evaluation.scoring (the FID scorer training is handed) and where reference statistics are cached: in fedrun's
cache directory, never in a data root that fedrun was only asked to read."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import reference as Ref
from evaluation.fid import load_stats
from evaluation.scoring import fid_of_model, fid_scorer
from fedrun.build import build_diffusion, build_model
from fedrun.cli import main as fedrun_main
from fedrun.config import apply_overrides
from fedrun.presets import get_preset


def fake_fashion_mnist(root: Path, n: int = 6) -> Path:
    """A data root in torchvision's Fashion-MNIST layout with ``n`` random images per split (idx files)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        # idx format: magic (0x0803: uint8, 3 dims), then the dims, big-endian int32; then the bytes.
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 0x803, n, 28, 28) + images.tobytes())
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 0x801, n) + labels.tobytes())
    return root


def _listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _chmod_tree(root: Path, writable: bool) -> None:
    for d, _dirs, files in os.walk(root):
        os.chmod(d, 0o755 if writable else 0o555)
        for f in files:
            os.chmod(Path(d) / f, 0o644 if writable else 0o444)


@pytest.fixture
def read_only_root(tmp_path: Path):
    """A fake Fashion-MNIST root made read-only (tests run as root, who may write anyway: compare listings)."""
    root = fake_fashion_mnist(tmp_path / "data")
    _chmod_tree(root, writable=False)
    before = _listing(root)
    yield root
    _chmod_tree(root, writable=True)  # so that tmp_path can be removed
    assert _listing(root) == before, "something was written into the data root"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDRUN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert Ref.default_cache_dir() == Path.home() / ".cache" / "fedrun"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Ref.default_cache_dir() == tmp_path / "xdg" / "fedrun"
    monkeypatch.setenv("FEDRUN_CACHE", str(tmp_path / "mine"))
    assert Ref.default_cache_dir() == tmp_path / "mine"
    assert Ref.stats_cache_dir() == tmp_path / "mine" / "fid_stats"


def test_fid_scorer_loads_the_reference_once_and_scores_like_fid_of_model(
    tmp_path, torch_home, monkeypatch, read_only_root
):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    computed = []
    source_statistics = Ref.source_statistics
    monkeypatch.setattr(Ref, "source_statistics", lambda *a, **k: computed.append(a) or source_statistics(*a, **k))
    cfg = apply_overrides(get_preset("tiny"), {"data.root": str(read_only_root), "fid_samples": 4, "sample_steps": 2})
    score = fid_scorer(cfg, torch.device("cpu"), tmp_path / "cache")
    cached = tmp_path / "cache" / "fid_stats" / "fashion-mnist_test_s16.npz"
    assert len(computed) == 1 and cached.is_file()  # the default reference: the test split at the model's size

    model, diffusion = build_model(cfg), build_diffusion(cfg)
    v = score(model, diffusion, 7)
    expected = fid_of_model(
        model, diffusion, load_stats(cached), 4, image_shape=(1, 16, 16), sampler="ddim", steps=2, seed=7
    )
    assert np.isfinite(v) and v == pytest.approx(expected, rel=1e-9)
    assert score(model, diffusion, 8) != v and len(computed) == 1  # another seed; the reference not again
    fid_scorer(cfg, torch.device("cpu"), tmp_path / "cache")
    assert len(computed) == 1  # a second scorer reads the cache


@pytest.mark.slow
def test_fid_and_eval_work_on_a_read_only_data_root(tmp_path, torch_home, monkeypatch, capsys, read_only_root):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("FEDRUN_CACHE", str(tmp_path / "cache"))
    root = str(read_only_root)
    assert (
        fedrun_main(["fid", "fashion-mnist:test", "fashion-mnist:train", "--data-root", root, "--device", "cpu"]) == 0
    )
    assert float(capsys.readouterr().out.split("FID:")[1]) > 0
    assert not (tmp_path / "cache").exists()  # `fedrun fid` caches nothing

    cfg = apply_overrides(get_preset("tiny"), {"data.root": root})
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    torch.save({n: p.detach() for n, p in build_model(cfg).named_parameters()}, run / "models" / "global.pt")
    args = ["--num-samples", "4", "--sampler", "ddim", "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    assert fedrun_main(["eval", str(run), *args]) == 0  # the default reference: fashion-mnist:test in root
    assert (tmp_path / "cache" / "fid_stats" / "fashion-mnist_test_s16.npz").is_file()  # at the model's 16x16
    assert (run / "fid.json").is_file()
