"""The in-place sync across real processes (gloo on 127.0.0.1, CPU): a rank's single client whose parameters
the Exchange adopted averages where they lie, bit for bit like the packed path on a copy.

Two ranks run every case in one process group and write what they saw; the test compares the ranks. Inputs
are drawn from seeds on each rank, so both sides compute the same cases.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from fedavg_expect import client_sizes, max_err, sha
from multiproc import spawn_ranks

from fedrun import dist as fdist
from fedrun.exchange import Exchange
from fedrun.methods import METHODS, plan_round

SEED = 17
NET_GROUPS = {
    "encoder": ["enc.weight", "enc.bias"],
    "bottleneck": ["mid.weight"],
    "decoder": ["dec.weight", "dec.bias"],
}


class _Net(torch.nn.Module):
    """A convolution kept channels_last (non-contiguous strides), then two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Conv2d(2, 4, 3)
        self.mid = torch.nn.Linear(3, 3, bias=False)
        self.dec = torch.nn.Linear(4, 2)
        self.to(memory_format=torch.channels_last)


# -- worker side ----------------------------------------------------------------------------------------


def _adopted_vs_packed(ctx: fdist.DistContext, dtype: str, method: str, given_ref: bool) -> list[dict]:
    """One client per rank: the adopted model's in-place sync against the packed sync of a copy, three
    rounds (bf16: values, then changes), on identical inputs."""
    k, rank = ctx.world_size, ctx.rank
    sizes, cases = client_sizes(k), []
    net = _Net()
    adopted = Exchange(NET_GROUPS, sizes, exchange_dtype=dtype)
    assert adopted.adopt(net)
    mine = {n: p.data for n, p in net.named_parameters()}  # what a rank's single client holds
    ptrs = {n: t.data_ptr() for n, t in mine.items()}
    packed = Exchange(NET_GROUPS, sizes, exchange_dtype=dtype, bucket_bytes=16)
    copy = {n: t.clone() for n, t in mine.items()}
    if given_ref:  # as fedrun.train does: the identical initial model is the first reference
        torch.manual_seed(5)
        with torch.no_grad():
            for n, t in mine.items():
                t.copy_(torch.randn(t.shape))
                copy[n].copy_(t)
        adopted.set_reference(mine)
        packed.set_reference(copy)
    for r in range(1, 4):
        g = torch.Generator().manual_seed(zlib.crc32(f"inplace-{dtype}-{method}-{r}-{rank}".encode()))
        with torch.no_grad():
            for n, t in mine.items():
                step = torch.randn(t.shape, generator=g)
                # round 1: values (unless a reference was given); then small changes
                t.copy_(step if r == 1 and not given_ref else t + 1e-3 * step)
                copy[n].copy_(t)
        plan = plan_round(method, r, k, SEED)
        a = adopted.sync(plan, {rank: mine})
        b = packed.sync(plan, {rank: copy})
        cases.append(
            {
                "case": f"{dtype}-{method}-{r}-{given_ref}",
                "in_place": {n: sha(t) for n, t in mine.items()},
                "packed": {n: sha(t) for n, t in copy.items()},
                "module_is_client": all(torch.equal(p, mine[n]) for n, p in net.named_parameters()),
                "ptrs_kept": {n: t.data_ptr() for n, t in mine.items()} == ptrs,
                "channels_last": net.enc.weight.is_contiguous(memory_format=torch.channels_last),
                "stats": [a.bytes, a.collectives, b.bytes, b.collectives],
                "buffer_made": adopted.packed_layout is not None,
            }
        )
    return cases


def _mixed(ctx: fdist.DistContext, dtype: str, method: str) -> dict:
    """K = W + 1, so rank 0 hosts two clients (packed path) and the others one adopted client each (in
    place); several buckets. Every rank must issue the same collectives and end with the same average."""
    k_mixed, rank = ctx.world_size + 1, ctx.rank
    hosted = fdist.hosted_clients(rank, ctx.world_size, k_mixed)
    sizes = client_sizes(k_mixed)
    avg = Exchange(NET_GROUPS, sizes, exchange_dtype=dtype, bucket_bytes=24)
    nets = {c: _Net() for c in hosted}
    if len(hosted) == 1:
        assert avg.adopt(nets[hosted[0]])
    live = {c: {n: p.data for n, p in net.named_parameters()} for c, net in nets.items()}
    glob, errs, ncoll = None, [], []
    for r in range(1, 4):
        pre = {}
        for c in range(k_mixed):
            g = torch.Generator().manual_seed(zlib.crc32(f"mixed-{dtype}-{method}-{r}-{c}".encode()))
            pre[c] = {
                n: torch.randn(t.shape, generator=g)
                if glob is None
                else glob[n] + 1e-3 * torch.randn(t.shape, generator=g)
                for n, t in live[hosted[0]].items()
            }
        with torch.no_grad():
            for c in hosted:
                for n, t in live[c].items():
                    t.copy_(pre[c][n])
        plan = plan_round(method, r, k_mixed, SEED)
        ncoll.append(avg.sync(plan, live).collectives)
        errs.append(max_err(plan, NET_GROUPS, pre, sizes, live, hosted))
        # the next round: small changes from the average (only the shared groups are compared, and they are
        # the same on every rank)
        glob = {n: t.clone() for n, t in live[hosted[0]].items()}
    return {
        "case": f"mixed-{dtype}-{method}",
        "errs": errs,
        "collectives": ncoll,
        "in_place": avg.packed_layout is None,
        "hosted": hosted,
        "hashes": {str(c): {n: sha(t) for n, t in live[c].items()} for c in hosted},
    }


def _disagree(ctx: fdist.DistContext) -> dict:
    """Ranks that disagree about the weights: every rank raises, after the collective, and says so."""
    sizes = client_sizes(ctx.world_size)
    net = _Net()
    bad = Exchange(NET_GROUPS, sizes if ctx.rank == 0 else sizes[::-1])
    bad.adopt(net)
    try:
        bad.sync(
            plan_round("full", 1, ctx.world_size, SEED), {ctx.rank: {n: p.data for n, p in net.named_parameters()}}
        )
    except RuntimeError as e:
        return {"case": "disagree", "error": str(e)}
    return {"case": "disagree", "error": None}


def _in_place_scenario(ctx: fdist.DistContext) -> dict:
    cases = []
    for dtype, given_ref in (("fp32", False), ("bf16", False), ("bf16", True)):
        for method in METHODS:
            cases += _adopted_vs_packed(ctx, dtype, method, given_ref)
    cases += [_mixed(ctx, dtype, method) for dtype in ("fp32", "bf16") for method in METHODS]
    cases.append(_disagree(ctx))
    return {"backend": ctx.backend, "world_size": ctx.world_size, "cases": cases}


# -- test side --------------------------------------------------------------------------------------------


def _shared(method: str, round_: int, k: int) -> list[str]:
    groups = ("encoder", "bottleneck", "decoder")
    return [g for g in groups if any(g in s for s in plan_round(method, round_, k, SEED).assignments)]


def _check_mixed(tag: str, cases: list[dict]) -> None:
    assert [c["in_place"] for c in cases] == [False, True], tag  # rank 0 packed, rank 1 in place
    assert cases[0]["collectives"] == cases[1]["collectives"] and max(cases[0]["collectives"]) >= 2, tag
    bf16 = "bf16" in tag
    for c in cases:  # round 1 (values, fp32 on the wire) exact; bf16 changes to ~1e-3 * 2^-8
        assert c["errs"][0] < 1e-6 and max(c["errs"]) < (5e-5 if bf16 else 1e-6), (tag, c["errs"])
    hashes = {**cases[0]["hashes"], **cases[1]["hashes"]}
    for g in _shared(tag.split("-")[2], 3, 3):
        for n in NET_GROUPS[g]:
            assert len({h[n] for h in hashes.values()}) == 1, (tag, n)  # identical on every client


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_in_place_sync_bit_identical_to_packed(tmp_path):
    """An adopted model (parameters in the averager's flat tensor, a channels_last convolution among them)
    averages in place with ONE collective and no buffer, bit for bit like the packed path on a copy, on every
    rank, every method, fp32 and bf16; the module keeps its tensors; a weight disagreement fails everywhere."""
    results = spawn_ranks(2, _in_place_scenario, tmp_path, 75.0, init_timeout_s=30, label="in_place")
    assert all(res["backend"] == "gloo" and res["world_size"] == 2 for res in results)
    per_rank = [res["cases"] for res in results]
    assert len(per_rank[0]) == 3 * len(METHODS) * 3 + 2 * len(METHODS) + 1
    for cases in zip(*per_rank, strict=True):
        tag = cases[0]["case"]
        if tag.startswith("mixed-"):
            _check_mixed(tag, list(cases))
            continue
        if tag == "disagree":
            for c in cases:
                assert c["error"] is not None and "sum to" in c["error"] and "no longer valid" in c["error"], c
            continue
        for c in cases:
            assert c["in_place"] == c["packed"], tag  # bit for bit, every parameter
            assert c["module_is_client"] and c["ptrs_kept"] and c["channels_last"], tag
            in_bytes, in_coll, packed_bytes, packed_coll = c["stats"]
            assert in_coll == 1 and in_bytes == packed_bytes > 0, tag  # one collective, the same bytes
            assert packed_coll >= 2, tag  # the packed copy went in buckets
            assert not c["buffer_made"], tag  # the in-place path allocates no buffer
        for g in _shared(tag.split("-")[1], 1, 2):
            for n in NET_GROUPS[g]:
                assert cases[0]["in_place"][n] == cases[1]["in_place"][n], (tag, n)  # the same on both ranks
