"""TCP segmentation and coalescing of virtio-net packets, for carriers that move datagrams (UDP).

Why: with offload the TUN hands vpnd TCP *super-packets* of up to 64 KiB (one virtio-net header
plus one IP packet whose payload the kernel did not segment). Over TCP the carrier takes them
whole; a datagram carrier must not (a datagram larger than the path MTU is fragmented, and losing
one fragment loses all 45 segments). So, as wireguard-go does:

* `split(pkt)` cuts a super-packet into MSS-sized TCP segments, each a complete IP packet with its
  own virtio header (`NEEDS_CSUM`: the TCP checksum field holds the pseudo-header sum and the far
  kernel completes it), sequence numbers advanced, FIN/PSH only on the last, CWR only on the first,
  IPv4 length, id and header checksum rewritten. Each segment then fits one datagram.
* `coalesce(pkts)` does the reverse on the receiving side (the kernel's GRO rules, restricted):
  consecutive in-order segments of one TCP flow with equal headers (ack, window, options, flags
  but PSH) and equal size (the last may be shorter) become one super-packet with a virtio GSO
  header, so one TUN write hands the kernel 64 KiB instead of 45 packets.

Anything else (non-TCP, IP options, IPv6 extension headers, SYN/RST/URG) passes unchanged. Pure:
no I/O; `tests/property/test_gso.py` checks that coalesce(split(p)) carries the same bytes.
"""

from __future__ import annotations

import struct

#: struct virtio_net_hdr (legacy, little-endian on the hosts vpnd runs on).
VNET = struct.Struct("<BBHHHH")
VNET_LEN = VNET.size  # 10
F_NEEDS_CSUM = 0x01
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80
_PROTO_TCP = 6
_FIN, _SYN, _RST, _PSH, _URG, _CWR = 0x01, 0x02, 0x04, 0x08, 0x20, 0x80
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
#: Largest IPv4 total length (and IPv6 payload length) a coalesced packet may reach.
_IP_MAX = 65535


def _fold(s: int) -> int:
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum16(data: bytes | bytearray | memoryview) -> int:
    n = len(data)
    return sum(struct.unpack(f"!{n // 2}H", data[: n - (n & 1)])) + (data[-1] << 8 if n & 1 else 0)


def _ip4_csum(hdr: bytearray, ihl: int) -> None:
    hdr[10:12] = b"\0\0"
    hdr[10:12] = _U16.pack(~_fold(_sum16(memoryview(hdr)[:ihl])) & 0xFFFF)


def _parse(ip: memoryview) -> tuple[int, int, int] | None:
    """(version, IP header length, IP+TCP header length) of a plain TCP packet, else None."""
    if len(ip) < 20:
        return None
    version = ip[0] >> 4
    if version == 4:
        ihl = (ip[0] & 0x0F) * 4
        if ihl < 20 or ip[9] != _PROTO_TCP or len(ip) < ihl + 20:
            return None
        if _U16.unpack_from(ip, 6)[0] & 0x3FFF:  # a fragment
            return None
    elif version == 6:
        ihl = 40
        if len(ip) < 60 or ip[6] != _PROTO_TCP:
            return None
    else:
        return None
    thl = (ip[ihl + 12] >> 4) * 4
    if thl < 20 or len(ip) < ihl + thl:
        return None
    return version, ihl, ihl + thl


def _pseudo(ip: memoryview, version: int, ihl: int) -> int:
    """The pseudo-header sum without the length: addresses and protocol."""
    if version == 4:
        return _sum16(ip[12:20]) + _PROTO_TCP
    return _sum16(ip[8:40]) + _PROTO_TCP


def split(pkt: bytes) -> list[bytes]:
    """Segment one virtio-net TCP super-packet into MSS-sized packets (others: `[pkt]`)."""
    _, gso_type, _, mss, _, _ = VNET.unpack_from(pkt)
    kind = gso_type & ~GSO_ECN
    if kind not in (GSO_TCPV4, GSO_TCPV6) or mss == 0:
        return [pkt]
    ip = memoryview(pkt)[VNET_LEN:]
    parsed = _parse(ip)
    if parsed is None:
        return [pkt]
    version, ihl, hlen = parsed
    total = len(ip) - hlen
    count = max(1, (total + mss - 1) // mss)
    base = bytearray(ip[:hlen])
    (seq0,) = _U32.unpack_from(base, ihl + 4)
    tcp_flags = base[ihl + 13]
    pseudo = _pseudo(ip, version, ihl)
    thl = hlen - ihl
    ip_id = _U16.unpack_from(base, 4)[0] if version == 4 else 0
    hdr = VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, ihl, 16)
    out = []
    pack_into = struct.pack_into
    for k in range(count):
        off = k * mss
        chunk = ip[hlen + off : hlen + off + mss]
        clen = len(chunk)
        h = bytearray(base)
        if version == 4:
            pack_into("!HH", h, 2, hlen + clen, (ip_id + k) & 0xFFFF)
            _ip4_csum(h, ihl)
        else:
            pack_into("!H", h, 4, thl + clen)
        f = tcp_flags
        if k < count - 1:
            f &= ~(_FIN | _PSH)
        if k:
            f &= ~_CWR
        h[ihl + 13] = f
        pack_into("!I", h, ihl + 4, (seq0 + off) & 0xFFFFFFFF)
        pack_into("!H", h, ihl + 16, _fold(pseudo + thl + clen))
        out.append(hdr + h + chunk)
    return out


def _same_flow(a: memoryview, b: memoryview, version: int, ihl: int, hlen: int) -> bool:
    """Headers equal but for lengths, ids, checksums, sequence and PSH/FIN."""
    if version == 4:
        if a[0:2] != b[0:2] or a[6:10] != b[6:10] or a[12:ihl] != b[12:ihl]:
            return False
    elif a[0:4] != b[0:4] or a[6:40] != b[6:40]:
        return False
    t = ihl
    return (
        a[t : t + 4] == b[t : t + 4]  # ports
        and a[t + 8 : t + 13] == b[t + 8 : t + 13]  # ack, data offset
        and a[t + 14 : t + 16] == b[t + 14 : t + 16]  # window
        and a[t + 20 : hlen] == b[t + 20 : hlen]  # options
    )


class _Group:
    __slots__ = ("first", "hlen", "ihl", "last_len", "mss", "next_seq", "parts", "psh", "size")

    def __init__(self, pkt: bytes, ihl: int, hlen: int, plen: int, seq: int) -> None:
        self.first = pkt
        self.ihl = ihl
        self.hlen = hlen
        self.mss = plen
        self.last_len = plen
        self.next_seq = (seq + plen) & 0xFFFFFFFF
        self.parts = [memoryview(pkt)[VNET_LEN + hlen :]]
        self.size = plen
        self.psh = False


def _emit(g: _Group, out: list[bytes]) -> None:
    if len(g.parts) == 1:
        out.append(g.first)
        return
    ip = memoryview(g.first)[VNET_LEN:]
    ihl, hlen = g.ihl, g.hlen
    version = ip[0] >> 4
    h = bytearray(ip[:hlen])
    thl = hlen - ihl
    if version == 4:
        struct.pack_into("!H", h, 2, hlen + g.size)
        _ip4_csum(h, ihl)
        kind = GSO_TCPV4
    else:
        struct.pack_into("!H", h, 4, thl + g.size)
        kind = GSO_TCPV6
    if g.psh:
        h[ihl + 13] |= _PSH
    struct.pack_into("!H", h, ihl + 16, _fold(_pseudo(ip, version, ihl) + thl + g.size))
    vnet = VNET.pack(F_NEEDS_CSUM, kind, hlen, g.mss, ihl, 16)
    out.append(b"".join([vnet, h, *g.parts]))


def coalesce(pkts: list[bytes]) -> list[bytes]:
    """Merge runs of consecutive segments of one TCP flow into virtio GSO super-packets."""
    if len(pkts) < 2:
        return pkts
    out: list[bytes] = []
    g: _Group | None = None
    for pkt in pkts:
        ip = memoryview(pkt)[VNET_LEN:]
        parsed = None
        if len(pkt) > VNET_LEN and pkt[1] == GSO_NONE:
            parsed = _parse(ip)
        if parsed is None:
            if g is not None:
                _emit(g, out)
                g = None
            out.append(pkt)
            continue
        version, ihl, hlen = parsed
        plen = len(ip) - hlen
        tflags = ip[ihl + 13]
        (seq,) = _U32.unpack_from(ip, ihl + 4)
        mergeable = plen > 0 and not tflags & (_SYN | _RST | _URG | _FIN | _CWR)
        if (
            g is not None
            and mergeable
            and not g.psh
            and g.hlen == hlen
            and g.ihl == ihl
            and seq == g.next_seq
            and g.last_len == g.mss
            and plen <= g.mss
            and hlen + g.size + plen <= _IP_MAX
            and _same_flow(memoryview(g.first)[VNET_LEN:], ip, version, ihl, hlen)
        ):
            g.parts.append(ip[hlen:])
            g.size += plen
            g.last_len = plen
            g.next_seq = (seq + plen) & 0xFFFFFFFF
            g.psh = bool(tflags & _PSH)
            continue
        if g is not None:
            _emit(g, out)
            g = None
        if mergeable and not tflags & _PSH:
            g = _Group(pkt, ihl, hlen, plen, seq)
        else:
            out.append(pkt)
    if g is not None:
        _emit(g, out)
    return out
