"""Complete, atomic, verifiable round checkpoints, written by each rank into its own run directory.

Layout under a rank's run directory::

    checkpoints/round-000003/shared.pt            rank 0: round, config, counters (what all clients share)
    checkpoints/round-000003/client-0002.pt       the rank hosting client 2: its whole state
    checkpoints/round-000003/MANIFEST-rank1.json  each rank, after its files: their names + sha256
    checkpoints/latest                            rank 0, once every rank has sealed the round: "round-000003"

Each rank writes and verifies only its own part (its clients' files, and rank 0 the shared one), so the
ranks need no shared filesystem: with one, the parts of a round lie side by side in one folder; without
one, each site holds its own. A round counts as complete when every rank reports its part sealed (a
collective in ``fedrun.resume``, not a file listing), and a resume starts from the newest round every rank
has intact. A part is intact when every file it needs is listed, with its checksum, by a manifest in the
round folder (any rank's: with a shared filesystem a resume on other ranks finds each client's file; the
single ``MANIFEST.json`` of older runs counts too).

Every file is written to a temporary name and renamed (``fedrun.rundir``'s atomic writers), so a crash
leaves either the old or the new file, never half of one. Loading uses ``torch.load(weights_only=True)``: a
checkpoint holds only tensors and plain Python values and can never execute code. Folders in
``checkpoints/`` that are not named ``round-NNNNNN`` (a user's ``round-000004.bak``) are never read or pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from fedrun.output import ConsoleSink
from fedrun.rundir import RunDir, atomic_save, atomic_write_bytes

MANIFEST = "MANIFEST.json"
"""The one manifest of runs written before each rank sealed its own part (still read)."""
_ROUND = re.compile(r"round-(\d{6,})")
_MANIFESTS = "MANIFEST*.json"

Warn = Callable[[str], None]


def round_dir(run_dir: str | os.PathLike[str], rnd: int) -> Path:
    """``checkpoints/round-000003`` of round 3."""
    return RunDir(run_dir).checkpoints / f"round-{rnd:06d}"


def client_file(rnd_dir: Path, client: int) -> Path:
    return rnd_dir / f"client-{client:04d}.pt"


def shared_file(rnd_dir: Path) -> Path:
    return rnd_dir / "shared.pt"


def manifest_file(rnd_dir: Path, rank: int) -> Path:
    """The manifest of ``rank``'s part of a round."""
    return rnd_dir / f"MANIFEST-rank{rank}.json"


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` of tensors and plain values only: a checkpoint can never execute code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def round_dirs(run_dir: str | os.PathLike[str], warn: Warn | None = None) -> dict[int, Path]:
    """The round folders of ``checkpoints/`` by round, ascending. Anything else there is left alone (and
    reported to ``warn`` when its name starts with ``round-``: a copy or backup a user made)."""
    base = RunDir(run_dir).checkpoints
    if not base.is_dir():
        return {}
    found: dict[int, Path] = {}
    for p in base.iterdir():
        m = _ROUND.fullmatch(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
        elif p.name.startswith("round-") and warn is not None:
            warn(f"{p} is not a round checkpoint (round-NNNNNN): ignored")
    return dict(sorted(found.items()))


# -- writing a part ----------------------------------------------------------------------------------
def write_part(rnd_dir: Path, rank: int, files: Mapping[str, Any]) -> None:
    """Write this rank's files of a round (name -> object for ``torch.save``), then seal them.

    A manifest left from an earlier attempt at this round is removed first: the part is incomplete until the
    new files are all on disk and the new manifest names them.
    """
    manifest_file(rnd_dir, rank).unlink(missing_ok=True)
    for name, obj in files.items():
        atomic_save(obj, rnd_dir / name)
    seal(rnd_dir, rank, list(files))


def seal(rnd_dir: Path, rank: int, names: Iterable[str]) -> None:
    """Write ``rank``'s manifest: the checksums of its files as they are on disk (read back, so a file that
    did not reach the disk is noticed here). RuntimeError when one is missing."""
    names = list(names)
    missing = [n for n in names if not (rnd_dir / n).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {rnd_dir} is incomplete, missing {missing[:3]}")
    manifest = {"round": _round_of(rnd_dir), "rank": rank, "files": {n: _sha256(rnd_dir / n) for n in names}}
    atomic_write_bytes(manifest_file(rnd_dir, rank), json.dumps(manifest, indent=1).encode())


def mark_latest(run_dir: str | os.PathLike[str], rnd: int) -> None:
    """Rank 0, once every rank sealed round ``rnd``: ``checkpoints/latest`` (a pointer for people and tools;
    a resume does not need it)."""
    atomic_write_bytes(RunDir(run_dir).checkpoints / "latest", round_dir(run_dir, rnd).name.encode())


def prune(run_dir: str | os.PathLike[str], rnd: int, keep: int) -> None:
    """Keep the newest ``keep`` rounds up to ``rnd``; delete older round folders. Rounds after ``rnd`` (left by
    an attempt that got further before the round resumed) are kept until they are written again."""
    done = [p for r, p in round_dirs(run_dir).items() if r <= rnd]
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)  # with a shared filesystem, every rank prunes the same folders


# -- verifying a part --------------------------------------------------------------------------------
def _round_of(rnd_dir: Path) -> int:
    m = _ROUND.fullmatch(rnd_dir.name)
    if m is None:
        raise ValueError(f"{rnd_dir} is not a round folder (round-NNNNNN)")
    return int(m.group(1))


def _listed(rnd_dir: Path) -> tuple[dict[str, set[str]], list[str]]:
    """File name -> the checksums the round folder's manifests give it, and a reason per unusable manifest."""
    listed: dict[str, set[str]] = {}
    bad: list[str] = []
    for mpath in sorted(rnd_dir.glob(_MANIFESTS)):
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            bad.append(f"{mpath.name} is unreadable ({e})")
            continue
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if (
            not isinstance(files, dict)
            or not files
            or not all(isinstance(n, str) and Path(n).name == n and isinstance(d, str) for n, d in files.items())
        ):
            bad.append(f"{mpath.name} is malformed (no 'files' of names and checksums)")
            continue
        for name, digest in files.items():
            listed.setdefault(name, set()).add(digest)
    return listed, bad


def verify(rnd_dir: Path, needed: Iterable[str] | None = None) -> str | None:
    """None if the files ``needed`` (None: every file the manifests list) are in ``rnd_dir`` and match a
    manifest's checksum, else a one-line reason."""
    listed, bad = _listed(rnd_dir)
    names = sorted(listed) if needed is None else list(needed)
    if not names:
        return "; ".join(bad) if bad else "no manifest (the round was not finished writing)"
    for name in names:
        p = rnd_dir / name
        if name not in listed:
            return "; ".join(bad) if bad else f"no manifest lists {name} (the round was not finished writing)"
        if not p.is_file():
            return f"{name} is missing"
        if _sha256(p) not in listed[name]:
            return f"{name} fails its checksum (truncated or corrupt)"
    return None


def intact_rounds(
    run_dir: str | os.PathLike[str], needed: Iterable[str] | None = None, warn: Warn | None = None
) -> Iterator[tuple[int, Path]]:
    """This rank's intact rounds, newest first, as (round, its folder); each verified only when reached.

    ``needed``: the files this rank loads (None: every file a manifest lists). Each unusable round passed on
    the way is reported to ``warn`` (default: a warning on stderr), and so is a ``latest`` naming a round
    that is not there.
    """
    warn = warn or ConsoleSink().warn
    needed = None if needed is None else list(needed)
    rounds = round_dirs(run_dir, warn)
    latest = RunDir(run_dir).checkpoints / "latest"
    if latest.is_file():
        name = latest.read_text(errors="replace").strip()
        m = _ROUND.fullmatch(name)
        if m is None or int(m.group(1)) not in rounds:
            warn(f"{latest} names {name!r}, which is not in {latest.parent}: using the newest intact round")
    for rnd in sorted(rounds, reverse=True):
        reason = verify(rounds[rnd], needed)
        if reason is None:
            yield rnd, rounds[rnd]
        else:
            warn(f"checkpoint {rounds[rnd]} is unusable: {reason}; trying the previous one")


def find_resumable(
    run_dir: str | os.PathLike[str], warn: Warn | None = None, needed: Iterable[str] | None = None
) -> tuple[int, Path] | None:
    """This rank's newest intact round as (round, its folder), or None (see ``intact_rounds``). Several ranks
    agree on theirs with ``fedrun.resume.agree_round``."""
    return next(intact_rounds(run_dir, needed, warn), None)
