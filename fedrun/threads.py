"""How many intra-op CPU threads each rank uses: chosen on purpose, said once, easy to change.

The count decides the speed of a CPU step several times over: on a shared 2-core machine 2 threads ran the
paper UNet's step 1.7x faster than 1 while the other core was free and 13-15x slower while other work held it
(``bench_step --threads 1,2``, BENCHMARKS.md). torch's default, one thread per core in every process,
oversubscribes a node as soon as several ranks share it. So every rank sets its count, in this order:

1. ``threads=N`` of the config (``--set threads=N``), N >= 1: the user said so;
2. else ``$OMP_NUM_THREADS`` when it holds a positive integer: the variable every OpenMP program honours, set
   by the user, a batch script, ``fedrun submit`` (the task's cpus-per-task) or torchrun (1 per rank when it
   starts several on a node and the user set none);
3. else auto: the cores this process may run on (``os.sched_getaffinity``: taskset, a cgroup or a Slurm
   binding count) divided by the ranks on its node (``LOCAL_WORLD_SIZE``, exported by torchrun and
   ``fedrun submit``; else ``WORLD_SIZE``, as if on one node), at least 1.

``choose_threads`` is the rule as a pure function; ``apply_threads`` reads this process's facts, sets torch and
remembers the previous count for ``restore_threads`` (``train()`` leaves its caller's setting as it found it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

SOURCES = ("config", "OMP_NUM_THREADS", "auto")
"""Where a count came from, in the order of precedence."""


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count of one rank and why."""

    threads: int
    """The count set (torch.set_num_threads)."""
    cores: int
    """Cores this process may run on."""
    local_ranks: int
    """Ranks on this node sharing them."""
    source: str
    """One of ``SOURCES``."""
    auto: int
    """What auto gives here (cores // local ranks, at least 1)."""
    omp_num_threads: str | None = None
    """$OMP_NUM_THREADS as found (None = not set)."""
    previous: int = 0
    """torch's count before ``apply_threads`` (0 = not applied)."""
    load: float | None = None
    """The machine's 1-minute load average when chosen (None = unknown): only for the hint in ``describe``."""

    def describe(self) -> str:
        """One line for the run's log: '2 ranks x 1 thread (2 cores; auto = cores / ranks on this node; ...)'."""
        who = "1 process" if self.local_ranks == 1 else f"{self.local_ranks} ranks on this node"
        why = {
            "config": f"threads={self.threads}",
            "OMP_NUM_THREADS": f"from OMP_NUM_THREADS={self.omp_num_threads}"
            + (f", auto would give {self.auto}" if self.auto != self.threads else ""),
            "auto": "auto = cores / ranks on this node",
        }[self.source]
        if self.source != "OMP_NUM_THREADS" and self.omp_num_threads is not None:
            state = "ignored: not a positive integer" if self.source == "auto" else "overridden"
            why += f"; OMP_NUM_THREADS={self.omp_num_threads} {state}"
        cores = f"{self.cores} core{'s' if self.cores != 1 else ''}"
        if self.threads * self.local_ranks > self.cores:
            why += f"; {self.threads * self.local_ranks} threads on {cores}: oversubscribed"
        elif self.threads > 1 and self.load is not None and self.load > self.cores:
            # Other work holds the cores: OpenMP threads then wait on each other (BENCHMARKS.md: 13-15x slower).
            why += f"; the machine is busy (load {self.load:.1f} on {cores}): fewer threads may be much faster"
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{who} x {threads} ({cores}; {why}; --set threads=N changes it)"


def positive_int(text: str | None) -> int | None:
    """``text`` as a positive integer, else None. An OpenMP list ('4,2') counts by its first entry."""
    if text is None:
        return None
    try:
        n = int(text.split(",")[0].strip())
    except ValueError:
        return None
    return n if n >= 1 else None


def choose_threads(
    requested: int, cores: int, local_ranks: int, omp_num_threads: str | None = None, load: float | None = None
) -> ThreadChoice:
    """The count for one rank: ``requested`` (config ``threads``; 0 = auto), else ``$OMP_NUM_THREADS`` when it is
    a positive integer, else ``cores // local_ranks`` (at least 1). ``load`` (the 1-minute load average) never
    changes the count, which must not depend on a moment's load; it only adds a hint to the line."""
    if requested < 0:
        raise ValueError(f"invalid threads={requested}: allowed: 0 (auto) or a positive integer")
    cores, local_ranks = max(int(cores), 1), max(int(local_ranks), 1)
    auto = max(cores // local_ranks, 1)
    env = positive_int(omp_num_threads)
    if requested:
        threads, source = requested, "config"
    elif env is not None:
        threads, source = env, "OMP_NUM_THREADS"
    else:
        threads, source = auto, "auto"
    return ThreadChoice(threads, cores, local_ranks, source, auto, omp_num_threads, load=load)


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cgroups, Slurm binding), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def local_ranks(env: Mapping[str, str] | None = None) -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE, else WORLD_SIZE (a launcher that exports no local count: as if on
    one node, which errs towards fewer threads), else 1."""
    env = os.environ if env is None else env
    return positive_int(env.get("LOCAL_WORLD_SIZE")) or positive_int(env.get("WORLD_SIZE")) or 1


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def apply_threads(requested: int, alone: bool = False) -> ThreadChoice:
    """Choose this process's count (``choose_threads``) and set it in torch; ``restore_threads`` undoes it.

    ``alone``: the other ranks of this node have finished (rank 0 scoring after training), so this one may use
    every core it may run on; the OMP_NUM_THREADS that torchrun or ``fedrun submit`` set per rank then no longer
    applies (a Slurm binding still does, through the affinity). ``threads=N`` of the config still wins."""
    import torch  # here, not at import: the rule itself needs no torch

    ranks, omp = local_ranks(), os.environ.get("OMP_NUM_THREADS")
    if alone and ranks > 1:
        ranks, omp = 1, None
    choice = choose_threads(requested, available_cores(), ranks, omp, load=_load_average())
    previous = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    return replace(choice, previous=previous)


def restore_threads(choice: ThreadChoice) -> None:
    """Set torch's count back to what it was before ``apply_threads`` (a no-op for a choice never applied)."""
    if choice.previous:
        import torch

        torch.set_num_threads(choice.previous)
