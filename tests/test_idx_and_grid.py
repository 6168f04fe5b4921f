"""The two things a training process used torchvision for, done without importing it (about 2 s a process:
its ops import torch._dynamo): reading MNIST's idx files, and writing sample grids. Each equals torchvision's
own result on the same input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedrun.data import load_dataset, load_labels, read_idx
from fedrun.images import DataError, image_grid, save_png

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", [1, 3, 16, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_and_png_equal_torchvision(tmp_path, n, channels):
    from torchvision.utils import make_grid, save_image

    x = torch.rand(n, channels, 5, 7, generator=torch.Generator().manual_seed(n * channels))
    nrow = max(1, int(np.ceil(np.sqrt(n))))
    ours = image_grid(x, nrow=nrow, padding=2)
    assert torch.equal(ours, make_grid(x, nrow=nrow, padding=2))
    save_png(ours, tmp_path / "ours.png")
    save_image(x, tmp_path / "theirs.png", nrow=nrow, padding=2)
    pixels = [np.asarray(Image.open(tmp_path / f"{who}.png")) for who in ("ours", "theirs")]
    assert np.array_equal(*pixels)
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, H, W\]"):
        image_grid(x[0], nrow=2)


@pytest.mark.parametrize("train", [True, False])
def test_fashion_mnist_read_directly_equals_torchvision(fmnist_root, train):
    import torchvision.datasets as tvd

    ds = tvd.FashionMNIST(str(fmnist_root), train=train, download=False)
    ours = load_dataset("fashion-mnist", fmnist_root, train=train)
    assert ours.images.dtype == torch.uint8 and ours.images.is_contiguous()
    assert torch.equal(ours.images, ds.data.unsqueeze(1)) and torch.equal(ours.labels, ds.targets.long())
    assert np.array_equal(load_labels("fashion-mnist", fmnist_root, train=train), ds.targets.numpy())


def test_a_damaged_idx_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)  # float data, not unsigned bytes
    with pytest.raises(DataError, match="is not an idx file of unsigned bytes"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") * 2 + b"\x01" * 17)
    with pytest.raises(DataError, match=r"holds 17 data bytes, its header says \(2, 3, 3\)"):
        read_idx(bad)
    bad.write_bytes(bad.read_bytes()[:-17] + b"\x01" * 18)
    assert read_idx(bad).shape == (2, 3, 3)


def test_loading_fashion_mnist_and_the_training_loop_import_no_torchvision(fmnist_root):
    code = (
        "import sys, torch\n"
        "from fedrun.data import load_dataset\n"
        "import fedrun.train, fedrun.loop\n"
        "from fedrun.images import image_grid\n"
        f"d = load_dataset('fashion-mnist', {str(fmnist_root)!r}, subset=8)\n"
        "image_grid(d.images.float() / 255, nrow=4)\n"
        "print(sorted(m for m in sys.modules if m.startswith('torchvision')))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "[]"
