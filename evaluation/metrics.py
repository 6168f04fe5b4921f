"""FID and KID of one set of sample features against a Reference: what fid.json, `fedrun fid` and the report show.

Both come from the same 2048-d Inception features, computed once per set of samples (``evaluate_models``
keeps them to score the pooled samples of all clients of a personalised method too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.fid import Reference, frechet_distance, statistics
from evaluation.kid import KID_KERNEL, KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, Kid, kid


@dataclass(frozen=True)
class Scores:
    """FID, and KID when the reference has features (``no_kid`` says why not, else '')."""

    fid: float
    kid: Kid | None
    no_kid: str = ""

    def record(self) -> dict[str, Any]:
        """As fid.json holds one set's scores: fid, kid, kid_std (over the subsets) and kid_subset_size, the
        KID entries None without features."""
        k = self.kid
        return {
            "fid": self.fid,
            "kid": None if k is None else k.mean,
            "kid_std": None if k is None else k.std,
            "kid_subset_size": None if k is None else k.subset_size,
        }


def kid_text(k: Kid) -> str:
    """E.g. '0.01234 ± 0.00080 (100 subsets of 1000)'."""
    return f"{k.mean:.5f} ± {k.std:.5f} ({k.subsets} subsets of {k.subset_size})"


def kid_protocol() -> dict[str, Any]:
    """fid.json's record of how KID is estimated."""
    return {
        "kernel": KID_KERNEL,
        "estimator": "unbiased MMD^2",
        "subsets": KID_SUBSETS,
        "max_subset_size": KID_SUBSET_SIZE,
        "seed": KID_SEED,
    }


def score_features(features: np.ndarray, ref: Reference) -> Scores:
    """FID (pytorch-fid's) and KID of sample features [N, 2048] against ``ref``."""
    # float64 first: the features are float32 values, but np.mean of a float32 array sums in float32.
    features = np.asarray(features, np.float64)
    mu, sigma = statistics(features)
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    if ref.features is None:
        return Scores(fid, None, ref.no_kid)
    return Scores(fid, kid(features, ref.features))
