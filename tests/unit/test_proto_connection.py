"""Two protocol endpoints back to back in memory, on a fake clock.

Each test narrates one rule of the wire protocol (see vpnd_runtime/proto/connection.py).
"""

from __future__ import annotations

import random
import struct
import tracemalloc
import zlib

import pytest

from tests.unit.test_proto_pair import PSK, WALL, Pair, seeded_rng
from vpnd_runtime.proto import (
    Closed,
    Connection,
    KeepaliveRtt,
    LinkUp,
    LocalProtocolError,
    Packets,
    Params,
    PeerDead,
    Rekeyed,
    RemoteProtocolError,
    ReplayGuard,
    State,
)
from vpnd_runtime.proto.handshake import _SymmetricState
from vpnd_runtime.proto.session import MAX_BODY

LOW_ORDER_POINTS = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
]


def established(params: Params | None = None, **kw: object) -> Pair:
    pair = Pair(params, **kw)  # type: ignore[arg-type]
    pair.handshake()
    return pair


def random_packets(rnd: random.Random, n: int, lo: int = 1, hi: int = 1500) -> list[bytes]:
    return [rnd.randbytes(rnd.randint(lo, hi)) for _ in range(n)]


# --------------------------------------------------------------------------- handshake
def test_handshake_brings_both_ends_up_with_the_same_session_and_key_id() -> None:
    pair = established()
    up_i = next(e for e in pair.events_i if isinstance(e, LinkUp))
    up_r = next(e for e in pair.events_r if isinstance(e, LinkUp))
    assert up_i == up_r
    assert up_i.key_id == pair.i.key_id == pair.r.peer_key_id
    assert len(up_i.session_id) == 16
    assert pair.i.state is State.ESTABLISHED
    assert pair.r.state is State.ESTABLISHED
    assert pair.i.stats.established_at == 0.0


def test_responder_declares_link_up_only_after_the_confirm() -> None:
    pair = Pair()
    pair.i.start(0.0)
    events = pair.r.receive_data(pair.i.data_to_send(), 0.0)
    assert events == []
    assert pair.r.state is State.HANDSHAKE
    pair.i.receive_data(pair.r.data_to_send(), 0.0)
    assert pair.i.state is State.ESTABLISHED
    events = pair.r.receive_data(pair.i.data_to_send(), 0.0)
    assert [type(e) for e in events] == [LinkUp]


def test_wrong_key_fails_the_handshake_with_a_clear_reason() -> None:
    pair = Pair(psk_r=bytes(32))
    pair.i.start(0.0)
    with pytest.raises(RemoteProtocolError, match="peer uses another key") as err:
        pair.r.receive_data(pair.i.data_to_send(), 0.0)
    assert pair.i.key_id in err.value.reason
    assert pair.r.state is State.ERROR
    assert pair.r.data_to_send() == b""  # an unauthenticated peer gets no answer


def test_forged_key_id_with_the_wrong_key_fails_authentication_before_any_dh() -> None:
    pair = Pair(psk_i=bytes(32))
    pair.i.start(0.0)
    msg = bytearray(pair.i.data_to_send())
    msg[5:9] = bytes.fromhex(pair.r.key_id)  # claim the responder's key id
    with pytest.raises(RemoteProtocolError, match="does not hold our key"):
        pair.r.receive_data(bytes(msg), 0.0)
    assert pair.r.data_to_send() == b""


def test_replayed_first_message_is_refused_by_the_shared_replay_guard() -> None:
    guard = ReplayGuard()
    pair = Pair(guard=guard)
    pair.i.start(0.0)
    msg1 = pair.i.data_to_send()
    pair.r.receive_data(msg1, 0.0)
    again = Connection(
        "responder", PSK, Params(), seeded_rng(7), 1.0, replay_guard=guard, wall=WALL
    )
    with pytest.raises(RemoteProtocolError, match="replayed"):
        again.receive_data(msg1, 1.0)
    assert again.data_to_send() == b""


def test_replayed_first_message_opens_no_session_even_without_a_guard() -> None:
    pair = Pair()
    pair.i.start(0.0)
    msg1 = pair.i.data_to_send()
    victim = Connection("responder", PSK, Params(), seeded_rng(7), 0.0, wall=WALL)
    assert victim.receive_data(msg1, 0.0) == []
    assert victim.data_to_send() != b""  # it answers, but the replayer cannot confirm
    assert victim.state is State.HANDSHAKE
    assert victim.tick(9.9) == []
    events = victim.tick(10.0)
    assert [type(e) for e in events] == [PeerDead]
    assert "no handshake" in events[0].reason
    assert victim.state is State.CLOSED


def test_handshake_timestamp_far_from_our_clock_is_refused() -> None:
    i = Connection("initiator", PSK, Params(), seeded_rng(1), 0.0, wall=WALL - 3600)
    r = Connection("responder", PSK, Params(), seeded_rng(2), 0.0, wall=WALL)
    i.start(0.0)
    with pytest.raises(RemoteProtocolError, match="off our clock"):
        r.receive_data(i.data_to_send(), 0.0)


def test_cipher_mismatch_fails_with_a_clear_reason() -> None:
    pair = Pair(Params(cipher="aes-256-gcm"), params_r=Params())
    pair.i.start(0.0)
    with pytest.raises(RemoteProtocolError, match="peer uses aes-256-gcm, we use chacha20"):
        pair.r.receive_data(pair.i.data_to_send(), 0.0)


def test_compression_mismatch_fails_with_a_clear_reason() -> None:
    pair = Pair(Params(compress=True), params_r=Params())
    pair.i.start(0.0)
    with pytest.raises(RemoteProtocolError, match="compression mismatch: peer has compress on"):
        pair.r.receive_data(pair.i.data_to_send(), 0.0)


def forge_message1(e_pub: bytes, payload: bytes) -> bytes:
    """Message 1 as an initiator holding the psk would build it around a chosen ephemeral key."""
    from vpnd_runtime.proto.handshake import PROLOGUE
    from vpnd_runtime.proto.kdf import key_id

    ss = _SymmetricState()
    ss.mix_hash(PROLOGUE)
    ss.mix_key_and_hash(PSK)
    ss.mix_hash(e_pub)
    ss.mix_key(e_pub)
    body = b"\x01" + key_id(PSK) + e_pub + ss.encrypt_and_hash(payload)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p[:2].hex())
def test_low_order_x25519_key_in_message_1_fails_cleanly(point: bytes) -> None:
    r = Connection("responder", PSK, Params(), seeded_rng(2), 0.0, wall=WALL)
    payload = struct.pack(">QBB", int(WALL * 1e9), 1, 0)
    with pytest.raises(RemoteProtocolError, match="low-order"):
        r.receive_data(forge_message1(point, payload), 0.0)
    assert r.state is State.ERROR
    assert r.data_to_send() == b""


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p[:2].hex())
def test_low_order_x25519_key_in_message_2_fails_cleanly(point: bytes) -> None:
    i = Connection("initiator", PSK, Params(), seeded_rng(1), 0.0, wall=WALL)
    i.start(0.0)
    body = b"\x02" + point + bytes(16)
    with pytest.raises(RemoteProtocolError, match="low-order"):
        i.receive_data(struct.pack(">I", len(body)) + body, 0.0)
    assert i.state is State.ERROR


def test_no_link_up_within_the_handshake_timeout_is_peer_dead() -> None:
    pair = Pair(Params(handshake_timeout=5.0))
    pair.i.start(0.0)
    pair.i.data_to_send()  # lost
    assert pair.i.next_deadline() == 5.0
    assert pair.i.tick(4.99) == []
    events = pair.i.tick(5.0)
    assert isinstance(events[0], PeerDead)
    assert "within 5 s" in events[0].reason


# --------------------------------------------------------------------------- data
def test_ten_thousand_packets_each_way_arrive_in_order_and_exact() -> None:
    pair = established()
    rnd = random.Random(42)
    sent_i = random_packets(rnd, 10_000)
    sent_r = random_packets(rnd, 10_000)
    for k in range(0, 10_000, 37):
        pair.i.send_packets(sent_i[k : k + 37], pair.now)
        pair.r.send_packets(sent_r[k : k + 37], pair.now)
        if k % 5 == 0:
            pair.pump()
    pair.pump()
    assert pair.packets(pair.events_r) == sent_i
    assert pair.packets(pair.events_i) == sent_r
    assert pair.r.stats.packets_in == pair.i.stats.packets_out == 10_000
    assert pair.r.stats.bytes_in == pair.i.stats.bytes_out == sum(map(len, sent_i))
    assert pair.i.stats.wire_bytes_out == pair.r.stats.wire_bytes_in


def test_batches_respect_sendbuf_and_a_big_packet_travels_alone() -> None:
    pair = established(Params(sendbuf=3000))
    pair.i.send_packets([b"a" * 1000] * 5 + [b"b" * 65545], 0.0)
    pair.pump()
    batches = [e.packets for e in pair.events_r if isinstance(e, Packets)]
    assert [len(b) for b in batches] == [2, 2, 1, 1]
    assert batches[-1] == [b"b" * 65545]


def test_packet_above_the_virtio_plus_ip_maximum_is_refused() -> None:
    pair = established()
    with pytest.raises(LocalProtocolError, match="65546 bytes exceeds"):
        pair.i.send_packets([b"fine", bytes(65546)], 0.0)
    assert pair.i.data_to_send() == b""  # nothing of the refused call was sealed
    assert pair.i.stats.packets_out == 0


@pytest.mark.parametrize("cipher", ["chacha20-poly1305", "aes-256-gcm", "aes-128-gcm"])
def test_every_cipher_carries_packets_both_ways(cipher: str) -> None:
    pair = established(Params(cipher=cipher))
    pair.i.send_packets([b"ping" * 300], 0.0)
    pair.r.send_packets([b"pong" * 300], 0.0)
    pair.pump()
    assert pair.packets(pair.events_r) == [b"ping" * 300]
    assert pair.packets(pair.events_i) == [b"pong" * 300]


def test_compression_round_trips_and_incompressible_data_is_sent_as_is() -> None:
    pair = established(Params(compress=True, compress_level=6))
    text = [b"GET /index.html HTTP/1.1\r\nHost: example\r\n\r\n" * 30] * 10
    pair.i.send_packets(text, 0.0)
    wire = pair.i.data_to_send()
    assert len(wire) < sum(map(len, text)) // 10
    pair.events_r += pair.r.receive_data(wire, 0.0)
    assert pair.packets(pair.events_r) == text

    noise = [random.Random(3).randbytes(1400)]
    pair.i.send_packets(noise, 0.0)
    wire = pair.i.data_to_send()
    overhead = 4 + 13 + 2 + 4 + 16  # frame length, header, PACKETS type+flags, packet length, tag
    assert len(wire) == 1400 + overhead
    assert pair.r.receive_data(wire, 0.0) == [Packets(noise)]


def test_a_decompression_bomb_is_refused() -> None:
    pair = established(Params(compress=True))
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)  # one packet, deflated on its own
    packed = bomb.compress(bytes(MAX_BODY * 4)) + bomb.flush()
    pair.i._seal_inner(b"\x01\x02" + struct.pack(">I", 0x8000_0000 | len(packed)) + packed)
    with pytest.raises(RemoteProtocolError, match="expands beyond"):
        pair.r.receive_data(pair.i.data_to_send(), 0.0)


def data_frame_pair(seed: int = 5) -> tuple[Pair, bytes]:
    pair = established(seed=seed)
    pair.i.send_packets([b"secret payload" * 3], 0.0)
    return pair, pair.i.data_to_send()


def test_each_single_byte_flip_of_a_data_frame_is_rejected() -> None:
    _, frame = data_frame_pair()
    for pos in range(len(frame)):
        pair, same = data_frame_pair()  # byte-identical session (seeded randomness)
        assert same == frame
        bad = bytearray(frame)
        bad[pos] ^= 0x01
        if pos < 4:  # the length prefix: the framer waits for more or cuts the frame short
            try:
                events = pair.r.receive_data(bytes(bad), 0.0)
            except RemoteProtocolError:
                continue
            assert not any(isinstance(e, Packets) for e in events), pos
            continue
        with pytest.raises(RemoteProtocolError) as err:
            pair.r.receive_data(bytes(bad), 0.0)
        assert not err.value.events  # type: ignore[attr-defined]
        assert pair.r.state is State.ERROR


def test_a_replayed_data_frame_ends_a_tcp_connection() -> None:
    pair, frame = data_frame_pair()
    pair.r.receive_data(frame, 0.0)
    with pytest.raises(RemoteProtocolError, match="replayed"):
        pair.r.receive_data(frame, 0.0)


def test_a_missing_data_frame_ends_a_tcp_connection() -> None:
    pair, _lost = data_frame_pair()
    pair.i.send_packets([b"next"], 0.0)
    with pytest.raises(RemoteProtocolError, match="gap"):
        pair.r.receive_data(pair.i.data_to_send(), 0.0)


def test_oversized_length_to_a_connection_is_rejected_before_allocation() -> None:
    pair = established()
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="exceeds the cap"):
            pair.r.receive_data(b"\xff\xff\xff\xf0", 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_before_the_handshake_a_frame_above_1_kib_is_refused_before_allocation() -> None:
    for role in ("initiator", "responder"):
        pair = Pair()
        conn = pair.i if role == "initiator" else pair.r
        if role == "initiator":
            pair.i.start(0.0)
        tracemalloc.start()
        try:
            with pytest.raises(
                RemoteProtocolError,
                match="1025 exceeds the cap of 1024 bytes before the handshake completes",
            ):
                conn.receive_data(struct.pack(">I", 1025) + bytes(1000), 0.0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024, role
        assert conn.state is State.ERROR


def test_big_frames_right_behind_the_confirm_in_the_same_read_get_the_full_cap() -> None:
    pair = Pair(Params(sendbuf=262144))
    pair.i.start(0.0)
    pair.r.receive_data(pair.i.data_to_send(), 0.0)
    pair.i.receive_data(pair.r.data_to_send(), 0.0)
    big = [bytes([k]) * 60000 for k in range(1, 4)]
    pair.i.send_packets(big, 0.0)  # one 180 KB frame, behind the CONFIRM
    events = pair.r.receive_data(pair.i.data_to_send(), 0.0)
    assert [type(e) for e in events] == [LinkUp, Packets]
    assert Pair.packets(events) == big


def test_a_zero_length_packet_in_a_batch_ends_the_connection_even_on_a_lossy_link() -> None:
    for params in (Params(), Params(lossy=True)):
        pair = established(params)
        pair.i._seal_inner(b"\x01\x00" + struct.pack(">I", 3) + b"abc" + bytes(4))
        with pytest.raises(RemoteProtocolError, match="zero-length packet"):
            pair.r.receive_data(pair.i.data_to_send(), 0.0)
        assert pair.r.state is State.ERROR


def test_a_zero_length_packet_is_not_sent() -> None:
    pair = established()
    with pytest.raises(LocalProtocolError, match="zero-length"):
        pair.i.send_packets([b"x", b""], 0.0)
    assert pair.i.data_to_send() == b""


def test_an_empty_batch_is_accepted_and_delivers_nothing() -> None:
    pair = established()
    pair.i._seal_inner(b"\x01\x00")
    assert pair.r.receive_data(pair.i.data_to_send(), 0.0) == []
    assert pair.r.state is State.ESTABLISHED


def test_lossy_mode_drops_and_counts_a_damaged_frame_and_continues() -> None:
    pair = established(Params(lossy=True))
    frames = []
    for k in range(3):
        pair.i.send_packets([b"packet %d" % k], 0.0)
        frames.append(pair.i.data_to_send())
    damaged = bytearray(frames[1])
    damaged[-1] ^= 0xFF
    events = pair.r.receive_data(frames[0] + bytes(damaged) + frames[2], 0.0)
    assert [p for e in events if isinstance(e, Packets) for p in e.packets] == [
        b"packet 0",
        b"packet 2",
    ]
    assert pair.r.stats.drops == {"bad_tag": 1}
    assert pair.r.state is State.ESTABLISHED
    assert pair.r.receive_data(frames[2], 0.0) == []  # counters must still strictly increase
    assert pair.r.stats.drops == {"bad_tag": 1, "replay": 1}


def test_lossy_mode_tolerates_a_lost_frame() -> None:
    pair = established(Params(lossy=True))
    pair.i.send_packets([b"lost"], 0.0)
    pair.i.data_to_send()
    pair.i.send_packets([b"kept"], 0.0)
    assert pair.r.receive_data(pair.i.data_to_send(), 0.0) == [Packets([b"kept"])]


# --------------------------------------------------------------------------- rekey
def frame_epochs(stream: bytes) -> list[int]:
    """The key epoch of each length-framed DATA message in `stream` (what an observer sees)."""
    out = []
    pos = 0
    while pos < len(stream):
        (n,) = struct.unpack_from(">I", stream, pos)
        assert stream[pos + 4] == 0x03, "not a DATA message"
        out.append(struct.unpack_from(">I", stream, pos + 5)[0])
        pos += 4 + n
    return out


def test_rekey_mid_stream_with_frames_in_flight_loses_no_packet() -> None:
    pair = established(Params(keyttl=5.0, keepalive=100.0))
    i, r = pair.i, pair.r
    got_i: list[bytes] = []
    got_r: list[bytes] = []

    def deliver_to_r() -> list[int]:
        data = i.data_to_send()
        got_r.extend(Pair.packets(r.receive_data(data, 6.0)))
        return frame_epochs(data)

    def deliver_to_i() -> list[int]:
        data = r.data_to_send()
        got_i.extend(Pair.packets(i.receive_data(data, 6.0)))
        return frame_epochs(data)

    i.send_packets([b"A0"], 1.0)
    assert i.tick(6.0) == []  # REKEY_INIT queued, still in epoch 0
    i.send_packets([b"A1", b"A2"], 6.0)  # epoch 0, behind the REKEY_INIT
    r.send_packets([b"B0"], 6.0)  # epoch 0, in flight towards i
    assert deliver_to_r() == [0, 0, 0]  # A0, REKEY_INIT, A1+A2
    assert r.stats.epoch == 0  # r answered, but keeps sending in epoch 0 ...
    assert set(r._recv) == {0, 1}  # ... while already able to read epoch 1
    r.send_packets([b"B1"], 6.0)
    i.send_packets([b"A3"], 6.0)  # still epoch 0: i has not seen the answer
    assert deliver_to_i() == [0, 0, 0]  # B0, REKEY_RESP, B1
    assert i.stats.epoch == 1  # i switched on REKEY_RESP and confirms with an empty frame
    i.send_packets([b"A4"], 6.0)
    r.send_packets([b"B2"], 6.0)  # epoch 0: r has not seen epoch 1 from i yet
    assert deliver_to_r() == [0, 1, 1]  # A3, the empty confirmation, A4
    assert r.stats.epoch == 1
    assert set(r._recv) == {1}  # the old key is gone once the new epoch arrived
    r.send_packets([b"B3"], 6.0)
    assert deliver_to_i() == [0, 1]  # B2 (old key still accepted by i), B3
    assert set(i._recv) == {1}
    assert got_r == [b"A0", b"A1", b"A2", b"A3", b"A4"]
    assert got_i == [b"B0", b"B1", b"B2", b"B3"]
    assert i.stats.rekeys == r.stats.rekeys == 1


def test_rekey_over_tcp_with_both_ends_streaming_loses_and_repeats_nothing() -> None:
    pair = established(Params(keyttl=3.0, keepalive=1.0))
    rnd = random.Random(4)
    to_r = random_packets(rnd, 600, hi=400)
    to_i = random_packets(rnd, 600, hi=400)
    for k in range(0, 600, 4):
        pair.advance(pair.now + 0.05)  # 7.5 s of traffic: two rekeys on the way
        pair.i.send_packets(to_r[k : k + 4], pair.now)
        pair.r.send_packets(to_i[k : k + 4], pair.now)
        if k % 12 == 0:
            pair.pump()
    pair.pump()
    assert pair.packets(pair.events_r) == to_r
    assert pair.packets(pair.events_i) == to_i
    assert pair.i.stats.rekeys == pair.r.stats.rekeys == 2
    assert pair.i.stats.epoch == pair.r.stats.epoch == 2


def test_rekey_after_a_message_count_keeps_a_long_stream_intact() -> None:
    pair = established(Params(rekey_after_messages=50))
    rnd = random.Random(9)
    sent = random_packets(rnd, 2000, hi=200)
    for k in range(0, len(sent), 3):
        pair.i.send_packets(sent[k : k + 3], pair.now)
        pair.r.send_packets(sent[k : k + 3], pair.now)
        if k % 30 == 0:
            pair.pump()
    pair.pump()
    assert pair.packets(pair.events_r) == sent
    assert pair.packets(pair.events_i) == sent
    assert pair.i.stats.rekeys >= 10
    assert sum(isinstance(e, Rekeyed) for e in pair.events_r) == pair.r.stats.rekeys


def test_keys_are_renewed_every_keyttl_on_the_fake_clock() -> None:
    pair = established(Params(keyttl=30.0, keepalive=10.0))
    pair.advance(95.0)
    assert pair.i.stats.epoch == pair.r.stats.epoch == 3
    pair.i.send_packets([b"still fine"], pair.now)
    pair.pump()
    assert pair.packets(pair.events_r) == [b"still fine"]


def test_responder_gives_up_on_keys_the_initiator_never_renews() -> None:
    p = Params(keyttl=30.0, keepalive=10.0, handshake_timeout=10.0)
    pair = established(p)
    dead_at = None
    for t in range(1, 200):
        events = pair.r.tick(float(t))  # the initiator's timers never run: no rekey from it
        pair.i.receive_data(pair.r.data_to_send(), float(t))
        pair.r.receive_data(pair.i.data_to_send(), float(t))
        if any(isinstance(e, PeerDead) for e in events):
            dead_at = t
            assert "renew" in events[-1].reason
            break
    assert dead_at == 2 * 30 + 10 + 10


# --------------------------------------------------------------------------- keepalive
def test_keepalive_is_answered_and_reports_the_round_trip_time() -> None:
    pair = established(Params(keepalive=10.0))
    pair.advance(10.0)
    rtts = [e for e in pair.events_i if isinstance(e, KeepaliveRtt)]
    assert rtts == [KeepaliveRtt(0.0)]
    assert pair.i.stats.last_rtt == 0.0
    assert pair.i.stats.missed_keepalives == 0


def test_silently_cut_link_is_declared_dead_after_keepalive_times_noanswer() -> None:
    keepalive, noanswer = 10.0, 3
    pair = established(Params(keepalive=keepalive, noanswer=noanswer, keyttl=1000.0))
    pair.advance(35.0)
    assert pair.i.state is State.ESTABLISHED
    cut_at = pair.now
    pair.cut = True
    dead: dict[str, float] = {}
    t = cut_at
    while len(dead) < 2 and t < cut_at + 100:
        t += 0.5
        pair.now = t
        for name, conn in (("i", pair.i), ("r", pair.r)):
            if name not in dead and any(isinstance(e, PeerDead) for e in conn.tick(t)):
                dead[name] = t
        pair.pump()
    for name, at in dead.items():
        assert keepalive * noanswer < at - cut_at <= keepalive * (noanswer + 1), (name, at)
    assert set(dead) == {"i", "r"}
    assert pair.i.state is State.CLOSED


def test_any_authenticated_message_resets_the_missed_keepalives() -> None:
    pair = established(Params(keepalive=10.0, noanswer=2))
    pair.advance(10.0)
    pair.cut = True
    pair.advance(30.0)  # the PING of t=20 went unanswered
    assert pair.i.stats.missed_keepalives == 1
    pair.cut = False
    pair.r.send_packets([b"alive"], pair.now)
    pair.pump()
    assert pair.i.stats.missed_keepalives == 0


def test_an_answer_later_than_maxdelay_is_peer_dead() -> None:
    pair = established(Params(keepalive=10.0, maxdelay=2.0))
    pair.advance(10.0)  # answered at once: fine
    assert pair.i.state is State.ESTABLISHED
    pair.cut = True
    pair.advance(20.0)  # a PING goes out and is lost
    assert pair.i.next_deadline() == 22.0
    events = pair.i.tick(22.5)
    assert isinstance(events[0], PeerDead)
    assert "maxdelay" in events[0].reason


# --------------------------------------------------------------------------- API misuse, close
def test_sending_before_the_link_is_up_is_a_local_protocol_error() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError, match="before the link is up"):
        pair.i.send_packets([b"x"], 0.0)
    pair.i.start(0.0)
    with pytest.raises(LocalProtocolError, match="already called"):
        pair.i.start(0.0)
    with pytest.raises(LocalProtocolError, match="only the initiator"):
        pair.r.start(0.0)


def test_initiator_without_a_wall_clock_cannot_start() -> None:
    i = Connection("initiator", PSK, Params(), seeded_rng(1), 0.0)
    with pytest.raises(LocalProtocolError, match="wall-clock"):
        i.start(0.0)
    i.start(0.0, wall=WALL)


def test_error_state_is_terminal() -> None:
    pair = established()
    with pytest.raises(RemoteProtocolError):
        pair.r.receive_data(b"\0\0\0\x05garbage", 0.0)
    with pytest.raises(LocalProtocolError, match="ERROR"):
        pair.r.receive_data(b"", 0.0)
    with pytest.raises(LocalProtocolError, match="ERROR"):
        pair.r.send_packets([b"x"], 0.0)
    assert pair.r.tick(100.0) == []
    assert pair.r.next_deadline() is None


def test_close_says_goodbye_and_the_peer_sees_closed() -> None:
    pair = established()
    pair.i.close("operator shutdown\n")
    assert pair.i.state is State.CLOSED
    pair.pump()
    assert pair.events_r[-1] == Closed("operator shutdown?")
    assert pair.r.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.i.send_packets([b"x"], 0.0)


def test_params_reject_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"Params\.cipher"):
        Params(cipher="blowfish")
    with pytest.raises(ValueError, match=r"Params\.noanswer"):
        Params(noanswer=0)
    with pytest.raises(ValueError, match=r"Params\.compress_level"):
        Params(compress_level=10)
    with pytest.raises(ValueError, match="psk must be 32 bytes"):
        Connection("initiator", b"short", Params(), seeded_rng(1), 0.0)


# --------------------------------------------------------------------------- lossy (serial) link
def slip_pair(params: Params) -> tuple[Connection, Connection]:
    from vpnd_runtime.proto.slip import SlipFramer

    i = Connection(
        "initiator", PSK, params, seeded_rng(1), 0.0, framer=SlipFramer(xfilter=True), wall=WALL
    )
    r = Connection(
        "responder", PSK, params, seeded_rng(2), 0.0, framer=SlipFramer(xfilter=True), wall=WALL
    )
    return i, r


def test_over_slip_a_noisy_line_loses_only_the_damaged_frames() -> None:
    i, r = slip_pair(Params(lossy=True))
    i.start(0.0)
    r.receive_data(i.data_to_send(), 0.0)
    i.receive_data(r.data_to_send(), 0.0)
    assert [type(e) for e in r.receive_data(i.data_to_send(), 0.0)] == [LinkUp]
    rnd = random.Random(8)
    sent = random_packets(rnd, 50, hi=300)
    wire = bytearray()
    for k, pkt in enumerate(sent):
        i.send_packets([pkt], 0.0)
        frame = bytearray(i.data_to_send())
        if k % 10 == 3:
            frame[len(frame) // 2] ^= 0x40  # line noise inside the frame
        wire += frame
        if k % 10 == 7:
            wire += b"\x13\x11junk\xc0"  # noise between frames
    got = Pair.packets(r.receive_data(bytes(wire), 0.0))
    assert got == [p for k, p in enumerate(sent) if k % 10 != 3]
    assert sum(r.stats.drops.values()) >= 5
    assert r.state is State.ESTABLISHED


def test_lossy_link_that_loses_the_confirm_comes_up_on_the_next_authenticated_frame() -> None:
    pair = Pair(Params(lossy=True))
    pair.i.start(0.0)
    pair.r.receive_data(pair.i.data_to_send(), 0.0)
    pair.i.receive_data(pair.r.data_to_send(), 0.0)
    pair.i.data_to_send()  # the CONFIRM is lost on the line
    pair.i.send_packets([b"first"], 0.0)
    events = pair.r.receive_data(pair.i.data_to_send(), 0.0)
    assert [type(e) for e in events] == [LinkUp, Packets]


def test_lossy_rekey_survives_a_lost_rekey_init() -> None:
    pair = established(Params(lossy=True, keyttl=5.0, keepalive=2.0))
    pair.advance(4.5)
    pair.now = 5.0
    pair.events_i += pair.i.tick(5.0)
    pair.i.data_to_send()  # REKEY_INIT (and PING) lost
    assert pair.i.next_deadline() == 6.0  # it will be repeated after one keepalive
    pair.advance(8.0)
    assert pair.i.stats.epoch == pair.r.stats.epoch == 1
    pair.i.send_packets([b"after"], pair.now)
    pair.r.send_packets([b"back"], pair.now)
    pair.pump()
    assert Pair.packets(pair.events_r)[-1:] == [b"after"]
    assert Pair.packets(pair.events_i)[-1:] == [b"back"]


def test_lossy_rekey_survives_a_lost_rekey_resp_without_losing_a_responder_packet() -> None:
    pair = established(Params(lossy=True, keyttl=5.0, keepalive=2.0))
    pair.advance(4.5)
    pair.now = 5.0
    pair.events_i += pair.i.tick(5.0)  # REKEY_INIT
    pair.events_r += pair.r.receive_data(pair.i.data_to_send(), 5.0)
    pair.r.data_to_send()  # REKEY_RESP lost on the line
    assert pair.r.stats.epoch == 0  # the responder keeps sending in epoch 0
    to_i = [b"r->i %d" % k for k in range(40)]
    to_r = [b"i->r %d" % k for k in range(40)]
    for k in range(40):  # 10 s of traffic both ways; REKEY_INIT is repeated at 7.0
        pair.advance(5.0 + 0.25 * (k + 1))
        pair.r.send_packets([to_i[k]], pair.now)
        pair.i.send_packets([to_r[k]], pair.now)
        pair.pump()
    assert Pair.packets(pair.events_i) == to_i  # not one dropped as unknown_epoch
    assert Pair.packets(pair.events_r) == to_r
    assert pair.i.stats.drops == pair.r.stats.drops == {}
    # the delayed rekey completed at 7.0 s, the next one (keyttl later) on an intact line
    assert pair.i.stats.rekeys == pair.r.stats.rekeys == 2
    assert pair.i.stats.epoch == pair.r.stats.epoch == 2
    assert set(pair.i._recv) == set(pair.r._recv) == {2}
    assert not any(isinstance(e, PeerDead) for e in pair.events_i + pair.events_r)


def test_idle_lossy_link_that_loses_the_new_epochs_first_frame_switches_on_the_next_ping() -> None:
    pair = established(Params(lossy=True, keyttl=5.0, keepalive=2.0))
    pair.advance(4.5)
    pair.now = 5.0
    pair.events_i += pair.i.tick(5.0)  # REKEY_INIT
    pair.events_r += pair.r.receive_data(pair.i.data_to_send(), 5.0)
    pair.events_i += pair.i.receive_data(pair.r.data_to_send(), 5.0)  # REKEY_RESP
    assert pair.i.stats.epoch == 1
    pair.i.data_to_send()  # the empty frame of epoch 1 is lost
    assert pair.r.stats.epoch == 0
    pair.advance(6.0)  # the initiator's PING of epoch 1 completes the switch
    assert pair.r.stats.epoch == 1
    pair.r.send_packets([b"back"], pair.now)
    pair.pump()
    assert Pair.packets(pair.events_i) == [b"back"]
    assert pair.i.stats.drops == pair.r.stats.drops == {}


def test_a_different_rekey_init_while_a_rekey_is_pending_is_refused() -> None:
    pair = established(Params(keyttl=5.0, keepalive=100.0))
    pair.i.tick(6.0)
    pair.r.receive_data(pair.i.data_to_send(), 6.0)
    pair.i._seal_inner(b"\x04" + struct.pack(">I32s", 1, bytes(range(1, 33))))
    with pytest.raises(RemoteProtocolError, match="still being confirmed"):
        pair.r.receive_data(pair.i.data_to_send(), 6.0)


def test_a_busy_responder_makes_the_initiator_rekey_by_message_count() -> None:
    pair = established(Params(rekey_after_messages=20))
    for k in range(100):
        pair.r.send_packets([b"download %d" % k], pair.now)
        pair.pump()
    assert pair.r.stats.rekeys >= 4
    assert Pair.packets(pair.events_i) == [b"download %d" % k for k in range(100)]
