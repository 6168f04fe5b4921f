"""The process group and the Exchange across real processes (gloo on 127.0.0.1, CPU).

Each spawn runs every scenario of one world size in one process group (spawning is the slow part); every
rank writes what it saw to a JSON file and the test compares the ranks. Expected values are recomputed
independently on every rank from seeds: client k's pre-sync state depends only on (method, K, round, k).
Without a process group: test_dist_single.py.
"""

from __future__ import annotations

import json
import time
import zlib
from functools import partial
from pathlib import Path

import pytest
import torch
from fedavg_expect import client_sizes, max_err, sha
from multiproc import spawn_ranks

from fedrun import agreement
from fedrun import dist as fdist
from fedrun.comm import collective_bytes_per_round
from fedrun.exchange import Exchange
from fedrun.methods import METHODS, plan_round

SHAPES = {"enc.w": (4, 3), "enc.b": (4,), "mid.w": (3, 3), "dec.w": (2, 4), "dec.b": (2,)}
NAMED = {"encoder": ["enc.w", "enc.b"], "bottleneck": ["mid.w"], "decoder": ["dec.w", "dec.b"]}
NAMED_SIZES = {"encoder": 16, "bottleneck": 9, "decoder": 10}
SEED = 17


# -- worker side ----------------------------------------------------------------------------------------


def _state(tag: str, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(f"{tag}-{k}".encode()))
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _methods_scenario(ctx: fdist.DistContext) -> list[dict]:
    """Every method, K = W..5, three rounds each (one Exchange per run, so its buffer is reused)."""
    cases = []
    for method in METHODS:
        for k in range(max(2, ctx.world_size), 6):
            hosted = fdist.hosted_clients(ctx.rank, ctx.world_size, k)
            sizes = client_sizes(k)
            avg = Exchange(NAMED, sizes)
            live = {c: {n: torch.zeros(s, requires_grad=True) for n, s in SHAPES.items()} for c in hosted}
            for r in range(1, 4):
                tag = f"{method}-{k}-{r}"
                pre = {c: _state(tag, c) for c in range(k)}  # every client's, to compute the expectation
                with torch.no_grad():
                    for c in hosted:
                        for n, t in live[c].items():
                            t.copy_(pre[c][n])
                plan = plan_round(method, r, k, SEED)
                stats = avg.sync(plan, live)
                err = max_err(plan, NAMED, pre, sizes, live, hosted)
                local_ok = all(
                    torch.equal(live[c][n].detach(), pre[c][n])
                    for c in hosted
                    for g in plan.local_groups()
                    for n in NAMED[g]
                )
                cases.append(
                    {
                        "case": tag,
                        "k": k,
                        "shared": list(plan.shared_groups()),
                        "local": list(plan.local_groups()),
                        "hashes": {str(c): {n: sha(t) for n, t in live[c].items()} for c in hosted},
                        "max_err": err,
                        "local_ok": local_ok,
                        "bytes": stats.bytes,
                        "collectives": stats.collectives,
                        "expected_bytes": collective_bytes_per_round(plan, NAMED_SIZES, "fp32"),
                        "buffer_id": avg.packed_layout.buffer.data_ptr(),
                    }
                )
    return cases


def _bf16_scenario(ctx: fdist.DistContext) -> list[dict]:
    """bf16 exchange: round 1 in fp32 (no reference yet), rounds 2-3 send the changes in bf16."""
    cases = []
    for method in ("full", "usplit"):
        k = ctx.world_size + 1
        hosted = fdist.hosted_clients(ctx.rank, ctx.world_size, k)
        sizes = client_sizes(k)
        avg = Exchange(NAMED, sizes, exchange_dtype="bf16")
        live = {c: {n: torch.zeros(s) for n, s in SHAPES.items()} for c in hosted}
        glob = None
        for r in range(1, 4):
            tag = f"bf16-{method}-{r}"
            if glob is None:
                pre = {c: {n: 5.0 + t for n, t in _state(tag, c).items()} for c in range(k)}
            else:  # "local training" from the identical global model: small changes
                pre = {c: {n: glob[n] + 1e-3 * t for n, t in _state(tag, c).items()} for c in range(k)}
            for c in hosted:
                for n, t in live[c].items():
                    t.copy_(pre[c][n])
            plan = plan_round(method, r, k, SEED)
            stats = avg.sync(plan, live)
            err = max_err(plan, NAMED, pre, sizes, live, hosted)
            glob = {n: t.clone() for n, t in live[hosted[0]].items()}
            cases.append(
                {
                    "case": tag,
                    "hashes": {str(c): {n: sha(t) for n, t in live[c].items()} for c in hosted},
                    "max_err": err,
                    "bytes": stats.bytes,
                    "fp32_bytes": collective_bytes_per_round(plan, NAMED_SIZES, "fp32"),
                    "bf16_bytes": collective_bytes_per_round(plan, NAMED_SIZES, "bf16"),
                }
            )
    return cases


BUCKET_BYTES = (None, 8, 40)  # one bucket; about one parameter per bucket; a few parameters per bucket


def _buckets_scenario(ctx: fdist.DistContext) -> list[dict]:
    """Every method and exchange dtype, 3 rounds, K = W..5 (several contributors on a rank): the same sync
    with one bucket and with several, on identical inputs."""
    cases = []
    for dtype in ("fp32", "bf16"):
        for method in METHODS:
            for k in (ctx.world_size, ctx.world_size + 1, 5):
                hosted = fdist.hosted_clients(ctx.rank, ctx.world_size, k)
                sizes = client_sizes(k)
                avgs = [Exchange(NAMED, sizes, exchange_dtype=dtype, bucket_bytes=b) for b in BUCKET_BYTES]
                lives = [{c: {n: torch.zeros(s) for n, s in SHAPES.items()} for c in hosted} for _ in avgs]
                glob = None
                for r in range(1, 4):
                    tag = f"buckets-{dtype}-{method}-{k}-{r}"
                    if glob is None:
                        pre = {c: _state(tag, c) for c in hosted}
                    else:  # "local training" from each client's synced state: small changes (bf16: deltas)
                        pre = {c: {n: lives[0][c][n] + 1e-3 * t for n, t in _state(tag, c).items()} for c in hosted}
                    plan = plan_round(method, r, k, SEED)
                    runs = []
                    for avg, live in zip(avgs, lives, strict=True):
                        for c in hosted:
                            for n, t in live[c].items():
                                t.copy_(pre[c][n])
                        stats = avg.sync(plan, live)
                        runs.append(
                            {
                                "hashes": {str(c): {n: sha(t) for n, t in live[c].items()} for c in hosted},
                                "bytes": stats.bytes,
                                "collectives": stats.collectives,
                                "buckets": len(avg.packed_layout.buckets),
                            }
                        )
                    glob = True
                    cases.append({"case": tag, "k": k, "runs": runs})
    return cases


def _helpers_scenario(ctx: fdist.DistContext) -> dict:
    out: dict = {}
    rank, w = ctx.rank, ctx.world_size
    sizes = client_sizes(5)
    out["ints"] = fdist.all_gather_ints([s if c % w == rank else None for c, s in enumerate(sizes)])
    for name, values in (("conflict", [rank, 1]), ("empty", [1, None])):
        try:
            fdist.all_gather_ints(values)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    # mixed dtypes, odd byte lengths, a 0-dim tensor: one byte-level broadcast makes them rank 0's
    g = torch.Generator().manual_seed(100 + rank)
    tensors = [
        torch.randn(3, 2, generator=g),
        torch.randn(3, generator=g).bfloat16(),
        torch.tensor(rank * 7 + 1, dtype=torch.int64),
        torch.randn(2, generator=g).double(),
    ]
    fdist.broadcast_state(tensors)
    out["broadcast"] = [sha(t.float() if t.dtype == torch.bfloat16 else t) for t in tensors]
    out["broadcast_int"] = int(tensors[2])
    entries = [(n, s, "torch.float32") for n, s in SHAPES.items()]
    out["signature"] = agreement.check_signature(entries)
    out["object"] = fdist.broadcast_json({"from": rank} if rank == 0 else None)
    gathered = fdist.gather_dict({c: f"loss of client {c}" for c in fdist.hosted_clients(rank, w, 5)})
    out["gathered"] = {str(k): v for k, v in gathered.items()}
    try:
        fdist.gather_dict({"same": rank})
        out["gather_clash"] = "no error"
    except ValueError as e:
        out["gather_clash"] = str(e)
    fdist.barrier()
    return out


def _mismatch_scenario(ctx: fdist.DistContext) -> dict:
    entries = [("enc.w", (4, 3), "torch.float32"), ("dec.b", (2,), "torch.float32")]
    if ctx.rank == 1:
        entries[1] = ("dec.b", (3,), "torch.float32")
    start = time.monotonic()
    try:
        agreement.check_signature(entries)
        return {"error": None, "seconds": time.monotonic() - start}
    except fdist.SignatureMismatchError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}


def _thread_names() -> list[str]:
    """This process's native threads, as the kernel names them (gloo's: gloo_tcp_loop, pt_gloo_runloop)."""
    tasks = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())


def _leave_scenario(ctx: fdist.DistContext) -> dict:
    """Last scenario (it tears the group down): rank 1 arrives late; rank 0's leave() waits for it. torchvision
    is imported with the group formed, as fedrun's data loading does; it imports torch._dynamo, whose import of
    torch.distributed.nn.functional once kept the group (and gloo's threads) alive past leave()."""
    import torchvision  # noqa: F401

    # Both ranks start from one point, so rank 1 is late by its sleep alone: the scenarios before and the import
    # above end at different times on each rank (rank 0 once arrived 0.25 s after rank 1 and waited 0.75 s).
    torch.distributed.barrier()
    if ctx.rank == 1:
        time.sleep(1.0)
    start = time.monotonic()
    during = [n for n in _thread_names() if "gloo" in n]
    fdist.leave()
    after = [n for n in _thread_names() if "gloo" in n]
    return {
        "waited_s": time.monotonic() - start,
        "initialised": torch.distributed.is_initialized(),
        "gloo_threads": [during, after],
    }


SCENARIOS = {
    "methods": _methods_scenario,
    "bf16": _bf16_scenario,
    "buckets": _buckets_scenario,
    "helpers": _helpers_scenario,
    "mismatch": _mismatch_scenario,
    "leave": _leave_scenario,
}


def _run_scenarios(scenarios: list[str], ctx: fdist.DistContext) -> dict:
    result: dict = {"backend": ctx.backend, "world_size": ctx.world_size}
    for name in scenarios:
        result[name] = SCENARIOS[name](ctx)
    return result


# -- test side --------------------------------------------------------------------------------------------


def _spawn(world: int, scenarios: list[str], out_dir: Path, timeout_s: float = 75.0) -> list[dict]:
    results = spawn_ranks(
        world, partial(_run_scenarios, scenarios), out_dir, timeout_s, init_timeout_s=30, label=str(scenarios)
    )
    for res in results:
        assert res["backend"] == "gloo" and res["world_size"] == world
    return results


def _check_methods(results: list[dict], world: int) -> None:
    per_rank = [res["methods"] for res in results]
    n_cases = len(per_rank[0])
    assert n_cases == len(METHODS) * len(range(max(2, world), 6)) * 3
    for i in range(n_cases):
        cases = [pr[i] for pr in per_rank]
        case = cases[0]
        assert all(c["case"] == case["case"] for c in cases)
        hashes: dict[str, dict[str, str]] = {}
        for c in cases:
            hashes.update(c["hashes"])
            assert c["max_err"] < 1e-6, case["case"]
            assert c["local_ok"], case["case"]
            assert c["collectives"] == 1 and c["bytes"] == c["expected_bytes"] > 0, case["case"]
        assert sorted(hashes, key=int) == [str(k) for k in range(case["k"])]  # every client hosted once
        for g in case["shared"]:
            for n in NAMED[g]:
                # bit-identical on every client of every rank
                assert len({h[n] for h in hashes.values()}) == 1, (case["case"], n)
        for g in case["local"]:
            for n in NAMED[g]:
                assert len({h[n] for h in hashes.values()}) == case["k"], (case["case"], n)  # still personal
    # the three rounds of one run reuse one buffer
    for pr in per_rank:
        for j in range(0, n_cases, 3):
            assert pr[j]["buffer_id"] == pr[j + 1]["buffer_id"] == pr[j + 2]["buffer_id"]


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_two_ranks(tmp_path):
    results = _spawn(2, ["helpers", "methods", "bf16", "leave"], tmp_path)
    _check_methods(results, 2)
    # leave(): rank 0 met rank 1 (1 s late) before either tore the group down
    assert results[0]["leave"]["waited_s"] > 0.8 and results[1]["leave"]["waited_s"] < 0.5
    assert not results[0]["leave"]["initialised"] and not results[1]["leave"]["initialised"]
    # ... and the group's threads ended there, not at the interpreter's exit (which aborted now and then)
    for res in results:
        during, after = res["leave"]["gloo_threads"]
        assert during and after == [], res["leave"]

    h0, h1 = results[0]["helpers"], results[1]["helpers"]
    assert h0["ints"] == h1["ints"] == client_sizes(5)
    for h in (h0, h1):
        assert "slot 0" in h["conflict"] and "differently" in h["conflict"]
        assert "slot 1" in h["empty"] and "not filled" in h["empty"]
    assert h0["broadcast"] == h1["broadcast"] and h1["broadcast_int"] == 1
    assert h0["signature"] == h1["signature"]
    assert h0["object"] == h1["object"] == {"from": 0}
    assert h0["gathered"] == h1["gathered"] == {str(c): f"loss of client {c}" for c in range(5)}
    assert "'same'" in h0["gather_clash"] and h0["gather_clash"] == h1["gather_clash"]

    b0, b1 = results[0]["bf16"], results[1]["bf16"]
    for c0, c1 in zip(b0, b1, strict=True):
        hashes = {**c0["hashes"], **c1["hashes"]}
        assert len({json.dumps(h, sort_keys=True) for h in hashes.values()}) == 1  # whole model identical
        first = c0["case"].endswith("-1")
        assert c0["bytes"] == c1["bytes"] == (c0["fp32_bytes"] if first else c0["bf16_bytes"])
        # round 1 exact; then bf16 error relative to changes of ~1e-3, far below bf16 of values near 5
        assert c0["max_err"] < (1e-6 if first else 5e-5) and c1["max_err"] < (1e-6 if first else 5e-5)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_two_ranks_buckets_bit_identical_to_one_bucket(tmp_path):
    """Bucketed sync (async all-reduce per bucket, unpacked while later buckets are in flight) gives the same
    bits as one bucket on every client of every rank, for every method, fp32 and bf16 (the first round of
    bf16 exchanges values, the later ones changes), with the same bytes on the wire."""
    results = _spawn(2, ["buckets"], tmp_path)
    per_rank = [res["buckets"] for res in results]
    assert len(per_rank[0]) == 2 * len(METHODS) * 3 * 3
    for cases in zip(*per_rank, strict=True):
        tag, k = cases[0]["case"], cases[0]["k"]
        assert all(c["case"] == tag for c in cases)
        for c in cases:
            one, *many = c["runs"]
            assert one["buckets"] == one["collectives"] == 1, tag
            for run in many:
                assert run["collectives"] == run["buckets"], tag  # one collective per bucket
                assert run["bytes"] == one["bytes"] > 0, tag
            assert many[0]["buckets"] >= max(2, many[1]["buckets"]), tag
        for i in range(len(BUCKET_BYTES)):
            hashes: dict[str, dict[str, str]] = {}
            for c in cases:
                hashes.update(c["runs"][i]["hashes"])
            assert sorted(hashes, key=int) == [str(c) for c in range(k)]
            # bucketed == one bucket, client by client, bit for bit
            assert hashes == {c: h for case in cases for c, h in case["runs"][0]["hashes"].items()}, (tag, i)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_three_ranks(tmp_path):
    results = _spawn(3, ["methods"], tmp_path)
    _check_methods(results, 3)


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_signature_mismatch_raises_on_every_rank(tmp_path):
    start = time.monotonic()
    results = _spawn(2, ["mismatch"], tmp_path, timeout_s=30)
    messages = [res["mismatch"]["error"] for res in results]
    assert all(m is not None for m in messages), messages
    assert messages[0] == messages[1]
    assert "rank(s) [1]" in messages[0] and "dec.b" in messages[0] and "(3,)" in messages[0]
    assert all(res["mismatch"]["seconds"] < 5 for res in results)
    assert time.monotonic() - start < 30
