"""``evaluate_run``: sample every final model of a run, score its FID and KID, write fid.json, TensorBoard, samples.

A pipeline of small steps: ``plan_evaluation`` (the protocol and the files: model weights, or samples saved by an
earlier ``stage='sample'``), ``prepare_reference`` (rank 0, before minutes of sampling), ``evaluate_models``
(sample or load, then score, model by model) and ``write_samples_record`` / ``write_scores``.

FID protocol (the paper): pytorch-fid's Inception, 1,000 ancestral DDPM samples per model, against the
Fashion-MNIST test split. Numbers from different protocols are not comparable: at 1,000 samples even real
data scores about 15.5 (the small-sample floor), and EMA weights usually score differently from the raw ones;
``fid.json`` therefore records the full protocol next to the numbers. KID (``evaluation.kid``), from the same
features, has no such floor; it needs the reference's features (``evaluation.fid.Reference``).

A personalised method (UDec/ULatDec) has one model per client: fid.json holds each client's scores, their mean
+- std over clients, and the scores of the pooled samples of all clients (``pooled``), since an average of
per-client FIDs can rank methods differently from one score of all their samples (arXiv 2310.11714).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evaluation.errors import EvalError
from evaluation.fid import Reference
from evaluation.graphs import check_graphs
from evaluation.inception import find_inception_weights, inception_features
from evaluation.metrics import score_features
from evaluation.protocol import (
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SAMPLER,
    DEFAULT_SEED,
    SAMPLES_JSON,
    STAGES,
    WEIGHT_KINDS,
    Protocol,
)
from evaluation.records import ModelFiles, Outcome, Plan, write_samples_record, write_scores
from evaluation.reference import stats_cache_dir
from evaluation.sample import (
    for_sampling,
    load_weights,
    run_model_files,
    sample_images,
    sampler_steps,
    save_grid,
    save_npz,
)
from evaluation.scoring import default_reference, reference_of_run
from evaluation.sources import load_images_npz, parse_source
from fedrun import dist
from fedrun.build import build_diffusion, build_model, image_shape
from fedrun.config import RunConfig
from fedrun.methods import get_method
from fedrun.output import Sink, rank_sink
from fedrun.rundir import RunDir


def load_run_config(run: RunDir) -> RunConfig:
    """The run's config.json; EvalError when ``run`` is not a run directory."""
    if not run.config.is_file():
        raise EvalError(f"{run.root} is not a run directory (no config.json)")
    return RunConfig.from_json(run.config.read_text())


def plan_evaluation(
    run: RunDir,
    stage: str,
    num_samples: int | None,
    sampler: str | None,
    steps: int | None,
    weights: str | None,
    seed: int | None,
    batch_size: int,
) -> Plan:
    """The protocol and files of an evaluation; None arguments take the defaults (or the saved samples')."""
    cfg = load_run_config(run)
    if stage not in STAGES:
        raise EvalError(f"invalid stage={stage!r}: allowed: {', '.join(STAGES)}")
    if stage == "score":  # the protocol is the one the samples were drawn with
        protocol, files = _saved_samples(run.eval, num_samples, sampler, steps, seed, weights)
        return Plan(run, cfg, stage, protocol, files, saved=True)
    sampler = sampler or DEFAULT_SAMPLER
    protocol = Protocol(
        DEFAULT_NUM_SAMPLES if num_samples is None else num_samples,
        sampler,
        sampler_steps(sampler, steps),
        DEFAULT_SEED if seed is None else seed,
        batch_size,
    )
    if protocol.num_samples < 2:
        raise EvalError(f"invalid num_samples={protocol.num_samples}: FID needs at least 2")
    method = get_method(cfg.federation.method)
    files = run_model_files(run, method, cfg.federation.clients, weights)
    return Plan(run, cfg, stage, protocol, files, saved=False)


def _saved_samples(
    eval_dir: Path,
    num_samples: int | None,
    sampler: str | None,
    steps: int | None,
    seed: int | None,
    weights: str | None,
) -> tuple[Protocol, ModelFiles]:
    """What ``stage='sample'`` recorded, checked against the sampling arguments given (None = not given)."""
    path = eval_dir / SAMPLES_JSON
    if not path.is_file():
        raise EvalError(f"no saved samples: {path} is missing; run `fedrun eval RUN_DIR --stage sample` first")
    rec = json.loads(path.read_text())
    proto = rec["protocol"]
    given = {"num_samples": num_samples, "sampler": sampler, "seed": seed}
    if steps is not None:
        given["steps"] = steps
    for key, value in given.items():
        if value is not None and value != proto[key]:
            raise EvalError(
                f"--{key.replace('_', '-')} {value} differs from the saved samples' {proto[key]} "
                f"({path}): drop it, or sample again"
            )
    # In WEIGHT_KINDS order, whatever the order of the JSON's keys (atomic_write_json sorts them).
    files = {k: rec["files"][k] for k in WEIGHT_KINDS if k in rec["files"]}
    if weights is not None:
        wanted = list(WEIGHT_KINDS) if weights == "both" else [weights]
        missing = [k for k in wanted if k not in files]
        if missing:
            raise EvalError(f"no saved {', '.join(missing)} samples in {path} (saved: {', '.join(files)})")
        files = {k: files[k] for k in wanted}
    absent = [name for entries in files.values() for name in entries.values() if not (eval_dir / name).is_file()]
    if absent:
        raise EvalError(f"saved sample file(s) missing from {eval_dir}: {', '.join(absent)}")
    protocol = Protocol(
        proto["num_samples"],
        proto["sampler"],
        proto["steps"] if proto["sampler"].startswith("ddim") else None,
        proto["seed"],
        proto["batch_size"],
    )
    return protocol, {
        kind: [(label, eval_dir / name) for label, name in entries.items()] for kind, entries in files.items()
    }


def prepare_reference(
    plan: Plan, ref: str, data_root: str | os.PathLike[str] | None, device: torch.device, sink: Sink, **kw: Any
) -> Reference | None:
    """Reference statistics and features on rank 0 (None elsewhere), before any sampling, so that a missing
    data set fails at once. The outcome is shared, so no rank waits in a collective for a rank that has failed."""
    stats, error = None, None
    if dist.rank() == 0:
        try:
            # Cached in fedrun's cache, else in this run's eval/; never next to the data.
            stats = reference_of_run(
                plan.cfg,
                ref,
                data_root=data_root,
                device=device,
                sink=sink,
                cache_dirs=[stats_cache_dir(), plan.run.eval],
                **kw,
            )
        except Exception as e:  # re-raised below on rank 0, reported on the others
            error = e
    failed = dist.broadcast_json(
        None if error is None else f"{type(error).__name__}: {error}", str | None, what="reference outcome"
    )
    if error is not None:
        raise error
    if failed:
        raise EvalError(f"rank 0 failed to prepare the FID reference: {failed}")
    return stats


def _samples_of(plan: Plan, path: Path, device: torch.device, progress: bool, graphs: bool) -> Tensor | None:
    """One model's uint8 samples: loaded (saved samples, rank 0 only) or drawn (spread over every rank)."""
    if plan.saved:
        return load_images_npz(path) if dist.rank() == 0 else None
    channels, size = image_shape(plan.cfg)
    p = plan.protocol
    model = for_sampling(load_weights(build_model(plan.cfg), path).to(device))
    return sample_images(
        model,
        build_diffusion(plan.cfg),
        p.num_samples,
        (channels, size, size),
        sampler=p.sampler,
        steps=p.ddim_steps,
        batch_size=p.batch_size,
        device=device,
        seed=p.seed,
        progress=progress,
        graphs=graphs,
    )


def evaluate_models(
    plan: Plan,
    ref: Reference | None,
    device: torch.device,
    write: bool,
    progress: bool,
    batch_size: int = 50,
    weights: str | os.PathLike[str] | None = None,
    graphs: bool = False,
) -> Outcome:
    """Sample (or load) and score every model in turn (``batch_size``, ``weights``: Inception's; ``graphs``: sample
    from CUDA graphs). Every model is sampled with the same seed (same noise), so raw vs EMA and client vs client
    differ only by the weights."""
    out = Outcome(no_kid=ref.no_kid if ref is not None else "")
    pool = get_method(plan.cfg.federation.method).personalised
    for kind, entries in plan.files.items():
        out.mean_pixels[kind] = {}
        features = []
        for label, path in entries:
            x = _samples_of(plan, path, device, progress, graphs)
            if dist.rank() != 0:
                continue
            if not plan.saved and (write or not plan.score):
                stem = f"{label}_{kind}"
                save_npz(x, plan.run.eval / f"samples_{stem}.npz")
                save_grid(x, plan.run.eval / f"grid_{stem}.png")
                out.written.setdefault(kind, {})[label] = f"samples_{stem}.npz"
            # Mean pixel (0-255): drifting brightness is a known failure of raw DDPM weights.
            out.mean_pixels[kind][label] = round(float(x.float().mean()), 3)
            if plan.score:
                feats = inception_features(
                    x,
                    batch_size=batch_size,
                    device=device,
                    weights=weights,
                    progress=progress,
                    desc=f"inception ({label}, {kind})",
                )
                out.scores.setdefault(kind, {})[label] = score_features(feats, ref)
                if pool:  # float32 is exact: the network computes in float32
                    features.append(feats.astype(np.float32))
        if features:
            pooled = np.concatenate(features)
            out.pooled[kind], out.pooled_samples = score_features(pooled, ref), pooled.shape[0]
    return out


def evaluate_run(
    run_dir: str | os.PathLike[str],
    num_samples: int | None = None,
    ref: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    weights: str | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 250,
    seed: int | None = None,
    *,
    inception_weights: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    fid_batch_size: int = 50,
    progress: bool = True,
    write: bool = True,
    stage: str = "all",
    ref_num: int | None = None,
    graphs: bool = False,
) -> dict[str, Any]:
    """Sample every model of a finished run, score FID and KID, write fid.json, TensorBoard scalars and samples.

    ``stage``: 'all' samples and scores; 'sample' only samples (``eval/samples_*.npz`` and grids, plus
    ``eval/samples.json`` with the protocol: no Inception weights or reference needed, e.g. on a GPU node
    without them); 'score' scores those saved samples under the protocol recorded with them (e.g. later, on
    a CPU machine that has the weights), then writes fid.json as 'all' would.

    Models: the run's final models (``Method.model_labels``: one global model, or one per client with one FID
    each; fid/fid_std are their mean and population std). ``num_samples`` (None = 1,000, the paper's),
    ``sampler`` (None = 'ddpm') and ``seed`` (None = 0) set the protocol. ``weights``: raw, ema, both, or
    None = both when EMA files exist. ``ref``: a statistics .npz, an image folder, an .npz of images or a
    dataset split; None = the run dataset's test split (statistics cached in fedrun's cache directory).
    ``ref_num``: only the first N images of a reference that is not a statistics file (a quicker reference,
    cached apart; fid.json names it). With an initialised process group, sampling is spread over the ranks,
    rank 0 scores and writes, and every rank returns rank 0's result. ``graphs``: sample from CUDA graphs
    (``evaluation.graphs``; CUDA only).
    """
    p = plan_evaluation(RunDir(run_dir), stage, num_samples, sampler, steps, weights, seed, batch_size)
    ref = (ref or default_reference(p.cfg)) if p.score else None
    if p.score:
        parse_source(ref)  # a bad --ref fails before anything is computed,
        find_inception_weights(inception_weights)  # as does a missing weights file
    dev = dist.pick_device(device)
    if graphs and not p.saved:  # before the reference: a CPU run fails at once
        check_graphs(dev)
    sink = rank_sink(dist.rank() == 0)
    fid_kw = {"batch_size": fid_batch_size, "weights": inception_weights}
    ref_feats = (
        prepare_reference(p, ref, data_root, dev, sink, progress=progress, limit=ref_num, **fid_kw) if p.score else None
    )
    outcome = evaluate_models(p, ref_feats, dev, write, progress, graphs=graphs, **fid_kw)
    if p.score and ref_num and parse_source(ref).kind != "stats":
        ref = f"{ref} (first {ref_num} images)"  # fid.json says which reference: a part scores differently
    out = None
    if dist.rank() == 0:
        out = write_scores(p, outcome, ref, write) if p.score else write_samples_record(p, outcome)
    return dist.broadcast_json(out, dict[str, Any], what="evaluation results")


def evaluate_at_end(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """``cfg.eval_samples`` samples of every final model of ``run_dir`` scored as ``fedrun eval`` does (fid.json):
    the grids' sampler (DDIM with ``cfg.sample_steps`` else ancestral DDPM, x0 clipped with ``cfg.sample_clip``),
    the EMA weights when the run keeps them (those of its grids), else the raw ones; against ``cfg.fid_ref``
    (default: the dataset's test split at the model's size), its first ``cfg.fid_ref_num`` images when set."""
    return evaluate_run(
        run_dir,
        num_samples=cfg.eval_samples,
        ref=cfg.fid_ref,
        sampler=("ddim" if cfg.sample_steps else "ddpm") + ("-clip" if cfg.sample_clip else ""),
        steps=cfg.sample_steps,
        weights="ema" if cfg.optim.ema_decay else "raw",
        device=cfg.device,
        ref_num=cfg.fid_ref_num,
        progress=False,
    )
