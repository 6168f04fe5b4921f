"""Communication accounting: the paper's parameter count, and the bytes our collectives really carry.

The paper counts parameters in a star topology (section 3 of docs/feddiffuse.md): per round and client,
the download (the whole model P in the first round; later P again if everyone receives the whole model,
else the averaged groups) plus the upload (the groups the client contributes). This project has no server:
one all-reduce of a flat buffer per round, whose size ``collective_bytes_per_round`` gives. ``CommLog``
records both, one JSON line per round.

The two figures answer different questions and are never mixed (``TRAFFIC_TERMS`` says so wherever they are
shown): with the paper UNet, UDec's N is 26.4 % of FULL's over 15 rounds (round 1's full download included), its
all-reduce 23.9 % of FULL's bytes in every round. A single process has no collective: its rows say
``"collective": false`` beside ``bytes`` 0 (numeric fields stay numbers), and the round line ``NO_COLLECTIVE``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrun.methods import GROUPS, RoundPlan, plan_round
from fedrun.rundir import atomic_write_bytes

TRAFFIC_TERMS = (
    "N           parameters over the whole run by the paper's count (star topology): every client downloads",
    "            the whole model in round 1, then the averaged groups, and uploads what it shares",
    "all-reduce  bytes one rank hands to its all-reduce in one round, what fedrun really sends (a ring moves",
    "            about 2(W-1)/W of it per rank); a single process has no collective and sends nothing",
    "            (int8: the codes and scales one rank hands to its all-to-all, as many as its all-gather returns)",
)
"""The two traffic figures in words, for every place that shows them (``fedrun info``, the README)."""
NO_COLLECTIVE = "no collective (1 process)"
"""A single-process round's exchange: its clients are averaged in memory, nothing goes over a wire."""


def wire_text(bytes_moved: int, collective: bool) -> str:
    """A round's exchange for the round line: 'all-reduce 11.43 MiB/rank', or ``NO_COLLECTIVE``."""
    return f"all-reduce {bytes_moved / 2**20:,.2f} MiB/rank" if collective else NO_COLLECTIVE


def _total(sizes: Mapping[str, int]) -> int:
    missing = [g for g in GROUPS if g not in sizes]
    if missing:
        raise ValueError(f"sizes lacks group(s) {missing}; needs {', '.join(GROUPS)}")
    return sum(int(sizes[g]) for g in GROUPS)


def paper_round_count(plan: RoundPlan, sizes: Mapping[str, int], first_round: bool) -> int:
    """Parameters the paper counts for one round, summed over clients (download + upload)."""
    p = _total(sizes)
    shared = sum(int(sizes[g]) for g in plan.shared_groups())
    download = p if first_round or plan.broadcast_all else shared
    upload = sum(int(sizes[g]) for groups in plan.assignments for g in groups)
    return plan.num_clients * download + upload


def paper_total(
    method: str, sizes: Mapping[str, int], num_clients: int, rounds: int, seed: int, sample_clients: int = 0
) -> int:
    """The paper's N for a whole run: ``paper_round_count`` over rounds 1..rounds (plans from
    ``plan_round``). FULL = 2PRK, UDec = K(P + U + 2U(R-1)), ULatDec = K(P + (U+M) + 2(U+M)(R-1)),
    USplit = KPR + the uploaded assigned parts. With ``sample_clients`` m of K, only the m sampled clients
    upload; all K still download (FULL: (K + m)PR)."""
    return sum(
        paper_round_count(plan_round(method, r, num_clients, seed, sample_clients), sizes, first_round=r == 1)
        for r in range(1, rounds + 1)
    )


def usplit_range(sizes: Mapping[str, int], num_clients: int, rounds: int, sample_clients: int = 0) -> tuple[int, int]:
    """(min, max) of USplit's paper count over all role draws. Every client downloads P every round; each
    pair of the m clients that take part (``sample_clients``, 0 = all K) uploads E + M + U = P; an odd last
    one uploads M plus E or U, the only random part; a lone one uploads P."""
    p = _total(sizes)
    k, m = num_clients, sample_clients or num_clients
    if m == 1:
        return ((k + 1) * p * rounds,) * 2
    fixed = k * p + (m // 2) * p
    if m % 2 == 0:
        return (fixed * rounds,) * 2
    bottleneck, e, u = sizes["bottleneck"], sizes["encoder"], sizes["decoder"]
    return (fixed + bottleneck + min(e, u)) * rounds, (fixed + bottleneck + max(e, u)) * rounds


def collective_bytes_per_round(
    plan: RoundPlan,
    named_sizes: Mapping[str, int | Sequence[int]],
    exchange_dtype: str,
    dtype_bytes: int = 4,
    world_size: int = 2,
) -> int:
    """Bytes one rank's collective carries in this round: every shared parameter plus one weight slot per
    shared group, at 2 bytes for bf16 else ``dtype_bytes``; int8: the codes, block scales and slots of
    ``world_size`` ranks' shards (``fedrun.exchange.quant.Geometry``, padding included). ``named_sizes``:
    group -> its number of parameters, or the list of its tensors' sizes. (Under bf16 and int8 a first sync
    without a reference goes in fp32, see ``fedrun.exchange.Exchange``.) A ring all-reduce then sends about
    2 (W-1)/W times this per rank, and so do int8's all-to-all and all-gather together."""
    shared = plan.shared_groups()
    if not shared:
        return 0
    numel = 0
    for g in shared:
        n = named_sizes[g]
        numel += int(n) if isinstance(n, int) else sum(int(x) for x in n)
    if exchange_dtype == "int8":
        from fedrun.exchange.quant import wire_bytes  # torch: only when int8 is asked about

        return wire_bytes(numel, len(shared), world_size)
    return (numel + len(shared)) * (2 if exchange_dtype == "bf16" else dtype_bytes)


class CommLog:
    """Per-round communication record: the paper's count and the bytes really all-reduced, with totals.

    Every rank may keep one (the totals are then known everywhere); give ``path`` only on rank 0, which
    appends one JSON line per round. On a resume, pass the round of the checkpoint as ``truncate_after``
    and the totals saved in the checkpoint (``counters()``): the file is rewritten with its rows up to that
    round (later ones are about to be run again). A line that does not parse (a crash while appending one),
    and rows missing or disagreeing with the checkpoint's totals, are reported to ``warn``: the totals
    continue from the checkpoint's counters whatever the file held.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        truncate_after: int | None = None,
        paper_params_cum: int = 0,
        bytes_cum: int = 0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.paper_params_cum = int(paper_params_cum)
        self.bytes_cum = int(bytes_cum)
        self.rows: list[dict[str, Any]] = []
        if self.path is not None and truncate_after is not None and self.path.exists():
            self._rewrite(truncate_after, warn or (lambda msg: None))

    def _rewrite(self, rnd: int, warn: Callable[[str], None]) -> None:
        """Keep the readable rows of rounds 1..rnd (one each), report what was dropped or is missing."""
        assert self.path is not None
        rows, bad = _parse_rows(self.path.read_bytes().decode("utf-8", errors="replace"))
        by_round = {r["round"]: r for r in rows if r["round"] <= rnd}
        kept = [by_round[r] for r in sorted(by_round)]
        if bad:
            warn(
                f"{self.path}: dropped unreadable line(s) {bad[:5]} (a crash while appending); the rows of "
                f"rounds up to {rnd} are kept and the totals continue from the checkpoint"
            )
        missing = [r for r in range(1, rnd + 1) if r not in by_round]
        if missing:
            warn(f"{self.path} has no rows for round(s) {missing[:5]}; the totals continue from the checkpoint")
        elif kept and (kept[-1]["paper_params_cum"], kept[-1]["bytes_cum"]) != (self.paper_params_cum, self.bytes_cum):
            warn(
                f"{self.path}: the totals of round {rnd} differ from its checkpoint's; later rows continue "
                "from the checkpoint"
            )
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append(
        self,
        round: int,
        *,
        paper_params: int,
        bytes_moved: int,
        sync_seconds: float = 0.0,
        collective: bool = True,
        sampled: Sequence[int] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record one round; returns the row (also written to the file where there is one). ``collective``
        False: a single process, whose ``bytes`` 0 mean 'no collective', not 'free': the row says
        ``"collective": false``. ``sampled``: the clients the round drew (``RoundPlan.sampled``), recorded as
        ``"sampled": [...]``; None (every client took part) adds nothing. ``extra``: further fields of the row
        (DP's epsilon and delta)."""
        self.paper_params_cum += int(paper_params)
        self.bytes_cum += int(bytes_moved)
        row = {
            "round": int(round),
            "paper_params": int(paper_params),
            "paper_params_cum": self.paper_params_cum,
            "bytes": int(bytes_moved),
            "bytes_cum": self.bytes_cum,
            "sync_seconds": float(sync_seconds),
            # Only where there was none (older files and multi-rank rows lack it: read it as true).
            **({} if collective else {"collective": False}),
            **({} if sampled is None else {"sampled": [int(k) for k in sampled]}),
            **(extra or {}),
        }
        self.rows.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def counters(self) -> dict[str, int]:
        """The running totals, to store in a checkpoint and pass back on resume."""
        return {"paper_params_cum": self.paper_params_cum, "bytes_cum": self.bytes_cum}


_ROW_FIELDS = {
    "round": int,
    "paper_params": int,
    "paper_params_cum": int,
    "bytes": int,
    "bytes_cum": int,
    "sync_seconds": (int, float),
}


def _parse_rows(text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The valid rows of comm.jsonl text, and the numbers (from 1) of the lines that are not (blank lines
    skipped)."""
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and all(
            isinstance(row.get(k), t) and not isinstance(row.get(k), bool) for k, t in _ROW_FIELDS.items()
        ):
            rows.append(row)
        else:
            bad.append(i)
    return rows, bad


def read_comm_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a comm.jsonl file, in order (blank lines skipped); ValueError naming the first line that
    is not a row."""
    rows, bad = _parse_rows(Path(path).read_text())
    if bad:
        raise ValueError(f"{path}: line {bad[0]} is not a comm.jsonl row")
    return rows
