"""fedrun.threads: each rank's intra-op thread count from its cores, its node's ranks, OMP_NUM_THREADS and the
config, and the one line that says so."""

from __future__ import annotations

import pytest
import torch

from fedrun.config import ConfigError, RunConfig, apply_overrides
from fedrun.threads import apply_threads, choose_threads, local_ranks, positive_int, restore_threads


@pytest.mark.parametrize(
    "cores, ranks, expected",
    [
        (2, 1, 2),  # one process on a 2-core machine: both cores
        (2, 2, 1),  # torchrun --nproc_per_node=2 there: one each, no oversubscription
        (16, 4, 4),  # a 16-core node with 4 GPU ranks
        (17, 4, 4),  # the remainder is left idle rather than oversubscribed
        (1, 4, 1),  # never 0
        (8, 3, 2),
    ],
)
def test_auto_is_cores_over_the_ranks_of_the_node(cores, ranks, expected):
    c = choose_threads(0, cores, ranks)
    assert (c.threads, c.source, c.auto) == (expected, "auto", expected)


def test_precedence_config_then_omp_num_threads_then_auto():
    assert choose_threads(3, 16, 2, omp_num_threads="1").threads == 3  # --set threads=3 wins
    c = choose_threads(0, 16, 2, omp_num_threads="1")  # e.g. torchrun's default for 2 ranks
    assert (c.threads, c.source, c.auto) == (1, "OMP_NUM_THREADS", 8)
    assert choose_threads(0, 16, 2, omp_num_threads="4,2").threads == 4  # an OpenMP list: its first entry
    for bad in ("", "0", "-2", "many"):
        assert choose_threads(0, 16, 2, omp_num_threads=bad).source == "auto", bad
    with pytest.raises(ValueError, match="threads=-1"):
        choose_threads(-1, 2, 1)


def test_one_line_says_what_was_chosen_and_why():
    assert choose_threads(0, 2, 2).describe() == (
        "2 ranks on this node x 1 thread (2 cores; auto = cores / ranks on this node; --set threads=N changes it)"
    )
    assert choose_threads(0, 2, 1).describe().startswith("1 process x 2 threads (2 cores; auto")
    line = choose_threads(0, 16, 2, omp_num_threads="1").describe()
    assert "from OMP_NUM_THREADS=1, auto would give 8" in line
    line = choose_threads(4, 2, 1, omp_num_threads="2").describe()
    assert "threads=4" in line and "OMP_NUM_THREADS=2 overridden" in line
    assert "4 threads on 2 cores: oversubscribed" in line
    assert "OMP_NUM_THREADS=many ignored" in choose_threads(0, 2, 1, omp_num_threads="many").describe()


def test_local_ranks_from_the_launcher_environment():
    assert local_ranks({}) == 1
    assert local_ranks({"WORLD_SIZE": "4"}) == 4  # no local count exported: as if on one node
    assert local_ranks({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"}) == 2  # torchrun, fedrun submit
    assert local_ranks({"LOCAL_WORLD_SIZE": "x", "WORLD_SIZE": "3"}) == 3
    assert positive_int(None) is None and positive_int(" 5 ") == 5


def test_apply_sets_torch_and_restore_puts_the_callers_count_back(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        choice = apply_threads(0)
        assert choice.source == "OMP_NUM_THREADS" and torch.get_num_threads() == 1 and choice.previous == before
        torch.set_num_threads(before)
        choice = apply_threads(2)  # threads=2 in the config
        assert torch.get_num_threads() == 2
        restore_threads(choice)
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_a_rank_left_alone_on_its_node_uses_every_core_it_may_run_on(monkeypatch):
    """Rank 0 scoring after a torchrun job: its siblings have exited, so torchrun's per-rank
    OMP_NUM_THREADS=1 no longer applies; the affinity (a Slurm binding) and threads=N of the config still do."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr("fedrun.threads.available_cores", lambda: 3)
    try:
        assert apply_threads(0).threads == 1  # still training beside the other rank
        alone = apply_threads(0, alone=True)
        assert (alone.threads, alone.source, alone.local_ranks) == (3, "auto", 1) and torch.get_num_threads() == 3
        assert apply_threads(2, alone=True).threads == 2  # the config's count wins
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process: its OMP_NUM_THREADS is the user's, kept
        assert apply_threads(0, alone=True).threads == 1
    finally:
        torch.set_num_threads(before)


def test_threads_is_a_config_field():
    assert RunConfig().threads == 0
    assert apply_overrides(RunConfig(), {"threads": "2"}).threads == 2
    with pytest.raises(ConfigError, match="invalid threads=-1"):
        apply_overrides(RunConfig(), {"threads": "-1"})


def test_a_busy_machine_adds_a_hint_but_never_changes_the_count():
    busy, idle = choose_threads(0, 2, 1, load=11.2), choose_threads(0, 2, 1, load=0.3)
    assert busy.threads == idle.threads == 2
    assert "the machine is busy (load 11.2 on 2 cores): fewer threads may be much faster" in busy.describe()
    assert "busy" not in idle.describe() and "busy" not in choose_threads(0, 2, 2, load=11.2).describe()
