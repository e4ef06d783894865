"""Property tests of the WAN emulator's GSO re-cutting and its pipe.

Whatever segments of a TCP super-packet the loss draw keeps, the re-cut packets carry exactly
those segments' bytes at their own sequence numbers, with valid IP and TCP checksums; and a pipe
never delivers before the delay nor out of order (reorder off), whatever the arrivals.
"""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_wan_spec import _csum, _finish, _tcp4_gso, _tcp_ok
from vpnctl.wan import GSO_NONE, GSO_TCPV4, VNET_HDR, Pipe, parse_spec, segment_count, split_gso


@settings(max_examples=150, deadline=None)
@given(
    mss=st.integers(min_value=100, max_value=1448),
    payload_len=st.integers(min_value=2, max_value=20000),
    data=st.data(),
)
def test_re_cut_packets_carry_exactly_the_kept_segments(mss, payload_len, data):
    payload = bytes(random.Random(payload_len).randbytes(payload_len))
    packet = _tcp4_gso(payload, mss)
    nseg, _wire = segment_count(packet)
    assert nseg == -(-payload_len // mss)
    keep = data.draw(st.lists(st.booleans(), min_size=nseg, max_size=nseg))
    parts = split_gso(packet, keep)
    carried = {}
    for part in parts:
        frame = _finish(part)
        assert _csum(frame[14:34]) == 0xFFFF
        assert _tcp_ok(frame)
        assert struct.unpack_from("!H", frame, 16)[0] == len(frame) - 14
        seq = struct.unpack_from("!I", frame, 38)[0]
        offset = seq - 7000
        assert offset % mss == 0
        body = frame[54:]
        _flags, gso_type, _hl, gso_size, _cs, _co = VNET_HDR.unpack_from(part)
        if len(body) <= mss:  # one segment: a plain packet
            assert (gso_type, gso_size) == (GSO_NONE, 0)
        else:
            assert (gso_type, gso_size) == (GSO_TCPV4, mss)
        for i in range(0, len(body), mss):
            carried[(offset + i) // mss] = body[i : i + mss]
    kept = {i: payload[i * mss : (i + 1) * mss] for i, k in enumerate(keep) if k}
    assert carried == kept


@settings(max_examples=100, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=0.01), min_size=1, max_size=200),
    jitter_ms=st.integers(min_value=0, max_value=30),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_a_pipe_never_delivers_early_or_out_of_order(gaps, jitter_ms, seed):
    pipe = Pipe(
        parse_spec(f"delay=30ms,jitter={jitter_ms}ms,rate=100mbit").up, random.Random(seed), 0.0
    )
    now, last = 0.0, 0.0
    for gap in gaps:
        now += gap
        verdict = pipe.admit(now, 1500, 1)
        if verdict.deliver_at is None:
            continue
        assert verdict.deliver_at >= now + max(0.0, 0.030 - jitter_ms / 1000) - 1e-9
        assert verdict.deliver_at >= last
        last = verdict.deliver_at
