"""`fedrun eval`, `fedrun fid`, `fedrun report`: the argparse commands. The work is in ``evaluation.evaluate``
(a run's FID and KID), ``evaluation.sources`` / ``evaluation.metrics`` (FID and KID of two sources) and
``evaluation.report`` / ``evaluation.figure4``.

Registering the commands imports no torch (``fedrun --help`` is instant): the choice lists come from the
torch-free ``evaluation.protocol``, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from evaluation.errors import EvalError
from evaluation.protocol import (
    FID_FLOOR_NOTE,
    SAMPLERS,
    SAMPLES_JSON,
    STAGES,
    WEIGHT_CHOICES,
    WEIGHT_KINDS,
    WEIGHTS_FILENAME,
    known_datasets,
)
from fedrun.config import RunConfig
from fedrun.output import ConsoleSink
from fedrun.rundir import RunDir

KID_FEATURES_HELP = (
    "KID needs the reference's Inception features, not only mu and sigma: a dataset split, an image folder or "
    "an .npz of images provides them (computed once, cached with the statistics), a statistics .npz only when "
    "written by `fedrun fid --save-stats`; a statistics .npz of mu and sigma only (pytorch-fid's) gives FID "
    "and no KID"
)
LIST_LIMIT = 10
"""Items of a list printed in full; longer lists say how many more."""


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    """Add the eval, fid and report subcommands to ``fedrun``'s subparsers."""
    _register_eval(sub)
    _register_fid(sub)
    _register_report(sub)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="sample a finished run's models and score their FID and KID",
        description="Sample every model of RUN_DIR and score FID and KID (for UDec/ULatDec: "
        "each client's, their mean ± std, and the pooled samples of all clients); "
        "writes RUN_DIR/fid.json, fid/<weights> to RUN_DIR/scores (TensorBoard) and "
        "samples to RUN_DIR/eval/. " + FID_FLOOR_NOTE + "; KID has no such floor.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument(
        "--num-samples", type=_positive_int, default=None, help="samples per model (default 1000, the paper's)"
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=None,
        help="ddpm (default): ancestral over all T steps (the paper's sampler); ddpm-clip: the same "
        "with x0 clipped to [-1, 1] each step (Ho et al.'s code); ddim: --steps steps; ddim-clip: the same "
        "with x0 clipped each step",
    )
    p.add_argument("--steps", type=_positive_int, default=None, help="DDIM steps (default 50)")
    p.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default=None,
        help="which weights to score (default: both when EMA files exist, else raw)",
    )
    p.add_argument(
        "--ref",
        default=None,
        help="reference: DATASET:SPLIT (default: the run dataset's test split), a statistics "
        ".npz, an image folder or an .npz of images. " + KID_FEATURES_HELP,
    )
    p.add_argument(
        "--ref-num",
        type=_positive_int,
        default=None,
        metavar="N",
        help="only the first N images of --ref (not of a statistics file): a quicker reference, "
        "computed once and cached apart (default: all)",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    p.add_argument(
        "--stage",
        choices=STAGES,
        default="all",
        help="all: sample and score; sample: only write eval/samples_*.npz (no Inception weights "
        "needed, e.g. on a GPU node); score: score those saved samples (e.g. on another machine)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=250, help="sampling batch size per rank")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the network from CUDA graphs while sampling (CUDA only; the same kernels, the same samples)",
    )
    p.add_argument("--fid-batch-size", type=_positive_int, default=50, help="Inception batch size")
    _add_scoring_arguments(p, "auto, cpu, cuda (under torchrun: each rank its GPU)", "the run's data.root")
    p.add_argument(
        "--dist-timeout-s",
        type=_positive_int,
        default=None,
        metavar="S",
        help="bound on every collective under torchrun (default: the run's dist_timeout_s)",
    )
    p.set_defaults(func=run_eval)


def _add_scoring_arguments(p: argparse.ArgumentParser, device_help: str, data_root_default: str) -> None:
    """--device, --data-root and --inception-weights: what every command that runs Inception takes."""
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--data-root", default=None, help=f"dataset root (default: {data_root_default})")
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help=f"pytorch-fid's {WEIGHTS_FILENAME} (default: $TORCH_HOME/hub/checkpoints/)",
    )


def _register_fid(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fid",
        help="FID and KID between two image sources (like python -m pytorch_fid)",
        description="FID and KID of A against B (KID first, the FID line last as pytorch-fid "
        "prints it). A source is an image folder, an .npz of uint8 images (key x, "
        "N x C x H x W), a statistics .npz (mu, sigma, and features when fedrun "
        "wrote it) or a dataset split: "
        + ", ".join(f"{d}:test" for d in known_datasets())
        + " (or :train). "
        + KID_FEATURES_HELP
        + ".",
    )
    p.add_argument("sources", nargs=2, metavar="SRC", help="two sources (with --save-stats: SRC OUT.npz)")
    p.add_argument(
        "--save-stats",
        action="store_true",
        help="write the statistics of the first source to the second path instead of scoring: "
        "pytorch-fid's format (mu, sigma) plus the Inception features KID needs (80 MB for "
        "10,000 images; pytorch-fid ignores them)",
    )
    p.add_argument(
        "--no-features",
        action="store_true",
        help="with --save-stats: mu and sigma only (a small file; FID against it, but no KID)",
    )
    p.add_argument(
        "--num",
        "--limit",
        dest="limit",
        type=_positive_int,
        default=None,
        help="take at most this many images from each source (the first ones)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=50, help="Inception batch size")
    _add_scoring_arguments(p, "auto, cpu, cuda, cuda:1 ...", "$FEDRUN_DATA")
    p.set_defaults(func=run_fid)


def _register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="Table 1 (FID and KID; Markdown + CSV) and Figure 4 (PNG) of a sweep",
        description="Table 1 of SWEEP_DIR's runs: N, FID and KID x 10^3, mean ± std over seeds "
        "(UDec/ULatDec: over clients and seeds, with the score of the pooled samples "
        "of all clients beside it), and Figure 4. Runs that differ in any setting "
        "(a config field that changes training, or the evaluation protocol) are "
        "never merged: each such field becomes a column of the rows.",
    )
    p.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR")
    p.add_argument("--csv", type=Path, default=None, help="CSV path (default SWEEP_DIR/table1.csv)")
    p.add_argument("--figure", type=Path, default=None, help="Figure 4 path (default SWEEP_DIR/figure4.png)")
    p.add_argument(
        "--k", type=_positive_int, default=None, help="clients K of the Figure 4 curves (default 5, else the largest K)"
    )
    p.add_argument(
        "--weights",
        choices=WEIGHT_KINDS,
        default=None,
        help="scores of these weights (default: each run's headline, EMA when evaluated)",
    )
    p.add_argument("--digits", type=int, default=1, help="decimals of the Markdown FID and KID x 10^3 cells")
    p.set_defaults(func=run_report)


def _error(e: Exception) -> int:
    print(f"fedrun: error: {e}", file=sys.stderr)
    return 2


def run_eval(args: argparse.Namespace) -> int:
    from evaluation.evaluate import evaluate_run, load_run_config
    from fedrun import dist

    run = RunDir(args.run_dir)
    try:
        cfg = load_run_config(run)
        ctx = dist.init_distributed(args.device, args.dist_timeout_s or cfg.dist_timeout_s)
    except (EvalError, RuntimeError, ValueError) as e:
        return _error(e)
    try:
        out = evaluate_run(
            run.root,
            num_samples=args.num_samples,
            ref=args.ref,
            sampler=args.sampler,
            steps=args.steps,
            weights=args.weights,
            device=ctx.device,
            batch_size=args.batch_size,
            seed=args.seed,
            data_root=args.data_root,
            inception_weights=args.inception_weights,
            fid_batch_size=args.fid_batch_size,
            stage=args.stage,
            ref_num=args.ref_num,
            graphs=args.cuda_graphs,
        )
        dist.leave()
    except EvalError as e:
        return _error(e)
    finally:
        dist.cleanup()
    if ctx.is_main:
        print_eval(run, out, args.stage)
    return 0


def score_finished_run(cfg: RunConfig, run_dir: Path) -> None:
    """``cfg.eval_samples`` after training: score the final models into fid.json
    (``evaluation.evaluate.evaluate_at_end``) on the cores the node's finished ranks have left to this one
    (``apply_threads(alone=True)``), print the scores. Skipped when
    fid.json is newer than DONE (a finished run started again)."""
    from evaluation.evaluate import evaluate_at_end
    from fedrun.threads import apply_threads, local_ranks, restore_threads

    run = RunDir(run_dir)
    if run.fid_json.is_file() and run.done.is_file() and run.fid_json.stat().st_mtime >= run.done.stat().st_mtime:
        print(f"fedrun: {run.fid_json} is newer than the run's DONE: not scored again", flush=True)
        return
    n, sink = cfg.eval_samples, ConsoleSink()
    ref = (cfg.fid_ref or f"{cfg.data.dataset}:test") + (
        f" (first {cfg.fid_ref_num} images)" if cfg.fid_ref_num else ""
    )
    sink.info(f"scoring {n} samples of each final model against {ref} (eval_samples)")
    threads = apply_threads(cfg.threads, alone=True)
    if local_ranks() > 1:  # only then does alone=True change the count: say so with the rule's own line
        sink.info(f"scoring alone, the other ranks of this node have finished: {threads.describe()}")
    try:
        out = evaluate_at_end(cfg, run.root)
    finally:
        restore_threads(threads)
    print_eval(run, out, "all")


def print_eval(run: RunDir, out: dict[str, Any], stage: str) -> None:
    """The scores on stdout; where they went, and what to do next, on stderr."""
    sink = ConsoleSink()
    if stage == "sample":
        for kind, entries in out["files"].items():
            for label, name in entries.items():
                print(f"samples ({label}, {kind}): {run.eval / name}")
        sink.info(f"wrote {run.eval / SAMPLES_JSON}; score them with: fedrun eval {run.root} --stage score")
        return
    subsets = out["protocol"]["kid"]["subsets"]
    for kind, r in out["results"].items():
        clients = f" over {len(r['per_client'])} clients" if r["per_client"] else ""
        pixels = list(r["mean_pixel"].values())
        extra = f" ± {r['fid_std']:.2f}{clients}" if clients else ""
        print(f"FID ({kind}): {r['fid']:.2f}{extra}  (mean sample pixel {sum(pixels) / len(pixels):.1f} of 255)")
        if r["kid"] is not None:
            size = next(iter(r["kid_models"].values()))["subset_size"]
            spread = clients or f" over {subsets} subsets of {size}"
            print(f"KID ({kind}): {r['kid']:.5f} ± {r['kid_std']:.5f}{spread}")
        if r["pooled"] is not None:
            p = r["pooled"]
            kid = "" if p["kid"] is None else f", KID {p['kid']:.5f} ± {p['kid_std']:.5f}"
            print(
                f"pooled samples of all {len(r['per_client'])} clients ({kind}, {p['num_samples']} samples): "
                f"FID {p['fid']:.2f}{kid}"
            )
    if out.get("kid_note"):
        sink.info(out["kid_note"])
    sink.info(f"wrote {run.fid_json}")


def run_fid(args: argparse.Namespace) -> int:
    from evaluation.fid import Reference, frechet_distance, save_reference
    from evaluation.inception import find_inception_weights
    from evaluation.kid import kid
    from evaluation.metrics import kid_text
    from evaluation.sources import parse_source, source_statistics
    from fedrun import dist

    sink = ConsoleSink()
    try:
        device = dist.pick_device(args.device)
    except (RuntimeError, ValueError) as e:
        return _error(e)
    kw = dict(
        data_root=args.data_root,
        limit=args.limit,
        batch_size=args.batch_size,
        device=device,
        weights=args.inception_weights,
        sink=sink,
    )
    try:
        src_a = parse_source(args.sources[0])
        if args.save_stats:
            out = Path(args.sources[1])
            if out.exists():
                raise EvalError(f"{out} exists; refusing to overwrite it")
            if out.suffix != ".npz":
                raise EvalError(f"{out}: the statistics file must end in .npz")
            ref = source_statistics(src_a, **kw)
            if args.no_features:
                ref = Reference(ref.mu, ref.sigma, n=ref.n)
            save_reference(out, ref)
            what = "statistics" if ref.features is None else "statistics and features"
            sink.info(f"wrote {what} of {ref.n or 'stored'} images to {out}")
            return 0
        src_b = parse_source(args.sources[1])
        if src_a.kind != "stats" or src_b.kind != "stats":
            find_inception_weights(args.inception_weights)  # fail before loading any images
        a, b = source_statistics(src_a, **kw), source_statistics(src_b, **kw)
    except EvalError as e:
        return _error(e)
    if a.features is not None and b.features is not None:
        print(f"KID: {kid_text(kid(a.features, b.features))}")
    else:
        sink.info(a.no_kid or b.no_kid)
    # The FID line last, as pytorch-fid prints it: scripts that read the last line keep working.
    print(f"FID: {frechet_distance(*a.stats, *b.stats)}")
    return 0


def listing(items: list[str], limit: int = LIST_LIMIT) -> str:
    """'a, b, c', or 'a, b, ... (and 7 more)' beyond ``limit`` items: a list is complete or says what it omits."""
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... (and {len(items) - limit} more)"


def run_report(args: argparse.Namespace) -> int:
    from evaluation import figure4, report

    sink = ConsoleSink()
    try:
        runs = report.find_runs(args.sweep_dir)
        if not runs:
            raise EvalError(f"no runs (config.json with fid.json or comm.jsonl) under {args.sweep_dir}")
        rows = report.table1(runs, weights=args.weights)
        keys = list(rows[0]["settings"])
        if keys:
            sink.info(f"runs differ in {', '.join(keys)}: one row per value (never merged)")
        print("FID:")
        print(report.table1_markdown(rows, digits=args.digits), end="")
        if report.has_kid(rows):
            print("\nKID x 10^3:")
            print(report.table1_markdown(rows, digits=args.digits, metric="kid"), end="")
        sink.info(f"wrote {report.write_csv(rows, args.csv or args.sweep_dir / 'table1.csv')}")
        unevaluated = [str(r.path) for r in runs if r.fid is None]
        if unevaluated:
            sink.info(
                f"note: {len(unevaluated)} run(s) without fid.json (run `fedrun eval RUN_DIR`): " + listing(unevaluated)
            )
        no_kid = [str(r.path) for r in runs if r.fid is not None and not r.kid_values(args.weights)]
        if no_kid:
            sink.info(
                f"note: {len(no_kid)} evaluated run(s) without KID (scored against a reference without "
                f"features; evaluate again with a dataset split or images as --ref): {listing(no_kid)}"
            )
        k = args.k or figure4.default_figure_k(runs)
        if k is None:
            sink.info("note: no comm.jsonl with K > 1: Figure 4 skipped")
        else:
            path = figure4.figure4(runs, args.figure or args.sweep_dir / "figure4.png", clients=k)
            notes = figure4.left_out(runs, k)
            sink.info(f"wrote {path} (K={k}" + (f"; not shown: {'; '.join(notes)})" if notes else ")"))
    except EvalError as e:
        return _error(e)
    return 0
