"""The privacy stage of the exchange: DP clipping (norms <= C, by hand), secure aggregation's masked sync equal
to the unmasked fixed-point sum, in one process and on 2 and 3 gloo ranks for every method (packed and in
place), and the int64 wire counted as such."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from multiproc import spawn_ranks
from torch import nn

from fedrun.exchange import Exchange
from fedrun.exchange.private import Privacy, PrivacySettings
from fedrun.methods import METHOD_NAMES, RoundPlan, plan_round
from fedrun.privacy.dp import l2_norm
from fedrun.privacy.fixedpoint import FixedPoint

pytest.importorskip("cryptography")

from fedrun.privacy.secagg import exchange_keys  # noqa: E402

E, M, U = "encoder", "bottleneck", "decoder"
NAMES = {E: ["enc.weight", "enc.bias"], M: ["mid.weight"], U: ["dec.weight", "dec.bias"]}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 2)  # 8 parameters
        self.mid = nn.Linear(2, 2, bias=False)  # 4
        self.dec = nn.Linear(2, 1)  # 3


def _ref() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {n: p.detach().clone() for n, p in Tiny().named_parameters()}


def _client(k: int, ref: dict[str, torch.Tensor], scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + k)
    return {n: (t + scale * torch.randn(t.shape, generator=g)).requires_grad_() for n, t in ref.items()}


def _expected_fixed_point(plan: RoundPlan, ref, states, fp: FixedPoint, shares) -> dict[str, torch.Tensor]:
    """ref + decode(sum_k encode(p_k (theta_k - ref))) per group over its contributors: the unmasked sum."""
    out = {}
    for g in plan.shared_groups():
        who = plan.contributors(g)
        den = sum(shares[k] for k in who)
        for n in NAMES[g]:
            code = sum(fp.encode(states[k][n].detach() - ref[n], shares[k] / den)[0] for k in who)
            out[n] = ref[n] + fp.decode(code, torch.float32)
    return out


def _secure(hosted, value_range=1.0) -> Privacy:
    return Privacy(PrivacySettings(None, 1.0, value_range), exchange_keys(hosted))


def test_secure_sync_in_one_process_is_the_fixed_point_sum():
    ref = _ref()
    states = {k: _client(k, ref) for k in range(3)}
    fp = FixedPoint(1.0)
    ex = Exchange(NAMES, [1, 2, 3], privacy=_secure([0, 1, 2]))
    ex.set_reference(ref)
    plan = plan_round("full", 1, 3, 0)
    expect = _expected_fixed_point(plan, ref, states, fp, [1 / 6, 2 / 6, 3 / 6])
    plain = {k: {n: t.detach().clone() for n, t in s.items()} for k, s in states.items()}
    Exchange(NAMES, [1, 2, 3]).sync(plan, plain)
    ex.sync(plan, states)
    for k in range(3):
        for n in ref:
            assert torch.equal(states[k][n].detach(), expect[n]), n
            # the plain fp32 average, to the fixed-point quantum (3 clients' roundings) and fp32's
            torch.testing.assert_close(states[k][n].detach(), plain[k][n], atol=3 * fp.quantum + 1e-6, rtol=0)


def test_dp_clips_every_update_to_c_over_its_shared_groups():
    ref = _ref()
    states = {k: _client(k, ref, scale=[0.01, 1.0, 5.0][k]) for k in range(3)}
    before = {k: {n: t.detach().clone() for n, t in s.items()} for k, s in states.items()}
    clip = 0.5
    privacy = Privacy(PrivacySettings(clip, 0.0, None))  # sigma 0: the clipping alone, checkable by hand
    ex = Exchange(NAMES, [1, 1, 1], privacy=privacy)
    ex.set_reference(ref)
    plan = plan_round("udec", 1, 3, 0)  # the decoder only: the norm is over it alone
    ex.sync(plan, states)
    changes = {k: [before[k][n] - ref[n] for n in NAMES[U]] for k in range(3)}
    for k in range(3):
        f = privacy.clip_factors[k]
        assert f == pytest.approx(min(1.0, clip / l2_norm(changes[k])), rel=1e-6)
        assert l2_norm([c * f for c in changes[k]]) <= clip * (1 + 1e-6)
    assert privacy.clip_factors[0] == 1.0 and privacy.clip_factors[2] < 1.0  # the check can fail both ways
    for i, n in enumerate(NAMES[U]):
        avg = sum(changes[k][i] * privacy.clip_factors[k] for k in range(3)) / 3
        torch.testing.assert_close(states[0][n].detach(), ref[n] + avg, atol=1e-6, rtol=0)
    assert torch.equal(states[1]["enc.weight"].detach(), before[1]["enc.weight"])  # local: untouched


def test_dp_noise_on_the_average_has_the_gaussian_mechanisms_variance():
    # Every client holds the reference (no change): the new values minus ref are the noise of the average,
    # N(0, sigma^2 C^2) / n_g per element, with n_g a group's contributors (usplit: fewer than K).
    big = nn.Linear(400, 250)  # 100,250 values: the variance to 0.5% (3% allowed)
    ref = {n: p.detach().clone() for n, p in big.named_parameters()}
    names = {U: list(ref)}
    sigma, clip, K = 2.0, 0.3, 4
    ex = Exchange(names, [1] * K, privacy=Privacy(PrivacySettings(clip, sigma, None)))
    ex.set_reference(ref)
    states = {k: {n: t.clone() for n, t in ref.items()} for k in range(K)}
    ex.sync(plan_round("udec", 1, K, 0), states)
    noise = torch.cat([(states[0][n] - ref[n]).flatten().double() for n in ref])
    assert noise.var().item() == pytest.approx((sigma * clip / K) ** 2, rel=0.03)
    assert all(torch.equal(states[k][n], states[0][n]) for k in range(K) for n in ref)  # the same on every client


def test_privacy_needs_the_reference():
    ex = Exchange(NAMES, [1, 1], privacy=Privacy(PrivacySettings(1.0, 1.0, None)))
    with pytest.raises(RuntimeError, match="no[n]e|set_reference"):
        ex.sync(plan_round("full", 1, 2, 0), {k: _client(k, _ref()) for k in range(2)})


# -- real ranks -------------------------------------------------------------------------------------


def _secure_methods_body(ctx, clients: int, in_place: bool) -> dict:
    from fedrun.dist import hosted_clients

    hosted = hosted_clients(ctx.rank, ctx.world_size, clients)
    ref = _ref()
    sizes = [k + 1 for k in range(clients)]
    shares = [s / sum(sizes) for s in sizes]
    fp = FixedPoint(1.0)
    out = {}
    for method in METHOD_NAMES:
        privacy = _secure(hosted)
        ex = Exchange(NAMES, sizes, privacy=privacy)
        model = None
        if in_place:  # one client per rank, living in the exchange's flat tensor
            model = Tiny()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(_client(hosted[0], ref)[n])
            assert ex.adopt(model)
            live = {hosted[0]: dict(model.named_parameters())}
        else:
            live = {k: _client(k, ref) for k in hosted}
        ex.set_reference(ref)
        ok, bytes_ok, after = True, True, {}
        for rnd in (1, 2):
            plan = plan_round(method, rnd, clients, 7)
            everyone = {k: {n: t.detach().clone() for n, t in _client(k, ref).items()} for k in range(clients)}
            if rnd == 2:  # every client's state after round 1 trained again: the same on every rank
                everyone = {k: {n: v + 0.01 * (k + 1) for n, v in s.items()} for k, s in after.items()}
                with torch.no_grad():
                    for k in hosted:
                        for n, t in live[k].items():
                            t.copy_(everyone[k][n])
            ref_now = {n: ex.reference[n].clone() for n in ref} if rnd == 2 else ref
            expect = _expected_fixed_point(plan, ref_now, everyone, fp, shares)
            stats = ex.sync(plan, live)
            for k in hosted:
                for n, t in live[k].items():
                    want = expect.get(n, everyone[k][n])  # a local group keeps the client's own value
                    ok &= bool(torch.equal(t.detach(), want))
            numel = sum(ref[n].numel() for g in plan.shared_groups() for n in NAMES[g])
            bytes_ok &= stats.bytes == 8 * (numel + len(plan.shared_groups()))  # int64: twice fp32's 4
            after = {k: {n: expect.get(n, everyone[k][n]).clone() for n in ref} for k in range(clients)}
        out[method] = {"exact": ok, "bytes": bytes_ok}
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("world, clients, in_place", [(2, 2, True), (2, 3, False), (3, 5, False), (3, 3, True)])
def test_secure_sync_on_ranks_equals_the_unmasked_fixed_point_sum(tmp_path, world, clients, in_place):
    body = partial(_secure_methods_body, clients=clients, in_place=in_place)
    for res in spawn_ranks(world, body, tmp_path, timeout_s=180, label="secure sync"):
        for method in METHOD_NAMES:
            assert res[method] == {"exact": True, "bytes": True}, (res["rank"], method, res[method])
