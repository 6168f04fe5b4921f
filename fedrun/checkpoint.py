"""Complete, atomic, verifiable round checkpoints.

Layout under the run directory::

    checkpoints/round-000003/shared.pt      rank 0: round, config, counters (what all clients share)
    checkpoints/round-000003/client-0002.pt the rank hosting client 2: its whole state
    checkpoints/round-000003/MANIFEST.json  rank 0, last: file names + sha256 (the round is complete)
    checkpoints/latest                      rank 0, after the manifest: "round-000003"

Every file is written to a temporary name and renamed (``fedrun.rundir``'s atomic writers), so a crash
leaves either the old or the new file, never half of one. Loading uses ``torch.load(weights_only=True)``: a
checkpoint holds only tensors and plain Python values and can never execute code. A round directory whose
manifest is missing or whose checksums do not match is reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedrun.output import ConsoleSink
from fedrun.rundir import RunDir, atomic_write_bytes

MANIFEST = "MANIFEST.json"


def round_dir(run_dir: str | os.PathLike[str], rnd: int) -> Path:
    """``checkpoints/round-000003`` of round 3."""
    return RunDir(run_dir).checkpoints / f"round-{rnd:06d}"


def client_file(rnd_dir: Path, client: int) -> Path:
    return rnd_dir / f"client-{client:04d}.pt"


def shared_file(rnd_dir: Path) -> Path:
    return rnd_dir / "shared.pt"


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` of tensors and plain values only: a checkpoint can never execute code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finalize(run_dir: str | os.PathLike[str], rnd: int, num_clients: int, keep: int) -> None:
    """Rank 0, after every rank has written its files: manifest, then `latest`, then prune."""
    base = RunDir(run_dir).checkpoints
    rdir = round_dir(run_dir, rnd)
    names = [shared_file(rdir).name] + [client_file(rdir, k).name for k in range(num_clients)]
    missing = [n for n in names if not (rdir / n).exists()]
    if missing:
        raise RuntimeError(f"checkpoint {rdir} is incomplete, missing {missing[:3]}")
    manifest = {"round": rnd, "files": {n: _sha256(rdir / n) for n in names}}
    atomic_write_bytes(rdir / MANIFEST, json.dumps(manifest, indent=1).encode())
    atomic_write_bytes(base / "latest", rdir.name.encode())
    for old in sorted(p for p in base.glob("round-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify(rdir: Path) -> str | None:
    """None if the round directory is complete and intact, else a one-line reason."""
    mpath = rdir / MANIFEST
    if not mpath.exists():
        return "no manifest (the round was not finished writing)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest ({e})"
    for name, digest in manifest["files"].items():
        p = rdir / name
        if not p.exists():
            return f"{name} is missing"
        if _sha256(p) != digest:
            return f"{name} fails its checksum (truncated or corrupt)"
    return None


def find_resumable(run_dir: str | os.PathLike[str],
                   warn: Callable[[str], None] | None = None) -> tuple[int, Path] | None:
    """The newest intact checkpoint as (round, its directory): `latest` first, then older rounds. Each broken
    one is reported to ``warn`` (default: a warning on stderr) and skipped."""
    warn = warn or ConsoleSink().warn
    base = RunDir(run_dir).checkpoints
    if not base.is_dir():
        return None
    candidates = sorted((p for p in base.glob("round-*") if p.is_dir()), reverse=True)
    latest = base / "latest"
    if latest.exists():
        name = latest.read_text().strip()
        candidates.sort(key=lambda p: (p.name != name, -int(p.name.split("-")[1])))
    for rdir in candidates:
        reason = verify(rdir)
        if reason is None:
            return int(rdir.name.split("-")[1]), rdir
        warn(f"checkpoint {rdir} is unusable: {reason}; trying the previous one")
    return None
