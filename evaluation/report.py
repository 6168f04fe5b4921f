"""Table 1 and Figure 4 of the paper from a sweep directory of finished, evaluated runs.

A run is a folder with ``config.json``; its ``fid.json`` (from ``fedrun eval``) gives the FID and its
``comm.jsonl`` the communication count. Runs are grouped by (method, K); K = 1 is the centralised
baseline. Each cell pools, over the seeds of a partition, one value per model: the run's FID for
FULL/USplit, every client's FID for UDec/ULatDec ("mean ± std over clients and runs", as the paper
reports them). std is the population standard deviation (ddof = 0) of the pooled values.
N is the paper's count of parameters communicated (``paper_params_cum`` of the last round) x 10^6,
averaged over the runs of the row (USplit's count depends on the seed through its random roles).
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
from fedrun.config import PARTITIONS, ConfigError, RunConfig
from fedrun.methods import METHOD_NAMES

CENTRALISED = "centralised"
"""The row of K = 1 runs (whatever their method: one client shares with nobody)."""
METHOD_ORDER = (CENTRALISED, *METHOD_NAMES)
"""Table 1's rows, in the paper's order."""
METHOD_LABELS = {CENTRALISED: "centralised", "full": "FULL", "usplit": "USplit", "ulatdec": "ULatDec",
                 "udec": "UDec"}
"""The paper's spelling of each row (the report's own display names)."""
PARTITION_LABELS = {"iid": "IID", "label-skew": "l-skew", "quantity-skew": "q-skew"}
"""The paper's column headers, keyed by ``fedrun.config.PARTITIONS``."""


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

    @property
    def paper_params(self) -> int | None:
        """Paper count of parameters communicated over the whole run (last ``paper_params_cum``)."""
        return int(self.comm[-1]["paper_params_cum"]) if self.comm else None

    def fid_values(self, weights: str | None = None) -> list[float]:
        """One FID per model: the clients' (UDec/ULatDec) or the run's; [] without fid.json.

        weights: None = fid.json's headline numbers, or 'raw' / 'ema' from its per-weights results.
        """
        if self.fid is None:
            return []
        entry: dict[str, Any] | None = self.fid
        if weights is not None:
            entry = (self.fid.get("results") or {}).get(weights)
            if entry is None:
                return []
        if entry.get("per_client"):
            return [float(v) for v in entry["per_client"]]
        return [float(entry["fid"])] if entry.get("fid") is not None else []


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
        runs.append(RunRecord(path=d, method=CENTRALISED if k == 1 else cfg.federation.method, clients=k,
                              partition=cfg.data.partition, seed=cfg.federation.seed, fid=fid, comm=comm))
    return runs


def _method_rank(method: str) -> int:
    """Position of ``method`` in the paper's order; unknown methods last."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=0))


def table1(runs: Iterable[RunRecord], weights: str | None = None) -> list[dict[str, Any]]:
    """Rows of Table 1, one per (method, K) in the paper's order.

    Each row: method, K, N (x 10^6 or None), runs, and per partition p: ``p`` -> {mean, std, runs,
    values} (mean/std None where no run of that partition has an FID).
    """
    groups: dict[tuple[str, int], list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[(r.method, r.clients)].append(r)

    rows = []
    for method, k in sorted(groups, key=lambda key: (_method_rank(key[0]), key[1])):
        members = groups[(method, k)]
        counts = [r.paper_params for r in members if r.paper_params is not None]
        row: dict[str, Any] = {"method": method, "K": k, "runs": len(members),
                               "N": float(np.mean(counts)) / 1e6 if counts else None}
        for p in PARTITIONS:
            of_p = [r for r in members if r.partition == p]
            values = [v for r in of_p for v in r.fid_values(weights)]
            mean, std = _mean_std(values)
            row[p] = {"mean": mean, "std": std, "runs": sum(1 for r in of_p if r.fid_values(weights)),
                      "values": len(values)}
        rows.append(row)
    return rows


def _cell(c: dict[str, Any], digits: int) -> str:
    return "–" if c["mean"] is None else f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"


def table1_markdown(rows: list[dict[str, Any]], digits: int = 1) -> str:
    """Markdown in the paper's layout: method | K | N | IID | l-skew | q-skew."""
    head = "| method | K | N | " + " | ".join(PARTITION_LABELS.get(p, p) for p in PARTITIONS) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(PARTITIONS)]
    for row in rows:
        n = "–" if row["N"] is None else f"{row['N']:.2f}"
        cells = " | ".join(_cell(row[p], digits) for p in PARTITIONS)
        lines.append(f"| {METHOD_LABELS.get(row['method'], row['method'])} | {row['K']} | {n} | {cells} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Tidy CSV, one line per (method, K, partition) with an FID, full precision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "K", "N_millions", "partition", "fid_mean", "fid_std", "runs", "values"])
        for row in rows:
            for p in PARTITIONS:
                c = row[p]
                if c["mean"] is None:
                    continue
                n = "" if row["N"] is None else f"{row['N']:.6f}"
                w.writerow([row["method"], row["K"], n, p, f"{c['mean']:.6f}", f"{c['std']:.6f}",
                            c["runs"], c["values"]])
    return path


def figure4_curves(runs: Iterable[RunRecord], clients: int) -> dict[str, tuple[list[int], list[float]]]:
    """{method: (rounds, cumulative paper parameters)} for K = ``clients``, averaged over its runs
    (rounds where every run of the method has a record)."""
    per: dict[str, list[dict[int, int]]] = defaultdict(list)
    for r in runs:
        if r.clients == clients and r.comm:
            per[r.method].append({int(c["round"]): int(c["paper_params_cum"]) for c in r.comm})
    curves = {}
    for method in sorted(per, key=_method_rank):
        rounds = sorted(set.intersection(*(set(d) for d in per[method])))
        curves[method] = (rounds, [float(np.mean([d[t] for d in per[method]])) for t in rounds])
    return curves


def default_figure_k(runs: Iterable[RunRecord]) -> int | None:
    """K = 5 as in the paper when the sweep has it, else the largest K > 1 with a comm log."""
    ks = {r.clients for r in runs if r.comm and r.clients > 1}
    if not ks:
        return None
    return 5 if 5 in ks else max(ks)


def figure4(runs: Iterable[RunRecord], path: str | os.PathLike[str], clients: int) -> Path:
    """PNG: cumulative parameters communicated (paper count, x 10^8) per round, one line per method."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        raise EvalError("the figure needs matplotlib: pip install matplotlib") from None
    curves = figure4_curves(runs, clients)
    if not curves:
        raise EvalError(f"no run with K={clients} and a comm.jsonl for Figure 4")
    # Figure + Agg canvas, not pyplot: no global backend state is touched.
    fig = Figure(figsize=(5, 3.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method, (rounds, cum) in curves.items():
        ax.plot(rounds, [c / 1e8 for c in cum], marker="o", markersize=3,
                label=METHOD_LABELS.get(method, method))
    ax.set_xlabel("round")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel("parameters communicated (x 10^8)")
    ax.set_title(f"Cumulative communication, K = {clients}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
