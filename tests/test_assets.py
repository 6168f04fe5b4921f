"""Where the tests find data, weights and reference statistics (tests/conftest.py), and fetching them.

The rules: the tests look where the app looks (``--data-root`` / ``$FEDRUN_DATA`` / ``~/.cache/fedrun/data``;
``$TORCH_HOME`` / ``~/.cache/torch``), with the team's ``../shared`` as one more candidate; a missing asset
skips with one summary line (fails with CI=true); ``tests/fetch_assets.py`` downloads what is missing.
Every case runs in temporary folders laid out as the app expects, with fake files.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import conftest as assets
import fetch_assets
import numpy as np
import pytest

FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
WEIGHTS = "hub/checkpoints/pt_inception-2015-12-05-6726825d.pth"


def fake_fmnist(root: Path) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_FILES:
        (raw / name).write_bytes(b"")
    return root


def fake_weights(home: Path) -> Path:
    (home / WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    (home / WEIGHTS).write_bytes(b"")
    return home


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's machine outside the team's layout: empty home, no shared folder, no fedrun/torch env."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDRUN_SHARED", str(tmp_path / "shared"))  # absent
    for name in ("FEDRUN_DATA", "TORCH_HOME", "XDG_CACHE_HOME", "FEDRUN_CACHE", "CI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(assets, "_missing", {})  # keep this session's own summary clean
    return tmp_path


# -- where data and weights are found ----------------------------------------------------------------


def test_data_only_under_fedrun_data_is_found(outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDRUN_DATA", str(fake_fmnist(outside / "data")))
    assert assets.find_fashion_mnist().found == outside / "data"
    assert assets.require(assets.find_fashion_mnist()) == outside / "data"


def test_data_in_the_user_cache_without_fedrun_data(outside: Path) -> None:
    cache = fake_fmnist(outside / "home" / ".cache" / "fedrun" / "data")
    assert assets.find_fashion_mnist().found == cache


def test_data_root_option_replaces_the_apps_default(outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDRUN_DATA", str(fake_fmnist(outside / "env")))
    explicit = fake_fmnist(outside / "explicit")
    assert assets.find_fashion_mnist(explicit).found == explicit
    # As `fedrun --data-root`: an explicit root that lacks the data does not fall back to $FEDRUN_DATA.
    assert assets.find_fashion_mnist(outside / "empty").found is None


def test_shared_is_one_more_candidate_after_the_apps(outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = fake_fmnist(outside / "shared" / "data")
    monkeypatch.setenv("FEDRUN_DATA", str(outside / "data"))
    assert assets.find_fashion_mnist().found == shared
    assert assets.find_fashion_mnist(outside / "explicit").found == shared
    fake_fmnist(outside / "data")
    assert assets.find_fashion_mnist().found == outside / "data"  # the app's location wins


def test_an_incomplete_data_set_is_missing(outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDRUN_DATA", str(fake_fmnist(outside / "data")))
    (outside / "data" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    asset = assets.find_fashion_mnist()
    assert asset.found is None and asset.target == outside / "data"
    assert asset.where_to_put() == f"FashionMNIST/raw/{{{', '.join(FMNIST_FILES)}}} into {outside / 'data'}"


def test_weights_under_torch_home_then_torch_cache_then_shared(outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert assets.find_inception_weights().target == outside / "home" / ".cache" / "torch"  # torch's default
    assert assets.find_inception_weights().found is None
    shared = fake_weights(outside / "shared" / "torch_home")
    assert assets.find_inception_weights().found == shared
    cache = fake_weights(outside / "home" / ".cache" / "torch")
    assert assets.find_inception_weights().found == cache
    monkeypatch.setenv("TORCH_HOME", str(outside / "th"))
    assert assets.find_inception_weights().found == shared  # TORCH_HOME replaces torch's default
    assert assets.find_inception_weights().where_to_put() == f"{WEIGHTS} into {outside / 'th'}"
    assert assets.require(assets.find_inception_weights()) == shared
    assert assets.require(assets.find_inception_weights()) == shared
    fake_weights(outside / "th")
    assert assets.find_inception_weights().found == outside / "th"


def test_missing_skips_saying_where_and_fails_with_ci(outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(pytest.skip.Exception, match="Fashion-MNIST not found in .*put FashionMNIST/raw/"):
        assets.require(assets.find_fashion_mnist())
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but missing test asset: FID Inception weights"):
        assets.require(assets.find_inception_weights())


# -- reference statistics ----------------------------------------------------------------------------


def test_reference_stats_prefer_the_full_test_set(outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(assets, "compute_reference_stats", lambda d, t: calls.append((d, t)) or Path("new.npz"))
    assert assets.find_reference_stats() is None
    assert assets.reference_stats(Path("d"), Path("t")) == Path("new.npz") and calls == [(Path("d"), Path("t"))]
    app_cache = outside / "home" / ".cache" / "fedrun" / "fid_stats"  # the app's reference cache
    computed = assets.computed_stats_path()
    assert computed == app_cache / "fashion-mnist_test_n200.npz"
    computed.parent.mkdir(parents=True)
    computed.write_bytes(b"")
    assert assets.reference_stats(Path("d"), Path("t")) == computed and len(calls) == 1  # computed once
    shared = outside / "shared" / "fid_stats" / "fashion_mnist_test10k.npz"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"")
    assert assets.find_reference_stats() == shared  # all 10,000 images beat 200
    (app_cache / "fashion-mnist_test.npz").write_bytes(b"")  # as `fedrun eval --ref fashion-mnist:test` caches
    assert assets.find_reference_stats() == app_cache / "fashion-mnist_test.npz"
    monkeypatch.setenv("FEDRUN_CACHE", str(outside / "cache"))
    assert assets.computed_stats_path() == outside / "cache" / "fid_stats" / "fashion-mnist_test_n200.npz"


@pytest.mark.slow
def test_computed_reference_stats_come_from_the_app_and_are_cached(
    fmnist_root: Path, torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDRUN_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "STATS_IMAGES", 3)  # the real fallback uses 200; the pipeline is the same
    out = assets.compute_reference_stats(fmnist_root, torch_home)
    assert out == tmp_path / "fid_stats" / "fashion-mnist_test_n3.npz"
    with np.load(out) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["n"]) == 3
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


# -- a fresh clone's pytest run: passes, or skips with one summary line, or fails with CI=true ----------

PROBE = """
def test_data(fmnist_root):
    assert (fmnist_root / "FashionMNIST" / "raw").is_dir()

def test_data_again(fmnist_root):
    pass

def test_weights(torch_home):
    assert (torch_home / "hub" / "checkpoints").is_dir()
"""


def _probe_run(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """pytest on a copy of conftest.py and three tests that need data and weights."""
    clone = root / "clone"
    (clone / "tests").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(assets.__file__), clone / "tests" / "conftest.py")
    (clone / "tests" / "test_probe.py").write_text(PROBE)
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FEDRUN_DATA", "TORCH_HOME", "XDG_CACHE_HOME", "FEDRUN_CACHE", "CI", "FEDRUN_SHARED")
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "tests"],
        cwd=clone,
        env={**base, "HOME": str(root / "home"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_fresh_clone_with_fedrun_data_and_torch_home_runs_everything(tmp_path: Path) -> None:
    env = {"FEDRUN_DATA": str(fake_fmnist(tmp_path / "data")), "TORCH_HOME": str(fake_weights(tmp_path / "th"))}
    p = _probe_run(tmp_path, env, "-ra")
    assert p.returncode == 0 and "3 passed" in p.stdout and "skipped" not in p.stdout, p.stdout + p.stderr


def test_fresh_clone_without_assets_prints_one_line(tmp_path: Path) -> None:
    p = _probe_run(tmp_path, {}, "-ra")
    assert p.returncode == 0 and "3 skipped" in p.stdout, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if "missing test assets" in ln or "SKIPPED" in ln]
    assert len(lines) == 1, p.stdout
    cache = tmp_path / "home" / ".cache"
    assert "3 tests skipped for missing test assets: Fashion-MNIST (2 tests): put FashionMNIST/raw/" in lines[0]
    assert (
        f"into {cache / 'fedrun' / 'data'}; FID Inception weights (1 test): put {WEIGHTS} into "
        f"{cache / 'torch'}; with internet `make test` downloads them" in lines[0]
    )


def test_fresh_clone_without_assets_fails_with_ci(tmp_path: Path) -> None:
    p = _probe_run(tmp_path, {"CI": "true"}, "-ra")
    assert p.returncode == 1 and "3 errors" in p.stdout and "skipped" not in p.stdout, p.stdout + p.stderr
    assert "CI=true but missing test asset: Fashion-MNIST" in p.stdout


# -- tests/fetch_assets.py -----------------------------------------------------------------------------


@pytest.fixture
def timeout_restored():
    before = socket.getdefaulttimeout()
    yield
    socket.setdefaulttimeout(before)


def test_fetch_offline_says_what_to_put_where_and_continues(
    outside: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], timeout_restored: None
) -> None:
    def no_internet(root: Path) -> None:
        (root / "FashionMNIST" / "raw").mkdir(parents=True)  # as torchvision does before it fails
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried http://x/, got:\n"
            "<urlopen error [Errno -2] Name or service not known>"
        )

    def no_weights(_home: Path) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(fetch_assets, "download_fashion_mnist", no_internet)
    monkeypatch.setattr(fetch_assets, "download_inception_weights", no_weights)
    assert fetch_assets.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    data, torch_cache = outside / "home" / ".cache" / "fedrun" / "data", outside / "home" / ".cache" / "torch"
    assert out == [
        f"test assets: downloading Fashion-MNIST into {data} (the tests need it; once)",
        "test assets: could not download Fashion-MNIST (RuntimeError: Error downloading train-images-idx3-ubyte.gz: "
        "Tried http://x/, got: <urlopen error [Errno -2] Name or service not known>): put FashionMNIST/raw/"
        f"{{{', '.join(FMNIST_FILES)}}} into {data}; the tests that need it will skip (fail with CI=true)",
        f"test assets: downloading FID Inception weights into {torch_cache} (the tests need it; once)",
        "test assets: could not download FID Inception weights (URLError: <urlopen error [Errno -2] Name or service "
        f"not known>): put {WEIGHTS} into {torch_cache}; the tests that need it will skip (fail with CI=true)",
    ]
    assert not (outside / "home").exists()  # no empty layout left behind
    assert socket.getdefaulttimeout() == fetch_assets.DOWNLOAD_TIMEOUT_S


def test_fetch_downloads_into_the_apps_locations(
    outside: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], timeout_restored: None
) -> None:
    monkeypatch.setenv("FEDRUN_DATA", str(outside / "data"))
    monkeypatch.setattr(fetch_assets, "download_fashion_mnist", fake_fmnist)
    monkeypatch.setattr(fetch_assets, "download_inception_weights", fake_weights)
    stats = outside / "stats.npz"
    monkeypatch.setattr(assets, "compute_reference_stats", lambda d, t: stats)
    assert fetch_assets.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    torch_cache = outside / "home" / ".cache" / "torch"
    assert out[:2] == [
        f"test assets: downloading Fashion-MNIST into {outside / 'data'} (the tests need it; once)",
        f"test assets: downloading FID Inception weights into {torch_cache} (the tests need it; once)",
    ]
    assert out[2].startswith("test assets: computing FID reference statistics of 200 Fashion-MNIST test images")
    assert out[3] == (
        f"test assets: Fashion-MNIST in {outside / 'data'}, FID Inception weights in {torch_cache}, "
        f"reference statistics {stats}"
    )
    # Everything present: nothing downloaded, one line.
    monkeypatch.setattr(assets, "find_reference_stats", lambda: stats)
    assert fetch_assets.main([]) == 0
    assert capsys.readouterr().out.splitlines() == out[3:]
