"""Secure aggregation's pure pieces: fixed point in Z_(2^32) by hand, the AES-CTR mask stream against AES
itself, masks that cancel, differ per round and hide an update; then real gloo ranks: the masked sum equals
the unmasked fixed-point sum exactly."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from multiproc import spawn_ranks

from fedrun.privacy.fixedpoint import MODULUS, FixedPoint

pytest.importorskip("cryptography")

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

from fedrun.privacy.secagg import PairKeys, mask_stream, pair_secret, public_bytes  # noqa: E402

# -- fixed point ----------------------------------------------------------------------------------


def test_fixed_point_by_hand():
    fp = FixedPoint(1.0)
    assert fp.quantum == 2.0**-30
    q, sat = fp.encode(torch.tensor([0.25, -0.25, 0.0, 1.0]))
    assert q.tolist() == [2**28, -(2**28), 0, 2**30] and sat == 0
    reduced = FixedPoint.reduce_(q.clone())
    assert reduced.tolist() == [2**28, MODULUS - 2**28, 0, 2**30]
    assert fp.decode(reduced).tolist() == [0.25, -0.25, 0.0, 1.0]
    # weighted and saturated: 0.5 * clamp(3, -1, 1) = 0.5 -> 2^29; one element beyond the range
    q, sat = fp.encode(torch.tensor([3.0, -0.5]), weight=0.5)
    assert q.tolist() == [2**29, -(2**28)] and sat == 1


def test_fixed_point_sum_is_exact_modulo_the_ring():
    fp = FixedPoint(2.0)
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(1000, generator=g) * 4 - 2 for _ in range(5)]
    codes = [fp.encode(x, 0.2)[0] for x in xs]
    exact = sum(codes)  # int64, no reduction
    wrapped = sum(FixedPoint.reduce_(c.clone()) + MODULUS * 7 for c in codes)  # any multiples of 2^32 away
    assert torch.equal(fp.decode(wrapped), fp.decode(exact))
    assert torch.equal(fp.decode(exact), exact.double() * fp.quantum)
    # within K/2 quanta of the real average
    assert (fp.decode(exact) - sum(0.2 * x.double() for x in xs)).abs().max() <= 5 * fp.quantum / 2


# -- mask streams -----------------------------------------------------------------------------------


def _key(seed: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes([seed]) * 32)  # fixed keys: deterministic tests


def test_mask_stream_is_aes_of_the_counter_blocks():
    secret = bytes(range(32))
    ecb = Cipher(algorithms.AES(secret), modes.ECB()).encryptor()
    blocks = b"".join(
        ecb.update((3).to_bytes(4, "big") + (1).to_bytes(4, "big") + b.to_bytes(8, "big")) for b in range(3)
    )
    expected = np.frombuffer(blocks, dtype="<u4")  # 12 uint32
    assert np.array_equal(mask_stream(secret, 3, 1, 0, 12), expected)
    assert np.array_equal(mask_stream(secret, 3, 1, 5, 11), expected[5:11])  # random access across blocks
    assert not np.array_equal(mask_stream(secret, 4, 1, 0, 12), expected)  # another round
    assert not np.array_equal(mask_stream(secret, 3, 0, 0, 12), expected)  # another sync of the round


def test_pair_secret_is_shared_and_bound_to_the_pair():
    a, b = _key(1), _key(2)
    s = pair_secret(a, public_bytes(b), 0, 3)
    assert s == pair_secret(b, public_bytes(a), 3, 0) and len(s) == 32
    assert s != pair_secret(a, public_bytes(b), 0, 4)
    with pytest.raises(ValueError, match="itself"):
        pair_secret(a, public_bytes(a), 2, 2)


def _parties(hosting: dict[int, list[int]]) -> dict[int, PairKeys]:
    """One PairKeys per party (rank), fixed keys; ``hosting``: party -> its clients."""
    keys = {r: _key(r + 1) for r in hosting}
    public = {k: public_bytes(keys[r]) for r, clients in hosting.items() for k in clients}
    return {r: PairKeys(keys[r], public, clients) for r, clients in hosting.items()}


def test_masks_cancel_over_the_contributors_and_differ_between_rounds():
    parties = _parties({0: [0, 3], 1: [1], 2: [2, 4]})
    owner = {k: p for p in parties.values() for k in p.hosted}
    contributors = [0, 1, 2, 4]  # client 3 does not contribute: its pairs must not enter
    for rnd in (1, 2):
        total = sum(owner[k].mask(k, contributors, rnd, 0, 7, 300) for k in contributors)
        assert torch.equal(total & (MODULUS - 1), torch.zeros(293, dtype=torch.int64))
    m1 = owner[0].mask(0, contributors, 1, 0, 0, 100)
    m2 = owner[0].mask(0, contributors, 2, 0, 0, 100)
    assert not torch.equal(m1, m2) and int((m1 == m2).sum()) <= 2
    assert int(m1.min()) >= 0 and int(m1.max()) < MODULUS


def test_a_masked_contribution_is_uncorrelated_with_the_update():
    parties = _parties({0: [0], 1: [1]})
    n = 100_000
    update = torch.linspace(-1, 1, n)  # a strongly structured update
    fp = FixedPoint(1.0)
    code, _ = fp.encode(update, 0.5)
    masked = FixedPoint.reduce_(code + parties[0].mask(0, [0, 1], 1, 0, 0, n))
    corr = np.corrcoef(masked.double().numpy(), update.double().numpy())[0, 1]
    assert abs(corr) < 0.01
    unmasked = FixedPoint.reduce_(code.clone())
    assert np.corrcoef(fp.decode(unmasked).numpy(), update.double().numpy())[0, 1] > 0.99  # the check can fail


# -- real ranks -------------------------------------------------------------------------------------


def _client_update(k: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + k)) * 0.3


def _masked_sum_body(ctx, clients: int, n: int) -> dict:
    import torch.distributed as tdist

    from fedrun.dist import hosted_clients
    from fedrun.privacy.secagg import exchange_keys

    hosted = hosted_clients(ctx.rank, ctx.world_size, clients)
    keys = exchange_keys(hosted)
    fp, p = FixedPoint(1.0), 1.0 / clients
    everyone = list(range(clients))
    results = {}
    for rnd in (1, 2):
        wire = torch.zeros(n, dtype=torch.int64)
        for k in hosted:
            code, _ = fp.encode(_client_update(k, n), p)
            wire += code + keys.mask(k, everyone, rnd, 0, 0, n)
        FixedPoint.reduce_(wire)
        sent = wire.clone()
        tdist.all_reduce(wire)
        plain = sum(fp.encode(_client_update(k, n), p)[0] for k in everyone)  # unmasked, every client
        results[rnd] = {
            "exact": bool(torch.equal(fp.decode(wire), fp.decode(plain))),
            "sent_differs": bool(
                not torch.equal(sent, FixedPoint.reduce_(sum(fp.encode(_client_update(k, n), p)[0] for k in hosted)))
            ),
        }
    return {"results": results}


@pytest.mark.multiproc
@pytest.mark.parametrize("world, clients", [(2, 3), (3, 5)])
def test_masked_sum_equals_the_unmasked_fixed_point_sum(tmp_path, world, clients):
    results = spawn_ranks(world, partial(_masked_sum_body, clients=clients, n=4099), tmp_path, timeout_s=120)
    for res in results:
        for rnd in ("1", "2"):
            assert res["results"][rnd]["exact"], res
            assert res["results"][rnd]["sent_differs"], res
