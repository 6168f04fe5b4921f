"""fedrun.data: real Fashion-MNIST, client data (simulated and per-folder), image folders, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedrun.config import DATASETS, DataConfig
from fedrun.data import (
    SHAPES,
    ClientData,
    DataNotFoundError,
    dataset_shape,
    load_client_data,
    load_dataset,
    load_image_folder,
    load_labels,
)
from fedrun.partition import partition


@pytest.fixture(scope="module")
def fmnist(fmnist_root: Path) -> ClientData:
    return load_dataset("fashion-mnist", fmnist_root, train=True)


# ---------------------------------------------------------------------------------------------
# Real Fashion-MNIST


def test_fashion_mnist_train(fmnist: ClientData) -> None:
    assert fmnist.images.shape == (60_000, 1, 28, 28) and fmnist.images.dtype == torch.uint8
    assert fmnist.labels.shape == (60_000,) and fmnist.labels.dtype == torch.int64
    assert len(fmnist) == 60_000
    # Fashion-MNIST has 6,000 training images per class (shared/ holds them in a shuffled order).
    np.testing.assert_array_equal(torch.bincount(fmnist.labels).numpy(), np.full(10, 6000))
    assert int(fmnist.images.min()) == 0 and int(fmnist.images.max()) == 255
    assert fmnist.images.is_contiguous()


def test_fashion_mnist_test_split_and_labels_only(fmnist_root: Path, fmnist: ClientData) -> None:
    test = load_dataset("fashion-mnist", fmnist_root, train=False)
    assert test.images.shape == (10_000, 1, 28, 28)
    np.testing.assert_array_equal(torch.bincount(test.labels).numpy(), np.full(10, 1000))
    labels = load_labels("fashion-mnist", fmnist_root)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, fmnist.labels.numpy())


def test_subset_and_resize(fmnist_root: Path, fmnist: ClientData) -> None:
    small = load_dataset("fashion-mnist", fmnist_root, subset=10)
    torch.testing.assert_close(small.images, fmnist.images[:10], rtol=0, atol=0)
    torch.testing.assert_close(small.labels, fmnist.labels[:10], rtol=0, atol=0)
    big = load_dataset("fashion-mnist", fmnist_root, subset=10, image_size=32)
    assert big.images.shape == (10, 1, 32, 32) and big.images.dtype == torch.uint8
    # A resize keeps the picture: the mean brightness moves by at most a few grey levels.
    assert abs(big.images.float().mean() - small.images.float().mean()) < 3


def test_dataset_shape() -> None:
    assert dataset_shape("fashion-mnist") == (1, 28)
    assert dataset_shape("mnist") == (1, 28)
    assert dataset_shape("cifar10") == (3, 32)
    assert dataset_shape("celeba") == (3, 64)
    assert dataset_shape("cifar10", image_size=64) == (3, 64)
    with pytest.raises(ValueError, match="'svhn'"):
        dataset_shape("svhn")


def test_every_dataset_the_config_accepts_has_a_shape() -> None:
    assert set(SHAPES) == set(DATASETS)


def test_client_data_checks_its_tensors() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ClientData(images=torch.zeros(2, 1, 4, 4), labels=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"int64 \[2\]"):
        ClientData(images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8), labels=torch.zeros(3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# load_client_data: simulation


def test_load_client_data_simulation(fmnist_root: Path, fmnist: ClientData) -> None:
    cfg = DataConfig(root=str(fmnist_root), subset=1000, partition="label-skew")
    data, sizes = load_client_data(cfg, num_clients=3, client_ids=[0, 2], seed=2023)
    assert set(data) == {0, 2}, "only the hosted clients are loaded"
    assert sum(sizes) == 1000 and len(sizes) == 3 and min(sizes) >= cfg.min_per_client
    # The same split as fedrun.partition on the first 1,000 labels, so every rank agrees on it.
    parts = partition(fmnist.labels[:1000].numpy(), 3, "label-skew", beta=0.5, seed=2023, min_per_client=10)
    assert sizes == [len(p) for p in parts]
    for c in (0, 2):
        idx = torch.from_numpy(parts[c])
        torch.testing.assert_close(data[c].images, fmnist.images[idx], rtol=0, atol=0)
        torch.testing.assert_close(data[c].labels, fmnist.labels[idx], rtol=0, atol=0)
    # Another rank hosting client 1 gets the rest of the same split.
    data1, sizes1 = load_client_data(cfg, num_clients=3, client_ids=[1], seed=2023)
    assert sizes1 == sizes and len(data1[1]) == sizes[1]


def test_load_client_data_iid_sizes_and_bad_ids(fmnist_root: Path) -> None:
    cfg = DataConfig(root=str(fmnist_root), subset=1002)
    data, sizes = load_client_data(cfg, num_clients=4, client_ids=[3], seed=1)
    assert sizes == [251, 251, 250, 250]
    assert data[3].images.shape == (250, 1, 28, 28)
    with pytest.raises(ValueError, match=r"client_ids=\[4\].*0\.\.3"):
        load_client_data(cfg, num_clients=4, client_ids=[4], seed=1)
    with pytest.raises(ValueError, match="distinct"):
        load_client_data(cfg, num_clients=4, client_ids=[1, 1], seed=1)


# ---------------------------------------------------------------------------------------------
# Image folders


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")  # lossless even when named .jpg


def test_flat_grey_folder(tmp_path: Path) -> None:
    for i, v in enumerate([0, 100, 255]):
        _png(tmp_path / f"img{i}.png", np.full((8, 6), v, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_image_folder(tmp_path)
    assert d.images.shape == (3, 1, 8, 6) and d.images.dtype == torch.uint8
    assert d.images.flatten(1).float().mean(1).tolist() == [0.0, 100.0, 255.0]  # sorted by file name
    assert d.labels.tolist() == [0, 0, 0]


def test_class_subfolders_rgb(tmp_path: Path) -> None:
    _png(tmp_path / "dog" / "a.png", np.full((4, 4, 3), (0, 0, 255), dtype=np.uint8))
    _png(tmp_path / "cat" / "b.png", np.full((4, 4, 3), (255, 0, 0), dtype=np.uint8))
    _png(tmp_path / "cat" / "c.png", np.full((4, 4, 3), (0, 255, 0), dtype=np.uint8))
    d = load_image_folder(tmp_path)
    assert d.labels.tolist() == [0, 0, 1], "classes in sorted folder order: cat=0, dog=1"
    assert d.images.shape == (3, 3, 4, 4)
    assert d.images[:, :, 0, 0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    # To grey with PIL's ITU-R 601-2 luma: L = (299 R + 587 G + 114 B) / 1000, rounded.
    grey = load_image_folder(tmp_path, channels=1)
    assert grey.images.shape == (3, 1, 4, 4)
    assert grey.images[:, 0, 0, 0].tolist() == [76, 150, 29]


def test_mixed_modes_become_rgb(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.full((4, 4), 7, dtype=np.uint8))
    _png(tmp_path / "b.png", np.full((4, 4, 3), (1, 2, 3), dtype=np.uint8))
    d = load_image_folder(tmp_path)
    assert d.images.shape == (2, 3, 4, 4)
    assert d.images[:, :, 0, 0].tolist() == [[7, 7, 7], [1, 2, 3]]


def test_sizes_must_match_or_be_resized(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    wide = np.zeros((8, 16), dtype=np.uint8)
    wide[:, 4:12] = 200  # centre square bright, side bands dark
    _png(tmp_path / "b.png", wide)
    with pytest.raises(ValueError, match=r"differ in size.*image_size"):
        load_image_folder(tmp_path)
    d = load_image_folder(tmp_path, image_size=4)
    assert d.images.shape == (2, 1, 4, 4)
    # The wide image is resized to 4x8 and centre-cropped: only the bright middle is left (its
    # edge columns blend a little of the dark bands in); squashing it to 4x4 would keep dark edges.
    assert (d.images[1, 0, :, 1:3] == 200).all() and d.images[1].min() >= 150


def test_load_client_data_from_client_folders(tmp_path: Path) -> None:
    for c, n in [(0, 2), (1, 3), (2, 1)]:
        for i in range(n):
            _png(tmp_path / f"client{c}" / f"{i}.png", np.full((40, 40, 3), 10 * c, dtype=np.uint8))
    cfg = DataConfig(dataset="imagefolder", client_data=str(tmp_path / "client{client}"), image_size=16)
    data, sizes = load_client_data(cfg, num_clients=3, client_ids=[1], seed=0)
    assert sizes == [None, 3, None], "other clients' sizes are gathered by the runtime"
    assert data[1].images.shape == (3, 3, 16, 16) and int(data[1].images.max()) == 10
    # With a torchvision data set's name, client images take its shape (grey 28x28 for Fashion-MNIST).
    cfg = DataConfig(dataset="fashion-mnist", client_data=str(tmp_path / "client{client}"))
    data, sizes = load_client_data(cfg, num_clients=3, client_ids=[0, 2], seed=0)
    assert sizes == [2, None, 1]
    assert data[0].images.shape == (2, 1, 28, 28) and data[2].images.shape == (1, 1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Missing data: one clear line, no torchvision traceback


def _check_one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert e.value.__cause__ is None and e.value.__suppress_context__, "torchvision's error is hidden"
    return msg


def test_missing_fashion_mnist(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path)
    files = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    msg = _check_one_line(e, "Fashion-MNIST not found", str(tmp_path / "FashionMNIST" / "raw"), *files)
    assert "zalandoresearch/fashion-mnist" in msg and "--download" in msg and "FEDRUN_DATA" in msg
    with pytest.raises(DataNotFoundError, match="train-labels-idx1-ubyte"):
        load_labels("fashion-mnist", tmp_path)


def test_missing_partial_fashion_mnist_names_what_is_missing(tmp_path: Path, fmnist_root: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-labels-idx1-ubyte").symlink_to(fmnist_root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte")
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path)
    missing = str(e.value).split("(missing: ")[1].split(")")[0]
    assert missing == "train-images-idx3-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


def test_failed_download_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets as tvd

    def offline(self) -> None:  # what torchvision raises without internet, several lines long
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://x/, got:\nno network\n")

    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path, download=True)
    msg = _check_one_line(e, "the download failed (Error downloading", "no network", "train-labels-idx1-ubyte")
    assert "pass --download" not in msg


@pytest.mark.parametrize(
    ("name", "folder", "needles"),
    [
        ("mnist", "MNIST/raw", ["MNIST not found", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        (
            "cifar10",
            "cifar-10-batches-py",
            ["CIFAR-10 not found", "data_batch_1", "test_batch", "cifar-10-python"],
        ),
        ("celeba", "celeba", ["CelebA not found", "img_align_celeba", "list_attr_celeba.txt"]),
    ],
)
def test_missing_other_datasets(tmp_path: Path, name: str, folder: str, needles: list[str]) -> None:
    with pytest.raises(DataNotFoundError) as e:
        load_dataset(name, tmp_path)
    _check_one_line(e, str(tmp_path / folder), *needles)


def test_missing_or_empty_image_folder(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as e:
        load_image_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "not found" in str(e.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match=r"no images found in .*empty"):
        load_image_folder(tmp_path / "empty")


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="load_image_folder"):
        load_dataset("imagefolder", tmp_path)


# ---------------------------------------------------------------------------------------------
# CelebA pipeline on a fake copy (torchvision checks real files' MD5s, so that check is skipped)


def test_celeba_centre_crop_and_resize(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets as tvd

    base = tmp_path / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 6)]
    for name in names:
        img = np.zeros((218, 178, 3), dtype=np.uint8)
        img[:, :] = (0, 0, 255)  # blue bands above and below ...
        img[20:198] = (255, 0, 0)  # ... of the centre 178x178 square, which is red
        _png(base / "img_align_celeba" / name, img)
    split = [0, 0, 0, 2, 2]  # three train images, two test images
    male = [1, -1, 1, 1, -1]
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {s}\n" for n, s in zip(names, split, strict=True)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} 1\n" for n in names))
    (base / "list_attr_celeba.txt").write_text(
        "5\nSmiling Male \n" + "".join(f"{n} -1 {m}\n" for n, m in zip(names, male, strict=True))
    )
    (base / "list_bbox_celeba.txt").write_text("5\nimage_id x_1 y_1 width height\n"
                                               + "".join(f"{n} 0 0 1 1\n" for n in names))  # fmt: skip
    (base / "list_landmarks_align_celeba.txt").write_text("5\nlefteye_x lefteye_y\n"
                                                          + "".join(f"{n} 1 1\n" for n in names))  # fmt: skip
    monkeypatch.setattr(tvd.CelebA, "_check_integrity", lambda self: True)

    train = load_dataset("celeba", tmp_path)
    assert train.images.shape == (3, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [1, 0, 1], "the 'Male' attribute mapped from -1/1 to 0/1"
    # Only the red centre survives the crop (lossless PNG content; allow a little resampling ringing).
    assert int(train.images[:, 0].min()) >= 250 and int(train.images[:, 2].max()) <= 5
    test = load_dataset("celeba", tmp_path, train=False, image_size=32)
    assert test.images.shape == (2, 3, 32, 32) and test.labels.tolist() == [1, 0]
    assert load_labels("celeba", tmp_path).tolist() == [1, 0, 1]


def test_mnist_reads_its_own_folder(tmp_path: Path, fmnist_root: Path, fmnist: ClientData) -> None:
    # MNIST has Fashion-MNIST's file format; fake it with links to see that MNIST/raw/ is read.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (fmnist_root / "FashionMNIST" / "raw").iterdir():
        (raw / f.name).symlink_to(f)
    d = load_dataset("mnist", tmp_path, subset=5)
    torch.testing.assert_close(d.images, fmnist.images[:5], rtol=0, atol=0)


def test_cifar10_is_nchw(tmp_path: Path, monkeypatch) -> None:
    import pickle

    import torchvision.datasets.cifar as tvc

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    # One image per batch; CIFAR stores rows as [R plane | G plane | B plane], 32*32 bytes each.
    for b, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]):  # fmt: skip
        row = np.concatenate([np.full(1024, 10 * b + c, dtype=np.uint8) for c in range(3)])
        row[0] = 200  # top-left pixel of the red plane
        with open(base / name, "wb") as f:
            pickle.dump({"data": row[None], "labels": [b]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)  # the real files' MD5s

    d = load_dataset("cifar10", tmp_path)
    assert d.images.shape == (5, 3, 32, 32) and d.labels.tolist() == [0, 1, 2, 3, 4]
    assert d.images[:, :, 5, 7].tolist() == [[10 * b + c for c in range(3)] for b in range(5)]
    assert d.images[:, 0, 0, 0].tolist() == [200] * 5
    assert load_labels("cifar10", tmp_path, train=False).tolist() == [5]
    assert load_dataset("cifar10", tmp_path, image_size=16, subset=2).images.shape == (2, 3, 16, 16)
