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
    (seq0,) = _U32.unpack_from(ip, ihl + 4)
    tcp_flags = ip[ihl + 13]
    pseudo = _pseudo(ip, version, ihl)
    thl = hlen - ihl
    vnet = VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, ihl, 16)
    # The header in pieces: what every segment shares, and the fields that change between them.
    t = ihl
    if version == 4:
        (ip_id,) = _U16.unpack_from(ip, 4)
        head = vnet + bytes(ip[0:2])
        mid = bytes(ip[6:10])
        # The IPv4 header sum without total length, id and checksum: add those per segment.
        base = _sum16(ip[0:2]) + _sum16(ip[6:10]) + _sum16(ip[12:ihl])
    else:
        ip_id = base = 0
        head = vnet + bytes(ip[0:4])
        mid = bytes(ip[6:40])
    addrs = bytes(ip[12 : t + 4]) if version == 4 else b""
    ack_off = bytes(ip[t + 8 : t + 13])
    window = bytes(ip[t + 14 : t + 16])
    tail = bytes(ip[t + 18 : hlen])
    out = []
    join = b"".join
    pack = struct.pack
    last = count - 1
    for k in range(count):
        off = k * mss
        chunk = ip[hlen + off : hlen + off + mss]
        clen = len(chunk)
        f = tcp_flags
        if k < last:
            f &= ~(_FIN | _PSH)
        if k:
            f &= ~_CWR
        tcsum = _fold(pseudo + thl + clen)
        seq = (seq0 + off) & 0xFFFFFFFF
        if version == 4:
            length = hlen + clen
            ident = (ip_id + k) & 0xFFFF
            csum = ~_fold(base + length + ident) & 0xFFFF
            out.append(
                join(
                    (
                        head,
                        pack("!HH", length, ident),
                        mid,
                        pack("!H", csum),
                        addrs,
                        pack("!I", seq),
                        ack_off,
                        bytes((f,)),
                        window,
                        pack("!H", tcsum),
                        tail,
                        chunk,
                    )
                )
            )
        else:
            out.append(
                join(
                    (
                        head,
                        pack("!H", thl + clen),
                        mid,
                        bytes(ip[t : t + 4]),
                        pack("!I", seq),
                        ack_off,
                        bytes((f,)),
                        window,
                        pack("!H", tcsum),
                        tail,
                        chunk,
                    )
                )
            )
    return out


def _flow_key(pkt: bytes, version: int, ihl: int, hlen: int) -> tuple[bytes, bytes, bytes]:
    """What must be equal for two segments to merge: the headers but for lengths, ids,
    checksums, sequence number and flags (compared separately), in three slices: IP fields and
    addresses with the ports; ack and data offset; window, urgent pointer and options."""
    o = VNET_LEN
    t = o + ihl
    if version == 4:
        ip = pkt[o : o + 2] + pkt[o + 6 : o + 10] + pkt[o + 12 : t + 4]
    else:
        ip = pkt[o : o + 4] + pkt[o + 6 : t + 4]
    return ip, pkt[t + 8 : t + 13], pkt[t + 14 : t + 16] + pkt[t + 18 : o + hlen]


class _Group:
    __slots__ = (
        "first",
        "hlen",
        "ihl",
        "key",
        "last_len",
        "mss",
        "next_seq",
        "parts",
        "psh",
        "size",
    )

    def __init__(
        self, pkt: bytes, ihl: int, hlen: int, plen: int, *, seq: int, key: tuple[bytes, ...]
    ) -> None:
        self.key = key
        self.first = pkt
        self.ihl = ihl
        self.hlen = hlen
        self.mss = plen
        self.last_len = plen
        self.next_seq = (seq + plen) & 0xFFFFFFFF
        self.parts = [pkt[VNET_LEN + hlen :]]
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
    o = VNET_LEN
    u32 = _U32.unpack_from
    for pkt in pkts:
        n = len(pkt)
        # Fast shape test before any parsing: plain IPv4/IPv6 TCP, no GSO header.
        if n < o + 40 or pkt[1] != GSO_NONE:
            parsed = None
        else:
            b0 = pkt[o]
            if b0 == 0x45 and pkt[o + 9] == _PROTO_TCP and not pkt[o + 6] & 0x3F and not pkt[o + 7]:
                version, ihl = 4, 20
            elif b0 >> 4 == 6 and pkt[o + 6] == _PROTO_TCP and n >= o + 60:
                version, ihl = 6, 40
            else:
                version = 0
            if version:
                thl = (pkt[o + ihl + 12] >> 4) * 4
                parsed = (version, ihl, ihl + thl) if thl >= 20 and n >= o + ihl + thl else None
            else:
                parsed = None
        if parsed is None:
            if g is not None:
                _emit(g, out)
                g = None
            out.append(pkt)
            continue
        version, ihl, hlen = parsed
        plen = n - o - hlen
        tflags = pkt[o + ihl + 13]
        (seq,) = u32(pkt, o + ihl + 4)
        mergeable = plen > 0 and not tflags & (_SYN | _RST | _URG | _FIN | _CWR)
        if mergeable and g is not None:
            t = o + ihl
            k1, k2, k3 = g.key
            if (
                not g.psh
                and seq == g.next_seq
                and g.last_len == g.mss
                and plen <= g.mss
                and g.hlen == hlen
                and hlen + g.size + plen <= _IP_MAX
                and pkt[t + 8 : t + 13] == k2  # ack first: it changes most often
                and pkt[t + 14 : t + 16] + pkt[t + 18 : o + hlen] == k3
                and (
                    pkt[o : o + 2] + pkt[o + 6 : o + 10] + pkt[o + 12 : t + 4]
                    if version == 4
                    else pkt[o : o + 4] + pkt[o + 6 : t + 4]
                )
                == k1
            ):
                g.parts.append(pkt[o + hlen :])
                g.size += plen
                g.last_len = plen
                g.next_seq = (seq + plen) & 0xFFFFFFFF
                g.psh = bool(tflags & _PSH)
                continue
        if g is not None:
            _emit(g, out)
            g = None
        if mergeable and not tflags & _PSH:
            g = _Group(pkt, ihl, hlen, plen, seq=seq, key=_flow_key(pkt, version, ihl, hlen))
        else:
            out.append(pkt)
    if g is not None:
        _emit(g, out)
    return out
