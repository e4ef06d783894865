"""The WAN emulator's pure parts: the spec grammar, one direction's pipe, GSO re-cutting."""

from __future__ import annotations

import random
import struct

import pytest

from vpnctl.wan import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    VNET_HDR,
    VNET_LEN,
    Impairment,
    Pipe,
    WanSpec,
    WanSpecError,
    format_spec,
    main,
    netem_args,
    parse_spec,
    segment_count,
    split_gso,
)

# ---------------------------------------------------------------- the spec


def test_a_plain_field_applies_to_both_directions():
    spec = parse_spec("delay=20ms,jitter=5ms,loss=1%,rate=100mbit,reorder=1%,outage=2s@5s")
    assert spec.up == spec.down
    assert spec.up.delay == pytest.approx(0.020)
    assert spec.up.jitter == pytest.approx(0.005)
    assert spec.up.loss == pytest.approx(0.01)
    assert spec.up.rate == pytest.approx(100e6)
    assert spec.up.reorder == pytest.approx(0.01)
    assert spec.up.outage == (2.0, 5.0)


def test_a_prefixed_field_overrides_its_direction_whatever_the_order():
    spec = parse_spec("up.delay=30ms,delay=10ms,down.loss=2.5%,seed=9")
    assert spec.up.delay == pytest.approx(0.030)
    assert spec.down.delay == pytest.approx(0.010)
    assert spec.up.loss == 0
    assert spec.down.loss == pytest.approx(0.025)
    assert spec.seed == 9


def test_units_are_read_as_tc_reads_them():
    spec = parse_spec("delay=500us,rate=1.5gbit,limit=64kb")
    assert spec.up.delay == pytest.approx(0.0005)
    assert spec.up.rate == pytest.approx(1.5e9)
    assert spec.up.limit == 65536


def test_an_empty_spec_is_a_plain_wire():
    assert parse_spec("") == WanSpec()


def test_format_spec_round_trips():
    spec = parse_spec("delay=10ms,jitter=1ms,up.loss=0.1%,down.rate=50mbit,outage=2s@5s,seed=4")
    assert parse_spec(format_spec(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("delay=20", "'delay=20': time needs a unit (us, ms, s), got 'none'"),
        ("delay=fast", "'delay=fast': 'fast' is not a time"),
        ("loss=1", "'loss=1': '1' is not a percentage like 1%"),
        ("loss=150%", "'loss=150%': 150% is more than 100%"),
        ("rate=100mbps", "'rate=100mbps': rate needs a unit (bit, kbit, mbit, gbit)"),
        ("rate=0mbit", "'rate=0mbit': a rate must be above 0"),
        ("outage=2s", "'outage=2s': outage is DURATION@START"),
        ("outage=0s@1s", "'outage=0s@1s': an outage must last longer than 0"),
        ("delya=20ms", "'delya=20ms': unknown field 'delya'"),
        ("left.delay=1ms", "'left.delay=1ms': prefix 'left' is not up. or down."),
        ("delay", "'delay': expected field=value"),
        ("delay=1ms,delay=2ms", "'delay=2ms': delay is given twice"),
        ("delay=1ms,,loss=1%", "empty item"),
        ("reorder=1%", "'reorder' (up): needs a delay above 0"),
        ("limit=64kb", "'limit' (up): only means something with rate="),
        ("limit=100b,rate=1mbit", "'limit=100b': a queue limit below 1514 bytes"),
        ("seed=x", "'seed=x': seed must be a whole number"),
        ("backend=tc", "'backend=tc': backend is one of"),
    ],
)
def test_a_bad_spec_names_the_field_and_the_reason(text, message):
    with pytest.raises(WanSpecError) as err:
        parse_spec(text)
    assert message in str(err.value)


def test_the_cli_check_prints_the_meaning_or_the_error(capsys):
    assert main(["check", "up.delay=5ms,down.delay=7ms"]) == 0
    assert capsys.readouterr().out.strip() == "up delay=5ms; down delay=7ms"
    assert main(["check", "loss=2"]) == 2
    assert "'loss=2'" in capsys.readouterr().err


def test_netem_arguments_express_the_same_impairment():
    imp = parse_spec("delay=10ms,jitter=2ms,loss=1%,reorder=5%,rate=100mbit").up
    args = netem_args(imp)
    assert args[args.index("delay") + 1 : args.index("delay") + 3] == ["10000us", "2000us"]
    assert args[args.index("loss") + 1] == "1%"
    assert args[args.index("rate") + 1] == "100000000bit"


# ---------------------------------------------------------------- one direction


def _pipe(spec: str, seed: int = 1) -> Pipe:
    return Pipe(parse_spec(spec).up, random.Random(seed), start=100.0)


def test_delay_holds_each_packet_and_keeps_order_under_jitter():
    pipe = _pipe("delay=20ms,jitter=15ms")
    times = [pipe.admit(100.0 + i * 0.001, 100, 1).deliver_at for i in range(500)]
    assert all(t is not None for t in times)
    assert times == sorted(times)  # jitter never reorders
    assert all(t - (100.0 + i * 0.001) >= 0.005 - 1e-9 for i, t in enumerate(times))


def test_loss_is_drawn_per_segment_of_a_super_packet():
    pipe = _pipe("loss=10%")
    kept = lost_whole = 0
    for i in range(2000):
        verdict = pipe.admit(100.0 + i, 45 * 1500, 45)
        if verdict.deliver_at is None:
            lost_whole += 1
        elif verdict.keep is not None:
            kept += sum(verdict.keep)
        else:
            kept += 45
    rate = pipe.stats.dropped_loss / pipe.stats.segments
    assert 0.09 < rate < 0.11
    assert lost_whole == 0  # 45 segments all lost at 10 %: practically never
    assert kept + pipe.stats.dropped_loss == 2000 * 45


def test_the_rate_limit_serialises_and_tail_drops_past_the_queue():
    pipe = _pipe("rate=8mbit,limit=10000b")  # 1 byte per microsecond
    verdicts = [pipe.admit(100.0, 1000, 1) for _ in range(20)]
    delivered = [v.deliver_at for v in verdicts if v.deliver_at is not None]
    assert len(delivered) == 10  # 10 x 1000 bytes fill the queue
    assert delivered == pytest.approx([100.0 + 0.001 * (i + 1) for i in range(10)])
    assert pipe.stats.dropped_queue == 10


def test_a_reordered_packet_skips_the_delay():
    pipe = _pipe("delay=50ms,reorder=50%", seed=5)
    times = [pipe.admit(100.0 + i * 0.001, 100, 1).deliver_at for i in range(100)]
    assert pipe.stats.reordered > 20
    assert times != sorted(times)


def test_an_outage_drops_everything_in_its_window_only():
    pipe = _pipe("outage=2s@5s")
    assert pipe.admit(104.9, 100, 1).deliver_at is not None
    assert pipe.admit(105.0, 100, 3).deliver_at is None
    assert pipe.admit(106.9, 100, 1).deliver_at is None
    assert pipe.admit(107.0, 100, 1).deliver_at is not None
    assert pipe.stats.dropped_outage == 4


def test_the_impairments_of_a_direction_are_its_own():
    spec = parse_spec("up.loss=100%")
    down = Pipe(spec.down, random.Random(1), 0.0)
    up = Pipe(spec.up, random.Random(1), 0.0)
    assert down.admit(1.0, 100, 1).deliver_at == 1.0
    assert up.admit(1.0, 100, 1).deliver_at is None
    assert Impairment().describe() == "none"


# ---------------------------------------------------------------- GSO super-packets


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _tcp4_gso(payload: bytes, mss: int, flags: int = 0x18) -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    src, dst = bytes([198, 18, 1, 2]), bytes([198, 18, 1, 1])
    l4_len = 20 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4_len, 1000, 0x4000, 64, 6, 0,
                               src, dst))  # fmt: skip
    struct.pack_into("!H", ip, 10, ~_csum(bytes(ip)) & 0xFFFF)
    pseudo = _csum(src + dst + struct.pack("!HH", 6, l4_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 7000, 1, 5 << 4, flags, 1024, pseudo, 0)
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 54, mss, 34, 16)
    return vnet + eth + bytes(ip) + tcp + payload


def _finish(packet: bytes) -> bytes:
    """What the NIC would do: fill in the L4 checksum of a CHECKSUM_PARTIAL frame."""
    _flags, _t, _h, _g, start, offset = VNET_HDR.unpack_from(packet)
    frame = bytearray(packet[VNET_LEN:])
    struct.pack_into("!H", frame, start + offset, ~_csum(bytes(frame[start:])) & 0xFFFF)
    return bytes(frame)


def _tcp_ok(frame: bytes) -> bool:
    l4 = frame[34:]
    return _csum(frame[26:34] + struct.pack("!HH", 6, len(l4)) + l4) == 0xFFFF


def test_segment_count_sees_the_wire_packets_in_a_super_packet():
    packet = _tcp4_gso(bytes(2500), 1000)
    assert segment_count(packet) == (3, len(packet) - VNET_LEN + 2 * 54)
    plain = VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0) + bytes(60)
    assert segment_count(plain) == (1, 60)


def test_split_keeps_runs_of_segments_with_right_headers_and_checksums():
    payload = bytes(range(256)) * 12  # 3072 bytes: segments of 1000, 1000, 1000, 72
    packet = _tcp4_gso(payload, 1000, flags=0x19)  # ACK PSH FIN
    parts = split_gso(packet, [True, False, True, True])
    assert len(parts) == 2
    first, rest = parts
    assert VNET_HDR.unpack_from(first)[1] == GSO_NONE  # one segment: a plain packet
    assert VNET_HDR.unpack_from(rest)[1:4:2] == (GSO_TCPV4, 1000)
    f1, f2 = _finish(first), _finish(rest)
    assert f1[54:] == payload[:1000] and f2[54:] == payload[2000:]
    assert struct.unpack_from("!I", f1, 38)[0] == 7000
    assert struct.unpack_from("!I", f2, 38)[0] == 9000
    assert f1[47] == 0x10 and f2[47] == 0x19  # PSH/FIN only where the last segment is
    assert struct.unpack_from("!H", f2, 16)[0] == 20 + 20 + 1072
    assert struct.unpack_from("!H", f2, 18)[0] == 1002  # IP ID of the third segment
    for frame in (f1, f2):
        assert _csum(frame[14:34]) == 0xFFFF
        assert _tcp_ok(frame)


def test_split_cuts_udp_gso_into_datagrams_of_the_right_length():
    eth = b"\x02" * 12 + b"\x86\xdd"
    payload = bytes(3000)
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 8 + 3000, 17, 64, b"\xfd" + bytes(15),
                      b"\xfd" + bytes(14) + b"\x01")  # fmt: skip
    udp = struct.pack("!HHHH", 5000, 6000, 8 + 3000, 0)
    packet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_UDP_L4, 62, 1200, 54, 6) + eth + ip6 + udp + payload
    parts = split_gso(packet, [False, True, True])
    assert len(parts) == 1
    frame = parts[0][VNET_LEN:]
    assert struct.unpack_from("!H", frame, 18)[0] == 8 + 1800  # IPv6 payload length
    assert struct.unpack_from("!H", frame, 58)[0] == 8 + 1800  # UDP length
    assert len(frame) == 62 + 1800


def test_split_refuses_what_it_does_not_understand():
    with pytest.raises(ValueError, match="cannot split"):
        split_gso(VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0) + bytes(60), [True])
