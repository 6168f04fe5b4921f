"""What ``evaluate_run`` plans and finds (``Plan``, ``Outcome``), and how it records it: eval/samples.json for a
later ``stage='score'``, fid.json and the fid/<weights> TensorBoard scalars."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.metrics import Scores, kid_protocol
from evaluation.protocol import FID_FLOOR_NOTE, SAMPLES_JSON, WEIGHTS_FILENAME, Protocol
from fedrun.config import RunConfig
from fedrun.methods import get_method
from fedrun.output import TensorBoardSink
from fedrun.rundir import RunDir, atomic_write_json

ModelFiles = dict[str, list[tuple[str, Path]]]
"""{weights kind: [(model label, file)]}: model weights, or saved samples."""


@dataclass
class Plan:
    """What one ``evaluate_run`` does."""

    run: RunDir
    cfg: RunConfig
    stage: str
    protocol: Protocol
    files: ModelFiles
    saved: bool
    """True: ``files`` are samples saved by ``stage='sample'`` (stage 'score'), else model weights."""

    @property
    def score(self) -> bool:
        return self.stage != "sample"


@dataclass
class Outcome:
    """What ``evaluate_models`` found (on rank 0; empty elsewhere)."""

    scores: dict[str, dict[str, Scores]] = field(default_factory=dict)
    """{kind: {label: FID and KID}}."""
    pooled: dict[str, Scores] = field(default_factory=dict)
    """{kind: scores of the pooled samples of all clients}: personalised methods only."""
    pooled_samples: int = 0
    """Samples behind each pooled score."""
    no_kid: str = ""
    """Why there is no KID (the reference has no features), else ''."""
    mean_pixels: dict[str, dict[str, float]] = field(default_factory=dict)
    """{kind: {label: mean sample pixel, 0-255}}."""
    written: dict[str, dict[str, str]] = field(default_factory=dict)
    """{kind: {label: samples file name in eval/}}."""


def _summary(per_model: dict[str, Scores], personalised: bool) -> dict[str, Any]:
    """Mean and population std of the models' FIDs and KIDs: over the clients for one model per client, and for
    one model its FID (std 0) and KID +- its std over the KID subsets. ``kid_models``: each model's KID."""
    fids = [s.fid for s in per_model.values()]
    out: dict[str, Any] = {
        "fid": float(np.mean(fids)),
        "fid_std": float(np.std(fids, ddof=0)),
        "per_client": fids if personalised else None,
        "models": {label: s.fid for label, s in per_model.items()},
        "kid": None,
        "kid_std": None,
        "kid_per_client": None,
        "kid_models": None,
    }
    kids = {label: s.kid for label, s in per_model.items() if s.kid is not None}
    if kids:
        means = [k.mean for k in kids.values()]
        spread = float(np.std(means, ddof=0)) if personalised else next(iter(kids.values())).std
        out.update(
            kid=float(np.mean(means)),
            kid_std=spread,
            kid_per_client=means if personalised else None,
            kid_models={
                label: {"kid": k.mean, "kid_std": k.std, "subset_size": k.subset_size} for label, k in kids.items()
            },
        )
    return out


def _summaries(plan: Plan, outcome: Outcome) -> dict[str, dict[str, Any]]:
    """Per weights kind: ``_summary`` of its models, their mean sample pixels and, for a personalised method,
    the scores of the pooled samples of all clients (``pooled``; None otherwise)."""
    personalised = get_method(plan.cfg.federation.method).personalised
    results = {}
    for kind, per_model in outcome.scores.items():
        pooled = outcome.pooled.get(kind)
        results[kind] = {
            **_summary(per_model, personalised),
            "mean_pixel": outcome.mean_pixels[kind],
            "pooled": None if pooled is None else {**pooled.record(), "num_samples": outcome.pooled_samples},
        }
    return results


def _run_facts(plan: Plan) -> dict[str, Any]:
    fed = plan.cfg.federation
    return {"method": fed.method, "clients": fed.clients, "rounds": fed.rounds}


def write_samples_record(plan: Plan, outcome: Outcome) -> dict[str, Any]:
    """eval/samples.json: what ``stage='score'`` needs to score the saved samples later."""
    protocol = plan.protocol.record(plan.cfg.diffusion.timesteps, list(plan.files))
    out = {
        "stage": "sample",
        "files": outcome.written,
        "mean_pixel": outcome.mean_pixels,
        **_run_facts(plan),
        "protocol": protocol,
    }
    atomic_write_json(plan.run.eval / SAMPLES_JSON, out)
    return out


def write_scores(plan: Plan, outcome: Outcome, ref: str, write: bool) -> dict[str, Any]:
    """fid.json and the fid/<weights>[/<client>] TensorBoard scalars (at step = rounds), headline EMA if any."""
    results = _summaries(plan, outcome)
    headline = "ema" if "ema" in results else "raw"
    protocol = {
        **plan.protocol.record(plan.cfg.diffusion.timesteps, list(plan.files)),
        "reference": ref,
        "inception": f"pytorch-fid InceptionV3 pool3 (2048-d), {WEIGHTS_FILENAME}",
        "note": FID_FLOOR_NOTE,
        "kid": kid_protocol(),
        **({"sampled_apart": True} if plan.saved else {}),
    }
    top = results[headline]
    # The headline weights' numbers at the top; kid_note says why KID is None (a reference without features).
    out = {
        **{k: top[k] for k in ("fid", "fid_std", "per_client", "kid", "kid_std", "kid_per_client", "pooled")},
        "headline_weights": headline,
        "results": results,
        **({"kid_note": outcome.no_kid} if outcome.no_kid else {}),
        **_run_facts(plan),
        "protocol": protocol,
    }
    if write:
        atomic_write_json(plan.run.fid_json, out)
        # Its own events folder, purged from this step on: a repeated eval replaces its points (as fid.json).
        tb = TensorBoardSink(plan.run.scores_tb, purge_step=plan.cfg.federation.rounds)
        try:
            for kind, r in results.items():
                tb.scalar(f"fid/{kind}", r["fid"], plan.cfg.federation.rounds)
                if r["per_client"] is not None:
                    for label, v in r["models"].items():
                        tb.scalar(f"fid/{kind}/{label}", v, plan.cfg.federation.rounds)
        finally:
            tb.close()
    return out
