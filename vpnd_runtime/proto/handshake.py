"""Noise NNpsk0_25519_ChaChaPoly_BLAKE2s for vpnd, plus the handshake replay guard.

Theory of operation
-------------------
Both ends hold the same 32-byte link key (the Noise `psk`).  The pattern is::

    NNpsk0:
      -> psk, e          message 1, initiator -> responder
      <- e, ee           message 2, responder -> initiator

with prologue ``b"vpnd/1"``.  Message 1 carries no DH at all: its payload is sealed under a key
derived from the psk and the initiator's ephemeral key only, so the responder checks the AEAD tag
(proof that the peer holds the psk) before it spends a DH or any per-peer state.  Message 2 mixes
the ephemeral-ephemeral DH, so the session keys from `split()` have forward secrecy, and its tag
proves to the initiator that the responder holds the psk too.

The Noise bodies are wrapped by `connection.py` as::

    message 1: 0x01 | key_id[4] | e[32] | AEAD(payload[26])        (79 bytes)
               payload = timestamp u64 ns (wall clock) | cipher id u8 | flags u8 (bit 1: compress)
                         | address[16] (the initiator's tunnel address, IPv4 as ::ffff:a.b.c.d;
                           all zeros: not announced)
               (the first version's 10-byte payload, without the address, is still accepted)
    message 2: 0x02 | e[32] | AEAD(empty)                          (49 bytes)

`key_id` (keyed BLAKE2s of the psk, see `kdf.key_id`) lets the responder reject "another key"
with a clear reason before any cryptography.  The timestamp defeats replay: the responder's
`ReplayGuard` accepts a message 1 only if its timestamp is strictly greater than the last one
accepted for that key id and (when the responder knows its wall clock) within `max_skew` of it.
Even without the guard a replayed message 1 opens no session: the responder only declares the
link up after the initiator's CONFIRM, which needs the DH the replayer cannot do.

Low-order X25519 points make `cryptography` raise ValueError (all-zero shared secret); that is
turned into a RemoteProtocolError.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..compat import SLOTS
from .errors import LocalProtocolError, RemoteProtocolError
from .kdf import hash_, hkdf
from .session import ChaCha20Poly1305

try:
    # The Rust binding's own constructors (what X25519PrivateKey.from_private_bytes returns):
    # the public classmethods first import cryptography's legacy OpenSSL backend (RSA, EC,
    # padding, OIDs: ~0.6 MiB of a daemon's RSS) only to ask whether X25519 exists.
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _private_key = _rust_openssl.x25519.from_private_bytes
    _public_key = _rust_openssl.x25519.from_public_bytes
except (ImportError, AttributeError):  # a cryptography laid out otherwise: the public API
    _private_key = X25519PrivateKey.from_private_bytes
    _public_key = X25519PublicKey.from_public_bytes

PROTOCOL_NAME = b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"vpnd/1"
DHLEN = 32
TAGLEN = 16
PSKLEN = 32

_NONCE = struct.Struct("<4xQ")
_PAYLOAD1_V0 = struct.Struct(">QBB")
_PAYLOAD1 = struct.Struct(">QBB16s")
PAYLOAD1_LEN = _PAYLOAD1.size
MSG1_BODY_LEN = DHLEN + PAYLOAD1_LEN + TAGLEN
#: Message 1 of the first protocol version (no announced address), still accepted.
MSG1_BODY_LEN_V0 = DHLEN + _PAYLOAD1_V0.size + TAGLEN
_NO_ADDRESS = bytes(16)
MSG2_BODY_LEN = DHLEN + TAGLEN

#: Message 1 flag: compression on, each packet compressed on its own (session.py).
FLAG_COMPRESS = 0x02
#: Message 1 flag of vpnd before issue 14: compression of whole batches (refused, by name).
FLAG_COMPRESS_BATCH = 0x01


def generate_keypair(rng: Callable[[int], bytes]) -> tuple[X25519PrivateKey, bytes]:
    """Make an X25519 key pair from 32 bytes of the caller's randomness."""
    seed = rng(32)
    if len(seed) != 32:
        raise LocalProtocolError(f"rng(32) returned {len(seed)} bytes")
    priv = _private_key(seed)
    return priv, priv.public_key().public_bytes_raw()


def dh(priv: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519; a malformed or low-order peer key is the peer's fault."""
    try:
        return priv.exchange(_public_key(peer_public))
    except ValueError:
        raise RemoteProtocolError("peer sent an invalid or low-order X25519 public key") from None


class _SymmetricState:
    """Noise SymmetricState (ck, h) with its CipherState (k, n), ChaChaPoly + BLAKE2s."""

    __slots__ = ("_aead", "_n", "ck", "h")

    def __init__(self) -> None:
        self.h = hash_(PROTOCOL_NAME) if len(PROTOCOL_NAME) > 32 else PROTOCOL_NAME.ljust(32, b"\0")
        self.ck = self.h
        self._aead: ChaCha20Poly1305 | None = None
        self._n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = hash_(self.h + data)

    def _set_key(self, k: bytes) -> None:
        self._aead = ChaCha20Poly1305(k)
        self._n = 0

    def mix_key(self, ikm: bytes) -> None:
        self.ck, k = hkdf(self.ck, ikm, 2)
        self._set_key(k)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, k = hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self._set_key(k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self._aead is None:  # never in NNpsk0: psk comes first
            raise LocalProtocolError("Noise cipher state has no key")
        ct = self._aead.encrypt(_NONCE.pack(self._n), plaintext, self.h)
        self._n += 1
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self._aead is None:
            raise LocalProtocolError("Noise cipher state has no key")
        try:
            pt = self._aead.decrypt(_NONCE.pack(self._n), ciphertext, self.h)
        except InvalidTag:
            raise RemoteProtocolError(
                "handshake authentication failed: the peer does not hold our key"
            ) from None
        self._n += 1
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = hkdf(self.ck, b"", 2)
        return k1, k2


@dataclass(frozen=True, **SLOTS)
class SessionKeys:
    """Result of a completed handshake.

    `send_key`/`recv_key` are this side's directions; `chaining_key` seeds the rekeys;
    `handshake_hash` identifies the session (equal on both ends).
    """

    send_key: bytes = field(repr=False)  # key material never shows in a repr or a log
    recv_key: bytes = field(repr=False)
    chaining_key: bytes = field(repr=False)
    handshake_hash: bytes


@dataclass(frozen=True, **SLOTS)
class InitPayload:
    """What the initiator states in message 1."""

    timestamp_ns: int
    cipher_id: int
    flags: int
    #: The initiator's tunnel address (16 bytes, IPv4-mapped for IPv4), all zeros when unknown.
    address: bytes = _NO_ADDRESS

    def encode(self) -> bytes:
        return _PAYLOAD1.pack(self.timestamp_ns, self.cipher_id, self.flags, self.address)

    @classmethod
    def decode(cls, data: bytes) -> InitPayload:
        if len(data) == _PAYLOAD1_V0.size:
            return cls(*_PAYLOAD1_V0.unpack(data))
        if len(data) != PAYLOAD1_LEN:
            raise RemoteProtocolError(f"handshake payload of {len(data)} bytes")
        return cls(*_PAYLOAD1.unpack(data))

    @property
    def announced(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The announced tunnel address (IPv4 unmapped), or None when none was sent."""
        if self.address == _NO_ADDRESS:
            return None
        addr = ipaddress.IPv6Address(self.address)
        return addr.ipv4_mapped or addr


def encode_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bytes:
    """16 bytes for message 1: IPv6 as is, IPv4 mapped (::ffff:a.b.c.d), None as zeros."""
    if address is None:
        return _NO_ADDRESS
    if address.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{address}").packed
    return address.packed


class NoiseHandshake:
    """One NNpsk0 handshake, driven message by message (no framing, no I/O).

    Initiator: `write_message1` then `read_message2`.  Responder: `read_message1` then
    `write_message2`.  Then `keys()`.
    """

    def __init__(self, initiator: bool, psk: bytes) -> None:
        if len(psk) != PSKLEN:
            raise ValueError(f"psk must be {PSKLEN} bytes, got {len(psk)}")
        self.initiator = initiator
        self._psk = psk
        self._ss = _SymmetricState()
        self._ss.mix_hash(PROLOGUE)
        self._e: X25519PrivateKey | None = None
        self._re: bytes | None = None
        self._step = 0

    def _expect(self, step: int, initiator: bool, what: str) -> None:
        if self._step != step or self.initiator != initiator:
            raise LocalProtocolError(f"{what} is out of order in the handshake")

    def write_message1(self, rng: Callable[[int], bytes], payload: bytes) -> bytes:
        """Initiator: `psk, e` + sealed payload -> body (e || ciphertext)."""
        self._expect(0, True, "write_message1")
        ss = self._ss
        ss.mix_key_and_hash(self._psk)
        self._e, e_pub = generate_keypair(rng)
        ss.mix_hash(e_pub)
        ss.mix_key(e_pub)
        ct = ss.encrypt_and_hash(payload)
        self._step = 1
        return e_pub + ct

    def read_message1(self, body: bytes) -> bytes:
        """Responder: check the psk-keyed tag (no DH) and return the payload."""
        self._expect(0, False, "read_message1")
        if len(body) not in (MSG1_BODY_LEN, MSG1_BODY_LEN_V0):
            raise RemoteProtocolError(f"handshake message 1 has a body of {len(body)} bytes")
        ss = self._ss
        ss.mix_key_and_hash(self._psk)
        re = bytes(body[:DHLEN])
        ss.mix_hash(re)
        ss.mix_key(re)
        payload = ss.decrypt_and_hash(bytes(body[DHLEN:]))
        self._re = re
        self._step = 1
        return payload

    def write_message2(self, rng: Callable[[int], bytes], payload: bytes = b"") -> bytes:
        """Responder: `e, ee` + sealed payload -> body."""
        self._expect(1, False, "write_message2")
        if self._re is None:
            raise LocalProtocolError("write_message2 before read_message1")
        ss = self._ss
        e, e_pub = generate_keypair(rng)
        shared = dh(e, self._re)
        ss.mix_hash(e_pub)
        ss.mix_key(e_pub)
        ss.mix_key(shared)
        ct = ss.encrypt_and_hash(payload)
        self._step = 2
        return e_pub + ct

    def read_message2(self, body: bytes) -> bytes:
        """Initiator: `e, ee`; the tag proves the responder holds the psk."""
        self._expect(1, True, "read_message2")
        if len(body) != MSG2_BODY_LEN:
            raise RemoteProtocolError(f"handshake message 2 has a body of {len(body)} bytes")
        if self._e is None:
            raise LocalProtocolError("read_message2 before write_message1")
        ss = self._ss
        re = bytes(body[:DHLEN])
        ss.mix_hash(re)
        ss.mix_key(re)
        ss.mix_key(dh(self._e, re))
        payload = ss.decrypt_and_hash(bytes(body[DHLEN:]))
        self._step = 2
        return payload

    def keys(self) -> SessionKeys:
        """Noise Split(): initiator sends with the first key, responder with the second."""
        if self._step != 2:
            raise LocalProtocolError("handshake is not complete")
        k1, k2 = self._ss.split()
        send, recv = (k1, k2) if self.initiator else (k2, k1)
        return SessionKeys(send, recv, self._ss.ck, self._ss.h)


class ReplayGuard:
    """Remembers, per key id, the newest accepted handshake timestamp (responder side).

    Share one guard between all responder connections of a process.  A message 1 is accepted
    only if its timestamp is strictly greater than the last accepted one for the same key id, and,
    when the responder passes its wall clock, within `max_skew` seconds of it (so that a guard
    that was restarted empty still refuses old captures).  At most `max_keys` ids are remembered.
    """

    def __init__(self, max_skew: float = 180.0, max_keys: int = 4096) -> None:
        if max_skew <= 0:
            raise ValueError(f"max_skew must be positive, got {max_skew}")
        self.max_skew = max_skew
        self.max_keys = max_keys
        self._last: dict[bytes, int] = {}

    def check(self, key_id: bytes, timestamp_ns: int, wall: float | None) -> None:
        """Raise RemoteProtocolError unless the timestamp is fresh; does not record it."""
        last = self._last.get(key_id)
        if last is not None and timestamp_ns <= last:
            raise RemoteProtocolError("replayed or stale handshake (timestamp not newer)")
        if wall is not None:
            skew = timestamp_ns / 1e9 - wall
            if abs(skew) > self.max_skew:
                raise RemoteProtocolError(
                    f"handshake timestamp is {skew:+.0f} s off our clock "
                    f"(more than {self.max_skew:.0f} s)"
                )

    def record(self, key_id: bytes, timestamp_ns: int) -> None:
        """Remember an accepted timestamp (after its AEAD tag was verified)."""
        self._last.pop(key_id, None)
        self._last[key_id] = timestamp_ns
        while len(self._last) > self.max_keys:
            del self._last[next(iter(self._last))]
