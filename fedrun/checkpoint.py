"""Complete, atomic, verifiable round checkpoints.

Layout under the run directory::

    checkpoints/round-000003/shared.pt      rank 0: round, config, counters (what all clients share)
    checkpoints/round-000003/client-0002.pt the rank hosting client 2: its whole state
    checkpoints/round-000003/MANIFEST.json  rank 0, last: file names + sha256 (the round is complete)
    checkpoints/latest                      rank 0, after the manifest: "round-000003"

Every file is written to a temporary name and renamed, so a crash leaves either the old or the new
file, never half of one. Loading uses ``torch.load(weights_only=True)``: a checkpoint holds only
tensors and plain Python values and can never execute code. A round directory whose manifest is
missing or whose checksums do not match is reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

CKPT = "checkpoints"
MANIFEST = "MANIFEST.json"


def round_dir(run_dir: Path, rnd: int) -> Path:
    return Path(run_dir) / CKPT / f"round-{rnd:06d}"


def client_file(rnd_dir: Path, client: int) -> Path:
    return rnd_dir / f"client-{client:04d}.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finalize(run_dir: Path, rnd: int, num_clients: int, keep: int) -> None:
    """Rank 0, after every rank has written its files: manifest, then `latest`, then prune."""
    rdir = round_dir(run_dir, rnd)
    names = ["shared.pt"] + [client_file(rdir, k).name for k in range(num_clients)]
    missing = [n for n in names if not (rdir / n).exists()]
    if missing:
        raise RuntimeError(f"checkpoint {rdir} is incomplete, missing {missing[:3]}")
    manifest = {"round": rnd, "files": {n: _sha256(rdir / n) for n in names}}
    atomic_write_bytes(rdir / MANIFEST, json.dumps(manifest, indent=1).encode())
    atomic_write_bytes(Path(run_dir) / CKPT / "latest", rdir.name.encode())
    for old in sorted(p for p in (Path(run_dir) / CKPT).glob("round-*") if p.is_dir())[:-keep]:
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


def find_resumable(run_dir: Path, log=lambda m: print(m, file=sys.stderr)) -> tuple[int, Path] | None:
    """The newest intact checkpoint: `latest` first, then older rounds; warns about broken ones."""
    base = Path(run_dir) / CKPT
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
        log(f"fedrun: warning: checkpoint {rdir} is unusable: {reason}; trying the previous one")
    return None
