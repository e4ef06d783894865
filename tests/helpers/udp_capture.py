"""Capture UDP datagrams of one port off an interface (run inside a namespace, as root).

    python udp_capture.py IFACE PORT SECONDS in|out

Prints "ready", then after SECONDS one JSON object: ``{"datagrams": [[src, sport, dst, dport,
payload_hex], ...]}`` for every IPv4 UDP frame on IFACE whose destination (``in``) or source
(``out``) port is PORT, received (``in``) or sent (``out``) by this host. A frame that is a GSO
super-datagram (the UDP length disagrees with the frame) is listed with its first datagram only
and counted in ``"super"``. Reads with an AF_PACKET socket: no tcpdump needed.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def main() -> None:
    iface, port, seconds, way = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    sock.settimeout(0.1)
    print("ready", flush=True)
    out: list[list[object]] = []
    supers = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            frame, addr = sock.recvfrom(70000)
        except TimeoutError:
            continue
        outgoing = addr[2] == PACKET_OUTGOING
        if outgoing != (way == "out") or len(frame) < 14 + 28:
            continue
        if struct.unpack_from("!H", frame, 12)[0] != 0x0800:
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        if ip[9] != 17:
            continue
        sport, dport, ulen = struct.unpack_from("!HHH", ip, ihl)
        if (dport if way == "in" else sport) != port:
            continue
        total = struct.unpack_from("!H", ip, 2)[0]
        if total != len(ip[: ihl + ulen]) or ihl + ulen != total:
            supers += 1
        payload = ip[ihl + 8 : ihl + ulen]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        out.append([src, sport, dst, dport, payload.hex()])
    print(json.dumps({"datagrams": out, "super": supers}), flush=True)


if __name__ == "__main__":
    main()
