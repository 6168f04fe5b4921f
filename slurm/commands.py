"""`fedrun submit` and `fedrun sweep`: thin command-line wrappers around slurm.submit / slurm.sweep.

The CLI passes the training entry to ``register`` (``train_fn``): what every Slurm task runs. Registering
imports neither submitit nor torch; the commands import submitit when they run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedrun.args import add_config_arguments, config_from_args

if TYPE_CHECKING:
    from slurm.submit import TrainFn


def add_slurm_arguments(p: argparse.ArgumentParser) -> None:
    """Resources of the Slurm job (per run: each array element of a sweep gets the same)."""
    g = p.add_argument_group("Slurm resources (per run)")
    g.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1)")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="GPUs per node, one client rank each (default 0: a CPU run with gloo)",
    )
    g.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="client ranks per node (default: --gpus-per-node; CPU: one rank per client)",
    )
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (sets OMP_NUM_THREADS)")
    g.add_argument("--mem", default=None, help="memory per node, sbatch syntax, e.g. 64G")
    g.add_argument("--time", default="60", help="time limit of one attempt: minutes or [D-]HH:MM:SS (default 60)")
    g.add_argument("--slurm-partition", default=None, metavar="NAME", help="Slurm partition (sbatch -p)")
    g.add_argument("--account", default=None, help="Slurm account (sbatch -A)")
    g.add_argument("--qos", default=None, help="Slurm quality of service")
    g.add_argument("--job-name", default=None, help="Slurm job name (default fedrun-<run or sweep name>)")
    g.add_argument(
        "--max-requeues", type=int, default=3, help="times a timed-out job requeues itself and resumes (default 3)"
    )
    g.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="USR2 (checkpoint + requeue) this many seconds before the time limit (default 120)",
    )
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --sbatch constraint=a100 --sbatch exclusive (repeatable)",
    )
    g.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    g.add_argument("--wait", action="store_true", help="wait until the job(s) end; exit 1 if one failed")


def options_from_args(args: argparse.Namespace):
    from slurm.submit import SlurmOptions, parse_sbatch_options, parse_time

    return SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time_min=parse_time(args.time),
        partition=args.slurm_partition,
        account=args.account,
        qos=args.qos,
        job_name=args.job_name,
        max_requeues=args.max_requeues,
        signal_delay_s=args.signal_delay_s,
        array_parallelism=getattr(args, "array_parallelism", None),
        sbatch=parse_sbatch_options(args.sbatch),
    )


def _error(e: Exception) -> int:
    print(f"fedrun: error: {e}", file=sys.stderr)
    return 2


def _wait(jobs: list) -> int:
    """Block until every job ends; 1 if any failed (its error is printed)."""
    failed = 0
    for job in jobs:
        try:
            job.result()
            print(f"job {job.job_id}: completed", flush=True)
        except Exception as e:  # submitit raises FailedJobError / UncompletedJobError with the log tail
            failed += 1
            print(f"job {job.job_id}: FAILED ({type(e).__name__}): {str(e)[-2000:]}", file=sys.stderr)
    return 1 if failed else 0


def run_submit(args: argparse.Namespace) -> int:
    from slurm.submit import Submission, SubmitError, resolve_tasks_per_node, submit

    try:
        cfg = config_from_args(args)
        opts = options_from_args(args)
        out = submit(cfg, opts, args.train_fn, dry_run=args.dry_run)
        tpn = resolve_tasks_per_node(opts, cfg.federation.clients)
    except SubmitError as e:
        return _error(e)
    if args.dry_run:
        print(out)
        return 0
    if out is None:
        print(f"fedrun: {cfg.run_dir()} is already finished (DONE present); nothing submitted")
        return 0
    assert isinstance(out, Submission)
    kind = f"{opts.gpus_per_node} GPU(s)/node, nccl" if opts.gpus_per_node else "CPU, gloo"
    print(f"submitted job {out.job_id}: {opts.nodes * tpn} rank(s) on {opts.nodes} node(s) ({kind})")
    print(f"  run dir: {out.run_dir}")
    print(f"  stdout:  {out.stdout}")
    print(f"  stderr:  {out.stderr}   (rank t: {out.job_id}_<t>_log.*)")
    print(f"  follow:  squeue -j {out.job_id}; sacct -j {out.job_id}; tail -f {out.stderr}", flush=True)
    return _wait([out.job]) if args.wait else 0


def run_sweep(args: argparse.Namespace) -> int:
    from slurm.submit import SubmitError
    from slurm.sweep import format_plan, load_grid, parse_grid_sets, with_axes
    from slurm.sweep import run_sweep as _run_sweep

    try:
        grid = with_axes(load_grid(args.grid) if args.grid else {}, parse_grid_sets(args.grid_set))
        res = _run_sweep(
            config_from_args(args),
            grid,
            options_from_args(args),
            args.train_fn,
            sweep_dir=args.sweep_dir,
            dry_run=args.dry_run,
            local=args.local,
        )
    except SubmitError as e:
        return _error(e)
    print(format_plan(res))
    if args.local and not args.dry_run:
        failed = sum(p.status == "failed" for p in res.points)
        print(f"  manifest: {res.manifest}" + (f"; {failed} run(s) failed" if failed else ""), flush=True)
        return 1 if failed else 0
    if args.dry_run:
        todo = sum(p.status == "todo" for p in res.points)
        if args.local:
            print(f"\ndry run: would run {todo} run(s) here, one after the other (--local: no Slurm)")
            return 0
        print(f"\ndry run: would submit {todo} run(s) as one job array; sbatch script:\n")
        print(res.preview)
        return 0
    if res.array_job_id is None:
        print("nothing to submit: every run is finished or still queued")
    else:
        n = len(res.submitted)
        print(f"submitted array {res.array_job_id}: {n} element(s) (array indices 0-{n - 1})")
        print(f"  logs:     {res.sweep_dir / 'slurm'}/{res.array_job_id}_<index>_<rank>_log.{{out,err}}")
        print(f"  follow:   squeue -r -j {res.array_job_id}; sacct -j {res.array_job_id}")
    print(f"  manifest: {res.manifest}", flush=True)
    return _wait(res.jobs) if args.wait and res.jobs else 0


def register(sub: argparse._SubParsersAction, train_fn: TrainFn) -> None:
    """Add ``submit`` and ``sweep`` to ``sub``; their jobs run ``train_fn(cfg)`` in every task."""
    p = sub.add_parser(
        "submit",
        help="submit one federated run to Slurm (one task per client rank)",
        description="Submit one run through submitit: each Slurm task is a client rank "
        "running fedrun.train; the job requeues itself on timeout and resumes.",
    )
    add_config_arguments(p)
    add_slurm_arguments(p)
    p.set_defaults(func=run_submit, train_fn=train_fn)

    p = sub.add_parser(
        "sweep",
        help="submit a grid of runs as one Slurm job array",
        description="Grid over config fields -> one job array; SWEEP_DIR/manifest.json maps "
        "array index <-> overrides <-> run dir <-> job id. Finished runs are skipped.",
    )
    add_config_arguments(p)
    g = p.add_argument_group("grid")
    g.add_argument(
        "--grid",
        type=Path,
        default=None,
        metavar="FILE.yaml",
        help="YAML mapping config field -> list of values, e.g. 'federation.method: [full, udec]'",
    )
    g.add_argument(
        "--grid-set",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="a grid axis on the command line, e.g. federation.seed=1,2 (repeatable; "
        "tuple values in brackets: model.dim_mults=[1,2],[1,2,4])",
    )
    g.add_argument(
        "--sweep-dir",
        type=Path,
        default=None,
        help="folder of the sweep's runs and manifest (default OUT_DIR/NAME, or OUT_DIR/sweep-PRESET)",
    )
    g.add_argument(
        "--local",
        action="store_true",
        help="no Slurm: run the unfinished points here, one after the other, each as one process "
        "hosting all its clients (started again, it skips finished runs and resumes the others)",
    )
    g.add_argument(
        "--array-parallelism",
        type=int,
        default=None,
        help="at most N array elements run at once (sbatch --array=...%%N)",
    )
    add_slurm_arguments(p)
    p.set_defaults(func=run_sweep, train_fn=train_fn)
