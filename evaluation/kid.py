"""KID: the kernel Inception distance of Binkowski et al. 2018 ("Demystifying MMD GANs", eq. 3 and section 4).

KID is the squared maximum mean discrepancy between two sets of Inception features under the cubic polynomial
kernel k(x, y) = (x . y / d + 1)^3 (d = 2048, the pool3 features that FID uses too), estimated without bias:

    MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
            - 2 sum_{i, j} k(x_i, y_j) / (m n)

As in torch-fidelity and clean-fid it is averaged over ``KID_SUBSETS`` random subsets (drawn without replacement,
with a fixed seed, so a number is reproducible) of ``min(N_fake, N_real, KID_SUBSET_SIZE)`` vectors of each set,
and reported as the mean +- the population std over the subsets. Unlike FID its expectation does not depend on
the number of samples, so a few hundred samples give a number comparable with 10,000 (only noisier); it can be
slightly negative when the two sets come from the same distribution.

Pure numpy in float64: the sums cancel to a small difference of numbers near 1, which float32 would not keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KID_SUBSETS = 100
"""Number of subsets (torch-fidelity's and clean-fid's default)."""
KID_SUBSET_SIZE = 1000
"""Largest subset (torch-fidelity's and clean-fid's default); smaller sets use all of their vectors."""
KID_SEED = 2020
"""Seed of the subset draws (torch-fidelity's default rng_seed)."""
KID_DEGREE = 3
KID_KERNEL = "(x.y/d + 1)^3"
"""The kernel in words, for fid.json's protocol."""


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x_i, y_j) = (x_i . y_j / d + 1)^3 for x [m, d], y [n, d] -> [m, n] (float64)."""
    d = x.shape[1]
    return (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T / d + 1.0) ** KID_DEGREE


def _within(x: np.ndarray) -> float:
    """sum_{i != j} k(x_i, x_j)."""
    k = polynomial_kernel(x, x)
    return float(k.sum() - np.trace(k))


def _cross_sums(x: np.ndarray, y: np.ndarray, axis: int, chunk: int = 2048) -> np.ndarray:
    """k(x, y).sum(axis) without holding all of k(x, y) at once (1,000 x 10,000 would be 80 MB)."""
    if axis == 1:
        return _cross_sums(y, x, 0, chunk)
    return np.concatenate([polynomial_kernel(x, y[i : i + chunk]).sum(axis=0) for i in range(0, y.shape[0], chunk)])


def _mmd2(within_x: float, within_y: float, cross: float, m: int, n: int) -> float:
    return within_x / (m * (m - 1)) + within_y / (n * (n - 1)) - 2.0 * cross / (m * n)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of MMD^2 between feature sets x [m, d] and y [n, d] (module docstring)."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 vectors in each set, got {m} and {n}")
    return _mmd2(_within(x), _within(y), float(polynomial_kernel(x, y).sum()), m, n)


@dataclass(frozen=True)
class Kid:
    """KID of one set of samples against a reference."""

    mean: float
    std: float
    """Population std over the subsets (0 when every subset is the whole of both sets)."""
    subsets: int
    subset_size: int


def kid(
    fake: np.ndarray,
    real: np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> Kid:
    """KID of features ``fake`` [N_f, d] against ``real`` [N_r, d]: mean +- std of ``mmd2_unbiased`` over
    ``subsets`` pairs of random subsets of ``min(N_f, N_r, subset_size)`` vectors each."""
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"mismatched features: {fake.shape} vs {real.shape}")
    m = min(fake.shape[0], real.shape[0], subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 vectors in each set, got {fake.shape[0]} and {real.shape[0]}")
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    # A subset that is a whole set is that set in another order, and MMD^2 does not depend on the order: its
    # sums are computed once (1,000 samples against 10,000 test images: 1 + 10 + 100 kernel blocks, not 300).
    whole_f, whole_r = m == fake.shape[0], m == real.shape[0]
    within_f = _within(fake) if whole_f else None
    within_r = _within(real) if whole_r else None
    by_real = _cross_sums(fake, real, axis=0) if whole_f else None  # [N_r]: summed over all the fake set
    by_fake = _cross_sums(fake, real, axis=1) if whole_r and not whole_f else None  # [N_f]
    # One RandomState draws the fake then the real indices of each subset in turn, as torch-fidelity does.
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        fi = rng.choice(fake.shape[0], m, replace=False)
        ri = rng.choice(real.shape[0], m, replace=False)
        if by_real is not None:
            cross = float(by_real[ri].sum())
        elif by_fake is not None:
            cross = float(by_fake[fi].sum())
        else:
            cross = float(polynomial_kernel(fake[fi], real[ri]).sum())
        values[s] = _mmd2(
            within_f if whole_f else _within(fake[fi]), within_r if whole_r else _within(real[ri]), cross, m, m
        )
    return Kid(float(values.mean()), float(values.std(ddof=0)), subsets, m)
