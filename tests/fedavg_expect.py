"""What the multi-process exchange tests expect, recomputed on every rank: client weights, hashes, and the
deviation of the synced parameters from ``weighted_average`` of the contributors' pre-sync states.

Test modules import it as `from fedavg_expect import ...` (pytest puts tests/ on sys.path; there is no package).
"""

from __future__ import annotations

import hashlib

import torch

from fedrun.exchange import weighted_average


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def client_sizes(k: int) -> list[int]:
    return [10 + 7 * i * i for i in range(k)]  # unequal weights


def max_err(plan, named, pre, sizes, live, hosted) -> float:
    """Largest deviation of any hosted client's shared parameters from ``weighted_average`` of the
    contributors' pre-sync states (``pre``: every client's, by name), group by group."""
    err = 0.0
    for g in plan.shared_groups():
        contrib = plan.contributors(g)
        want = weighted_average([{n: pre[c][n] for n in named[g]} for c in contrib], [sizes[c] for c in contrib])
        for c in hosted:
            for n in named[g]:
                err = max(err, (live[c][n].detach() - want[n]).abs().max().item())
    return err
