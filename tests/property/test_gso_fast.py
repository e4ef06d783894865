"""The fast paths of io/gso.py (header templates in `split`, slice comparison in `coalesce`)
give byte for byte what the first implementation gave (tests/property/gso_reference.py), for
any super-packet and for any mix of segments: lost, reordered, duplicated, damaged, other flows."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.property import gso_reference as ref
from vpnd_runtime.io import gso


def super_packet(
    *, version: int, size: int, mss: int, opts: bytes, flags: int, seq: int, ident: int, port: int
) -> bytes:
    """A TSO super-packet as the TUN gives it (fields chosen by the test)."""
    payload = bytes((i * 13 + port) & 0xFF for i in range(size))
    thl = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", port, 5201, seq, 987654321, (thl // 4) << 4, flags, 512,
                      0x1234, 0) + opts  # fmt: skip
    if version == 4:
        src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + thl + size, ident, 0x4000, 64,
                                   6, 0, src, dst))  # fmt: skip
        gso._ip4_csum(ip, 20)
        ihl, kind = 20, gso.GSO_TCPV4
    else:
        src, dst = b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02"
        ip = bytearray(struct.pack("!IHBB16s16s", 0x60000000, thl + size, 6, 64, src, dst))
        ihl, kind = 40, gso.GSO_TCPV6
    vnet = gso.VNET.pack(gso.F_NEEDS_CSUM, kind, ihl + thl, mss, ihl, 16)
    return vnet + bytes(ip) + tcp + payload


packets = st.builds(
    super_packet,
    version=st.sampled_from([4, 6]),
    size=st.integers(1, 9000),
    mss=st.integers(100, 1448),
    opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8))]),
    flags=st.sampled_from([0x10, 0x18, 0x11, 0x19, 0x90, 0x98, 0x12]),
    seq=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 20000, 2**32 - 1)),
    ident=st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFF0, 0xFFFF)),
    port=st.sampled_from([40000, 40001]),
)


@settings(max_examples=300, deadline=None)
@given(packets)
def test_split_equals_the_reference(pkt: bytes) -> None:
    assert gso.split(pkt) == ref.split(pkt)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(packets, min_size=1, max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(["drop", "swap", "dup", "flip", "trunc", "icmp"]),
            st.integers(0, 10**6),
            st.integers(0, 10**6),
        ),
        max_size=6,
    ),
)
def test_coalesce_equals_the_reference_on_any_mix(
    supers: list[bytes], edits: list[tuple[str, int, int]]
) -> None:
    segs = [seg for p in supers for seg in ref.split(p)]
    for op, a, b in edits:
        if not segs:
            break
        i = a % len(segs)
        if op == "drop":
            del segs[i]
        elif op == "swap":
            j = b % len(segs)
            segs[i], segs[j] = segs[j], segs[i]
        elif op == "dup":
            segs.insert(i, segs[i])
        elif op == "flip":  # damage one byte, mostly in the headers
            pos = b % min(len(segs[i]), 90)
            seg = bytearray(segs[i])
            seg[pos] ^= 1 << (b % 8)
            segs[i] = bytes(seg)
        elif op == "trunc":
            segs[i] = segs[i][: max(1, len(segs[i]) - 1 - b % 50)]
        else:
            segs.insert(i, gso.VNET.pack(0, 0, 0, 0, 0, 0) + bytes([0x45]) + bytes(19) + b"ping")
    assert gso.coalesce(list(segs)) == ref.coalesce(list(segs))
