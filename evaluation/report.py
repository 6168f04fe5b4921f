"""Table 1 of the paper from a sweep directory of finished, evaluated runs (Figure 4: ``evaluation.figure4``).

A run is a folder with ``config.json``; its ``fid.json`` (from ``fedrun eval``) gives FID and KID and its
``comm.jsonl`` the communication count. Runs are grouped by (method, K); K = 1 is the centralised baseline.
Each cell pools, over the seeds of a partition, one value per model: the run's score for FULL/USplit, every
client's score for UDec/ULatDec ("mean ± std over clients and runs", as the paper reports them); for those the
score of each run's pooled samples of all clients stands beside it. std is the population standard deviation
(ddof = 0) of the pooled values. N is the paper's count of parameters communicated (``paper_params_cum`` of the
last round) x 10^6, averaged over the runs of the row (USplit's count depends on the seed through its roles).

Unlike runs are never merged: every setting that differs between runs of the same (method, K) - a config field
that changes what is trained, or the evaluation protocol in fid.json - keys the rows too and is shown as a
column (``key_fields``).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.errors import EvalError
from fedrun.config import PARTITIONS, ConfigError, RunConfig, field_names
from fedrun.methods import METHOD_NAMES

CENTRALISED = "centralised"
"""The row of K = 1 runs (whatever their method: one client shares with nobody)."""
METHOD_ORDER = (CENTRALISED, *METHOD_NAMES)
"""Table 1's rows, in the paper's order."""
METHOD_LABELS = {CENTRALISED: "centralised", "full": "FULL", "usplit": "USplit", "ulatdec": "ULatDec", "udec": "UDec"}
"""The paper's spelling of each row (the report's own display names)."""
PARTITION_LABELS = {"iid": "IID", "label-skew": "l-skew", "quantity-skew": "q-skew"}
"""The paper's column headers, keyed by ``fedrun.config.PARTITIONS``."""
AXES = frozenset({"federation.method", "federation.clients", "data.partition", "federation.seed"})
"""The table's own axes: rows (method, K), columns (partition) and the seeds a cell pools."""
NOT_SETTINGS = frozenset(
    {
        "name",
        "out_dir",
        "preset",
        "data.root",
        "data.download",
        "data.placement",
        "device",
        "dist_timeout_s",
        "optim.compile",
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
        "threads",
    }
)
"""Config fields that do not change what a run trains (where it runs, what it logs): never keep runs apart."""
EVAL_FIELDS = ("num_samples", "sampler", "steps", "reference")
"""fid.json protocol entries that make two FIDs incomparable; keyed as ``eval.<name>`` (plus ``eval.weights``)."""
KID_SCALE = 1e3
"""The report shows KID x 10^3."""


@dataclass
class RunRecord:
    """What the report needs from one run directory."""

    path: Path
    method: str
    """``CENTRALISED`` for K = 1, else the config's federation.method."""
    clients: int
    partition: str
    seed: int
    fid: dict[str, Any] | None
    """The parsed fid.json, or None when the run was not evaluated."""
    comm: list[dict[str, Any]] = field(default_factory=list)
    """comm.jsonl records, in round order."""
    config: dict[str, Any] = field(default_factory=dict)
    """The config's leaf fields by dotted name (``RunConfig.to_flat_dict``)."""

    @property
    def paper_params(self) -> int | None:
        """Paper count of parameters communicated over the whole run (last ``paper_params_cum``)."""
        return int(self.comm[-1]["paper_params_cum"]) if self.comm else None

    def scores(self, weights: str | None = None) -> dict[str, Any] | None:
        """fid.json's numbers of ``weights`` (None: its headline ones); None without them."""
        if self.fid is None or weights is None:
            return self.fid
        return (self.fid.get("results") or {}).get(weights)

    def fid_values(self, weights: str | None = None) -> list[float]:
        """One FID per model: the clients' (UDec/ULatDec) or the run's; [] without fid.json.

        weights: None = fid.json's headline numbers, or 'raw' / 'ema' from its per-weights results.
        """
        return self._values("fid", "per_client", weights)

    def kid_values(self, weights: str | None = None) -> list[float]:
        """One KID per model, as ``fid_values``; [] where there is no KID (a reference without features)."""
        return self._values("kid", "kid_per_client", weights)

    def pooled_values(self, metric: str, weights: str | None = None) -> list[float]:
        """[the ``metric`` ('fid' or 'kid') of the pooled samples of all clients], or [] (not personalised)."""
        pooled = (self.scores(weights) or {}).get("pooled") or {}
        return [float(pooled[metric])] if pooled.get(metric) is not None else []

    def _values(self, metric: str, per_client: str, weights: str | None) -> list[float]:
        entry = self.scores(weights)
        if entry is None:
            return []
        if entry.get(per_client):
            return [float(v) for v in entry[per_client]]
        return [float(entry[metric])] if entry.get(metric) is not None else []

    def settings(self, weights: str | None = None) -> dict[str, Any]:
        """What may make this run unlike another of its row: config fields that change what is trained, and
        the evaluation protocol (``eval.*``, only when evaluated)."""
        out = {k: v for k, v in self.config.items() if k not in AXES and k not in NOT_SETTINGS}
        if self.fid is not None:
            protocol = self.fid.get("protocol") or {}
            out.update({f"eval.{k}": protocol[k] for k in EVAL_FIELDS if k in protocol})
            used = weights or self.fid.get("headline_weights")
            if used is not None:
                out["eval.weights"] = used
        return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def find_runs(sweep_dir: str | os.PathLike[str]) -> list[RunRecord]:
    """Every run under ``sweep_dir`` (recursively; a folder with config.json plus fid.json or comm.jsonl).

    Folders inside a run (e.g. its own eval/ or checkpoints) are never taken as runs of their own.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise EvalError(f"sweep dir {str(root)!r} does not exist")
    runs: list[RunRecord] = []
    run_dirs: list[Path] = []
    for cfg_path in sorted(root.rglob("config.json")):
        d = cfg_path.parent
        if not ((d / "fid.json").is_file() or (d / "comm.jsonl").is_file()):
            continue
        if any(r in d.parents for r in run_dirs):
            continue
        run_dirs.append(d)
        try:
            cfg = RunConfig.from_json(cfg_path.read_text())
        except (ConfigError, ValueError) as e:
            raise EvalError(f"{cfg_path}: {e}") from None
        fid = json.loads((d / "fid.json").read_text()) if (d / "fid.json").is_file() else None
        comm = _read_jsonl(d / "comm.jsonl") if (d / "comm.jsonl").is_file() else []
        k = cfg.federation.clients
        runs.append(
            RunRecord(
                path=d,
                method=CENTRALISED if k == 1 else cfg.federation.method,
                clients=k,
                partition=cfg.data.partition,
                seed=cfg.federation.seed,
                fid=fid,
                comm=comm,
                config=cfg.to_flat_dict(),
            )
        )
    return runs


def method_rank(method: str) -> int:
    """Position of ``method`` in the paper's order; unknown methods last."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _comparable(value: Any) -> Any:
    """A setting as compared and keyed: numbers by value (5 == 5.0, as a JSON config may spell either), lists as
    tuples (hashable)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return tuple(value) if isinstance(value, list) else value


def key_fields(runs: Iterable[RunRecord], weights: str | None = None) -> list[str]:
    """Settings (``RunRecord.settings``) that differ between runs of one (method, K): each keys the rows too, so
    unlike runs are never merged. In config order, then the evaluation's."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r.method, r.clients)].append(r.settings(weights))
    differ = set()
    for members in groups.values():
        for name in set().union(*members):
            if len({repr(_comparable(s[name])) for s in members if name in s}) > 1:
                differ.add(name)
    order = [*field_names(), *(f"eval.{k}" for k in (*EVAL_FIELDS, "weights"))]
    return [name for name in order if name in differ]


def show_setting(value: Any) -> str:
    """A setting as a table cell: none, 1,2,4, 0.0001, ema; '–' where a run has no such entry."""
    if value is _MISSING:
        return "–"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return f"{value:.10g}" if isinstance(value, float) else str(value)


_MISSING = object()
"""An ``eval.*`` setting of a run without fid.json."""


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, show_setting(value))


def row_key(run: RunRecord, keys: list[str], weights: str | None = None) -> tuple[Any, ...]:
    """The run's values of ``keys`` (``_MISSING`` where it has none), as one row of the table holds them."""
    settings = run.settings(weights)
    return tuple(_comparable(settings.get(k, _MISSING)) for k in keys)


def _mean_std(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "values": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=0)), "values": len(values)}


def _cells(of_p: list[RunRecord], weights: str | None) -> dict[str, Any]:
    """One partition's cell: FID (mean, std, runs, values), and 'kid', 'pooled_fid', 'pooled_kid' alike."""
    fids = [v for r in of_p for v in r.fid_values(weights)]
    cell = {**_mean_std(fids), "runs": sum(1 for r in of_p if r.fid_values(weights))}
    cell["kid"] = _mean_std([v for r in of_p for v in r.kid_values(weights)])
    for metric in ("fid", "kid"):
        cell[f"pooled_{metric}"] = _mean_std([v for r in of_p for v in r.pooled_values(metric, weights)])
    return cell


def table1(runs: Iterable[RunRecord], weights: str | None = None) -> list[dict[str, Any]]:
    """Rows of Table 1, one per (method, K, settings) in the paper's order (settings: ``key_fields``).

    Each row: method, K, settings ({field: value} of the key fields), N (x 10^6 or None), runs, and per
    partition p: ``p`` -> {mean, std, runs, values} of the FIDs plus ``kid``, ``pooled_fid`` and
    ``pooled_kid`` -> {mean, std, values} (mean/std None where no run of that partition has the score).
    """
    runs = list(runs)
    keys = key_fields(runs, weights)
    groups: dict[tuple[Any, ...], list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[(r.method, r.clients, row_key(r, keys, weights))].append(r)

    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        return (method_rank(key[0]), key[1], *(_sort_key(v) for v in key[2]))

    rows = []
    for key in sorted(groups, key=order):
        method, k, values = key
        members = groups[key]
        counts = [r.paper_params for r in members if r.paper_params is not None]
        row: dict[str, Any] = {
            "method": method,
            "K": k,
            "settings": dict(zip(keys, values, strict=True)),
            "runs": len(members),
            "N": float(np.mean(counts)) / 1e6 if counts else None,
        }
        for p in PARTITIONS:
            row[p] = _cells([r for r in members if r.partition == p], weights)
        rows.append(row)
    return rows


def _cell(c: dict[str, Any], digits: int, scale: float = 1.0) -> str:
    return "–" if c["mean"] is None else f"{c['mean'] * scale:.{digits}f} ± {c['std'] * scale:.{digits}f}"


def table1_markdown(rows: list[dict[str, Any]], digits: int = 1, metric: str = "fid") -> str:
    """Markdown in the paper's layout: method | K | <key fields> | N | IID | l-skew | q-skew.

    ``metric`` 'fid' or 'kid' (shown x 10^3); a UDec/ULatDec cell adds its pooled score: '40.0 ± 7.1 (pooled
    38.2 ± 0.4)'."""
    keys = list(rows[0]["settings"]) if rows else []
    head = "| method | K | " + "".join(f"{k} | " for k in keys) + "N | "
    head += " | ".join(PARTITION_LABELS.get(p, p) for p in PARTITIONS) + " |"
    lines = [head, "|---|---|" + "---|" * len(keys) + "---|" + "---|" * len(PARTITIONS)]
    scale = KID_SCALE if metric == "kid" else 1.0
    for row in rows:
        n = "–" if row["N"] is None else f"{row['N']:.2f}"
        cells = []
        for p in PARTITIONS:
            c = row[p] if metric == "fid" else row[p]["kid"]
            text, pooled = _cell(c, digits, scale), row[p][f"pooled_{metric}"]
            cells.append(text if pooled["mean"] is None else f"{text} (pooled {_cell(pooled, digits, scale)})")
        settings = "".join(f"{show_setting(v)} | " for v in row["settings"].values())
        lines.append(
            f"| {METHOD_LABELS.get(row['method'], row['method'])} | {row['K']} | {settings}{n} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def has_kid(rows: list[dict[str, Any]]) -> bool:
    """Whether any cell has a KID (a KID table is worth printing)."""
    return any(row[p]["kid"]["mean"] is not None for row in rows for p in PARTITIONS)


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Tidy CSV, one line per (row, partition) with an FID, full precision (KID not scaled)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0]["settings"]) if rows else []
    scores = ("kid", "pooled_fid", "pooled_kid")

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.8g}"

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "method",
                "K",
                *keys,
                "N_millions",
                "partition",
                "fid_mean",
                "fid_std",
                "runs",
                "values",
                *(f"{s}_{x}" for s in scores for x in ("mean", "std", "values")),
            ]
        )
        for row in rows:
            for p in PARTITIONS:
                c = row[p]
                if c["mean"] is None:
                    continue
                n = "" if row["N"] is None else f"{row['N']:.6f}"
                extra = [x for s in scores for x in (num(c[s]["mean"]), num(c[s]["std"]), c[s]["values"])]
                w.writerow(
                    [
                        row["method"],
                        row["K"],
                        *map(show_setting, row["settings"].values()),
                        n,
                        p,
                        f"{c['mean']:.6f}",
                        f"{c['std']:.6f}",
                        c["runs"],
                        c["values"],
                        *extra,
                    ]
                )
    return path
