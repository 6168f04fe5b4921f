"""Images in memory as uint8 tensors (``ClientData``), a client's private image folder, and sample grids.

Everything is held as one ``uint8`` tensor ``[N, C, H, W]`` plus ``int64`` labels ``[N]``: a client's
data is small enough for the training loop to keep on the GPU and shuffle there, and uint8 is 4x
smaller than float; the training step maps a batch to the model's [-1, 1] when it uses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedrun.config import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataNotFoundError(FileNotFoundError):
    """Data is missing; the message is one line: what to download, and where to put it."""


class DataError(ConfigError):
    """The data a config points to cannot be used (a corrupt image, fewer examples than clients); one line
    naming the file or the numbers. A ConfigError: the CLI prints it as one line and exits 2."""


@dataclass
class ClientData:
    """One client's (or one data set's) examples, all in memory."""

    images: torch.Tensor
    """uint8 [N, C, H, W], values 0..255."""
    labels: torch.Tensor
    """int64 [N]; 0 for unlabelled images."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"invalid images: dtype {self.images.dtype}, shape {tuple(self.images.shape)}: "
                "allowed: uint8 [N, C, H, W]"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"invalid labels: dtype {self.labels.dtype}, shape {tuple(self.labels.shape)}: "
                f"allowed: int64 [{self.images.shape[0]}]"
            )

    def __len__(self) -> int:
        return self.images.shape[0]


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to [N, C, size, size] (bilinear, antialiased), in chunks to bound memory."""
    from torchvision.transforms.v2 import functional as F

    if images.shape[-2:] == (size, size):
        return images
    out = [F.resize(images[i : i + chunk], [size, size], antialias=True) for i in range(0, len(images), chunk)]
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def _open_image(path: Path):
    """The decoded image at ``path``; a file PIL cannot decode is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im
    except UnidentifiedImageError:
        why = "not an image format PIL can read"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # truncated, broken, huge
        why = " ".join(str(e).split()) or type(e).__name__
    raise DataError(f"cannot read image {path} ({why}): replace or remove it")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(
    path: str | os.PathLike, image_size: int | None = None, channels: int | None = None
) -> ClientData:
    """Load every image of a folder into memory.

    Layout: torchvision's ImageFolder (one subfolder per class; labels = sorted subfolder index) when
    any subfolder holds images, else a flat folder of images (all label 0). ``channels`` 1 converts
    to grey, 3 to RGB; None picks 1 if every image is grey, else 3. ``image_size`` resizes the shorter
    side and centre-crops to a square; None requires every image to have the same size.
    """
    from torchvision.transforms import functional as TF

    folder = Path(path)
    if channels not in (None, 1, 3):
        raise ValueError(f"invalid channels={channels!r}: allowed: 1, 3 or None")
    if not folder.is_dir():
        raise DataNotFoundError(
            f"image folder {folder} not found: put the client's images there "
            f"({', '.join(IMAGE_EXTENSIONS)}), flat or in class subfolders"
        )
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and _image_files(d))
    if class_dirs:
        files = [(f, c) for c, d in enumerate(class_dirs) for f in _image_files(d)]
    else:
        files = [(f, 0) for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataNotFoundError(
            f"no images found in {folder}: put the client's images there "
            f"({', '.join(IMAGE_EXTENSIONS)}), flat or in class subfolders"
        )

    pil = [_open_image(f) for f, _ in files]
    if channels is None:
        grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in pil)
        channels = 1 if grey else 3
    mode = "L" if channels == 1 else "RGB"

    tensors = []
    for (f, _), im in zip(files, pil, strict=True):
        im = im.convert(mode)
        if image_size is not None:
            im = TF.center_crop(TF.resize(im, image_size), [image_size, image_size])
        t = TF.pil_to_tensor(im)  # uint8 [C, H, W]
        if tensors and t.shape != tensors[0].shape:
            raise ValueError(
                f"images in {folder} differ in size ({files[0][0].name}: {tuple(tensors[0].shape[1:])}, "
                f"{f.name}: {tuple(t.shape[1:])}): set an image_size (data.image_size) to resize them"
            )
        tensors.append(t)
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    return ClientData(images=torch.stack(tensors), labels=labels)


# -- sample grids ------------------------------------------------------------------------------------


def image_grid(x: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """Images [N, C, H, W] (C = 1 is repeated to 3) side by side, ``nrow`` to a row, ``padding`` pixels of
    ``pad_value`` around each: torchvision's ``make_grid``, bit for bit, without importing torchvision
    (about 2 s a process). A single image is returned as it is."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid takes images [N, 1 or 3, H, W], got shape {tuple(x.shape)}")
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    cols = min(nrow, n)
    rows = -(-n // cols)
    h, w = x.shape[2] + padding, x.shape[3] + padding
    grid = x.new_full((3, h * rows + padding, w * cols + padding), pad_value)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[:, r * h + padding : (r + 1) * h, c * w + padding : (c + 1) * w] = x[k]
    return grid


def save_png(grid: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """A [3, H, W] grid of values in [0, 1] as an 8-bit PNG, rounded as torchvision's ``save_image`` does."""
    from PIL import Image

    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
