"""Sites without a shared filesystem (issue 12, item 8): each rank has a run directory of its own.

Every site starts its rank as a separate process, with the launcher's variables (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and its own ``--out-dir``, as two institutions would. Each rank writes and verifies
its own part of every checkpoint; the rounds count as complete by a collective; a resume starts from the
newest round that every rank has intact; the results are bit-identical to one uninterrupted run with one
shared run directory (torchrun).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_subprocess import TINY, assert_bit_identical, load_models, run_fedrun
from sites import run_sites

pytestmark = [pytest.mark.timeout(900), pytest.mark.multiproc]


def train_sites(repo_root: Path, args: list[str], out_dirs: list[Path]) -> list[str]:
    """``fedrun train args --out-dir out_dirs[r]`` as rank r, one process per site; their stderr, by rank."""
    sites = run_sites(
        [["-m", "fedrun", "train", *args, "--out-dir", str(out)] for out in out_dirs],
        repo_root,
        timeout_s=500,
        repo_root=repo_root,
    )
    for rank, site in enumerate(sites):
        assert site.rc == 0, f"rank {rank} failed ({site.rc}):\n{site.stderr[-4000:]}"
    return [site.stderr for site in sites]


# UDec: every client keeps its own model, so each site ends with its own client's model files.
ARGS = [
    *TINY,
    "--name",
    "x",
    "--method",
    "udec",
    "--set",
    "optim.ema_decay=0.9",
    "--set",
    "optim.keep_state=true",
    "--set",
    "keep_checkpoints=3",
]


@pytest.fixture(scope="module")
def shared_reference(repo_root, fmnist_root, tmp_path_factory):
    """3 rounds, uninterrupted, 2 torchrun ranks in one shared run directory."""
    out = tmp_path_factory.mktemp("shared")
    run_fedrun(repo_root, [*ARGS, "--data-root", str(fmnist_root), "--out-dir", str(out), "--rounds", "3"], nproc=2)
    return load_models(out / "x")


def _site_models(sites: list[Path]) -> dict[str, dict[str, torch.Tensor]]:
    models: dict[str, dict[str, torch.Tensor]] = {}
    for site in sites:
        mine = load_models(site / "x")
        assert not set(mine) & set(models), "two sites wrote the same model"
        models |= mine
    return models


def test_a_run_dir_per_rank_checkpoints_resumes_and_matches_a_shared_one(
    repo_root, fmnist_root, tmp_path, shared_reference
):
    sites = [tmp_path / "site0", tmp_path / "site1"]
    args = [*ARGS, "--data-root", str(fmnist_root)]
    train_sites(repo_root, [*args, "--rounds", "2"], sites)
    # each site holds its own part of every round, and only rank 0 the shared artefacts
    r2 = [s / "x" / "checkpoints" / "round-000002" for s in sites]
    assert sorted(p.name for p in r2[0].iterdir()) == ["MANIFEST-rank0.json", "client-0000.pt", "shared.pt"]
    assert sorted(p.name for p in r2[1].iterdir()) == ["MANIFEST-rank1.json", "client-0001.pt"]
    assert (sites[0] / "x" / "DONE").exists() and not (sites[1] / "x" / "DONE").exists()
    assert not (sites[1] / "x" / "config.json").exists() and not (sites[1] / "x" / "comm.jsonl").exists()
    assert set(load_models(sites[1] / "x")) == {"client1.pt", "client1_ema.pt"}

    # rank 1's newest round is damaged: every rank resumes after round 1, and the result is the shared run's
    f = r2[1] / "client-0001.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err0, err1 = train_sites(repo_root, [*args, "--rounds", "3"], sites)
    assert "round-000002 is unusable" in err1 and "client-0001.pt fails its checksum" in err1
    assert "rank(s) [1] have no intact checkpoint of round 2" in err0 and "after round 1 of 3" in err0
    assert_bit_identical(shared_reference, _site_models(sites))
    assert (sites[1] / "x" / "checkpoints" / "round-000003" / "MANIFEST-rank1.json").exists()


def _write_rounds(run_dir: Path, rank: int, rounds: list[int], damaged: list[int]) -> None:
    from fedrun import checkpoint as ckpt

    for r in rounds:
        rdir = ckpt.round_dir(run_dir, r)
        ckpt.write_part(rdir, rank, {ckpt.client_file(rdir, rank).name: {"w": torch.full((2,), float(r))}})
        if r in damaged:
            ckpt.client_file(rdir, rank).write_bytes(b"torn")


def _agree_body(ctx, root: str, layouts: dict) -> dict:
    from fedrun import checkpoint as ckpt
    from fedrun.resume import agree_round
    from fedrun.rundir import RunDir

    run_dir = Path(root) / f"site{ctx.rank}"
    rounds, damaged = layouts[str(ctx.rank)]
    _write_rounds(run_dir, ctx.rank, rounds, damaged)
    warnings: list[str] = []
    agreed, rdir = agree_round(RunDir(run_dir), [ckpt.client_file(Path(), ctx.rank).name], ctx.is_main, warnings.append)
    return {"agreed": agreed, "dir": rdir.name if rdir else None, "warnings": warnings}


@pytest.mark.parametrize(
    "layouts, agreed",
    [
        ({"0": ([1, 2, 3], []), "1": ([1, 2, 3], [3])}, 2),  # rank 1's newest is damaged
        ({"0": ([1, 3], []), "1": ([1, 2], [])}, 1),  # newest per rank 3 and 2, but rank 0 lacks 2
        ({"0": ([1, 2], []), "1": ([], [])}, 0),  # nothing in common: a fresh start everywhere
    ],
)
def test_ranks_agree_on_the_newest_round_all_have_intact(tmp_path, layouts, agreed):
    """Real gloo ranks, each with its own run directory: the MIN agreement, tensors only."""
    from functools import partial

    from multiproc import spawn_ranks

    results = spawn_ranks(2, partial(_agree_body, root=str(tmp_path), layouts=layouts), tmp_path, timeout_s=120)
    assert [r["agreed"] for r in results] == [agreed, agreed]
    assert [r["dir"] for r in results] == [f"round-{agreed:06d}" if agreed else None] * 2
    if agreed < max(layouts["0"][0]):
        assert any("every rank" in w for w in results[0]["warnings"]), results[0]["warnings"]
