"""Noise hash functions over BLAKE2s, built from `cryptography` primitives.

- `hash_(data)`: BLAKE2s-256, the Noise HASH.
- `hmac_(key, data)`: HMAC-BLAKE2s-256 (RFC 2104 with a 64-byte block).
- `hkdf(chaining_key, ikm, n)`: the Noise HKDF, which is RFC 5869 HKDF with salt = chaining key,
  empty info, and the output cut into `n` 32-byte pieces.  WireGuard's KDF1/KDF2/KDF3 are the same
  function; their test vectors (wireguard-go device/kdf_test.go) are checked in the unit tests.
"""

from __future__ import annotations

try:  # hashlib's blake2s without importing hashlib: its _hashlib maps the system libcrypto
    # (~3.5 MB of RSS) into a daemon that already carries cryptography's own OpenSSL
    from _blake2 import blake2s
except ImportError:  # pragma: no cover - a Python built without _blake2
    from hashlib import blake2s

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HASHLEN = 32
BLOCKLEN = 64


def hash_(data: bytes) -> bytes:
    """BLAKE2s-256 of `data`."""
    h = hashes.Hash(hashes.BLAKE2s(HASHLEN))
    h.update(data)
    return h.finalize()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 of `data` under `key`."""
    h = hmac.HMAC(key, hashes.BLAKE2s(HASHLEN))
    h.update(data)
    return h.finalize()


def hkdf(chaining_key: bytes, ikm: bytes, n: int) -> tuple[bytes, ...]:
    """Noise HKDF: return `n` (1..3) outputs of 32 bytes derived from `chaining_key` and `ikm`."""
    if not 1 <= n <= 3:
        raise ValueError(f"hkdf produces 1 to 3 outputs, not {n}")
    okm = HKDF(hashes.BLAKE2s(HASHLEN), HASHLEN * n, chaining_key, b"").derive(ikm)
    return tuple(okm[i * HASHLEN : (i + 1) * HASHLEN] for i in range(n))


def key_id(psk: bytes) -> bytes:
    """4-byte public id of a link key: keyed BLAKE2s, so it reveals nothing about the key.

    Sent in clear in handshake message 1 so that a responder can say "the peer uses another key"
    without trying the AEAD.  (`cryptography` has no keyed BLAKE2s; hashlib's is the same
    primitive.)
    """
    return blake2s(b"vpnd/1 key id", key=psk, digest_size=4).digest()
