"""Noise NNpsk0 handshake: a known-answer vector from an independent implementation, and the guard.

The vector below was produced with the `noiseprotocol` package (0.3.1, a separate Python Noise
implementation) for Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s with prologue b"vpnd/1", psk 00..1f,
ephemeral private keys 0x11*32 (initiator) and 0x22*32 (responder), message-1 payload
`18b5c1d2e3f40000 01 00` (timestamp, cipher id, flags) and an empty message-2 payload; the two
transport ciphertexts are the first message of each direction (nonce 0, no associated data).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from vpnd_runtime.proto import RemoteProtocolError, ReplayGuard
from vpnd_runtime.proto.handshake import NoiseHandshake

PSK = bytes(range(32))
E_INIT = bytes([0x11]) * 32
E_RESP = bytes([0x22]) * 32
PAYLOAD1 = bytes.fromhex("18b5c1d2e3f400000100")
MSG1 = bytes.fromhex(
    "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13"
    "8eb3753c6eb6e2c26056b9fe044538b701825dd464b72f87fc00"
)
MSG2 = bytes.fromhex(
    "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20"
    "8a59d3961766ccea20b9f82cfd871c36"
)
I2R_CONFIRM = bytes.fromhex("fb84d6ccb7a960a88111da76022f50096d181c33228f1b")
R2I_PONG = bytes.fromhex("18cb7586332cac7513428a1ebb0bd203228f903f")
HANDSHAKE_HASH = bytes.fromhex("3522d4660c1395ca47470abb931d1b49420579bf92ca5efc9460c1d4b09bf386")


def fixed(key: bytes) -> Callable[[int], bytes]:
    """An rng that hands out the given key (to pin the ephemeral keys of the vector)."""
    return lambda n: key[:n]


def test_handshake_matches_an_independent_noise_implementation() -> None:
    init = NoiseHandshake(True, PSK)
    resp = NoiseHandshake(False, PSK)
    assert init.write_message1(fixed(E_INIT), PAYLOAD1) == MSG1
    assert resp.read_message1(MSG1) == PAYLOAD1
    assert resp.write_message2(fixed(E_RESP)) == MSG2
    assert init.read_message2(MSG2) == b""
    ki, kr = init.keys(), resp.keys()
    assert ki.handshake_hash == kr.handshake_hash == HANDSHAKE_HASH
    assert (ki.send_key, ki.recv_key) == (kr.recv_key, kr.send_key)
    nonce0 = bytes(12)
    assert ChaCha20Poly1305(ki.send_key).encrypt(nonce0, b"confirm", b"") == I2R_CONFIRM
    assert ChaCha20Poly1305(kr.send_key).encrypt(nonce0, b"pong", b"") == R2I_PONG
    assert ki.chaining_key == kr.chaining_key


def test_message_1_under_another_psk_fails_authentication() -> None:
    with pytest.raises(RemoteProtocolError, match="does not hold our key"):
        NoiseHandshake(False, bytes(32)).read_message1(MSG1)


@pytest.mark.parametrize("pos", [0, 31, 32, 41, len(MSG1) - 1])
def test_any_damage_to_message_1_fails_authentication(pos: int) -> None:
    bad = bytearray(MSG1)
    bad[pos] ^= 0x80
    with pytest.raises(RemoteProtocolError):
        NoiseHandshake(False, PSK).read_message1(bytes(bad))


def test_message_2_from_a_responder_without_the_psk_is_refused() -> None:
    init = NoiseHandshake(True, PSK)
    init.write_message1(fixed(E_INIT), PAYLOAD1)
    bad = bytearray(MSG2)
    bad[-1] ^= 1
    with pytest.raises(RemoteProtocolError, match="does not hold our key"):
        init.read_message2(bytes(bad))


def test_replay_guard_wants_strictly_newer_timestamps_per_key() -> None:
    guard = ReplayGuard(max_skew=180.0)
    guard.check(b"k1", 1_000, None)
    guard.record(b"k1", 1_000)
    with pytest.raises(RemoteProtocolError, match="replayed"):
        guard.check(b"k1", 1_000, None)
    guard.check(b"k1", 1_001, None)
    guard.check(b"k2", 5, None)  # another key has its own history


def test_replay_guard_refuses_timestamps_outside_the_skew_window() -> None:
    guard = ReplayGuard(max_skew=180.0)
    wall = 1_780_000_000.0
    guard.check(b"k", int((wall + 179) * 1e9), wall)
    with pytest.raises(RemoteProtocolError, match=r"\+181 s off our clock"):
        guard.check(b"k", int((wall + 181) * 1e9), wall)
    with pytest.raises(RemoteProtocolError, match="-181 s off"):
        guard.check(b"k", int((wall - 181) * 1e9), wall)


def test_replay_guard_forgets_the_oldest_key_beyond_its_cap() -> None:
    guard = ReplayGuard(max_keys=2)
    for k in (b"a", b"b", b"c"):
        guard.record(k, 10)
    guard.check(b"a", 5, None)  # forgotten
    with pytest.raises(RemoteProtocolError):
        guard.check(b"c", 5, None)
