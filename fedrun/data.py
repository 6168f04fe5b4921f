"""The torchvision data sets in memory, and the data of the clients a process hosts.

Two ways to get client data (``load_client_data``):

- Simulation: one torchvision data set (optionally its first ``subset`` examples) is split over the
  clients by ``fedrun.partition``; every process computes the same split and keeps its own clients.
- Real deployment: ``DataConfig.client_data`` is a path template with ``{client}``; each hosted client
  reads only its own image folder (``fedrun.images``), so a process does not know the other clients' sizes.

Images are uint8 ``ClientData`` (``fedrun.images``). Missing data raises ``DataNotFoundError`` with one line
naming the files, the folder and where to get them; torchvision's own errors for missing files never get
through.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fedrun.config import TORCHVISION_DATASETS, DataConfig
from fedrun.images import ClientData, DataError, DataNotFoundError, load_image_folder, resize_images
from fedrun.partition import PartitionError, partition

# (channels, native image size) of every data set; imagefolder images are converted to this shape
# unless told otherwise, so that every client of a real deployment feeds the same model.
SHAPES: dict[str, tuple[int, int]] = {
    "fashion-mnist": (1, 28),
    "mnist": (1, 28),
    "cifar10": (3, 32),
    "celeba": (3, 64),
    "imagefolder": (3, 64),
}
CELEBA_CROP = 178
"""CelebA is centre-cropped to 178x178 (the face) before resizing, as in the paper."""
CELEBA_LABEL = "Male"
"""CelebA has no classes; its binary 'Male' attribute (0/1) serves as label for partitions."""


def dataset_shape(name: str, image_size: int | None = None) -> tuple[int, int]:
    """(channels, image size) of a data set without loading it, so the model can be built first.

    ``image_size`` (DataConfig.image_size) overrides the native size, as the loaders do.
    """
    if name not in SHAPES:
        raise ValueError(f"invalid dataset {name!r}: allowed: " + ", ".join(SHAPES))
    channels, native = SHAPES[name]
    return channels, image_size or native


# ---------------------------------------------------------------------------------------------
# torchvision data sets


# What each data set needs on disk: folder under root, files in it, where to get them.
_LAYOUT: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "fashion-mnist": (
        "Fashion-MNIST",
        "FashionMNIST/raw",
        (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ),
        "https://github.com/zalandoresearch/fashion-mnist, gunzipped",
    ),
    "mnist": (
        "MNIST",
        "MNIST/raw",
        (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ),
        "https://ossci-datasets.s3.amazonaws.com/mnist/, gunzipped",
    ),
    "cifar10": (
        "CIFAR-10",
        "cifar-10-batches-py",
        (
            "data_batch_1",
            "data_batch_2",
            "data_batch_3",
            "data_batch_4",
            "data_batch_5",
            "test_batch",
            "batches.meta",
        ),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted in the data root",
    ),
    "celeba": (
        "CelebA",
        "celeba",
        (
            "img_align_celeba/",
            "list_eval_partition.txt",
            "list_attr_celeba.txt",
            "identity_CelebA.txt",
            "list_bbox_celeba.txt",
            "list_landmarks_align_celeba.txt",
        ),
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, 'Align&Cropped' images with img_align_celeba.zip unzipped",
    ),
}


def _not_found(name: str, root: str, download_error: str | None = None) -> DataNotFoundError:
    title, sub, files, source = _LAYOUT[name]
    folder = Path(root) / sub
    missing = [f for f in files if not (folder / f.rstrip("/")).exists()]
    if download_error is not None:
        # torchvision's download errors span several lines; the message stays one line.
        how = f"the download failed ({' '.join(download_error.split())}); put"
    else:
        how = "put"
    if not missing:
        state = " (the files are there but fail torchvision's checksum: corrupted or incomplete)"
    elif len(missing) < len(files):
        state = f" (missing: {', '.join(missing)})"
    else:
        state = ""
    fetch = "" if download_error is not None else " or pass --download with internet access"
    return DataNotFoundError(
        f"{title} not found under {root}{state}: {how} {', '.join(files)} in {folder}/ (from {source})"
        f"{fetch}; set --data-root or FEDRUN_DATA to point elsewhere."
    )


def _torchvision(name: str, root: str, download: bool, make):
    """Build a torchvision data set, turning its missing-file and download errors into ours.

    A failed download leaves no empty folders behind (torchvision makes the data set's folders first): a
    retry, or a look at the data root, then shows what is really there.
    """
    made = _missing_folders(Path(root) / _LAYOUT[name][1])
    try:
        return make()
    except RuntimeError as e:
        msg = str(e)
        if "not found" in msg.lower() or "download" in msg.lower():
            _remove_empty(made)
            raise _not_found(name, root, msg if download else None) from None
        raise
    except OSError as e:  # e.g. URLError: no internet during download=True
        if download:
            _remove_empty(made)
            raise _not_found(name, root, str(e)) from None
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    out = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        out.append(p)
    return out


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are empty; anything written into one keeps it."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:  # not empty (a partial download stays for a look), or gone already
            break


def _check_name(name: str) -> None:
    if name not in TORCHVISION_DATASETS:
        hint = " (use load_image_folder for image folders)" if name == "imagefolder" else ""
        raise ValueError(f"invalid dataset {name!r}: allowed: " + ", ".join(TORCHVISION_DATASETS) + hint)


def _idx_file(name: str, root: str, train: bool, kind: str) -> Path | None:
    """The extracted idx file (``kind`` images or labels) of MNIST / Fashion-MNIST's split in torchvision's
    layout; None for other data sets or when it is missing (then torchvision checks, downloads and explains)."""
    if name not in ("fashion-mnist", "mnist"):
        return None
    dims = 3 if kind == "images" else 1
    path = Path(root) / _LAYOUT[name][1] / f"{'train' if train else 't10k'}-{kind}-idx{dims}-ubyte"
    return path if path.is_file() else None


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (LeCun's MNIST format, as torchvision reads it): bytes 0, 0, 0x08, ndim,
    then ndim big-endian int32 sizes, then the data. Read here because importing torchvision costs a
    process about 2 s (its ops import torch._dynamo)."""
    data = path.read_bytes()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] not in (1, 3):
        raise DataError(f"{path} is not an idx file of unsigned bytes (MNIST's format): download it again")
    ndim, offset = data[3], 4 + 4 * data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path} holds {len(data) - offset} data bytes, its header says {dims}: download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_dataset(
    name: str,
    root: str | os.PathLike,
    train: bool = True,
    download: bool = False,
    image_size: int | None = None,
    subset: int | None = None,
) -> ClientData:
    """Load a torchvision data set into memory as uint8 [N, C, H, W] images and int64 labels.

    ``train`` picks the train or test split. ``subset`` keeps the first N examples (before any
    resize, so quick runs stay quick). ``image_size`` resizes to that size (default: native; CelebA:
    centre crop 178 then resize to 64). CelebA labels are its 'Male' attribute (``CELEBA_LABEL``).
    """
    _check_name(name)
    if subset is not None and subset < 1:
        raise ValueError(f"invalid subset={subset!r}: allowed: a positive integer or None")
    root = str(root)
    if name == "celeba":
        return _load_celeba(root, train, download, image_size or SHAPES["celeba"][1], subset)
    idx = [_idx_file(name, root, train, kind) for kind in ("images", "labels")]
    if idx[0] is not None and idx[1] is not None:  # the bytes torchvision's MNIST classes read, without it
        images = torch.from_numpy(read_idx(idx[0]).copy()).unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]
        labels = torch.from_numpy(read_idx(idx[1]).astype(np.int64))
    elif name in ("fashion-mnist", "mnist"):
        import torchvision.datasets as tvd

        cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
        ds = _torchvision(name, root, download, lambda: cls(root, train=train, download=download))
        images = ds.data.unsqueeze(1)  # [N, 28, 28] -> [N, 1, 28, 28]
        labels = ds.targets.long()
    else:
        import torchvision.datasets as tvd

        ds = _torchvision(name, root, download, lambda: tvd.CIFAR10(root, train=train, download=download))
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # NHWC -> NCHW
        labels = torch.tensor(ds.targets, dtype=torch.int64)
    if subset is not None:
        # A copy, not a slice: a slice would keep the whole data set's memory alive.
        images, labels = images[:subset].clone(memory_format=torch.contiguous_format), labels[:subset].clone()
    images = images.contiguous()  # CIFAR: materialise the NCHW view
    if image_size:
        images = resize_images(images, image_size)
    return ClientData(images=images, labels=labels)


def _load_celeba(root: str, train: bool, download: bool, size: int, subset: int | None) -> ClientData:
    """CelebA through torchvision's transform pipeline: centre crop 178, resize, to uint8 tensor."""
    import torchvision.datasets as tvd
    from torchvision import transforms as T

    transform = T.Compose([T.CenterCrop(CELEBA_CROP), T.Resize(size), T.PILToTensor()])
    split = "train" if train else "test"
    ds = _torchvision(
        "celeba",
        root,
        download,
        lambda: tvd.CelebA(root, split=split, target_type="attr", transform=transform, download=download),
    )
    labels = ds.attr[:, ds.attr_names.index(CELEBA_LABEL)].long()
    n = len(ds) if subset is None else min(subset, len(ds))
    view = torch.utils.data.Subset(ds, range(n))
    # JPEG decoding dominates (162,770 images for train): decode in worker processes.
    workers = min(8, os.cpu_count() or 1) if n >= 2048 else 0
    loader = torch.utils.data.DataLoader(view, batch_size=512, num_workers=workers)
    images = torch.cat([x for x, _ in loader]) if n else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return ClientData(images=images, labels=labels[:n].clone())


def load_labels(name: str, root: str | os.PathLike, train: bool = True, download: bool = False) -> np.ndarray:
    """Only the labels of a torchvision data set (int64 numpy), without decoding its images."""
    _check_name(name)
    root = str(root)
    path = None if download else _idx_file(name, root, train, "labels")
    if path is not None:
        return read_idx(path).astype(np.int64)
    import torchvision.datasets as tvd

    if name in ("fashion-mnist", "mnist"):
        cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
        ds = _torchvision(name, root, download, lambda: cls(root, train=train, download=download))
        return ds.targets.numpy().astype(np.int64)
    if name == "cifar10":
        ds = _torchvision(name, root, download, lambda: tvd.CIFAR10(root, train=train, download=download))
        return np.asarray(ds.targets, dtype=np.int64)
    split = "train" if train else "test"
    ds = _torchvision(
        name, root, download, lambda: tvd.CelebA(root, split=split, target_type="attr", download=download)
    )
    return ds.attr[:, ds.attr_names.index(CELEBA_LABEL)].numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The clients a process hosts


def load_client_data(
    data_cfg: DataConfig, num_clients: int, client_ids: list[int], seed: int
) -> tuple[dict[int, ClientData], list[int | None]]:
    """The data of the hosted clients ``client_ids``, and the sizes of all ``num_clients`` clients.

    Simulation (``data_cfg.client_data`` unset): loads the training set (its first ``subset``
    examples), splits it with ``fedrun.partition.partition(kind=data_cfg.partition, beta, seed,
    min_per_client)`` and keeps the hosted clients; every size is known, since every process computes
    the same split.

    Real deployment (``client_data`` set, e.g. ``/data/client{client}``): each hosted client reads its
    own folder with ``load_image_folder``, converted to ``dataset_shape(data_cfg.dataset,
    data_cfg.image_size)`` so that all clients feed the same model. Sizes of clients hosted elsewhere
    are not known here and are ``None``: the runtime gathers them across ranks (FedAvg weights).
    """
    ids = list(client_ids)
    bad = [c for c in ids if not (isinstance(c, (int, np.integer)) and 0 <= c < num_clients)]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(f"invalid client_ids={ids}: allowed: distinct integers in 0..{num_clients - 1}")
    ids = [int(c) for c in ids]

    if data_cfg.client_data:
        channels, size = dataset_shape(data_cfg.dataset, data_cfg.image_size)
        data = {}
        for c in ids:
            # str.replace, not str.format: a path may contain other braces.
            folder = data_cfg.client_data.replace("{client}", str(c))
            data[c] = load_image_folder(folder, image_size=size, channels=channels)
        sizes: list[int | None] = [len(data[c]) if c in data else None for c in range(num_clients)]
        return data, sizes

    full = load_dataset(
        data_cfg.dataset,
        data_cfg.root,
        train=True,
        download=data_cfg.download,
        image_size=data_cfg.image_size,
        subset=data_cfg.subset,
    )
    try:
        parts = partition(
            full.labels.numpy(),
            num_clients,
            data_cfg.partition,
            beta=data_cfg.beta,
            seed=seed,
            min_per_client=data_cfg.min_per_client,
        )
    except PartitionError as e:  # the config's names for what partition() calls its arguments
        given = [f"data.partition={data_cfg.partition}"]
        if data_cfg.partition != "iid":
            given += [f"data.beta={data_cfg.beta}", f"data.min_per_client={data_cfg.min_per_client}"]
        given += [f"data.subset={data_cfg.subset}"] if data_cfg.subset else []
        raise DataError(
            f"cannot split {len(full)} {data_cfg.dataset} training examples over federation.clients="
            f"{num_clients} ({', '.join(given)}): {e}"
        ) from None
    data = {}
    for c in ids:
        idx = torch.from_numpy(parts[c])
        data[c] = ClientData(images=full.images[idx], labels=full.labels[idx])
    return data, [len(p) for p in parts]
