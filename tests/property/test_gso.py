"""Property tests of io/gso.py: segmenting a TSO super-packet and coalescing the segments back
keeps every payload byte in order, and every packet's checksums complete to valid ones."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vpnd_runtime.io import gso


def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum16(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def super_packet(version: int, payload: bytes, mss: int, opts: bytes, flags: int) -> bytes:
    """A TSO super-packet as the TUN gives it (pseudo-header partial checksum, like Linux)."""
    thl = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 123456789, 987654321, (thl // 4) << 4, flags,
                      512, 0, 0) + opts  # fmt: skip
    if version == 4:
        src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + thl + len(payload), 7, 0x4000, 64, 6, 0,
                         src, dst)  # fmt: skip
        ihl, kind = 20, gso.GSO_TCPV4
    else:
        src, dst = b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02"
        ip = struct.pack("!IHBB16s16s", 0x60000000, thl + len(payload), 6, 64, src, dst)
        ihl, kind = 40, gso.GSO_TCPV6
    vnet = gso.VNET.pack(gso.F_NEEDS_CSUM, kind, ihl + thl, mss, ihl, 16)
    return vnet + ip + tcp + payload


def check_packet(pkt: bytes) -> tuple[int, bytes, int]:
    """Complete the checksum as the kernel would and verify it; (seq, payload, flags)."""
    flags, _kind, _, _mss, start, off = gso.VNET.unpack_from(pkt)
    ip = pkt[gso.VNET_LEN :]
    version = ip[0] >> 4
    ihl = 20 if version == 4 else 40
    assert flags & gso.F_NEEDS_CSUM and start == ihl and off == 16
    if version == 4:
        assert _fold(_sum16(ip[:20])) == 0xFFFF, "IPv4 header checksum"
        assert struct.unpack_from("!H", ip, 2)[0] == len(ip)
        pseudo = _sum16(ip[12:20]) + 6
    else:
        assert struct.unpack_from("!H", ip, 4)[0] == len(ip) - 40
        pseudo = _sum16(ip[8:40]) + 6
    tcp = bytearray(ip[ihl:])
    partial = struct.unpack_from("!H", tcp, 16)[0]
    assert partial == _fold(pseudo + len(tcp)), "pseudo-header partial checksum"
    full = ~_fold(_sum16(bytes(tcp))) & 0xFFFF  # the device sums from csum_start, partial included
    struct.pack_into("!H", tcp, 16, full)
    assert _fold(pseudo + len(tcp) + _sum16(bytes(tcp))) == 0xFFFF
    thl = (tcp[12] >> 4) * 4
    return struct.unpack_from("!I", tcp, 4)[0], bytes(tcp[thl:]), tcp[13]


@settings(max_examples=150, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    size=st.integers(1, 20000),
    mss=st.integers(200, 1448),
    opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8))]),
    psh=st.booleans(),
)
def test_split_then_coalesce_keeps_the_stream(
    version: int, size: int, mss: int, opts: bytes, psh: bool
) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(size))
    pkt = super_packet(version, payload, mss, opts, 0x10 | (0x08 if psh else 0))
    segs = gso.split(pkt)
    assert len(segs) == -(-size // mss)
    seq = 123456789
    for i, seg in enumerate(segs):
        s, data, flags = check_packet(seg)
        assert s == seq and len(data) == min(mss, size - i * mss)
        assert bool(flags & 0x08) == (psh and i == len(segs) - 1)
        seq += len(data)
    merged = gso.coalesce(segs)
    got = b""
    for m in merged:
        flags, kind, _hdr_len, gso_size, _, _ = gso.VNET.unpack_from(m)
        _, data, _tflags = check_packet(m)
        if len(segs) > 1:
            assert kind in (gso.GSO_TCPV4, gso.GSO_TCPV6) and gso_size == mss
        got += data
    assert got == payload
    assert len(merged) == 1


def test_non_tcp_and_gaps_pass_unchanged() -> None:
    icmp = gso.VNET.pack(0, 0, 0, 0, 0, 0) + bytes([0x45]) + bytes(19) + b"ping"
    assert gso.split(icmp) == [icmp]
    segs = gso.split(super_packet(4, bytes(5000), 1000, b"", 0x10))
    # a lost segment in the middle: two runs, not one packet that skips sequence space
    out = gso.coalesce([segs[0], segs[1], segs[3], segs[4], icmp])
    assert len(out) == 3 and out[2] == icmp
    assert check_packet(out[0])[0] == 123456789
    assert check_packet(out[1])[0] == 123456789 + 3000
