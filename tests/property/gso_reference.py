"""The first io/gso.py (before the per-segment fast paths), kept verbatim as the reference the
property tests compare the current `split` and `coalesce` with, byte for byte."""

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
MASK32 = 0xFFFFFFFF


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
    if version == 4:
        # The whole header (virtio + IPv4 + TCP) in one pack per segment.
        hdr = struct.Struct(f"!{len(head)}sHH4sH{len(addrs)}sI5sB2sH{len(tail)}s").pack
        chunk_end = hlen + count * mss
        for k, start in enumerate(range(hlen, chunk_end, mss)):
            chunk = ip[start : start + mss]
            clen = len(chunk)
            f = tcp_flags
            if k < last:
                f &= ~(_FIN | _PSH)
            if k:
                f &= ~_CWR
            length = hlen + clen
            ident = (ip_id + k) & 0xFFFF
            s = base + length + ident
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            t16 = pseudo + thl + clen
            t16 = (t16 & 0xFFFF) + (t16 >> 16)
            t16 = (t16 & 0xFFFF) + (t16 >> 16)
            out.append(
                hdr(head, length, ident, mid, ~s & 0xFFFF, addrs, (seq0 + start - hlen) & MASK32,
                    ack_off, f, window, t16, tail) + chunk
            )  # fmt: skip
        return out
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


class _Group:
    """An open run of segments of one flow: the first packet, where its fields are, and the
    header slices a following segment must repeat exactly."""

    __slots__ = (
        "addr_at",
        "first",
        "flags",
        "habs",
        "hlen",
        "ihl",
        "ip0",
        "ip1",
        "ip1_at",
        "k_ack",
        "k_addr",
        "k_opt",
        "k_win",
        "last_len",
        "mss",
        "next_seq",
        "parts",
        "psh",
        "size",
        "t",
    )

    def __init__(self, pkt: bytes, version: int, ihl: int, hlen: int, seq: int) -> None:
        o = VNET_LEN
        t = o + ihl
        habs = o + hlen
        plen = len(pkt) - habs
        self.first = pkt
        self.ihl = ihl
        self.hlen = hlen
        self.t = t
        self.habs = habs
        if version == 4:
            self.ip0 = pkt[o : o + 2]  # version, IHL, TOS
            self.ip1_at = o + 6
            self.ip1 = pkt[o + 6 : o + 10]  # flags, fragment offset, TTL, protocol
            self.addr_at = o + 12
        else:
            self.ip0 = pkt[o : o + 4]  # version, traffic class, flow label
            self.ip1_at = o + 6
            self.ip1 = pkt[o + 6 : o + 8]  # next header, hop limit
            self.addr_at = o + 8
        self.k_addr = pkt[self.addr_at : t + 4]  # addresses and ports
        self.k_ack = pkt[t + 8 : t + 13]  # ack and data offset
        self.k_win = pkt[t + 14 : t + 16]
        self.k_opt = pkt[t + 18 : habs]  # urgent pointer and options
        self.flags = pkt[t + 13]
        self.mss = plen
        self.last_len = plen
        self.next_seq = (seq + plen) & 0xFFFFFFFF
        self.parts = [pkt[habs:]]
        self.size = plen
        self.psh = False

    def extend(self, pkt: bytes) -> bool:
        """Append `pkt` when it is the next segment of this run (the kernel's GRO rules)."""
        t = self.t
        habs = self.habs
        plen = len(pkt) - habs
        if (
            plen <= 0
            or plen > self.mss
            or self.psh
            or self.last_len != self.mss
            or pkt[1] != GSO_NONE
            or pkt[t + 13] & ~_PSH != self.flags
            or _U32.unpack_from(pkt, t + 4)[0] != self.next_seq
            or self.hlen + self.size + plen > _IP_MAX
            or pkt[t + 8 : t + 13] != self.k_ack
            or pkt[self.addr_at : t + 4] != self.k_addr
            or pkt[t + 14 : t + 16] != self.k_win
            or pkt[t + 18 : habs] != self.k_opt
            or pkt[VNET_LEN : VNET_LEN + len(self.ip0)] != self.ip0
            or pkt[self.ip1_at : self.ip1_at + len(self.ip1)] != self.ip1
        ):
            return False
        self.parts.append(pkt[habs:])
        self.size += plen
        self.last_len = plen
        self.next_seq = (self.next_seq + plen) & 0xFFFFFFFF
        self.psh = bool(pkt[t + 13] & _PSH)
        return True


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
    for pkt in pkts:
        if g is not None:
            if len(pkt) > g.habs and g.extend(pkt):
                continue
            _emit(g, out)
            g = None
        n = len(pkt)
        # Shape test before any parsing: plain IPv4/IPv6 TCP, no GSO header.
        version = ihl = 0
        if n >= o + 40 and pkt[1] == GSO_NONE:
            b0 = pkt[o]
            if b0 == 0x45 and pkt[o + 9] == _PROTO_TCP and not pkt[o + 6] & 0x3F and not pkt[o + 7]:
                version, ihl = 4, 20
            elif b0 >> 4 == 6 and pkt[o + 6] == _PROTO_TCP and n >= o + 60:
                version, ihl = 6, 40
        if version:
            thl = (pkt[o + ihl + 12] >> 4) * 4
            tflags = pkt[o + ihl + 13]
            if (
                thl >= 20
                and n > o + ihl + thl
                and not tflags & (_SYN | _RST | _URG | _FIN | _CWR | _PSH)
            ):
                g = _Group(pkt, version, ihl, ihl + thl, _U32.unpack_from(pkt, o + ihl + 4)[0])
                continue
        out.append(pkt)
    if g is not None:
        _emit(g, out)
    return out
