"""Image sources of FID and KID: an image folder, an .npz of uint8 images (key ``x``), a dataset split, or a
statistics .npz (``mu``, ``sigma``, and the ``features`` when fedrun wrote it) that stands for its images; and
the statistics and features of any of them (a ``Reference``).

Sources are only read: nothing here writes next to them (caches live in ``evaluation.reference``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evaluation.errors import SourceError
from evaluation.fid import Reference, load_reference
from evaluation.inception import inception_features
from evaluation.protocol import DATASET_SPLITS, known_datasets
from fedrun.config import default_data_root
from fedrun.output import Sink, format_duration

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
"""What pytorch-fid reads from an image folder (lower-case extensions, not recursive)."""
SOURCE_KINDS = ("folder", "images", "dataset", "stats")

# Inception throughput, measured roughly (pool3 at 299x299): a few images a second on a CPU, hundreds on a
# GPU. Only used to warn before a step that takes minutes.
_IMAGES_PER_S = {"cpu": 5.0, "cuda": 500.0}
SLOW_STEP_S = 60.0
FASTER_PATH = (
    "a statistics .npz of the same images skips this: make it once with `fedrun fid --save-stats "
    "SRC STATS.npz` (faster with --device cuda), then pass STATS.npz in place of SRC or as "
    "`fedrun eval --ref STATS.npz`"
)


@dataclass
class Source:
    """Where images (or ready statistics) come from; ``kind`` is one of ``SOURCE_KINDS``."""

    kind: str
    spec: str
    path: Path | None = None
    dataset: str | None = None
    split: str | None = None

    def describe(self) -> str:
        return f"{self.dataset}:{self.split}" if self.kind == "dataset" else str(self.path)


def parse_source(spec: str) -> Source:
    """Classify ``spec``: an existing folder or .npz, or ``dataset:split`` (e.g. fashion-mnist:test)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return Source("folder", spec, path=p)
    if p.is_file():
        if p.suffix != ".npz":
            raise SourceError(f"{spec!r}: a file source must be an .npz (statistics mu/sigma or images x)")
        with np.load(p) as f:
            keys = set(f.files)
        if {"mu", "sigma"} <= keys:
            return Source("stats", spec, path=p)
        if "x" in keys:
            return Source("images", spec, path=p)
        raise SourceError(
            f"{spec!r}: an .npz needs keys mu and sigma (statistics) or x (uint8 images "
            f"N x C x H x W); it has {sorted(keys)}"
        )
    name, sep, split = spec.partition(":")
    if sep and name in known_datasets():
        if split not in DATASET_SPLITS:
            raise SourceError(f"{spec!r}: split must be one of {', '.join(DATASET_SPLITS)}")
        return Source("dataset", spec, dataset=name, split=split)
    raise SourceError(
        f"{spec!r} is not an image folder, an .npz file or a dataset split "
        f"({', '.join(d + ':test' for d in known_datasets())}, or :train)"
    )


def folder_files(path: Path) -> list[Path]:
    """The files pytorch-fid would read from ``path``, in its order."""
    files = sorted(f for ext in IMAGE_EXTENSIONS for f in path.glob(f"*.{ext}"))
    if not files:
        raise SourceError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[Tensor]:
    from PIL import Image

    for i in range(0, len(files), batch_size):
        imgs = []
        for f in files[i : i + batch_size]:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8, as pytorch-fid reads it
            imgs.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
        if len({t.shape for t in imgs}) > 1:
            raise SourceError(f"images of different sizes in {files[0].parent}; resize them to one size first")
        yield torch.stack(imgs)


def load_images_npz(path: str | os.PathLike[str], limit: int | None = None) -> Tensor:
    """uint8 [N, C, H, W] from an .npz with key ``x`` (what ``evaluation.sample`` writes)."""
    with np.load(path) as f:
        if "x" not in f.files:
            raise SourceError(f"{path}: no key 'x' (uint8 images N x C x H x W)")
        x = f["x"][:limit] if limit else f["x"][:]
    if x.dtype != np.uint8 or x.ndim != 4:
        raise SourceError(f"{path}: 'x' must be uint8 N x C x H x W, got {x.dtype} {x.shape}")
    return torch.from_numpy(x)


def load_dataset_images(
    name: str,
    split: str,
    data_root: str | os.PathLike[str],
    limit: int | None = None,
    image_size: int | None = None,
    download: bool = False,
) -> Tensor:
    """uint8 [N, C, H, W] of a dataset split through fedrun.data (raises its DataNotFoundError)."""
    from fedrun.data import load_dataset  # torchvision: only when a dataset split is asked for

    data = load_dataset(name, str(data_root), train=(split == "train"), download=download, image_size=image_size)
    x = data.images
    x = torch.as_tensor(x[:limit] if limit else x)
    if x.dtype != torch.uint8:
        raise SourceError(f"{name}:{split}: expected uint8 images from fedrun.data, got {x.dtype}")
    return x


def note_if_slow(n: int, device: str | torch.device, what: str, sink: Sink, faster: str = FASTER_PATH) -> None:
    """One line before Inception features of ``n`` images that take minutes, naming the faster path."""
    kind = torch.device(device).type
    rate = _IMAGES_PER_S.get(kind, _IMAGES_PER_S["cuda"])
    if n / rate >= SLOW_STEP_S:
        sink.info(
            f"Inception features of {n} images of {what} on {kind}: about {format_duration(n / rate)} "
            f"at ~{rate:.0f} img/s; {faster}"
        )


def source_statistics(
    source: Source | str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights: str | os.PathLike[str] | None = None,
    progress: bool = True,
    sink: Sink | None = None,
) -> Reference:
    """The statistics of any source: mu, sigma, the number of images (0 for a pytorch-fid statistics file) and
    the Inception features KID needs (None for a statistics file without them).

    ``sink`` hears one line before a step that takes minutes (``note_if_slow``); None: say nothing.
    """
    src = parse_source(source) if isinstance(source, str) else source
    if src.kind == "stats":
        return load_reference(src.path)
    if src.kind == "folder":
        files = folder_files(src.path)[:limit] if limit else folder_files(src.path)
        images, n = _folder_batches(files, batch_size), len(files)
    elif src.kind == "images":
        images = load_images_npz(src.path, limit)
        n = images.shape[0]
    else:
        images = load_dataset_images(src.dataset, src.split, data_root or default_data_root(), limit, image_size)
        n = images.shape[0]
    note_if_slow(n, device, src.describe(), sink or Sink())
    feats = inception_features(
        images, total=n, batch_size=batch_size, device=device, weights=weights, progress=progress, desc=src.describe()
    )
    return Reference.of_features(feats)
