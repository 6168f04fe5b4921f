"""FID: Inception features, statistics, Fréchet distance, image sources.

The numbers equal pytorch-fid's own pipeline (``python -m pytorch_fid DIR1 DIR2``) on the same images:
the same network (pytorch-fid's ``InceptionV3``, 2048-d pool3 features, its own bilinear resize to
299x299), the same input (uint8 images / 255, grey repeated to three channels exactly as PIL's
``convert('RGB')`` does), the same statistics (``np.mean``, ``np.cov(rowvar=False)`` in float64) and
the same ``.npz`` format (``mu``, ``sigma``), so either tool reads the other's statistics files.
What differs: images are scored in memory (no PNG round trip), the weights are never downloaded
(``WeightsNotFoundError`` says where to put them), and the Fréchet distance does not depend on
``scipy.linalg.sqrtm(..., disp=False)``, which SciPy >= 1.18 removed.

Pitfall, measured: FID is biased upwards at small sample counts. 1,000 *real* Fashion-MNIST training
images score about 15.5 against the 10,000 test images, so with the paper's 1,000 samples nothing can
score below that floor, and numbers are only comparable under the same protocol (number of samples,
reference, sampler, weights). ``fedrun eval`` records that protocol in ``fid.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
"""The file pytorch-fid downloads on first use (its FID Inception weights)."""
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
FEATURE_DIM = 2048
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
"""What pytorch-fid reads from an image folder (lower-case extensions, not recursive)."""
DATASET_SPLITS = ("train", "test")


class WeightsNotFoundError(FileNotFoundError):
    """The Inception weights are not on disk; the message says which file to put where."""


class EvalError(ValueError):
    """Evaluation cannot run as asked (bad run dir, source, option); the message is one line."""


class SourceError(EvalError):
    """An image source (folder, .npz, dataset split) cannot be used; the message says why."""


# ---------------------------------------------------------------------------------------------
# The network.


def default_weights_path() -> Path:
    """Where pytorch-fid's downloader caches the weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def find_inception_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to load: ``path`` if given, else the torch hub cache.

    Checked before pytorch-fid is asked to build anything, so a machine without internet gets an
    error at once instead of a hanging download.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(
                f"--inception-weights {str(p)!r} does not exist; it should be pytorch-fid's "
                f"{WEIGHTS_FILENAME} (from {WEIGHTS_URL})"
            )
        return p
    p = default_weights_path()
    if not p.is_file():
        raise WeightsNotFoundError(
            f"FID Inception weights not found: put {WEIGHTS_FILENAME} (download it from {WEIGHTS_URL}) "
            f"into {p.parent}/ (that is $TORCH_HOME/hub/checkpoints/), or pass --inception-weights PATH"
        )
    return p


_MODELS: dict[tuple[str, str], nn.Module] = {}


def load_inception(weights: str | os.PathLike[str] | None = None,
                   device: str | torch.device = "cpu") -> nn.Module:
    """pytorch-fid's ``InceptionV3`` (pool3, 2048-d) in eval mode, loaded from a local file only.

    Cached per (weights file, device), so repeated scoring in one process builds it once.
    """
    path = find_inception_weights(weights)
    key = (str(path.resolve()), str(device))
    if key not in _MODELS:
        from pytorch_fid import inception as pf_inception

        def load_local(*_args: object, **_kwargs: object) -> dict[str, Tensor]:
            return torch.load(path, map_location="cpu", weights_only=True)

        # InceptionV3() calls fid_inception_v3(), which calls the module-level
        # load_state_dict_from_url(URL). Pointing that name at the local file is the one way to build
        # pytorch-fid's exact network without any chance of a download.
        original = pf_inception.load_state_dict_from_url
        pf_inception.load_state_dict_from_url = load_local
        try:
            model = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]])
        finally:
            pf_inception.load_state_dict_from_url = original
        _MODELS[key] = model.eval().to(device)
    return _MODELS[key]


# ---------------------------------------------------------------------------------------------
# Images -> features -> statistics.


def to_inception_input(images: Tensor) -> Tensor:
    """[N, C, H, W] uint8 (or float in [0, 1]) with C in {1, 3} -> float32 [N, 3, H, W] in [0, 1].

    Grey is repeated to three channels, which is what PIL's ``convert('RGB')`` does in pytorch-fid.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise SourceError(f"expected images of shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "img"):
    """A tqdm bar on stderr when ``progress`` is True, or None and stderr is a terminal; else a no-op."""
    if progress is None:
        progress = sys.stderr.isatty()
    if progress and total > 0:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return contextlib.nullcontext(_NoBar())


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@torch.no_grad()
def inception_features(
    batches: Tensor | Iterable[Tensor],
    *,
    total: int | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    desc: str = "inception",
) -> np.ndarray:
    """Pool3 features, float64 [N, 2048], of a tensor [N, C, H, W] or an iterable of such batches.

    Inputs are uint8 or floats in [0, 1] (see ``to_inception_input``); a tensor is cut into
    ``batch_size`` chunks, an iterable is fed as it comes.
    """
    model = load_inception(weights, device)
    if isinstance(batches, Tensor):
        total = batches.shape[0]
        batches = batches.split(batch_size)
    feats: list[np.ndarray] = []
    with progress_bar(total or 0, desc, progress) as bar:
        for batch in batches:
            x = to_inception_input(batch).to(device)  # [B, 3, H, W]; the model resizes to 299 itself
            f = model(x)[0]  # [B, 2048, 1, 1]
            feats.append(f.flatten(1).double().cpu().numpy())
            bar.update(batch.shape[0])
    if not feats:
        raise SourceError("no images to compute features of")
    return np.concatenate(feats)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) exactly as pytorch-fid computes them."""
    if features.shape[0] < 2:
        raise SourceError(f"FID needs at least 2 images, got {features.shape[0]}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def save_stats(path: str | os.PathLike[str], mu: np.ndarray, sigma: np.ndarray, n: int | None = None) -> Path:
    """Write pytorch-fid's statistics format (``mu``, ``sigma``; plus ``n``, which it ignores)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if n is None else {"n": np.asarray(n, dtype=np.int64)}
    tmp = path.with_name(path.name + ".tmp.npz")  # written then renamed: a reader never sees half a file
    np.savez_compressed(tmp, mu=mu, sigma=sigma, **extra)
    os.replace(tmp, path)
    return path


def load_stats(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a statistics ``.npz`` (this project's or pytorch-fid's ``--save-stats``)."""
    with np.load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise SourceError(f"{path}: not a statistics file (needs keys mu and sigma, has {f.files})")
        return f["mu"][:], f["sigma"][:]


# ---------------------------------------------------------------------------------------------
# Fréchet distance.


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for symmetric PSD matrices, by symmetric eigen-decompositions.

    sigma1 @ sigma2 is similar to A = sqrt(sigma1) @ sigma2 @ sqrt(sigma1) (or to L^T sigma1 L with
    sigma2 = L L^T), and A is symmetric PSD, so the eigenvalues of the product are real and >= 0 and
    tr(sqrtm(sigma1 sigma2)) = sum_i sqrt(lambda_i(A)). Eigenvalues at rounding level (some negative)
    count as 0. Unlike a general matrix square root this needs no SciPy-version-specific
    flag and stays real for singular covariances (fewer images than feature dimensions).
    """
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    # Fast path: when one matrix is positive definite (a reference of 10,000 images is), factor it as
    # L L^T; sigma_a L L^T is similar to L^T sigma_a L, so one eigvalsh (no vectors) does. Cholesky is
    # backward stable, so a nearly singular factor costs no accuracy in these eigenvalues.
    for a, b in ((sigma1, sigma2), (sigma2, sigma1)):
        try:
            chol = np.linalg.cholesky(b)
        except np.linalg.LinAlgError:
            continue
        m = chol.T @ a @ chol
        return _sum_sqrt(np.linalg.eigvalsh((m + m.T) / 2))
    # Both singular (fewer images than dimensions on both sides): the symmetric square root of sigma1.
    w, v = np.linalg.eigh(sigma1)
    sqrt1 = (v * np.sqrt(_numerical_zeros_to_zero(w))) @ v.T
    m = sqrt1 @ sigma2 @ sqrt1
    return _sum_sqrt(np.linalg.eigvalsh((m + m.T) / 2))


def _sum_sqrt(eigenvalues: np.ndarray) -> float:
    return float(np.sqrt(_numerical_zeros_to_zero(eigenvalues)).sum())


def _numerical_zeros_to_zero(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix below rounding level (max |w| * n * eps, numpy's matrix_rank
    tolerance) set to 0. A sample covariance of N < D images has D - N + 1 zero eigenvalues that
    rounding leaves at +-1e-16 relative; their square roots (1e-8 each, thousands of them) would
    otherwise add up to a visible error, e.g. a non-zero FID of identical statistics."""
    tol = np.abs(w).max(initial=0.0) * w.size * np.finfo(w.dtype).eps
    return np.where(w > tol, w, 0.0)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """The same through scipy.linalg.sqrtm (pytorch-fid's algorithm), without the removed ``disp``."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if isinstance(covmean, tuple):  # very old SciPy returned (sqrtm, errest) in some modes
        covmean = covmean[0]
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "eigh",
) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) (Dowson & Landau 1982).

    ``method='eigh'`` (default) uses symmetric eigen-decompositions (see ``_trace_sqrt_product``);
    ``'sqrtm'`` uses ``scipy.linalg.sqrtm`` like pytorch-fid. As in pytorch-fid, a non-finite result
    is retried with ``eps`` added to both diagonals.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    trace_sqrt = {"eigh": _trace_sqrt_product, "sqrtm": _trace_sqrt_product_sqrtm}[method]
    tr = trace_sqrt(sigma1, sigma2)
    if not np.isfinite(tr):
        offset = np.eye(sigma1.shape[0]) * eps
        tr = trace_sqrt(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)


# ---------------------------------------------------------------------------------------------
# Image sources: an image folder, an .npz of uint8 images (key x), a dataset split, a stats .npz.


@dataclass
class Source:
    """Where images (or ready statistics) come from; ``kind`` in folder, images, dataset, stats."""

    kind: str
    spec: str
    path: Path | None = None
    dataset: str | None = None
    split: str | None = None

    def describe(self) -> str:
        return f"{self.dataset}:{self.split}" if self.kind == "dataset" else str(self.path)


def known_datasets() -> tuple[str, ...]:
    from fedrun.config import DATASETS

    return tuple(d for d in DATASETS if d != "imagefolder")


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
        raise SourceError(f"{spec!r}: an .npz needs keys mu and sigma (statistics) or x (uint8 images "
                          f"N x C x H x W); it has {sorted(keys)}")
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
        for f in files[i:i + batch_size]:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8, as pytorch-fid reads it
            imgs.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
        if len({t.shape for t in imgs}) > 1:
            raise SourceError(f"images of different sizes in {files[0].parent}; "
                              "resize them to one size first")
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


def load_dataset_images(name: str, split: str, data_root: str | os.PathLike[str], limit: int | None = None,
                        image_size: int | None = None, download: bool = False) -> Tensor:
    """uint8 [N, C, H, W] of a dataset split through fedrun.data (raises its DataNotFoundError)."""
    from fedrun.data import load_dataset

    data = load_dataset(name, str(data_root), train=(split == "train"), download=download,
                        image_size=image_size)
    x = data.images
    x = torch.as_tensor(x[:limit] if limit else x)
    if x.dtype != torch.uint8:
        raise SourceError(f"{name}:{split}: expected uint8 images from fedrun.data, got {x.dtype}")
    return x


def source_statistics(
    source: Source | str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, number of images; 0 for a statistics file) of any source."""
    src = parse_source(source) if isinstance(source, str) else source
    kw = dict(batch_size=batch_size, device=device, weights=weights, progress=progress, desc=src.describe())
    if src.kind == "stats":
        mu, sigma = load_stats(src.path)
        return mu, sigma, 0
    if src.kind == "folder":
        files = folder_files(src.path)[:limit] if limit else folder_files(src.path)
        feats = inception_features(_folder_batches(files, batch_size), total=len(files), **kw)
    elif src.kind == "images":
        feats = inception_features(load_images_npz(src.path, limit), **kw)
    else:
        if data_root is None:
            from fedrun.config import default_data_root

            data_root = default_data_root()
        x = load_dataset_images(src.dataset, src.split, data_root, limit, image_size)
        feats = inception_features(x, **kw)
    mu, sigma = statistics(feats)
    return mu, sigma, feats.shape[0]


def reference_cache_path(source: Source, cache_dir: str | os.PathLike[str], limit: int | None = None,
                         image_size: int | None = None) -> Path:
    """Cache file for a reference's statistics: named after a dataset split, or keyed by a folder's
    (path, file names, sizes, mtimes) so a changed folder is never served stale statistics."""
    suffix = (f"_n{limit}" if limit else "") + (f"_s{image_size}" if image_size else "")
    if source.kind == "dataset":
        return Path(cache_dir) / f"{source.dataset}_{source.split}{suffix}.npz"
    h = hashlib.sha1(str(source.path.resolve()).encode())
    if source.kind == "folder":
        for f in folder_files(source.path):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        st = source.path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(cache_dir) / f"{source.path.stem}_{h.hexdigest()[:12]}{suffix}.npz"


def reference_statistics(
    ref: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    cache_dirs: Iterable[str | os.PathLike[str]] = (),
    limit: int | None = None,
    image_size: int | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference: a statistics .npz as is; anything else computed once and cached.

    The cache goes to the first writable folder of ``cache_dirs`` (e.g. ``<data root>/fid_stats``,
    then ``<run dir>/eval``); a cached file found in any of them is reused.
    """
    src = parse_source(ref)
    if src.kind == "stats":
        return load_stats(src.path)
    dirs = [Path(d) for d in cache_dirs]
    for d in dirs:
        cached = reference_cache_path(src, d, limit, image_size)
        if cached.is_file():
            return load_stats(cached)
    mu, sigma, n = source_statistics(src, data_root=data_root, limit=limit, image_size=image_size,
                                     batch_size=batch_size, device=device, weights=weights, progress=progress)
    for d in dirs:
        with contextlib.suppress(OSError):
            save_stats(reference_cache_path(src, d, limit, image_size), mu, sigma, n)
            break
    return mu, sigma


def fid_of_images(images: Tensor, ref_stats: tuple[np.ndarray, np.ndarray], *, batch_size: int = 50,
                  device: str | torch.device = "cpu", weights: str | os.PathLike[str] | None = None,
                  progress: bool | None = None) -> float:
    """FID of uint8 images [N, C, H, W] against reference statistics (mu, sigma)."""
    feats = inception_features(images, batch_size=batch_size, device=device, weights=weights,
                               progress=progress, desc="inception (samples)")
    mu, sigma = statistics(feats)
    return frechet_distance(mu, sigma, *ref_stats)
