"""The lone-packet paths (`Connection.send_one` / `receive_packets`, issue 15) are the general
paths, shorter: for any mix of packets, sizes, timers, rekeys, split and damaged frames, a pair
of connections driven through them emits byte-identical frames, delivers the same packets in the
same order, and keeps the same counters, stats, deadlines and state as a twin pair driven only
through `send_packets` / `receive_data`."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_proto_pair import Pair
from vpnd_runtime.proto import Params, RemoteProtocolError
from vpnd_runtime.proto.session import MAX_PACKET

# Rekeys by count and by age happen within a few steps; keepalives too.
PARAMS = Params(keyttl=3.0, keepalive=1.0, noanswer=1000, rekey_after_messages=7)

step = st.one_of(
    st.tuples(
        st.just("send"),
        st.booleans(),  # initiator -> responder, or back
        st.one_of(st.integers(1, 300), st.sampled_from([0, 1500, MAX_PACKET, MAX_PACKET + 1])),
        st.sampled_from(["whole", "whole", "whole", "split", "two", "damaged"]),
    ),
    st.tuples(st.just("wait"), st.floats(0.0, 2.0)),
)


def _snapshot(pair: Pair) -> tuple:
    out = []
    for c in (pair.i, pair.r):
        send = c._send
        out.append(
            (
                c.state,
                dataclasses.astuple(c.stats),
                c.next_deadline(),
                (send.epoch, send.counter) if send else None,
                {e: r.next_counter for e, r in c._recv.items()},
                c._recv_epoch,
                c.accepted,
            )
        )
    return tuple(out)


def _send(sender, packet: bytes, now: float, fast: bool) -> bytes:
    frame = sender.send_one(packet, now) if fast else None
    if frame is None:
        sender.send_packets([packet], now)
        frame = sender.data_to_send()
    return frame


def _deliver(receiver, data: bytes, now: float, fast: bool) -> list[bytes]:
    if fast:
        before = dataclasses.astuple(receiver.stats)
        packets = receiver.receive_packets(data, now)
        if packets is not None:
            return packets
        assert dataclasses.astuple(receiver.stats) == before  # declined: nothing changed
    return Pair.packets(receiver.receive_data(data, now))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40), st.sampled_from(["chacha20-poly1305", "aes-256-gcm"]))
def test_lone_paths_match_the_general_paths(steps: list, cipher: str) -> None:
    params = dataclasses.replace(PARAMS, cipher=cipher)
    fast, slow = Pair(params, seed=5), Pair(params, seed=5)
    for pair in (fast, slow):
        pair.handshake()
    assert _snapshot(fast) == _snapshot(slow)
    for s in steps:
        if s[0] == "wait":
            for pair in (fast, slow):
                pair.advance(pair.now + s[1])
        else:
            _, forward, size, how = s
            packet = bytes([size % 251]) * size
            wires: list = []
            for pair, use_fast in ((fast, True), (slow, False)):
                sender = pair.i if forward else pair.r
                try:
                    wire = b"".join(
                        _send(sender, packet, pair.now, use_fast)
                        for _ in range(2 if how == "two" else 1)
                    )
                except Exception as exc:  # too big or empty: both refuse alike
                    wires.append(type(exc))
                    continue
                wires.append(wire)
            if isinstance(wires[0], type) or isinstance(wires[1], type):
                assert wires[0] is wires[1]
                continue
            assert wires[0] == wires[1]
            delivered = []
            for pair, use_fast, frame in ((fast, True, wires[0]), (slow, False, wires[1])):
                receiver = pair.r if forward else pair.i
                if how == "damaged":
                    bad = frame[:-1] + bytes([frame[-1] ^ 1])
                    with pytest.raises(RemoteProtocolError):
                        _deliver(receiver, bad, pair.now, use_fast)
                    delivered.append("error")
                    continue
                if how == "split":
                    got = _deliver(receiver, frame[:7], pair.now, use_fast)
                    got += _deliver(receiver, frame[7:], pair.now, use_fast)
                else:
                    got = _deliver(receiver, frame, pair.now, use_fast)
                delivered.append(got)
                pair.pump()  # answers (PONG, rekey) flow the general way on both
            assert delivered[0] == delivered[1]
            if how == "damaged":
                return
        assert _snapshot(fast) == _snapshot(slow)
        assert Pair.packets(fast.events_i) == Pair.packets(slow.events_i)
        assert Pair.packets(fast.events_r) == Pair.packets(slow.events_r)


def test_send_one_declines_what_it_does_not_handle() -> None:
    """Compression, a lossy line, queued output: None and nothing changed."""
    for params in (Params(compress=True), Params(lossy=True)):
        pair = Pair(params)
        pair.handshake()
        before = _snapshot(pair)
        assert pair.i.send_one(b"x" * 84, pair.now) is None
        assert pair.r.receive_packets(b"\x00" * 40, pair.now) is None
        assert _snapshot(pair) == before
    pair = Pair()
    pair.handshake()
    pair.i.send_packets([b"a"], pair.now)  # queued, not drained: order demands the general path
    assert pair.i.send_one(b"b", pair.now) is None
