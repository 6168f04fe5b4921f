"""FID: statistics of features, their files, the Fréchet distance, and the FID of images.

The numbers equal pytorch-fid's own pipeline (``python -m pytorch_fid DIR1 DIR2``) on the same images: the
same features (``evaluation.inception``), the same statistics (``np.mean``, ``np.cov(rowvar=False)`` in
float64) and the same ``.npz`` format (``mu``, ``sigma``), so either tool reads the other's statistics
files. What differs: images are scored in memory (no PNG round trip), and the Fréchet distance does not
depend on ``scipy.linalg.sqrtm(..., disp=False)``, which SciPy >= 1.18 removed.

Pitfall, measured: FID is biased upwards at small sample counts. 1,000 *real* Fashion-MNIST training
images score about 15.5 against the 10,000 test images, so with the paper's 1,000 samples nothing can
score below that floor, and numbers are only comparable under the same protocol (number of samples,
reference, sampler, weights). ``fedrun eval`` records that protocol in ``fid.json``.

A statistics file may also hold the Inception ``features`` (float32 [N, 2048]) they were computed from: KID
(``evaluation.kid``) needs the features themselves, not only their mean and covariance. fedrun writes them
(``fedrun fid --save-stats`` and its reference cache); pytorch-fid ignores the extra key. A file of ``mu`` and
``sigma`` only (pytorch-fid's own) still gives FID, and ``Reference.no_kid`` says why there is no KID.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evaluation.errors import SourceError
from evaluation.inception import inception_features

Stats = tuple[np.ndarray, np.ndarray]
"""(mu [D], sigma [D, D]) of a set of images' features."""


FEATURES_KEY = "features"
"""The statistics file's key for the Inception features behind mu and sigma (fedrun's addition)."""


def statistics(features: np.ndarray) -> Stats:
    """(mu [D], sigma [D, D]) exactly as pytorch-fid computes them."""
    if features.shape[0] < 2:
        raise SourceError(f"FID needs at least 2 images, got {features.shape[0]}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


@dataclass(frozen=True, eq=False)
class Reference:
    """What samples are scored against: the FID statistics, and the features KID needs where they are known."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    """float32 [N, 2048] Inception features (exact: the network computes in float32), or None."""
    n: int = 0
    """Images behind the statistics; 0 when unknown (a pytorch-fid statistics file)."""
    no_kid: str = ""
    """Why there is no KID against this reference (no features), else ''."""

    @property
    def stats(self) -> Stats:
        return self.mu, self.sigma

    @classmethod
    def of_features(cls, features: np.ndarray) -> Reference:
        """Statistics (computed in float64, as pytorch-fid does) and the features themselves."""
        mu, sigma = statistics(features)
        return cls(mu, sigma, np.asarray(features, np.float32), features.shape[0])


def save_stats(
    path: str | os.PathLike[str],
    mu: np.ndarray,
    sigma: np.ndarray,
    n: int | None = None,
    features: np.ndarray | None = None,
) -> Path:
    """Write pytorch-fid's statistics format (``mu``, ``sigma``; plus ``n`` and the ``features`` behind them,
    which it ignores)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if n is None else {"n": np.asarray(n, dtype=np.int64)}
    if features is not None:
        extra[FEATURES_KEY] = np.asarray(features, np.float32)
    # Written then renamed: a reader never sees half a file. np.savez appends .npz to a name without it,
    # which rules out fedrun.rundir.atomic_write_bytes' temporary name.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, mu=mu, sigma=sigma, **extra)
    os.replace(tmp, path)
    return path


def save_reference(path: str | os.PathLike[str], ref: Reference) -> Path:
    """``save_stats`` of a Reference, its features included when it has them."""
    return save_stats(path, ref.mu, ref.sigma, ref.n or None, ref.features)


def load_stats(path: str | os.PathLike[str]) -> Stats:
    """(mu, sigma) from a statistics ``.npz`` (this project's or pytorch-fid's ``--save-stats``); the features
    of a large reference (80 MB for 10,000 images) are not read."""
    with np.load(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise SourceError(f"{path}: not a statistics file (needs keys mu and sigma, has {f.files})")
        return f["mu"][:], f["sigma"][:]


def load_reference(path: str | os.PathLike[str], no_features: str = "") -> Reference:
    """A statistics ``.npz`` with its features when it holds them. ``no_features``: what to do about a file
    without them (the message of ``Reference.no_kid``)."""
    mu, sigma = load_stats(path)
    with np.load(path) as f:
        feats = f[FEATURES_KEY][:] if FEATURES_KEY in f.files else None
        n = int(f["n"]) if "n" in f.files else 0
    if feats is None:
        why = no_features or (
            "KID needs the reference's Inception features: pass the images themselves, or a "
            "statistics file from `fedrun fid --save-stats`, which stores them"
        )
        return Reference(mu, sigma, n=n, no_kid=f"no KID: {path} holds only mu and sigma; {why}")
    if feats.ndim != 2 or feats.shape[1] != mu.shape[0]:
        raise SourceError(f"{path}: {FEATURES_KEY} must be N x {mu.shape[0]}, got {feats.shape}")
    return Reference(mu, sigma, feats, n or feats.shape[0])


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
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    trace_sqrt = {"eigh": _trace_sqrt_product, "sqrtm": _trace_sqrt_product_sqrtm}[method]
    tr = trace_sqrt(sigma1, sigma2)
    if not np.isfinite(tr):
        offset = np.eye(sigma1.shape[0]) * eps
        tr = trace_sqrt(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)


def fid_of_images(
    images: Tensor,
    ref: Stats | Reference,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> float:
    """FID of uint8 images [N, C, H, W] against reference statistics ((mu, sigma) or a Reference)."""
    feats = inception_features(
        images, batch_size=batch_size, device=device, weights=weights, progress=progress, desc="inception (samples)"
    )
    mu, sigma = statistics(feats)
    return frechet_distance(mu, sigma, *(ref.stats if isinstance(ref, Reference) else ref))
