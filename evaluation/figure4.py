"""Figure 4 of the paper: cumulative parameters communicated per round, one line per method, for one K.

Runs are split into lines as Table 1 splits them into rows (``evaluation.report.key_fields``), so unlike runs
are never averaged into one line, and what the figure leaves out (other K, runs without comm.jsonl, rounds not
every run of a line reached) is named in the figure itself and in ``left_out``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from evaluation.errors import EvalError
from evaluation.report import METHOD_LABELS, RunRecord, key_fields, method_rank, row_key, show_setting

Curves = dict[str, tuple[list[int], list[float]]]
"""{line name: (rounds, cumulative paper parameters)}."""


def _line_name(method: str, keys: list[str], values: tuple[object, ...], label: bool = False) -> str:
    """'full', or 'full (optim.lr=0.0002)' when runs of the method differ in a key field."""
    name = METHOD_LABELS.get(method, method) if label else method
    if not keys:
        return name
    return f"{name} ({', '.join(f'{k}={show_setting(v)}' for k, v in zip(keys, values, strict=True))})"


def _per_line(runs: list[RunRecord], clients: int, label: bool = False) -> dict[str, list[dict[int, int]]]:
    """{line name: [{round: paper_params_cum} per run]} of the runs with K = ``clients`` and a comm log."""
    keys = key_fields(runs)
    per: dict[str, list[dict[int, int]]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: method_rank(r.method)):
        if r.clients == clients and r.comm:
            name = _line_name(r.method, keys, row_key(r, keys), label)
            per[name].append({int(c["round"]): int(c["paper_params_cum"]) for c in r.comm})
    return per


def figure4_curves(runs: Iterable[RunRecord], clients: int, label: bool = False) -> Curves:
    """{line: (rounds, cumulative paper parameters)} for K = ``clients``, averaged over the runs of each line
    (rounds where every run of the line has a record). Lines are named by method (the paper's spelling with
    ``label``) and, where runs differ in them, the key fields' values."""
    curves = {}
    for name, logs in _per_line(list(runs), clients, label).items():
        rounds = sorted(set.intersection(*(set(d) for d in logs)))
        curves[name] = (rounds, [float(np.mean([d[t] for d in logs])) for t in rounds])
    return curves


def left_out(runs: Iterable[RunRecord], clients: int) -> list[str]:
    """What Figure 4 for K = ``clients`` does not show, one phrase each (empty: it shows every run)."""
    runs = list(runs)
    notes = []
    others: dict[int, int] = defaultdict(int)
    for r in runs:
        if r.comm and r.clients != clients:
            others[r.clients] += 1
    notes += [f"{n} run{'s' * (n != 1)} with K={k}" for k, n in sorted(others.items())]
    silent = sum(1 for r in runs if not r.comm)
    if silent:
        notes.append(f"{silent} run{'s' * (silent != 1)} without comm.jsonl")
    for name, logs in _per_line(runs, clients).items():
        common = set.intersection(*(set(d) for d in logs))
        longest = max(len(d) for d in logs)
        if len(common) < longest:
            notes.append(
                f"rounds of {name} after round {max(common, default=0)} (not reached by all {len(logs)} of its runs)"
            )
    return notes


def default_figure_k(runs: Iterable[RunRecord]) -> int | None:
    """K = 5 as in the paper when the sweep has it, else the largest K > 1 with a comm log."""
    ks = {r.clients for r in runs if r.comm and r.clients > 1}
    if not ks:
        return None
    return 5 if 5 in ks else max(ks)


def figure4(runs: Iterable[RunRecord], path: str | os.PathLike[str], clients: int) -> Path:
    """PNG: cumulative parameters communicated (paper count, x 10^8) per round, one line per method (and key
    fields' values); a footnote names what it leaves out (``left_out``)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        raise EvalError("the figure needs matplotlib: pip install matplotlib") from None
    runs = list(runs)
    curves = figure4_curves(runs, clients, label=True)
    if not curves:
        raise EvalError(f"no run with K={clients} and a comm.jsonl for Figure 4")
    # Figure + Agg canvas, not pyplot: no global backend state is touched.
    fig = Figure(figsize=(5, 3.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (rounds, cum) in curves.items():
        ax.plot(rounds, [c / 1e8 for c in cum], marker="o", markersize=3, label=name)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel("parameters communicated (x 10^8)")
    ax.set_title(f"Cumulative communication, K = {clients}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    notes = left_out(runs, clients)
    fig.tight_layout(rect=(0, 0.06, 1, 1) if notes else (0, 0, 1, 1))
    if notes:
        fig.text(0.01, 0.01, "not shown: " + "; ".join(notes), fontsize=5, wrap=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
