"""int8 exchange: the block quantiser and its error feedback by hand, then the int8 sync (one process, and
2 and 3 real gloo ranks) against the dequantised reference computed in one process
(``fedrun.exchange.quant.reduce_reference``)."""

from __future__ import annotations

import hashlib
import warnings
import zlib
from functools import partial

import pytest
import torch
from multiproc import spawn_ranks
from torch import nn

from fedrun import dist as fdist
from fedrun.comm import collective_bytes_per_round
from fedrun.config import FederationConfig
from fedrun.exchange import Exchange
from fedrun.exchange.int8 import Int8Feedback
from fedrun.exchange.quant import BLOCK, Geometry, Residual, dequantise, quantise, reduce_reference
from fedrun.exchange.weights import WeightSumError
from fedrun.methods import GROUPS, plan_round

# -- the quantiser by hand ----------------------------------------------------------------------------------


def test_quantise_one_block_by_hand():
    x = torch.zeros(BLOCK)
    x[:6] = torch.tensor([127.0, 63.5, -1.0, 0.4, -0.5, 2.5])
    q, s = quantise(x)
    assert s.tolist() == [1.0]  # absmax 127 / 127
    # round half to even: 63.5 -> 64, -0.5 -> -0, 2.5 -> 2
    assert q[:6].tolist() == [127, 64, -1, 0, 0, 2] and q.dtype == torch.int8
    assert dequantise(q, s)[:6].tolist() == [127.0, 64.0, -1.0, 0.0, 0.0, 2.0]
    q, s = quantise(-x)  # symmetric: -x gives -q
    assert q[:3].tolist() == [-127, -64, 1]
    q, s = quantise(torch.zeros(2 * BLOCK))  # a block of zeros: scale 0, codes 0, exact
    assert s.tolist() == [0.0, 0.0] and not q.any()
    with pytest.raises(ValueError, match="multiple of 256"):
        quantise(torch.zeros(BLOCK + 1))


def test_round_trip_error_at_most_half_a_quantum():
    g = torch.Generator().manual_seed(0)
    mags = torch.logspace(-8, 3, 64)  # each block its own magnitude
    x = (torch.randn(64, BLOCK, generator=g) * mags[:, None]).view(-1)
    q, s = quantise(x)
    err = (dequantise(q, s) - x).abs().view(64, BLOCK)
    half = (s / 2)[:, None]
    assert (err <= half * (1 + 2**-16)).all()  # float32 rounding of x/s and q*s: 2^-16 of s at most
    assert (err > half * 0.9).any()  # and the bound is nearly reached: not a vacuous test
    assert q.abs().max() == 127 and (q.view(64, BLOCK).abs().amax(1) == 127).all()  # every block uses its range


def test_error_feedback_tracks_the_true_sum_within_one_quantum():
    """50 rounds of updates that drift by values below half a quantum: without feedback they never arrive,
    with it the sum of what was sent is within one quantum of the sum of the true updates."""
    g = torch.Generator().manual_seed(1)
    ef, sent = Residual(4 * BLOCK), torch.zeros(4 * BLOCK, dtype=torch.float64)
    true, plain = torch.zeros_like(sent), torch.zeros_like(sent)
    for _ in range(50):
        u = (1 + 0.5 * torch.randn(4 * BLOCK, generator=g)) * 1e-3
        u[::BLOCK] = 1.0  # one large value per block: the quantum is ~1/127, most values far below half of it
        q, s = ef.compress(u)
        sent += dequantise(q, s).double()
        true += u.double()
        plain += dequantise(*quantise(u)).double()
    quantum = s.double().repeat_interleave(BLOCK)  # the last round's scale of each element's block
    assert ((sent - true).abs() <= quantum).all()
    assert ((sent - true).abs() <= quantum / 2 + 1e-6).all()  # the theory: the last residual, <= s / 2
    assert (plain - true).abs().max() > 5 * quantum.max()  # without feedback the error grows with the rounds


def test_geometry_by_hand():
    geo = Geometry(numel=1000, slots=1, world=3)  # 4 blocks of values -> 2 per shard, 6 blocks padded
    assert (geo.blocks, geo.padded, geo.shard) == (2, 1536, 512)
    assert geo.chunk_bytes == 4 + 2 * 4 + 2 * 256 and geo.wire_bytes == 3 * 524
    assert Geometry(10, 2, 1).wire_bytes == 8 + 4 + 256  # never less than one block per shard
    plan = plan_round("udec", 1, 3, 0)
    assert collective_bytes_per_round(plan, {"decoder": 1000}, "int8", world_size=3) == 3 * 524


def test_config_accepts_int8():
    assert FederationConfig(exchange_dtype="int8").exchange_dtype == "int8"
    with pytest.raises(ValueError, match="exchange_dtype"):
        FederationConfig(exchange_dtype="int4")


# -- the sync in one process ----------------------------------------------------------------------------------

NAMED = {"encoder": ["enc.weight", "enc.bias"], "bottleneck": ["mid.weight"], "decoder": ["dec.weight", "dec.bias"]}


class Net(nn.Module):
    """1,850 parameters: 8 blocks, so shards of 3 ranks hold 3, 3 and 2 of them (one padded)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid, self.dec = nn.Linear(40, 20), nn.Linear(20, 20, bias=False), nn.Linear(20, 30)


def _noise(tag: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return torch.randn(shape, generator=g)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def _shapes() -> dict[str, torch.Size]:
    return {n: p.shape for n, p in Net().named_parameters()}


def _trained(glob: dict[str, torch.Tensor], method: str, rnd: int, k: int) -> dict[str, torch.Tensor]:
    """Client k after 'local training' of round rnd from the shared model: a change of ~1e-2, and one large
    value per tensor so that most changes are small against their block's quantum."""
    out = {}
    for n, t in glob.items():
        d = 1e-2 * _noise(f"{method}-{rnd}-{k}-{n}", t.shape)
        d.view(-1)[0] = 0.5
        out[n] = t + d
    return out


def _rank_update(plan, sizes, hosted, ref, pre, groups) -> torch.Tensor:
    """A rank's fp32 sum of its hosted contributors' weighted changes, in layout order, with the exchange's
    rounding (first contributor: (theta - ref) * p; later ones: add with alpha = p)."""
    total = sum(sizes)
    parts = []
    for g in groups:
        contributors = plan.contributors(g)
        den = sum(sizes[k] / total for k in contributors)
        mine = [(k, sizes[k] / total / den) for k in contributors if k in hosted]
        for n in NAMED[g]:
            acc = torch.zeros_like(ref[n])
            for j, (k, p) in enumerate(mine):
                d = pre[k][n] - ref[n]
                acc = d * p if j == 0 and p != 1 else d if j == 0 else acc.add_(d, alpha=p)
            parts.append(acc.reshape(-1))
    return torch.cat(parts)


def _expected_round(plan, sizes, world, ref, pre, senders, owners) -> dict[str, torch.Tensor]:
    """The new shared values by ``reduce_reference`` (residuals persist across calls)."""
    groups = plan.shared_groups()
    updates = [
        _rank_update(plan, sizes, fdist.hosted_clients(r, world, len(sizes)), ref, pre, groups) for r in range(world)
    ]
    geo = Geometry(updates[0].numel(), len(groups), world)
    if not senders:
        senders += [Residual(geo.padded) for _ in range(world)]
        owners += [Residual(geo.shard) for _ in range(world)]
    avg, pos, new = reduce_reference(updates, senders, owners, geo), 0, {}
    for g in groups:
        for n in NAMED[g]:
            num = ref[n].numel()
            new[n] = ref[n] + avg[pos : pos + num].view(ref[n].shape)
            pos += num
    return new


def test_one_process_virtual_clients_equal_the_reference():
    """Three clients on one process: their weighted changes are summed in fp32 and quantised once (one upload,
    one residual), as ``reduce_reference`` does for one rank; three rounds, so the residuals matter."""
    sizes, shapes = [5, 9, 2], _shapes()
    init = {n: _noise(f"init-{n}", s) for n, s in shapes.items()}
    for method in ("full", "udec", "usplit"):
        ex = Exchange(NAMED, sizes, exchange_dtype="int8")
        live = {k: {n: t.clone() for n, t in init.items()} for k in range(3)}
        ex.set_reference(live[0])
        ref, senders, owners = {n: t.clone() for n, t in init.items()}, [], []
        for rnd in range(1, 4):
            plan = plan_round(method, rnd, 3, 0)
            pre = {k: _trained(live[k], method, rnd, k) for k in range(3)}
            for k in live:
                for n, t in live[k].items():
                    t.copy_(pre[k][n])
            stats = ex.sync(plan, live)
            new = _expected_round(plan, sizes, 1, ref, pre, senders, owners)
            assert stats.bytes == 0 and stats.collectives == 0  # one process: nothing on a wire
            for n, v in new.items():
                for k in live:
                    assert torch.equal(live[k][n], v), (method, rnd, n, k)
                ref[n] = v
            exact = _rank_update(plan, sizes, {0, 1, 2}, ref, pre, plan.shared_groups())  # the fp32 average change
            got = torch.cat([(new[n] - ref[n]).reshape(-1) for g in plan.shared_groups() for n in NAMED[g]])
            err = (got - exact).abs().max().item()
            # quantised, not exact; off by this and the last round's residuals: a few quanta (changes <= ~0.5)
            assert 0 < err < 4 * 0.6 / 127, (method, err)
            ref.update(new)


def test_error_feedback_off_forgets_what_quantisation_lost():
    """error_feedback=False: every sync quantises as a fresh exchange would (no residual carried over), where
    feedback on carries it: the same first round (no residual yet), different later ones."""
    sizes, shapes = [5, 9], _shapes()
    init = {n: _noise(f"init-{n}", s) for n, s in shapes.items()}
    runs: dict[bool, list[dict[str, torch.Tensor]]] = {}
    for ef in (True, False):
        ex = Exchange(NAMED, sizes, exchange_dtype="int8", error_feedback=ef)
        live = {k: {n: t.clone() for n, t in init.items()} for k in range(2)}
        ex.set_reference(live[0])
        runs[ef] = []
        for rnd in range(1, 4):
            plan = plan_round("full", rnd, 2, 0)
            pre = {k: _trained(live[k], "full", rnd, k) for k in range(2)}
            ref = {n: ex.reference[n].clone() for n in shapes}
            for k in live:
                for n, t in live[k].items():
                    t.copy_(pre[k][n])
            ex.sync(plan, live)
            runs[ef].append({n: live[0][n].clone() for n in shapes})
            if not ef:  # a fresh exchange from the same reference and clients: the same result
                fresh = Exchange(NAMED, sizes, exchange_dtype="int8", error_feedback=False)
                again = {k: {n: t.clone() for n, t in pre[k].items()} for k in range(2)}
                fresh.set_reference(ref)
                fresh.sync(plan, again)
                assert all(torch.equal(again[0][n], live[0][n]) for n in shapes), rnd
    assert all(torch.equal(runs[True][0][n], runs[False][0][n]) for n in shapes)
    assert any(not torch.equal(runs[True][r][n], runs[False][r][n]) for r in (1, 2) for n in shapes)


def test_sync_once_and_the_feedback_state(tmp_path):
    """The EMA's one-off sync goes in fp32 values and leaves the reference and the error feedback alone; the
    feedback state survives a weights_only checkpoint and is dropped, with a warning, where it does not fit."""
    sizes, shapes = [1, 1], _shapes()
    ex = Exchange(NAMED, sizes, exchange_dtype="int8")
    live = {k: {n: _noise(f"c{k}-{n}", s) for n, s in shapes.items()} for k in range(2)}
    ex.set_reference(live[0])
    ex.sync(plan_round("full", 1, 2, 0), live)
    state = ex.feedback.state_dict()
    ref = {n: ex.reference[n].clone() for n in shapes}
    ema = {k: {n: _noise(f"e{k}-{n}", s) for n, s in shapes.items()} for k in range(2)}
    ex.sync_once(plan_round("full", 1, 2, 0), ema)
    for n in shapes:  # exact fp32 average of values, reference untouched
        assert torch.allclose(ema[0][n], (_noise(f"e0-{n}", shapes[n]) + _noise(f"e1-{n}", shapes[n])) / 2)
        assert torch.equal(ex.reference[n], ref[n])
    after = ex.feedback.state_dict()
    assert after["key"] == state["key"] and torch.equal(after["sender"], state["sender"]) and state["sender"].any()
    assert ex.exchange_dtype == "int8"

    torch.save(after, tmp_path / "fb.pt")
    fb = Int8Feedback()
    fb.load_state_dict(torch.load(tmp_path / "fb.pt", weights_only=True))
    geo = Geometry(1850, 3, 1)
    sender, owner = fb.residuals(state["key"], geo, torch.device("cpu"))
    assert torch.equal(sender.error, state["sender"]) and torch.equal(owner.error, state["owner"])
    fb.load_state_dict(after)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sender, _ = fb.residuals([2, 0, [0], list(GROUPS), 1850], Geometry(1850, 3, 2), torch.device("cpu"))
    assert not sender.error.any() and "restarts at 0" in str(caught[0].message)


# -- 2 and 3 ranks --------------------------------------------------------------------------------------------


def _int8_body(ctx: fdist.DistContext) -> dict:
    """Every rank: the int8 sync of 3 rounds per method, in place (one client per rank, adopted) and packed,
    plus virtual clients (one more client than ranks) and a plan the ranks disagree about. Each rank also
    computes the whole federation's expected result in this process (``reduce_reference``)."""
    world, rank, out = ctx.world_size, ctx.rank, {"cases": []}
    shapes = _shapes()
    init = {n: _noise(f"init-{n}", s) for n, s in shapes.items()}
    for method in ("full", "udec", "usplit"):
        for k in (world, world + 1):
            sizes = [3 + 5 * i for i in range(k)]
            hosted = fdist.hosted_clients(rank, world, k)
            packed = Exchange(NAMED, sizes, exchange_dtype="int8")
            live = {c: {n: t.clone() for n, t in init.items()} for c in hosted}
            net, in_place = None, None
            if k == world:  # one client per rank: every rank also syncs in place (the same collectives)
                net, in_place = Net(), Exchange(NAMED, sizes, exchange_dtype="int8")
                with torch.no_grad():
                    for n, p in net.named_parameters():
                        p.copy_(init[n])
                assert in_place.adopt(net)
                in_place.set_reference(init)
            packed.set_reference(init)
            ref, senders, owners = {n: t.clone() for n, t in init.items()}, [], []
            for rnd in range(1, 4):
                plan = plan_round(method, rnd, k, 0)
                glob = {n: t.clone() for n, t in ref.items()}  # every client starts from the shared model
                pre = {c: _trained(glob, method, rnd, c) for c in range(k)}
                for c in hosted:
                    for n, t in live[c].items():
                        t.copy_(pre[c][n])
                stats = packed.sync(plan, live)
                new = _expected_round(plan, sizes, world, ref, pre, senders, owners)
                case = {
                    "case": f"{method}-k{k}-r{rnd}",
                    "equal": all(torch.equal(live[c][n], v) for c in hosted for n, v in new.items()),
                    "hashes": {n: _sha(live[hosted[0]][n]) for n in new},
                    "bytes": stats.bytes,
                    "collectives": stats.collectives,
                    "expected_bytes": collective_bytes_per_round(
                        plan, {g: sum(shapes[n].numel() for n in NAMED[g]) for g in GROUPS}, "int8", world_size=world
                    ),
                }
                if net is not None:
                    params = dict(net.named_parameters())
                    with torch.no_grad():
                        for n, p in params.items():
                            p.copy_(pre[hosted[0]][n])
                    in_place.sync(plan, {hosted[0]: {n: p.data for n, p in params.items()}})
                    assert in_place.packed_layout is None  # it did sync in place
                    case["in_place_equal"] = all(torch.equal(params[n].data, v) for n, v in new.items())
                out["cases"].append(case)
                ref.update(new)
    # Ranks that disagree about who hosts client 0 (all claim it): refused on every rank, nothing written.
    ex = Exchange(NAMED, [1, 2, 3, 4][:world], exchange_dtype="int8")
    mine = {n: t.clone() for n, t in init.items()}
    ex.set_reference(init)
    try:
        ex.sync(plan_round("full", 1, world, 0), {0: mine})
        out["disagree"] = "no error"
    except WeightSumError as e:
        out["disagree"] = str(e)
    out["untouched"] = all(torch.equal(mine[n], init[n]) for n in init)
    return out


@pytest.mark.multiproc
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_int8_sync_equals_the_reference(tmp_path, world):
    results = spawn_ranks(world, partial(_int8_body), tmp_path, timeout_s=150, label=f"int8 x{world}")
    per_rank = [r["cases"] for r in results]
    assert len(per_rank[0]) == 3 * 2 * 3
    for cases in zip(*per_rank, strict=True):
        name = cases[0]["case"]
        assert all(c["equal"] for c in cases), name  # == the dequantised reference, bit for bit
        assert all(c.get("in_place_equal", True) for c in cases), name  # in place == packed
        assert len({str(c["hashes"]) for c in cases}) == 1, name  # identical on every rank
        assert all(c["bytes"] == c["expected_bytes"] > 0 and c["collectives"] == 2 for c in cases), name
    assert sum("in_place_equal" in c for c in per_rank[0]) == 9  # the k == world cases ran in place too
    for r in results:
        assert "sum to" in r["disagree"] and "ranks disagree" in r["disagree"] and r["untouched"]
