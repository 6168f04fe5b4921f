"""Every rank agrees on the whole run, or nothing starts.

At start-up, right after the process group forms and before anything is read or written, every rank compares
a SHA-256 of its resolved config without the fields that may differ per site (``SITE_FIELDS``: the one list,
each with the reason it may differ). Later, once the model is built, the ranks compare the (name, shape,
dtype) of the parameters the method exchanges. Only the digests travel (one all_gather of 32 bytes); after a
mismatch the details travel too, as JSON (``fedrun.dist``), so every rank stops with the same line naming
what differs, within seconds, instead of training apart (a different ``--lr``) or meeting at a timeout (a
different ``--rounds``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedrun import dist
from fedrun.config import ConfigError, RunConfig

SITE_FIELDS: dict[str, str] = {
    "data.root": "where this site keeps its datasets: a path on its own disk",
    "data.download": "whether this site may fetch a missing dataset: its network, not the run",
    "data.client_data": "the path template of this site's own image folders",
    "data.placement": "GPU or host memory for this rank's images: its hardware; the data order is the same",
    "federation.resident": "GPU or host memory for this rank's waiting clients: its hardware; results are identical",
    "out_dir": "where this site writes its run directory: sites need not share a filesystem",
    "name": "the run directory's name on this site's disk (as out_dir)",
    "device": "this site's hardware (auto, cpu, cuda)",
    "optim.amp": "local mixed precision: what this site's device supports ('auto' differs by device and CPU)",
    "optim.compile": "torch.compile of the local step: a speed-up this site's toolchain may lack",
    "threads": "CPU threads per rank: how many cores this site has",
    "dist_timeout_s": "how long this site waits for the others before it gives up",
    "preset": "informational: every field a preset sets is compared itself",
}
"""Config fields (dotted, as ``--set`` takes them) that may differ between ranks, and why: where a site keeps
things and how fast it computes, never what is trained, exchanged, checkpointed or logged. Every other field is
compared, including those a resume may change (``fedrun.rundir.RESUMABLE_CHANGES``, a different question:
what may change over time): the rounds, every collective's schedule (checkpoint_every, sample_every, fid_every
and their sizes) and ``fid_ref``, since scores averaged over sites only mean something against one reference
(give a dataset name such as 'fashion-mnist:test', which each site resolves under its own data.root)."""

_SHOWN_FIELDS = 8
"""Differing fields named in the error (then 'and N more'): one readable line."""


class RunMismatchError(ConfigError, dist.PeerError):
    """Ranks were started with different runs: a bad input (one line, exit code 2), raised on every rank."""


def run_fields(cfg: RunConfig) -> dict[str, Any]:
    """The flat config every rank must share: every field but ``SITE_FIELDS``, with numbers normalised."""
    return {k: _number(v) for k, v in cfg.to_flat_dict().items() if k not in SITE_FIELDS}


def _number(value: Any) -> Any:
    # `--local-epochs 5` gives 5.0 where the preset says 5: the same run, so the same digest.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (tuple, list)):
        return [_number(v) for v in value]
    return value


def run_digest(cfg: RunConfig) -> str:
    """SHA-256 of ``run_fields`` as canonical JSON (tuples as lists, sorted keys)."""
    return hashlib.sha256(_canonical(run_fields(cfg)).encode()).hexdigest()


def check_run_config(cfg: RunConfig) -> str:
    """Stop every rank with one line naming the differing fields unless all ranks share ``run_fields(cfg)``;
    returns the digest. A no-op check without a process group."""
    digest = run_digest(cfg)
    if dist.agree(digest):
        return digest
    gathered = dist.all_gather_json(run_fields(cfg), dict[str, Any], "config")
    raise RunMismatchError(mismatch_message(gathered))


def mismatch_message(configs: list[dict[str, Any]]) -> str:
    """One line: each differing field with its values and the ranks that have them."""
    names = sorted(set().union(*configs))
    parts = []
    for name in names:
        by_value: dict[str, list[int]] = {}
        for r, c in enumerate(configs):
            by_value.setdefault(_canonical(c[name]) if name in c else "(missing)", []).append(r)
        if len(by_value) > 1:
            parts.append(
                f"{name[:60]} ("
                + ", ".join(f"{_short(v)} on rank{'s' * (len(rs) > 1)} {_ranks(rs)}" for v, rs in by_value.items())
                + ")"
            )
    if not parts:  # the digests differed, the fields do not: a rank sent a digest of something else
        return "ranks sent different config digests for the same fields: does every rank run the same fedrun?"
    more = f" and {len(parts) - _SHOWN_FIELDS} more" if len(parts) > _SHOWN_FIELDS else ""
    return (
        f"the ranks were started with different runs, so none starts: {'; '.join(parts[:_SHOWN_FIELDS])}"
        f"{more}. Give every rank the same settings; only {', '.join(SITE_FIELDS)} may differ per site"
    )


def signature_hash(entries: list[tuple[str, tuple[int, ...], str]]) -> str:
    """SHA-256 of the (name, shape, dtype) entries, in order."""
    h = hashlib.sha256()
    for name, shape, dtype in entries:
        h.update(f"{name}|{tuple(int(s) for s in shape)}|{dtype}\n".encode())
    return h.hexdigest()


def check_signature(entries: list[tuple[str, tuple[int, ...], str]], what: str = "shared parameters") -> str:
    """Check that every rank has the same (name, shape, dtype) entries, in the same order.

    The digests first, then (only on a mismatch) the entries, and the same comparison everywhere: every rank
    raises ``dist.SignatureMismatchError`` with the same message, naming the differing rank(s) and the first
    differing entry. Returns the hash. A no-op check without a process group.
    """
    norm = [(str(n), tuple(int(s) for s in shape), str(dt)) for n, shape, dt in entries]
    mine = signature_hash(norm)
    if dist.agree(mine):
        return mine
    # The entries travel only now (a few kB for a UNet), so the error can name the first difference.
    gathered = dist.all_gather_json(norm, list[tuple[str, tuple[int, ...], str]], what)
    ref = gathered[0]
    bad = [r for r, ents in enumerate(gathered) if ents != ref]
    if not bad:
        raise dist.SignatureMismatchError(
            f"{what}: the ranks sent different digests of the same entries: does every rank run the same fedrun?"
        )
    lines = []
    for r in bad:
        ents = gathered[r]
        pairs = zip(ref, ents, strict=False)  # lengths may differ: that is a mismatch too
        i = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ref), len(ents)))
        have0 = _short(repr(ref[i]), 120) if i < len(ref) else "nothing"
        have_r = _short(repr(ents[i]), 120) if i < len(ents) else "nothing"
        lines.append(
            f"rank {r} ({len(ents)} entries vs {len(ref)} on rank 0) first differs at entry {i}: "
            f"rank 0 has {have0}, rank {r} has {have_r}"
        )
    raise dist.SignatureMismatchError(
        f"{what} differ across ranks: rank(s) {bad} differ from rank 0; " + "; ".join(lines)
    )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _short(text: str, limit: int = 40) -> str:
    """A value as shown in the error: a peer chooses it, so it is cut short."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:6])) + (f" and {len(ranks) - 6} more" if len(ranks) > 6 else "")
