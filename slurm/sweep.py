"""A grid over config fields, submitted as ONE Slurm job array (or run one after the other here), with a manifest.

    grid (field -> values, or a list of such: their products one after the other)
                            ->  points (the product, in the grid's key order)
                            ->  run directories SWEEP_DIR/<name from the overrides>
                            ->  the unfinished ones as one array (element k = k-th unfinished point)
                            ->  SWEEP_DIR/manifest.json: grid index <-> overrides <-> run dir <-> job id

Run names depend only on the overrides, so re-running a sweep (even with a grown grid) finds the same
directories: finished runs (DONE) and runs whose earlier job is still queued or running are skipped,
interrupted ones are resubmitted and resume from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedrun.config import ConfigError, RunConfig, apply_overrides, field_names, unknown_field_message
from fedrun.rundir import RunDir
from slurm.local import run_locally
from slurm.submit import (
    FederatedRun,
    SlurmOptions,
    TrainFn,
    executor_parameters,
    make_executor,
    prepare_config,
    require_sbatch,
    resolve_tasks_per_node,
    sbatch_preview,
)

MANIFEST = "manifest.json"
# The sweep names and places every run itself; a grid over these would fight it.
RESERVED = {"out_dir": "--out-dir/--sweep-dir", "name": "--name/--sweep-dir", "preset": "--preset"}


class GridError(ConfigError):
    """The grid is malformed or names an unknown config field."""


Grid = dict[str, list[Any]]
Grids = Grid | list[Grid]
"""One grid, or several whose products follow each other: axes that go together (K and the local steps that
keep a total budget) or a point that needs no product (the centralised baseline)."""


# -- grid: parse, validate, expand ----------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """'full,udec' -> ['full', 'udec']; '[1,2],[1,2,4]' -> ['[1,2]', '[1,2,4]'] (bracketed commas stay)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_grid_sets(items: Iterable[str]) -> Grid:
    """['federation.method=full,udec', 'federation.seed=1,2'] -> {field: [values]}."""
    grid: Grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise GridError(f"invalid --grid-set {item!r}: expected FIELD=V1,V2,... e.g. federation.seed=1,2")
        grid[key.strip()] = split_values(values)
    return grid


def _flatten(d: dict[str, Any], prefix: str = "") -> Grid:
    out: Grid = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + str(k) + "."))
        else:
            out[prefix + str(k)] = v if isinstance(v, list) else [v]
    return out


def load_grid(path: Path) -> Grids:
    """A YAML mapping field -> list of values (nested mappings allowed: `federation: {seed: [1, 2]}`), or a list
    of such mappings, whose products follow each other."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"invalid --grid {str(path)!r}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"invalid --grid {str(path)!r}: not YAML ({str(e).splitlines()[0]})") from None
    parts = data if isinstance(data, list) else [data]
    if not parts or not all(isinstance(d, dict) and d for d in parts):
        raise GridError(
            f"invalid --grid {str(path)!r}: expected a mapping of config field -> list of values, or a list of them"
        )
    grids = [_flatten(d) for d in parts]
    return grids if isinstance(data, list) else grids[0]


def with_axes(grids: Grids, axes: Grid) -> Grids:
    """``grids`` with ``axes`` (from --grid-set) set in every one of them."""
    if isinstance(grids, list):
        return [{**g, **axes} for g in grids]
    return {**grids, **axes}


def validate_grid(grid: Grid) -> None:
    if not grid:
        raise GridError("empty grid: give --grid FILE.yaml and/or --grid-set FIELD=V1,V2")
    known = field_names()
    for key, values in grid.items():
        if key in RESERVED:
            raise GridError(
                f"sweep grid: {key!r} cannot vary (each run's directory is named by the sweep; use {RESERVED[key]})"
            )
        if key not in known:
            raise GridError(f"sweep grid: {unknown_field_message(key)}")
        if not isinstance(values, list) or not values:
            raise GridError(f"sweep grid: {key!r} needs a non-empty list of values")


def expand_grid(grid: Grids) -> list[dict[str, Any]]:
    """The Cartesian product, last key varying fastest: [{field: value, ...}, ...]; a list of grids: their
    products one after the other."""
    if isinstance(grid, list):
        if not grid:
            raise GridError("empty grid: give --grid FILE.yaml and/or --grid-set FIELD=V1,V2")
        return [point for g in grid for point in expand_grid(g)]
    validate_grid(grid)
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Shortest dotted suffix that tells the keys apart: federation.seed -> seed."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(1 for o in keys if o == suffix or o.endswith("." + suffix)) == 1:
                out[k] = suffix
                break
    return out


def _token(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_token(v) for v in value)
    text = "none" if value is None else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text.strip("[]() ")).strip("-") or "x"


def run_name(overrides: dict[str, Any]) -> str:
    """{'federation.method': 'full', 'federation.seed': 1} -> 'method-full_seed-1' (stable across re-runs)."""
    short = _short_keys(list(overrides))
    return "_".join(f"{short[k]}-{_token(v)}" for k, v in overrides.items()) or "run"


# -- plan: points, their state -------------------------------------------------------------------


@dataclass
class SweepPoint:
    index: int
    """Position in the grid's product order."""
    overrides: dict[str, Any]
    config: RunConfig
    status: str = "todo"
    """todo (to submit), done (DONE present), active (an earlier job for it is still queued/running)."""
    job_id: str | None = None
    """The job that ran / runs it: this submission's 'ARRAY_k', or an earlier one's."""
    array_index: int | None = None

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()


def default_sweep_dir(base: RunConfig) -> Path:
    return Path(base.out_dir) / (base.name or f"sweep-{base.preset or 'run'}")


def read_manifest(sweep_dir: Path) -> dict[str, Any] | None:
    path = Path(sweep_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def plan_sweep(
    base: RunConfig,
    grid: Grids,
    sweep_dir: Path,
    opts: SlurmOptions,
    active: Callable[[list[str]], set[str]] | None = None,
) -> list[SweepPoint]:
    """Every grid point with its config and status; `active(job_ids)` returns those still in the queue."""
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    points: list[SweepPoint] = []
    names: dict[str, dict[str, Any]] = {}
    for i, raw in enumerate(expand_grid(grid)):
        try:
            cfg = apply_overrides(base, {**raw, "out_dir": str(sweep_dir)})
        except ConfigError as e:
            raise GridError(f"sweep grid point {raw}: {e}") from None
        # The values as the config holds them ('1e-4' -> 0.0001): names and manifest do not depend
        # on how a value was spelled.
        flat = cfg.to_flat_dict()
        overrides = {k: list(flat[k]) if isinstance(flat[k], tuple) else flat[k] for k in raw}
        name = run_name(overrides)
        if name in names:
            raise GridError(f"sweep grid: {overrides} and {names[name]} give the same run name {name!r}")
        names[name] = overrides
        cfg = dataclasses.replace(cfg, name=name)
        points.append(SweepPoint(i, overrides, prepare_config(cfg, opts)))

    previous = {r["run_dir"]: r.get("job_id") for r in (read_manifest(sweep_dir) or {}).get("runs", [])}
    for p in points:
        p.job_id = previous.get(str(p.run_dir))
        if RunDir(p.run_dir).is_done(p.config.federation.rounds):
            p.status = "done"
    pending = [p for p in points if p.status == "todo" and p.job_id]
    if pending and active is not None:
        still = active([p.job_id for p in pending if p.job_id])
        for p in pending:
            if p.job_id in still:
                p.status = "active"
    return points


def squeue_active(job_ids: list[str]) -> set[str]:
    """Which of these job ids ('123' or '123_4') are still pending or running."""
    found: set[str] = set()
    if shutil.which("squeue") is None:
        return found
    for array_id in sorted({j.split("_")[0] for j in job_ids}):
        # -r: one line per array element; an id Slurm has forgotten makes squeue fail -> not active
        res = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i", "-j", array_id], capture_output=True, text=True, check=False
        )
        if res.returncode == 0:
            found |= set(res.stdout.split())
    return {j for j in job_ids if j in found}


# -- manifest and submission ---------------------------------------------------------------------


def manifest_dict(
    sweep_dir: Path,
    grid: Grids,
    base: RunConfig,
    points: list[SweepPoint],
    array_job_id: str | None,
    sbatch: dict[str, Any],
) -> dict[str, Any]:
    return {
        "sweep_dir": str(sweep_dir),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "array_job_id": array_job_id,
        "grid": grid,
        "sbatch": sbatch,
        "base_config": base.to_dict(),
        "runs": [
            {
                "index": p.index,
                "array_index": p.array_index,
                "job_id": p.job_id,
                "status": p.status,
                "overrides": p.overrides,
                "run_dir": str(p.run_dir),
            }
            for p in points
        ],
    }


def write_manifest(sweep_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(sweep_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


@dataclass
class SweepResult:
    sweep_dir: Path
    points: list[SweepPoint]
    array_job_id: str | None = None
    manifest: Path | None = None
    preview: str | None = None
    jobs: list[Any] = dataclasses.field(default_factory=list)

    @property
    def submitted(self) -> list[SweepPoint]:
        return [p for p in self.points if p.array_index is not None]


def run_sweep(
    base: RunConfig,
    grid: Grids,
    opts: SlurmOptions,
    train_fn: TrainFn,
    sweep_dir: Path | None = None,
    dry_run: bool = False,
    active: Callable[[list[str]], set[str]] | None = squeue_active,
    local: bool = False,
) -> SweepResult:
    """Plan the grid; unless dry_run, submit the unfinished points as one job array of ``train_fn(cfg)``
    (``local``: run them here, one after the other, see ``run_locally``) and write the manifest."""
    sweep_dir = Path(sweep_dir or default_sweep_dir(base)).expanduser().resolve()
    points = plan_sweep(base, grid, sweep_dir, opts, active=active)
    todo = [p for p in points if p.status == "todo"]
    if local and not dry_run:
        result = SweepResult(sweep_dir, points)
        result.manifest = run_locally(
            todo, train_fn, lambda: write_manifest(sweep_dir, manifest_dict(sweep_dir, grid, base, points, None, {}))
        )
        return result
    clients = [p.config.federation.clients for p in todo] or [base.federation.clients]
    tpn = resolve_tasks_per_node(opts, clients)
    name = f"fedrun-{sweep_dir.name}"
    result = SweepResult(sweep_dir, points)
    if dry_run:  # needs no Slurm: the grid and the script only
        executor = make_executor(sweep_dir / "slurm", opts, tpn, name, preview=True)
        result.preview = sbatch_preview(executor, array_size=max(1, len(todo)))
        return result
    sbatch = executor_parameters(opts, tpn, name)
    if todo:
        require_sbatch()
        executor = make_executor(sweep_dir / "slurm", opts, tpn, name)
        # One array: every element has the same resources (nodes x tasks_per_node ranks).
        with executor.batch():
            jobs = [executor.submit(FederatedRun(p.config.to_json(), train_fn)) for p in todo]
        for k, (p, job) in enumerate(zip(todo, jobs, strict=True)):
            p.array_index, p.job_id, p.status = k, job.job_id, "submitted"
        result.jobs = jobs
        result.array_job_id = jobs[0].job_id.split("_")[0]
    result.manifest = write_manifest(
        sweep_dir, manifest_dict(sweep_dir, grid, base, points, result.array_job_id, sbatch)
    )
    return result


def format_plan(result: SweepResult) -> str:
    """One line per grid point: index, status, run directory, overrides."""
    lines = [f"sweep {result.sweep_dir}: {len(result.points)} run(s)"]
    for p in result.points:
        ov = " ".join(f"{k}={_fmt(v)}" for k, v in p.overrides.items())
        job = f" job {p.job_id}" if p.job_id else ""
        lines.append(f"  [{p.index:>3}] {p.status:<9} {p.run_dir.name:<40} {ov}{job}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
