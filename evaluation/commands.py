"""`fedrun eval`, `fedrun fid`, `fedrun report`, and the programmatic ``evaluate_run`` / ``fid_of_model``.

FID protocol (the paper): pytorch-fid's Inception, 1,000 ancestral DDPM samples per model, against the
Fashion-MNIST test split. Numbers from different protocols are not comparable: at 1,000 samples even
real data scores about 15.5 (the small-sample floor), and EMA weights usually score differently from
the raw ones; ``fid.json`` therefore records the full protocol next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from evaluation.fid import (
    WEIGHTS_FILENAME,
    EvalError,
    fid_of_images,
    find_inception_weights,
    known_datasets,
    load_images_npz,
    load_stats,
    parse_source,
    reference_statistics,
    save_stats,
    source_statistics,
)
from evaluation.sample import (
    SAMPLERS,
    load_weights,
    run_model_files,
    sample_images,
    sampler_steps,
    save_grid,
    save_npz,
)

STAGES = ("all", "sample", "score")
SAMPLES_JSON = "samples.json"
FID_FLOOR_NOTE = (
    "FID is biased upwards at small sample counts: 1,000 real Fashion-MNIST training images score "
    "about 15.5 against the 10,000 test images, so numbers are comparable only under the same protocol"
)


def _device(device: str | torch.device) -> torch.device:
    """'auto' -> this rank's GPU when there is one, else the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _ref_stats(ref: str | tuple[np.ndarray, np.ndarray], **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    return (ref[0], ref[1]) if isinstance(ref, tuple) else reference_statistics(ref, **kw)


def fid_of_model(
    model: nn.Module,
    diffusion,
    ref_stats: tuple[np.ndarray, np.ndarray] | str,
    num_samples: int,
    *,
    image_shape: tuple[int, int, int],
    sampler: str = "ddpm",
    steps: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    inception_weights: str | os.PathLike[str] | None = None,
    fid_batch_size: int = 50,
    data_root: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> float:
    """FID of ``num_samples`` samples of ``model`` against ``ref_stats`` ((mu, sigma) or a source spec).

    For FID during training: samples in this process only (no collectives, so ranks holding different
    client models never mix their samples); the model's training flag is restored.
    """
    stats = _ref_stats(ref_stats, device=device, weights=inception_weights, batch_size=fid_batch_size,
                       data_root=data_root)
    x = sample_images(model, diffusion, num_samples, image_shape, sampler=sampler, steps=steps,
                      batch_size=batch_size, device=device, seed=seed, distributed=False, progress=progress)
    return fid_of_images(x, stats, batch_size=fid_batch_size, device=device, weights=inception_weights,
                         progress=progress)


def default_reference(cfg) -> str:
    """The paper's reference: the test split of the run's dataset."""
    if cfg.data.dataset not in known_datasets():
        raise EvalError(f"no default reference for dataset {cfg.data.dataset!r}: pass --ref "
                        "(a statistics .npz, an image folder, or e.g. fashion-mnist:test)")
    return f"{cfg.data.dataset}:test"


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    progress: bool | None = None,
    write: bool = True,
    stage: str = "all",
) -> dict[str, Any]:
    """Sample every model of a finished run, score it, write fid.json, TensorBoard scalars and samples.

    ``stage``: 'all' samples and scores; 'sample' only samples (``eval/samples_*.npz`` and grids, plus
    ``eval/samples.json`` with the protocol: no Inception weights or reference needed, e.g. on a GPU node
    without them); 'score' scores those saved samples under the protocol recorded with them (e.g. later, on
    a CPU machine that has the weights), then writes fid.json as 'all' would.


    Models: ``models/global[_ema].pt`` (FULL/USplit) or ``models/client{k}[_ema].pt`` (UDec/ULatDec,
    one FID per client; fid/fid_std are their mean and population std). ``num_samples`` (None = 1,000, the
    paper's), ``sampler`` (None = 'ddpm') and ``seed`` (None = 0) set the protocol. ``weights``: raw, ema,
    both, or None = both when EMA files exist. Every model is sampled with the same seed (same noise), so raw
    vs EMA and client vs client differ only by the weights. ``ref``: a statistics .npz, an image
    folder, an .npz of images or a dataset split; None = the run dataset's test split. Computed
    reference statistics are cached under ``<data root>/fid_stats`` (else ``RUN_DIR/eval``).
    With an initialised process group, sampling is spread over the ranks, rank 0 scores and writes,
    and every rank returns rank 0's result.
    """
    from fedrun.build import build_diffusion, build_model, image_shape
    from fedrun.config import RunConfig

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise EvalError(f"{run_dir} is not a run directory (no config.json)")
    if stage not in STAGES:
        raise EvalError(f"invalid stage={stage!r}: allowed: {', '.join(STAGES)}")
    cfg = RunConfig.from_json((run_dir / "config.json").read_text())
    method, num_clients = cfg.federation.method, cfg.federation.clients
    eval_dir = run_dir / "eval"
    saved = _saved_samples(eval_dir, num_samples, sampler, steps, seed, weights) if stage == "score" else None
    if saved is not None:  # the protocol is the one the samples were drawn with
        num_samples, sampler, seed = saved["num_samples"], saved["sampler"], saved["seed"]
        ddim_steps, batch_size = saved["ddim_steps"], saved["batch_size"]
        files = {kind: [(label, eval_dir / name) for label, name in entries.items()]
                 for kind, entries in saved["files"].items()}
    else:
        num_samples = 1000 if num_samples is None else num_samples
        sampler = sampler or "ddpm"
        seed = 0 if seed is None else seed
        files = run_model_files(run_dir, method, num_clients, weights)
        ddim_steps = sampler_steps(sampler, steps)
    if num_samples < 2:
        raise EvalError(f"invalid num_samples={num_samples}: FID needs at least 2")
    score = stage != "sample"
    ref = ref or default_reference(cfg)
    data_root = data_root or cfg.data.root
    ref_source = parse_source(ref) if score else None  # a bad --ref fails before anything is computed
    if score:
        find_inception_weights(inception_weights)  # as does a missing weights file
    dev = _device(device)
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    # Reference first (rank 0), so a missing data set fails before minutes of sampling; the outcome is
    # shared so that no rank waits in a collective for a rank that has failed.
    stats, error = None, None
    if is_main and score:
        try:
            size = cfg.data.image_size if ref_source.kind == "dataset" else None  # as the model saw it
            stats = reference_statistics(ref, data_root=data_root, image_size=size, batch_size=fid_batch_size,
                                         device=dev, weights=inception_weights, progress=progress,
                                         cache_dirs=[Path(data_root) / "fid_stats", eval_dir])
        except Exception as e:  # re-raised below on rank 0, reported on the others
            error = e
    failed = _broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed:
        raise EvalError(f"rank 0 failed to prepare the FID reference: {failed}")

    channels, size = image_shape(cfg)
    diffusion = build_diffusion(cfg)
    results: dict[str, Any] = {}
    written: dict[str, dict[str, str]] = {}
    mean_pixels: dict[str, dict[str, float]] = {}
    for kind, entries in files.items():
        per_model: dict[str, float] = {}
        brightness: dict[str, float] = {}
        for label, path in entries:
            if saved is not None:
                x = load_images_npz(path) if is_main else None
            else:
                model = load_weights(build_model(cfg), path).to(dev)
                x = sample_images(model, diffusion, num_samples, (channels, size, size), sampler=sampler,
                                  steps=ddim_steps, batch_size=batch_size, device=dev, seed=seed,
                                  progress=progress)
                del model
                if is_main and (write or not score):
                    stem = f"{label}_{kind}"
                    save_npz(x, eval_dir / f"samples_{stem}.npz")
                    save_grid(x, eval_dir / f"grid_{stem}.png")
                    written.setdefault(kind, {})[label] = f"samples_{stem}.npz"
            if is_main:  # mean pixel (0-255): drifting brightness is a known failure of raw DDPM weights
                brightness[label] = round(float(x.float().mean()), 3)
            if is_main and score:
                per_model[label] = fid_of_images(x, stats, batch_size=fid_batch_size, device=dev,
                                                 weights=inception_weights, progress=progress)
        mean_pixels[kind] = brightness
        if is_main and score:
            values = list(per_model.values())
            results[kind] = {
                "fid": float(np.mean(values)),
                "fid_std": float(np.std(values, ddof=0)),
                "per_client": values if method in ("udec", "ulatdec") else None,
                "models": per_model,
                "mean_pixel": brightness,
            }

    protocol = {
        "num_samples": num_samples,
        "reference": ref if score else None,
        "sampler": sampler,
        "steps": ddim_steps if ddim_steps is not None else cfg.diffusion.timesteps,
        "weights": list(files),
        "seed": seed,
        "batch_size": batch_size,
        "inception": f"pytorch-fid InceptionV3 pool3 (2048-d), {WEIGHTS_FILENAME}",
        "note": FID_FLOOR_NOTE,
    }
    out: dict[str, Any] | None = None
    if is_main and not score:
        out = {"stage": "sample", "files": written, "mean_pixel": mean_pixels, "method": method,
               "clients": num_clients,
               "rounds": cfg.federation.rounds,
               "protocol": {k: v for k, v in protocol.items() if k not in ("reference", "inception", "note")}}
        _write_json(eval_dir / SAMPLES_JSON, out)
    elif is_main:
        headline = "ema" if "ema" in results else "raw"
        out = {
            "fid": results[headline]["fid"],
            "fid_std": results[headline]["fid_std"],
            "per_client": results[headline]["per_client"],
            "headline_weights": headline,
            "results": results,
            "method": method,
            "clients": num_clients,
            "rounds": cfg.federation.rounds,
            "protocol": {**protocol, **({"sampled_apart": True} if saved is not None else {})},
        }
        if write:
            _write_json(run_dir / "fid.json", out)
            _log_tensorboard(run_dir / "tb", results, cfg.federation.rounds)
    return _broadcast(out)


def _saved_samples(eval_dir: Path, num_samples: int | None, sampler: str | None, steps: int | None,
                   seed: int | None, weights: str | None) -> dict[str, Any]:
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
            raise EvalError(f"--{key.replace('_', '-')} {value} differs from the saved samples' {proto[key]} "
                            f"({path}): drop it, or sample again")
    files = rec["files"]
    if weights is not None:
        wanted = ["raw", "ema"] if weights == "both" else [weights]
        missing = [k for k in wanted if k not in files]
        if missing:
            raise EvalError(f"no saved {', '.join(missing)} samples in {path} (saved: {', '.join(files)})")
        files = {k: files[k] for k in wanted}
    absent = [name for entries in files.values() for name in entries.values() if not (eval_dir / name).is_file()]
    if absent:
        raise EvalError(f"saved sample file(s) missing from {eval_dir}: {', '.join(absent)}")
    return {"num_samples": proto["num_samples"], "sampler": proto["sampler"], "seed": proto["seed"],
            "batch_size": proto["batch_size"], "files": files,
            "ddim_steps": proto["steps"] if proto["sampler"] == "ddim" else None}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _log_tensorboard(tb_dir: Path, results: dict[str, Any], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for kind, r in results.items():
            writer.add_scalar(f"fid/{kind}", r["fid"], step)
            if r["per_client"] is not None:
                for label, v in r["models"].items():
                    writer.add_scalar(f"fid/{kind}/{label}", v, step)
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# CLI.


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    """Add the eval, fid and report subcommands to ``fedrun``'s subparsers."""
    p = sub.add_parser("eval", help="sample a finished run's models and score their FID",
                       description="Sample every model of RUN_DIR and score FID; writes RUN_DIR/fid.json, "
                                   "fid/<weights> to RUN_DIR/tb and samples to RUN_DIR/eval/. "
                                   + FID_FLOOR_NOTE + ".")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--num-samples", type=_positive_int, default=None,
                   help="samples per model (default 1000, the paper's)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (default): ancestral over all T steps (the paper's sampler); ddpm-clip: the same "
                        "with x0 clipped to [-1, 1] each step (Ho et al.'s code); ddim: --steps steps")
    p.add_argument("--steps", type=_positive_int, default=None, help="DDIM steps (default 50)")
    p.add_argument("--weights", choices=("raw", "ema", "both"), default=None,
                   help="which weights to score (default: both when EMA files exist, else raw)")
    p.add_argument("--ref", default=None,
                   help="reference: DATASET:SPLIT (default: the run dataset's test split), a statistics "
                        ".npz, an image folder or an .npz of images")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    p.add_argument("--stage", choices=STAGES, default="all",
                   help="all: sample and score; sample: only write eval/samples_*.npz (no Inception weights "
                        "needed, e.g. on a GPU node); score: score those saved samples (e.g. on another machine)")
    p.add_argument("--batch-size", type=_positive_int, default=250, help="sampling batch size per rank")
    p.add_argument("--fid-batch-size", type=_positive_int, default=50, help="Inception batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: each rank its GPU)")
    p.add_argument("--data-root", default=None, help="dataset root (default: the run's data.root)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"pytorch-fid's {WEIGHTS_FILENAME} (default: $TORCH_HOME/hub/checkpoints/)")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("fid", help="FID between two image sources (like python -m pytorch_fid)",
                       description="FID of A against B. A source is an image folder, an .npz of uint8 "
                                   "images (key x, N x C x H x W), a statistics .npz (mu, sigma) or a "
                                   "dataset split: "
                                   + ", ".join(f"{d}:test" for d in known_datasets()) + " (or :train).")
    p.add_argument("sources", nargs=2, metavar="SRC", help="two sources (with --save-stats: SRC OUT.npz)")
    p.add_argument("--save-stats", action="store_true",
                   help="write the statistics of the first source to the second path (pytorch-fid's format) "
                        "instead of scoring")
    p.add_argument("--num", "--limit", dest="limit", type=_positive_int, default=None,
                   help="take at most this many images from each source (the first ones)")
    p.add_argument("--batch-size", type=_positive_int, default=50, help="Inception batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--data-root", default=None, help="dataset root (default: $FEDRUN_DATA)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"pytorch-fid's {WEIGHTS_FILENAME} (default: $TORCH_HOME/hub/checkpoints/)")
    p.set_defaults(func=run_fid)

    p = sub.add_parser("report", help="Table 1 (Markdown + CSV) and Figure 4 (PNG) of a sweep directory")
    p.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    p.add_argument("--csv", type=Path, default=None, help="CSV path (default SWEEP_DIR/table1.csv)")
    p.add_argument("--figure", type=Path, default=None, help="Figure 4 path (default SWEEP_DIR/figure4.png)")
    p.add_argument("--k", type=_positive_int, default=None,
                   help="clients K of the Figure 4 curves (default 5, else the largest K)")
    p.add_argument("--weights", choices=("raw", "ema"), default=None,
                   help="FID of these weights (default: each run's headline, EMA when evaluated)")
    p.add_argument("--digits", type=int, default=1, help="decimals of the Markdown FID cells")
    p.set_defaults(func=run_report)


def _error(e: Exception) -> int:
    print(f"fedrun: error: {e}", file=sys.stderr)
    return 2


def run_eval(args: argparse.Namespace) -> int:
    from fedrun.dist import cleanup, init_distributed

    try:
        ctx = init_distributed(args.device, 600)
    except (RuntimeError, ValueError) as e:
        return _error(e)
    try:
        out = evaluate_run(args.run_dir, num_samples=args.num_samples, ref=args.ref, sampler=args.sampler,
                           steps=args.steps, weights=args.weights, device=ctx.device,
                           batch_size=args.batch_size, seed=args.seed, data_root=args.data_root,
                           inception_weights=args.inception_weights, fid_batch_size=args.fid_batch_size,
                           stage=args.stage)
    except EvalError as e:
        return _error(e)
    finally:
        cleanup()
    if ctx.is_main and args.stage == "sample":
        eval_dir = Path(args.run_dir) / "eval"
        for kind, entries in out["files"].items():
            for label, name in entries.items():
                print(f"samples ({label}, {kind}): {eval_dir / name}")
        print(f"wrote {eval_dir / SAMPLES_JSON}; score them with: fedrun eval {args.run_dir} --stage score",
              file=sys.stderr)
    elif ctx.is_main:
        for kind, r in out["results"].items():
            extra = f" ± {r['fid_std']:.2f} over {len(r['per_client'])} clients" if r["per_client"] else ""
            pixels = list(r["mean_pixel"].values())
            print(f"FID ({kind}): {r['fid']:.2f}{extra}  (mean sample pixel {np.mean(pixels):.1f} of 255)")
        print(f"wrote {Path(args.run_dir) / 'fid.json'}", file=sys.stderr)
    return 0


def run_fid(args: argparse.Namespace) -> int:
    dev = _device(args.device)
    kw = dict(data_root=args.data_root, limit=args.limit, batch_size=args.batch_size, device=dev,
              weights=args.inception_weights)
    a, b = args.sources
    try:
        src_a = parse_source(a)
        if args.save_stats:
            out = Path(b)
            if out.exists():
                raise EvalError(f"{out} exists; refusing to overwrite it")
            if out.suffix != ".npz":
                raise EvalError(f"{out}: the statistics file must end in .npz")
            mu, sigma, n = source_statistics(src_a, **kw)
            save_stats(out, mu, sigma, n or None)
            print(f"wrote statistics of {n or 'stored'} images to {out}", file=sys.stderr)
            return 0
        src_b = parse_source(b)
        if src_a.kind != "stats" or src_b.kind != "stats":
            find_inception_weights(args.inception_weights)  # fail before loading any images
        m1, s1 = load_stats(src_a.path) if src_a.kind == "stats" else source_statistics(src_a, **kw)[:2]
        m2, s2 = load_stats(src_b.path) if src_b.kind == "stats" else source_statistics(src_b, **kw)[:2]
    except EvalError as e:
        return _error(e)
    from evaluation.fid import frechet_distance

    print(f"FID: {frechet_distance(m1, s1, m2, s2)}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from evaluation import report

    try:
        runs = report.find_runs(args.sweep_dir)
        if not runs:
            raise EvalError(f"no runs (config.json with fid.json or comm.jsonl) under {args.sweep_dir}")
        rows = report.table1(runs, weights=args.weights)
        print(report.table1_markdown(rows, digits=args.digits), end="")
        csv_path = report.write_csv(rows, args.csv or args.sweep_dir / "table1.csv")
        print(f"wrote {csv_path}", file=sys.stderr)
        unevaluated = [r for r in runs if r.fid is None]
        if unevaluated:
            print(f"note: {len(unevaluated)} run(s) without fid.json (run `fedrun eval RUN_DIR`): "
                  + ", ".join(str(r.path) for r in unevaluated[:5]), file=sys.stderr)
        k = args.k or report.default_figure_k(runs)
        if k is None:
            print("note: no comm.jsonl with K > 1: Figure 4 skipped", file=sys.stderr)
        else:
            fig = report.figure4(runs, args.figure or args.sweep_dir / "figure4.png", clients=k)
            print(f"wrote {fig}", file=sys.stderr)
    except EvalError as e:
        return _error(e)
    return 0
