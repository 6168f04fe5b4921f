"""Secure aggregation by pairwise masks (Bonawitz et al. 2017, "Practical secure aggregation for
privacy-preserving machine learning", without the dropout recovery).

Every rank makes an X25519 key pair at start (fresh per process: keys are never stored, so a restarted run
never reuses a mask); the public keys are all-gathered as JSON. Clients i < j derive the secret
s_ij = HKDF-SHA256(X25519(own private key, the other's public key), info = "... pair i j"): both ranks
compute the same 32 bytes, nobody else can. Clients hosted on one rank share its key pair (they are one
party), but each pair of clients still has its own secret, since masks are between clients.

Per sync, the mask of pair (i, j) is the keystream of AES-256-CTR under s_ij, read as little-endian uint32,
with the counter block (round, use, block index): round and the sync's number within it (``use``: the
final EMA sync reuses the last round's number) make every stream new, and counter mode lets every bucket
read its own slice [lo, hi) of the stream directly. Client i adds m_ij for every other contributor j > i and
subtracts m_ji for j < i, mod 2^32: over all contributors the masks cancel exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedrun.privacy.fixedpoint import RING_MASK

KEY_BYTES = 32
_INFO = b"fedrun secagg v1 pair %d %d"


def public_bytes(private_key: object) -> bytes:
    """The 32 raw bytes of an X25519 private key's public key."""
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def new_private_key() -> object:
    """A fresh X25519 private key (from the OS's randomness)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.generate()


def pair_secret(private_key: object, peer_public: bytes, i: int, j: int) -> bytes:
    """s_ij: HKDF-SHA256 of the X25519 shared key of this party and the one holding ``peer_public``, bound
    to the client pair {i, j} (order-free: both sides get the same bytes)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if i == j:
        raise ValueError(f"a client has no pair secret with itself (client {i})")
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))  # type: ignore[attr-defined]
    lo, hi = min(i, j), max(i, j)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_INFO % (lo, hi)).derive(shared)


def mask_stream(secret: bytes, round: int, use: int, lo: int, hi: int) -> np.ndarray:
    """Elements [lo, hi) of the uint32 mask stream of ``secret`` in sync (round, use): AES-256-CTR's
    keystream, 4 bytes per element, counter block = round (4 bytes) | use (4) | block index (8), big-endian."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if not 0 <= lo <= hi:
        raise ValueError(f"bad stream slice [{lo}, {hi})")
    first_block, skip = divmod(lo * 4, 16)
    counter = struct.pack(">IIQ", round, use, first_block)
    enc = Cipher(algorithms.AES(secret), modes.CTR(counter)).encryptor()
    raw = enc.update(bytes(skip + (hi - lo) * 4))[skip:]
    return np.frombuffer(raw, dtype="<u4")


class PairKeys:
    """This rank's pair secrets: s_kj for every hosted client k and every other client j of the federation.

    Args:
        private_key: this rank's X25519 key.
        public_keys: client -> the 32-byte public key of the rank that hosts it (every client).
        hosted: the clients this rank hosts.
    """

    def __init__(self, private_key: object, public_keys: Mapping[int, bytes], hosted: Iterable[int]) -> None:
        self.hosted = tuple(sorted(hosted))
        self.secrets: dict[tuple[int, int], bytes] = {}
        for k in self.hosted:
            for j, pub in public_keys.items():
                if j != k:
                    self.secrets[(min(k, j), max(k, j))] = pair_secret(private_key, pub, k, j)

    def mask(self, client: int, contributors: Sequence[int], round: int, use: int, lo: int, hi: int) -> Tensor:
        """Client ``client``'s mask over elements [lo, hi) of sync (round, use), int64 in [0, 2^32):
        sum_{j > client} m_cj - sum_{j < client} m_jc over the other ``contributors``, mod 2^32."""
        out = np.zeros(hi - lo, dtype=np.int64)
        for j in contributors:
            if j == client:
                continue
            stream = mask_stream(self.secrets[(min(client, j), max(client, j))], round, use, lo, hi)
            if j > client:
                out += stream
            else:
                out -= stream
        return torch.from_numpy(out).bitwise_and_(RING_MASK)


def exchange_keys(hosted: Sequence[int]) -> PairKeys:
    """At start, on every rank alike: a fresh key pair, the public keys all-gathered (JSON, hex, each
    checked to be 32 bytes), and this rank's pair secrets. One process: no peers, the keys are its own."""
    from fedrun import dist

    key = new_private_key()
    mine = public_bytes(key).hex()
    gathered = dist.gather_dict({k: mine for k in hosted}, str, "secure-aggregation public keys")
    public: dict[int, bytes] = {}
    for k, text in gathered.items():
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
        if len(raw) != KEY_BYTES:
            raise dist.PeerPayloadError(f"client {k}'s public key is not {KEY_BYTES} bytes of hex: refused")
        public[int(k)] = raw
    return PairKeys(key, public, hosted)
