"""Property tests of the protocol core: chunking never matters; garbage raises only the peer error.

A reference transcript (handshake, packets, keepalive, rekey, close) is recorded once with seeded
randomness, so a fresh responder built with the same seed is byte-for-byte the one that recorded it
and the initiator's stream can be replayed into it in any chunking or with any damage.
"""

from __future__ import annotations

import functools
import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_proto_pair import PSK, WALL, Pair, seeded_rng
from vpnd_runtime.proto import (
    Connection,
    Event,
    Params,
    ProtocolError,
    RemoteProtocolError,
    ReplayGuard,
    State,
)

PARAMS = Params(keyttl=30.0, keepalive=10.0, compress=True)
LOSSY = Params(keyttl=30.0, keepalive=10.0, compress=True, lossy=True)
SEED = 11


def fresh_responder(params: Params = PARAMS) -> Connection:
    """A responder identical to the one that recorded the transcript."""
    return Connection(
        "responder",
        PSK,
        params,
        seeded_rng(SEED + 1000),
        0.0,
        replay_guard=ReplayGuard(),
        wall=WALL,
    )


@functools.cache
def transcript() -> tuple[bytes, list[tuple[float, bytes]], list[Event]]:
    """The initiator->responder stream with the time of each piece, and the responder's events."""
    pair = Pair(PARAMS, seed=SEED)
    pieces: list[tuple[float, bytes]] = []
    events: list[Event] = []
    i, r = pair.i, pair.r

    def flush(now: float) -> None:
        while True:
            data = i.data_to_send()
            if data:
                pieces.append((now, data))
                events.extend(r.receive_data(data, now))
            back = r.data_to_send()
            if back:
                i.receive_data(back, now)
            if not data and not back:
                return

    i.start(0.0)
    flush(0.0)
    rnd = random.Random(5)
    for step in range(8):
        now = step * 9.0
        i.tick(now)
        i.send_packets([rnd.randbytes(rnd.randint(1, 300)) for _ in range(3)], now)
        i.send_packets([b"compressible " * 40], now)
        flush(now)
    i.close("done")
    flush(80.0)
    stream = b"".join(data for _, data in pieces)
    return stream, pieces, events


def replay_chunks(
    conn: Connection, chunks: list[bytes], pieces: list[tuple[float, bytes]]
) -> list[Event]:
    """Feed `chunks` (a re-cut of the transcript), each at the time its first byte was recorded."""
    starts = []
    pos = 0
    for now, data in pieces:
        starts.append((pos, now))
        pos += len(data)
    events: list[Event] = []
    pos = 0
    for chunk in chunks:
        now = max(t for p, t in starts if p <= pos)
        events += conn.receive_data(chunk, now)
        conn.data_to_send()
        pos += len(chunk)
    return events


def test_the_reference_transcript_covers_packets_rekeys_and_close() -> None:
    _, _, events = transcript()
    kinds = {type(e).__name__ for e in events}
    assert {"LinkUp", "Packets", "Rekeyed", "Closed"} <= kinds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=40))
def test_any_chunking_of_a_valid_stream_gives_the_same_events(cuts: list[int]) -> None:
    stream, pieces, expected = transcript()
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    got = replay_chunks(fresh_responder(), chunks, pieces)
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=400))
def test_random_bytes_to_a_fresh_responder_only_raise_remote_protocol_error(data: bytes) -> None:
    conn = fresh_responder()
    try:
        conn.receive_data(data, 0.0)
    except RemoteProtocolError:
        assert conn.state is State.ERROR


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=400), framed=st.booleans())
def test_random_bytes_to_an_established_connection_only_raise_remote_protocol_error(
    data: bytes, framed: bool
) -> None:
    pair = Pair(PARAMS, seed=SEED)
    pair.handshake()
    if framed:
        data = len(data).to_bytes(4, "big") + data
    try:
        pair.r.receive_data(data, 0.0)
    except RemoteProtocolError:
        assert pair.r.state is State.ERROR


mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "replace"]),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=255),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(mutation, min_size=1, max_size=4), lossy=st.booleans())
def test_mutated_valid_streams_only_raise_remote_protocol_error(
    mutations: list[tuple[str, int, int]], lossy: bool
) -> None:
    stream, pieces, _ = transcript()
    buf = bytearray(stream)
    for op, where, value in mutations:
        pos = where % (len(buf) + 1)
        if op == "flip" and pos < len(buf):
            buf[pos] ^= value or 1
        elif op == "insert":
            buf[pos:pos] = bytes([value])
        elif op == "delete" and pos < len(buf):
            del buf[pos]
        elif op == "replace" and pos < len(buf):
            buf[pos] = value
    conn = fresh_responder(LOSSY if lossy else PARAMS)
    try:
        events = replay_chunks(conn, [bytes(buf)], pieces)
    except RemoteProtocolError as exc:
        assert conn.state is State.ERROR
        events = exc.events  # type: ignore[attr-defined]
    except ProtocolError as exc:  # pragma: no cover - a LocalProtocolError here is a bug
        raise AssertionError(f"peer bytes raised {type(exc).__name__}: {exc}") from exc
    # Whatever got through is genuine: the delivered packets are a subsequence of the sent ones.
    sent = iter(Pair.packets(expected_events()))
    for packet in Pair.packets(events):
        assert any(packet == s for s in sent)


def expected_events() -> list[Event]:
    return transcript()[2]


@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=1, max_size=200), framed=st.booleans())
def test_random_bytes_to_a_started_initiator_only_raise_remote_protocol_error(
    data: bytes, framed: bool
) -> None:
    conn = Connection("initiator", PSK, PARAMS, seeded_rng(SEED), 0.0, wall=WALL)
    conn.start(0.0)
    if framed:
        data = len(data).to_bytes(4, "big") + data
    try:
        conn.receive_data(data, 0.0)
    except RemoteProtocolError:
        assert conn.state is State.ERROR


def split_frames(stream: bytes) -> list[bytes]:
    """Cut a length-framed stream into its frames (each still with its length prefix)."""
    out = []
    pos = 0
    while pos < len(stream):
        n = int.from_bytes(stream[pos : pos + 4], "big")
        out.append(stream[pos : pos + 4 + n])
        pos += 4 + n
    return out


def tagged(side: str, step: int) -> bytes:
    """A 20-byte packet; its sealed frame (4 + 13 + 2 + 4 + 20 + 16 bytes) has a size no
    PING, PONG, REKEY or empty frame has, so a lost packet frame can be told from the others."""
    return f"{side} packet {step:05d}".encode().ljust(20, b".")


PACKET_FRAME_LEN = 4 + 13 + 2 + 4 + 20 + 16


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), loss=st.floats(0.0, 0.3))
def test_losing_any_frames_around_rekeys_loses_only_their_own_packets(
    seed: int, loss: float
) -> None:
    # Whole frames vanish both ways (a serial line), rekeys every 2 s: no frame that does arrive
    # is ever unreadable (never an unknown epoch), and only the lost frames' packets are missing.
    params = Params(lossy=True, keyttl=2.0, keepalive=0.25, noanswer=10_000)
    pair = Pair(params, seed=3)
    pair.handshake()
    i, r = pair.i, pair.r
    rnd = random.Random(seed)
    sent = {"i": [], "r": []}  # type: dict[str, list[bytes]]
    lost = {"i": 0, "r": 0}
    got_i: list[Event] = []
    got_r: list[Event] = []
    for step in range(1, 81):  # 10 s with loss, then 10 s on an intact line
        now = step * 0.25
        lossy_phase = step <= 40
        got_i.extend(i.tick(now))
        got_r.extend(r.tick(now))
        for side, conn in (("i", i), ("r", r)):
            pkt = tagged(side, step)
            conn.send_packets([pkt], now)
            sent[side].append(pkt)
        for _ in range(50):
            to_r, to_i = i.data_to_send(), r.data_to_send()
            if not to_r and not to_i:
                break
            for side, data, dest, got in (("i", to_r, r, got_r), ("r", to_i, i, got_i)):
                for frame in split_frames(data):
                    if lossy_phase and rnd.random() < loss:
                        lost[side] += len(frame) == PACKET_FRAME_LEN
                    else:
                        got.extend(dest.receive_data(frame, now))
        if not lossy_phase:
            assert i.stats.epoch == r.stats.epoch, step
    assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED
    assert i.stats.drops == r.stats.drops == {}
    assert i.stats.rekeys == r.stats.rekeys >= 5
    for side, got in (("i", got_r), ("r", got_i)):
        received = Pair.packets(got)
        assert len(received) == len(sent[side]) - lost[side]
        it = iter(sent[side])
        assert all(any(p == s for s in it) for p in received)  # in order, none twice
