"""Privacy of the exchange: DP-FedAvg with an RDP accountant, and secure aggregation by pairwise masks.

Pure pieces, each testable alone and none of them calling a collective except ``secagg.exchange_keys``:

    ``dp``          clipping of a client's update to L2 norm C, the distributed Gaussian noise
    ``accountant``  epsilon of the rounds so far (Google's ``dp-accounting``), the budget check
    ``fixedpoint``  updates as fixed point in Z_(2^32): encode, sum in int64, reduce, decode
    ``secagg``      X25519 key pairs, HKDF pair secrets, the counter-mode mask streams

``fedrun.exchange.private`` runs them as a stage of the exchange; ``fedrun.privacy.run`` is what the
training loop calls (logging, checkpoint, budget stop). Both features are off by default and their
libraries (``dp-accounting``, ``cryptography``) are the optional extra ``fedrun[privacy]``.
"""

from __future__ import annotations

import importlib.util

from fedrun.validation import ConfigError

EXTRA = "pip install 'fedrun[privacy]'"
"""How to install what the privacy features import."""


def require(module: str, feature: str) -> None:
    """ConfigError (one line) unless ``module`` can be imported: checked before any process group starts."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{feature} needs the Python package {module!r}, which is not installed: {EXTRA}")
