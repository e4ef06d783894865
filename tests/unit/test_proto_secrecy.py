"""Forward secrecy per epoch and the compression oracle, checked on live Connection objects.

Forward secrecy: after a rekey has completed on both ends, nothing reachable from either
`Connection` may lead back to epoch 0: no session key, chaining key or ephemeral private key of the
handshake as bytes, no X25519 private key object, and no AEAD object that still opens a frame of
epoch 0.  The object graph is walked with `gc.get_referents` (not into modules, classes or function
globals, which are shared by the whole process and not the connection's state).

Compression: each packet is compressed on its own, so the length a packet takes on the wire does
not depend on the other packets sealed in the same frame (a CRIME-style oracle across flows).
"""

from __future__ import annotations

import contextlib
import gc
import types
import zlib
from collections.abc import Callable, Iterator

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from tests.unit.test_proto_pair import Pair, seeded_rng
from vpnd_runtime.proto import Params, RemoteProtocolError
from vpnd_runtime.proto.handshake import NoiseHandshake
from vpnd_runtime.proto.session import (
    HEADER,
    HEADER_LEN,
    MAX_BODY,
    NONCE,
    decode_packets,
)

#: Secrets recorded while the pair is built; module-level so that nothing reachable from a
#: Connection refers to it (function globals are not walked).
_RECORDED: list[bytes] = []


def _recording_rng(seed: int) -> Callable[[int], bytes]:
    draw = seeded_rng(seed)

    def rng(n: int) -> bytes:
        out = draw(n)
        _RECORDED.append(out)  # 32-byte draws are ephemeral private keys
        return out

    return rng


def reachable(root: object) -> Iterator[object]:
    """Every object reachable from `root` through references a Connection holds."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, (type, types.ModuleType)):
            continue
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    stack.append(cell.cell_contents)
            stack.extend(obj.__defaults__ or ())
            continue
        stack.extend(gc.get_referents(obj))


def _frame_messages(wire: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(wire):
        n = int.from_bytes(wire[pos : pos + 4], "big")
        out.append(wire[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def _opens(aead: object, frame: bytes) -> bool:
    _, _, counter = HEADER.unpack_from(frame)
    try:
        aead.decrypt(NONCE.pack(counter), frame[HEADER_LEN:], frame[:HEADER_LEN])  # type: ignore[attr-defined]
    except InvalidTag:
        return False
    return True


@pytest.mark.parametrize(
    "params",
    [
        Params(keyttl=30.0, keepalive=10.0),
        Params(keyttl=30.0, keepalive=10.0, lossy=True, cipher="aes-256-gcm"),
    ],
    ids=["tcp-chacha", "lossy-aesgcm"],
)
def test_after_a_rekey_nothing_reachable_from_a_connection_leads_back_to_epoch_0(
    params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    _RECORDED.clear()
    secrets: list[bytes] = []
    real_keys = NoiseHandshake.keys

    def keys(self: NoiseHandshake):  # type: ignore[no-untyped-def]
        k = real_keys(self)
        secrets.extend([k.send_key, k.recv_key, k.chaining_key])
        return k

    monkeypatch.setattr(NoiseHandshake, "keys", keys)
    pair = Pair(params)
    pair.i._rng = _recording_rng(1)
    pair.r._rng = _recording_rng(1001)
    pair.handshake()
    secrets += [b for b in _RECORDED if len(b) == 32]  # the two handshake ephemerals
    assert len(secrets) == 8

    # One frame of epoch 0 each way, kept to try every reachable AEAD on.
    pair.i.send_packets([b"epoch 0 from the initiator"], pair.now)
    to_r = pair.i.data_to_send()
    pair.r.send_packets([b"epoch 0 from the responder"], pair.now)
    to_i = pair.r.data_to_send()
    epoch0 = _frame_messages(to_r) + _frame_messages(to_i)
    assert all(HEADER.unpack_from(f)[1] == 0 for f in epoch0)
    pair.events_r += pair.r.receive_data(to_r, pair.now)
    pair.events_i += pair.i.receive_data(to_i, pair.now)

    pair.advance(35.0)  # the initiator renews its keys at 30 s
    pair.i.send_packets([b"epoch 1 from the initiator"], pair.now)
    pair.r.send_packets([b"epoch 1 from the responder"], pair.now)
    pair.pump()
    assert pair.i.stats.epoch == pair.r.stats.epoch == 1
    assert set(pair.i._recv) == set(pair.r._recv) == {1}  # the switch is complete both ways
    _RECORDED.clear()

    for conn in (pair.i, pair.r):
        for obj in reachable(conn):
            assert not isinstance(obj, X25519PrivateKey), (
                f"{conn.role}: an ephemeral private key is still reachable"
            )
            if isinstance(obj, (bytes, bytearray)) and len(obj) >= 32:
                for s in secrets:
                    assert s not in obj, f"{conn.role}: epoch-0 secret bytes still reachable"
            if isinstance(obj, (ChaCha20Poly1305, AESGCM)):
                for frame in epoch0:
                    assert not _opens(obj, frame), (
                        f"{conn.role}: an AEAD that opens an epoch-0 frame is still reachable"
                    )


# --------------------------------------------------------------------------- compression oracle
SECRET = b"Cookie: session=QWERTYUIOPASDFGH\r\n"


def _frame_len(pair: Pair, packets: list[bytes]) -> int:
    pair.i.send_packets(packets, pair.now)
    wire = pair.i.data_to_send()
    pair.events_r += pair.r.receive_data(wire, pair.now)
    assert pair.packets(pair.events_r)[-len(packets) :] == packets
    return len(wire)


def test_a_packets_compressed_length_does_not_depend_on_another_packet_in_the_batch() -> None:
    pair = Pair(Params(compress=True, compress_level=9))
    pair.handshake()
    victim = b"GET / HTTP/1.1\r\nHost: bank\r\n" + SECRET + b"\r\n"
    right = b"GET /?q=Cookie: session=QWERTYUIOPASDFGH HTTP/1.1\r\nHost: attacker\r\n\r\n"
    wrong = b"GET /?q=Cookie: session=ZXCVBNMLKJHGFDSA HTTP/1.1\r\nHost: attacker\r\n\r\n"
    assert len(zlib.compress(right, 9)) == len(zlib.compress(wrong, 9))  # equal on their own
    # What the victim's packet adds to the frame, next to the attacker's right or wrong guess.
    with_right = _frame_len(pair, [right, victim]) - _frame_len(pair, [right])
    with_wrong = _frame_len(pair, [wrong, victim]) - _frame_len(pair, [wrong])
    assert with_right == with_wrong


def test_each_compressed_packet_decompresses_within_the_per_packet_and_batch_caps() -> None:
    from vpnd_runtime.proto.session import PACKETS_PER_PACKET

    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = bomb.compress(bytes(70_000)) + bomb.flush()
    one = (0x8000_0000 | len(packed)).to_bytes(4, "big") + packed
    with pytest.raises(RemoteProtocolError, match="expands beyond"):
        decode_packets(bytes([1, PACKETS_PER_PACKET]) + one)
    small = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = small.compress(bytes(60_000)) + small.flush()
    one = (0x8000_0000 | len(packed)).to_bytes(4, "big") + packed
    assert decode_packets(bytes([1, PACKETS_PER_PACKET]) + one) == [bytes(60_000)]
    many = bytes([1, PACKETS_PER_PACKET]) + one * (MAX_BODY // 60_000 + 1)
    with pytest.raises(RemoteProtocolError, match="expands beyond"):
        decode_packets(many)


def test_a_whole_batch_compressed_body_of_an_older_vpnd_is_refused_by_name() -> None:
    body = b"\x00\x00\x00\x03abc"
    with pytest.raises(RemoteProtocolError, match="whole-batch"):
        decode_packets(b"\x01\x01" + zlib.compress(body))


def test_an_older_vpnd_that_compresses_whole_batches_is_named_at_the_handshake() -> None:
    import struct

    from tests.unit.test_proto_connection import forge_message1
    from tests.unit.test_proto_pair import PSK, WALL
    from vpnd_runtime.proto import Connection

    r = Connection("responder", PSK, Params(compress=True), seeded_rng(2), 0.0, wall=WALL)
    e_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    payload = struct.pack(">QBB", int(WALL * 1e9), 1, 0x01)  # compress flag of older vpnd
    with pytest.raises(RemoteProtocolError, match=r"older vpnd.*whole batches"):
        r.receive_data(forge_message1(e_pub, payload), 0.0)
