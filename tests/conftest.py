"""Shared test fixtures: where the real data, FID weights and reference statistics live.

On developers' machines and in CI they are in ../shared (next to the clone); elsewhere point
FEDRUN_SHARED at a folder with the same layout. Tests that need them skip with a clear reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDRUN_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    """Root with FashionMNIST/raw/* in torchvision's layout (the real data set)."""
    root = SHARED / "data"
    if not (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"real Fashion-MNIST not found under {root} (set FEDRUN_SHARED)")
    return root


@pytest.fixture(scope="session")
def torch_home() -> Path:
    """TORCH_HOME holding pytorch-fid's Inception weights (hub/checkpoints/pt_inception-*.pth)."""
    home = SHARED / "torch_home"
    if not list((home / "hub" / "checkpoints").glob("pt_inception-*.pth")):
        pytest.skip(f"FID Inception weights not found under {home} (set FEDRUN_SHARED)")
    return home


@pytest.fixture(scope="session")
def fid_stats_path() -> Path:
    p = SHARED / "fid_stats" / "fashion_mnist_test10k.npz"
    if not p.exists():
        pytest.skip(f"reference FID statistics not found at {p}")
    return p
