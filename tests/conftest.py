"""Shared test fixtures, and where the tests find the real data, FID weights and reference statistics.

The tests look where the app looks, and this file is the one place that decides it:

- Fashion-MNIST (torchvision's layout, ``FashionMNIST/raw/*-ubyte``): the data root the app would read
  (``pytest --data-root DIR``, else ``$FEDRUN_DATA``, else ``~/.cache/fedrun/data``:
  ``fedrun.config.default_data_root``);
- pytorch-fid's Inception weights: torch's hub cache (``$TORCH_HOME/hub/checkpoints/``, else
  ``~/.cache/torch/hub/checkpoints/``), where the app loads them from;
- then, as one more candidate, the team's shared folder (``../shared`` beside the clone, or
  ``$FEDRUN_SHARED``);
- reference FID statistics: the app's cache of the test split, else the team's, else computed once by
  the app from 200 test images (``reference_stats``).

``make test`` first runs ``tests/fetch_assets.py``, which downloads what is missing into the app's
locations through the app's own download paths. A test whose asset is still missing skips, and the
summary prints one line naming what is missing, where to put it and how many tests skipped; with
``CI=true`` it fails instead, so CI can never pass on a silently reduced suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MISSING = "missing test asset: "
"""Prefix of the skip reason of a test whose asset is missing (the summary counts them by it)."""
STATS_IMAGES = 200
"""Test images behind the computed reference statistics: 30-60 s of Inception on 2 CPU cores, once."""
SHARED_STATS = "fid_stats/fashion_mnist_test10k.npz"
"""The team's statistics of all 10,000 test images, under the shared folder."""


def shared_dir() -> Path:
    """The team's shared folder: ``$FEDRUN_SHARED``, else ``../shared`` beside the clone."""
    return Path(os.environ.get("FEDRUN_SHARED") or REPO.parent / "shared")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@dataclass(frozen=True)
class Asset:
    """One thing the tests need from outside the repository, and where it was looked for."""

    what: str
    """Its name in messages, e.g. "Fashion-MNIST"."""
    candidates: tuple[Path, ...]
    """Folders looked in, in order; the first is where the app looks (and where a download goes)."""
    files: tuple[str, ...]
    """Paths relative to a candidate that must all exist."""
    found: Path | None
    """The first candidate holding every file (what the fixture returns), or None."""

    @property
    def target(self) -> Path:
        return self.candidates[0]

    def where_to_put(self) -> str:
        """E.g. "FashionMNIST/raw/{a, b} into /home/u/.cache/fedrun/data"."""
        parent = os.path.dirname(self.files[0])
        names = [os.path.basename(f) for f in self.files]
        listed = names[0] if len(names) == 1 else "{" + ", ".join(names) + "}"
        return f"{parent + '/' if parent else ''}{listed} into {self.target}"


def _find(what: str, candidates: list[Path], files: tuple[str, ...]) -> Asset:
    unique = tuple(dict.fromkeys(Path(c).expanduser() for c in candidates))
    found = next((c for c in unique if all((c / f).is_file() for f in files)), None)
    return Asset(what, unique, files, found)


def find_fashion_mnist(data_root: str | os.PathLike[str] | None = None) -> Asset:
    """Fashion-MNIST in the data root the app reads (``data_root`` if given, as ``--data-root``), then shared."""
    from torchvision.datasets import FashionMNIST

    from fedrun.config import default_data_root

    # torchvision's own file list: what `FashionMNIST(root, download=True)` leaves under root.
    files = tuple(f"FashionMNIST/raw/{name.removesuffix('.gz')}" for name, _md5 in FashionMNIST.resources)
    return _find("Fashion-MNIST", [Path(data_root or default_data_root()), shared_dir() / "data"], files)


def find_inception_weights() -> Asset:
    """pytorch-fid's Inception weights in torch's hub cache (the app's TORCH_HOME), then shared."""
    import torch
    from pytorch_fid.inception import FID_WEIGHTS_URL

    # torch.hub.get_dir() is $TORCH_HOME/hub (else ~/.cache/torch/hub): a TORCH_HOME is its parent.
    app_home = Path(torch.hub.get_dir()).parent
    files = (f"hub/checkpoints/{FID_WEIGHTS_URL.rsplit('/', 1)[1]}",)
    return _find("FID Inception weights", [app_home, shared_dir() / "torch_home"], files)


_missing: dict[str, Asset] = {}
"""Assets a test asked for and did not get, by name (for the summary line)."""


def require(asset: Asset) -> Path:
    """The asset's folder; else skip the test (fail it with CI=true) with a reason saying where to put it."""
    if asset.found is not None:
        return asset.found
    _missing[asset.what] = asset
    why = (
        f"{MISSING}{asset.what} not found in {', '.join(map(str, asset.candidates))}: "
        f"put {asset.where_to_put()} (`make test` downloads it with internet)"
    )
    if in_ci():
        pytest.fail(f"CI=true but {why}", pytrace=False)
    pytest.skip(why)


def app_stats_path(limit: int | None = None) -> Path:
    """Where the app caches statistics of the Fashion-MNIST test split (of its first ``limit`` images)."""
    from evaluation.reference import reference_cache_path, stats_cache_dir
    from evaluation.sources import parse_source

    return reference_cache_path(parse_source("fashion-mnist:test"), stats_cache_dir(), limit)


def computed_stats_path() -> Path:
    return app_stats_path(STATS_IMAGES)


def find_reference_stats() -> Path | None:
    """Reference statistics already on disk (see ``reference_stats``), or None."""
    candidates = (app_stats_path(), shared_dir() / SHARED_STATS, computed_stats_path())
    return next((p for p in candidates if p.is_file()), None)


def compute_reference_stats(data_root: Path, torch_home: Path) -> Path:
    """Statistics of the first ``STATS_IMAGES`` test images, computed by the app and cached."""
    out = computed_stats_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.tmp-{os.getpid()}.npz")  # renamed when complete: never half a file
    tmp.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "fedrun",
        "fid",
        "--save-stats",
        "fashion-mnist:test",
        str(tmp),
        "--num",
        str(STATS_IMAGES),
        "--data-root",
        str(data_root),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"computing reference statistics failed ({' '.join(cmd)}): {last}")
    os.replace(tmp, out)
    return out


def reference_stats(data_root: Path, torch_home: Path) -> Path:
    """Reference FID statistics of real Fashion-MNIST test images (mu, sigma in pytorch-fid's .npz).

    All 10,000 test images where such a file exists (the app's cache, e.g. after ``fedrun eval --ref
    fashion-mnist:test``, or the team's ``fid_stats/``); else those of the first ``STATS_IMAGES`` test
    images, computed once by the app (``fedrun fid --save-stats fashion-mnist:test OUT --num 200``) into
    the app's cache (``$FEDRUN_CACHE``, else ``~/.cache/fedrun``, ``fid_stats/``): all 10,000 would take
    30-50 min on CPU.
    """
    return find_reference_stats() or compute_reference_stats(data_root, torch_home)


# -- fixtures --------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--data-root",
        default=None,
        metavar="DIR",
        help="dataset root for the data tests, as `fedrun --data-root` (default: $FEDRUN_DATA, "
        "else ~/.cache/fedrun/data; then ../shared/data)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # The tests that run fedrun's code in this process run it as the fedrun program does (fedrun.heap: malloc
    # keeps freed memory for reuse); its own tests check both settings in child processes.
    try:
        from fedrun.heap import apply_heap
    except ImportError:  # a probe's copy of this file beside no fedrun
        return
    apply_heap()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Every test leaves torch's intra-op thread count as it found it. The benchmarks' ``main()`` sets one thread
    on CPU (bench_sample, bench_step), and their smoke tests run it in this process: every later test ran on one
    core, and the pytorch-fid parity test took 228 s instead of ~130 s."""
    torch = sys.modules.get("torch")  # not imported yet: nothing to keep (and no import for tests without it)
    threads = torch.get_num_threads() if torch else None
    yield
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fmnist_root(request: pytest.FixtureRequest) -> Path:
    """Data root with FashionMNIST/raw/* in torchvision's layout (the real data set)."""
    return require(find_fashion_mnist(request.config.getoption("--data-root")))


@pytest.fixture(scope="session")
def torch_home() -> Path:
    """A TORCH_HOME holding pytorch-fid's Inception weights (hub/checkpoints/pt_inception-*.pth)."""
    return require(find_inception_weights())


@pytest.fixture(scope="session")
def fid_stats_path(fmnist_root: Path, torch_home: Path) -> Path:
    """Reference statistics of real Fashion-MNIST test images: see ``reference_stats``.

    The tests only need a real-data reference (FIDs finite, noise far from it, the same number for the
    same samples), not the paper's 10,000-image one, so 200 images do where the full file is absent.
    """
    return reference_stats(fmnist_root, torch_home)


@pytest.fixture(scope="session")
def real_200(fmnist_root: Path, torch_home: Path):
    """The project's Inception references (statistics and features) of the first 200 Fashion-MNIST train and
    the first 200 test images, through ``evaluation.sources.source_statistics`` as ``fedrun fid`` reads them.

    Computed once (400 images through Inception: ~80 s on 2 cores); the FID parity test against pytorch-fid
    and the KID test against an independent numpy KID both score these.
    """
    from evaluation import sources

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        return tuple(
            sources.source_statistics(f"fashion-mnist:{split}", data_root=fmnist_root, limit=200, progress=False)
            for split in ("train", "test")
        )


# -- summary ---------------------------------------------------------------------------------------


def missing_summary(reports: list[pytest.TestReport]) -> str | None:
    """One line for all tests skipped for a missing asset: what, where to put it, how many; None if none."""
    ours = [r for r in reports if isinstance(r.longrepr, tuple) and MISSING in str(r.longrepr[2])]
    if not ours:
        return None
    parts = []
    for what, asset in _missing.items():
        n = sum(f"{MISSING}{what} " in str(r.longrepr[2]) for r in ours)
        parts.append(f"{what} ({n} test{'s' * (n != 1)}): put {asset.where_to_put()}")
    return (
        f"{len(ours)} test{'s' * (len(ours) != 1)} skipped for missing test assets: {'; '.join(parts)}; "
        "with internet `make test` downloads them"
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reports = terminalreporter.stats.get("skipped", [])
    line = missing_summary(reports)
    if line is None:
        return
    if "s" in terminalreporter.reportchars:
        # -ra lists skips folded by reason: give ours one reason, so they fold into this one line.
        for r in reports:
            if isinstance(r.longrepr, tuple) and MISSING in str(r.longrepr[2]):
                r.longrepr = (__file__, None, line)
    else:
        terminalreporter.write_line(f"SKIPPED: {line}", yellow=True)
