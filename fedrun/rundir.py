"""The run directory: the one owner of every path under ``runs/<name>/``, the DONE rule, what a resume may
change, and atomic writes.

Layout::

    config.json        the resolved config of the run          comm.jsonl   per-round communication
    checkpoints/       round checkpoints (fedrun.checkpoint)    events.out.tfevents.*   TensorBoard (training)
    models/            final weights: global[_ema].pt or client{k}[_ema].pt (labels from the Method)
    samples/           final.png (a global model) or final_client{k}.png (one per client)
    eval/              samples, grids and reference statistics of ``fedrun eval``    fid.json   its scores
    scores/            TensorBoard events of fid.json's scores (a TensorBoard run '<name>/scores')
    DONE               written last: {"rounds": R, "time": ...}; sweeps skip finished runs

Training, Slurm and evaluation all ask a ``RunDir``; nothing else spells these names.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESUMABLE_CHANGES = frozenset(
    {
        "data.root",
        "data.download",
        "data.placement",
        "federation.rounds",
        "out_dir",
        "name",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
        "num_samples",
        "sample_steps",
        "sample_clip",
        "fid_every",
        "fid_samples",
        "fid_ref",
        "fid_ref_num",
        "eval_samples",
        "device",
        "dist_timeout_s",
        "preset",
        "optim.compile",
        "optim.amp",
        "threads",
    }
)
"""Config fields (dotted, as ``--set`` takes them) that may change when a run is resumed: where things are,
how long it runs, what it logs, how fast it computes. Any other difference changes the result and is refused."""


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Fields of two flat configs (``RunConfig.to_flat_dict``) that differ and may not change across a resume,
    as ``'field (a -> b)'``, sorted by field."""

    def norm(v: Any) -> Any:  # JSON turns tuples into lists
        return list(v) if isinstance(v, tuple) else v

    return [
        f"{k} ({saved[k]!r} -> {new.get(k)!r})"
        for k in sorted(saved)
        if k not in RESUMABLE_CHANGES and norm(saved[k]) != norm(new.get(k))
    ]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, rename."""
    import torch  # here, not at import: the CLI and Slurm submission use RunDir without torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """Paths and markers of one run directory (``RunConfig.run_dir()``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:  # a RunDir goes wherever a path does (Path(run_dir), open, RunDir(run_dir))
        return str(self.root)

    # -- paths -----------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def comm_log(self) -> Path:
        return self.root / "comm.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tb(self) -> Path:
        """Training's TensorBoard events: the run directory itself, since TensorBoard names a run after the
        folder of its events (``tensorboard --logdir runs/`` then lists the run as ``<name>``)."""
        return self.root

    @property
    def scores_tb(self) -> Path:
        """``fedrun eval``'s TensorBoard events (TensorBoard run ``<name>/scores``): apart from training's, so a
        repeated eval can replace its points without touching training's last round."""
        return self.root / "scores"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def fid_json(self) -> Path:
        return self.root / "fid.json"

    @property
    def done(self) -> Path:
        return self.root / "DONE"

    def model_file(self, label: str, ema: bool = False) -> Path:
        """``models/<label>.pt`` or ``models/<label>_ema.pt``; labels are ``Method.model_labels``."""
        return self.models / f"{label}{'_ema' if ema else ''}.pt"

    def sample_grid(self, label: str) -> Path:
        """The final sample grid of model ``label``: ``samples/final.png`` for the global model, else
        ``samples/final_<label>.png`` (``final_client0.png``, ...)."""
        return self.samples / ("final.png" if label == "global" else f"final_{label}.png")

    # -- markers ---------------------------------------------------------------------------------
    def is_done(self, rounds: int) -> bool:
        """Whether the run finished ``rounds`` rounds (more rounds than finished = a resume, not done).

        A DONE without a round count counts as finished; an unreadable one is reported and does not: the run
        then resumes from its newest checkpoint and writes it again.
        """
        try:
            text = self.done.read_text()
        except FileNotFoundError:
            return False
        try:
            got = json.loads(text).get("rounds")
        except (ValueError, AttributeError):
            print(
                f"fedrun: warning: {self.done} is unreadable ({text[:40]!r}); treating the run as unfinished",
                file=sys.stderr,
                flush=True,
            )
            return False
        return got is None or got == rounds

    def mark_done(self, rounds: int) -> None:
        atomic_write_json(self.done, {"rounds": rounds, "time": time.time()})

    def clear_done(self) -> None:
        self.done.unlink(missing_ok=True)
