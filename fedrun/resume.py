"""What a start finds in the run directory, and what every rank agrees on before the first round.

``claim`` (before anything is built): rank 0 checks its run directory (a finished run, an incompatible
resume, a damaged or leftover ``config.json``) and every rank learns the verdict, so every rank stops alike.
``agree_round`` (once the clients exist): the newest round that every rank has intact, by repeated MIN over
the ranks' newest intact rounds (each rank verifies only its own run directory, which need not be shared).

Only plain integers travel between ranks, as tensors: no rank unpickles what a peer sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedrun import checkpoint as ckpt
from fedrun import dist
from fedrun.config import ConfigError, RunConfig
from fedrun.exchange import Exchange
from fedrun.rundir import RunDir, config_differences

Warn = Callable[[str], None]

_GO, _FINISHED, _REFUSED = 0, 1, 2


class RunDirError(ConfigError):
    """The run directory cannot be used as it is; the one-line message says what to do (the CLI prints it)."""


def gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values`` (the same length everywhere), in rank order: one all_gather of int64."""
    got = dist.all_gather_tensor(torch.tensor(list(values), dtype=torch.int64))
    return [t.tolist() for t in got]


def claim(cfg: RunConfig, is_main: bool, run_dir: RunDir, warn: Warn) -> bool:
    """Rank 0 checks its run directory (``check_resumable``, then DONE); every rank gets the verdict. False
    when the run finished already; ConfigError (on every rank) when it may not resume here."""
    code, error = _GO, None
    if is_main:
        try:
            check_resumable(cfg, run_dir, warn)
            code = _FINISHED if run_dir.is_done(cfg.federation.rounds) else _GO
        except ConfigError as e:
            code, error = _REFUSED, e
    code = gather_ints([code])[0][0]  # rank 0's verdict, on every rank
    if error is not None:
        raise error
    if code == _REFUSED:
        raise RunDirError(
            f"rank 0 refused to start the run in its run directory ({cfg.run_dir()} there): see its log for what to do"
        )
    return code == _GO


def check_resumable(cfg: RunConfig, run_dir: RunDir, warn: Warn) -> None:
    """Refuse a resume whose config differs from the run's in fields that change the result (ConfigError).

    A run directory without any round checkpoint is a start that failed or stopped before its first one
    (``config.json`` is written before round 1): it starts anew, whatever its config said. With checkpoints,
    the run's config is ``config.json``, or the newest readable checkpoint's when that file is damaged (it is
    written again at the start); RunDirError when neither can be read.
    """
    rounds = ckpt.round_dirs(run_dir)
    saved, why = _read_config(run_dir.config)
    if not rounds:
        if run_dir.config.exists() and (saved is None or _differences(saved, cfg)):
            warn(f"{run_dir.config} is left by a start that wrote no checkpoint: the run starts anew")
        return
    if saved is None:
        saved, source = _checkpoint_config(rounds.values())
        if saved is None:
            raise RunDirError(
                f"cannot resume {run_dir.root}: {run_dir.config} {why} and no checkpoint holds a "
                f"readable config: restore {run_dir.config.name}, or remove {run_dir.checkpoints} "
                "to start the run anew, or choose another --name/--out-dir"
            )
        warn(
            f"{run_dir.config} {why}: the resume is checked against the config saved in {source} "
            f"({run_dir.config.name} is written again)"
        )
    diffs = _differences(saved, cfg)
    if diffs:
        raise ConfigError(
            f"cannot resume {run_dir.root}: its config differs in "
            + ", ".join(diffs)
            + "; choose another --name/--out-dir"
        )


def _differences(saved: RunConfig, cfg: RunConfig) -> list[str]:
    return config_differences(saved.to_flat_dict(), cfg.to_flat_dict())


def _read_config(path: Path) -> tuple[RunConfig | None, str]:
    """The config in ``path``, or None and why not ('is missing', 'is unreadable (...)')."""
    try:
        return RunConfig.from_json(path.read_text()), ""
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        return None, f"is unreadable ({' '.join(str(e).split())[:120]})"


def _checkpoint_config(rounds: Iterable[Path]) -> tuple[RunConfig | None, Path | None]:
    """The config saved with the newest checkpoint that holds a readable one, and its file."""
    for rdir in sorted(rounds, reverse=True):
        path = ckpt.shared_file(rdir)
        try:
            return RunConfig.from_json(ckpt.safe_load(path)["config"]), path
        except Exception:  # noqa: BLE001 - any damage (torch.load, a missing key, bad JSON): try the one before
            continue
    return None, None


def agree_round(run_dir: RunDir, needed: Iterable[str], is_main: bool, warn: Warn) -> tuple[int, Path | None]:
    """The newest round every rank has intact (its ``needed`` files verified), and this rank's folder of it;
    (0, None) when they share none (a fresh start).

    Each rank proposes its newest intact round; the MIN is the candidate; a rank that lacks the candidate
    proposes its newest intact round below it, until every rank proposes the same round. Every rank sees the
    same proposals, so all take the same number of steps. Rank 0 says when a rank held the others back.
    """
    local = ckpt.intact_rounds(run_dir, needed, warn)
    mine = next(local, None)
    first: list[int] | None = None
    while True:
        proposals = [p[0] for p in gather_ints([mine[0] if mine else 0])]
        first = first or proposals
        agreed = min(proposals)
        if agreed == 0 or all(p == agreed for p in proposals):
            break
        while mine is not None and mine[0] > agreed:
            mine = next(local, None)
    if is_main and agreed < max(first):
        behind = [r for r, p in enumerate(first) if p < max(first)]
        then = f"resumes after round {agreed}" if agreed else "starts the run anew"
        warn(
            f"rank(s) {behind} have no intact checkpoint of round {max(first)} (newest intact round per rank: "
            f"{first}): every rank {then}"
        )
    return agreed, (mine[1] if mine is not None and agreed else None)


def resume_counters(rdir: Path | None, is_main: bool) -> dict[str, int]:
    """The communication totals of the checkpoint resumed, read by rank 0 (the owner of ``shared.pt``) and
    known on every rank; zeros for a fresh start."""
    values = [0, 0]
    if is_main and rdir is not None:
        saved = ckpt.safe_load(ckpt.shared_file(rdir))["counters"]
        values = [int(saved["paper_params_cum"]), int(saved["bytes_cum"])]
    paper, nbytes = gather_ints(values)[0]
    return {"paper_params_cum": paper, "bytes_cum": nbytes}


def server_state(exchange: Exchange) -> dict[str, Any]:
    """What ``shared.pt`` holds of the server update: ``{"server": state}`` with a server optimiser (identical
    on every rank, so rank 0's is the run's), else nothing."""
    return {} if exchange.optimizer is None else {"server": exchange.optimizer.state_dict()}


def load_server_state(exchange: Exchange, rdir: Path | None, is_main: bool, params: Mapping[str, torch.Tensor]) -> None:
    """Resume the server optimiser's state on every rank: rank 0 reads it from the ``shared.pt`` of the round
    resumed (``rdir``), every rank learns which groups have stepped how often (JSON), then the state itself
    travels in one broadcast into tensors shaped like ``params`` (a hosted client's), bit for bit. Nothing
    with plain FedAvg or on a fresh start; every rank calls it alike."""
    opt = exchange.optimizer
    if opt is None:
        return
    saved = ckpt.safe_load(ckpt.shared_file(rdir))["server"] if is_main and rdir is not None else None
    steps = dist.broadcast_json(None if saved is None else saved["steps"], dict[str, int] | None, what="server steps")
    if steps is None:
        return
    unknown = sorted(set(steps) - set(exchange.named_groups))
    if unknown:
        raise ValueError(f"the checkpoint's server state has unknown group(s) {unknown}")
    names = [n for g in steps for n in exchange.named_groups[g]]
    device = next(iter(params.values())).device
    if saved is None:  # the other ranks: room for rank 0's values
        state = {s: {n: torch.empty_like(params[n], dtype=torch.float32) for n in names} for s in opt.slots}
        saved = {"optimizer": opt.name, "steps": steps, "state": state}
    else:
        saved["state"] = {s: {n: saved["state"][s][n].to(device) for n in names} for s in opt.slots}
    dist.broadcast_state([saved["state"][s][n] for s in opt.slots for n in names])
    opt.load_state_dict(saved)
