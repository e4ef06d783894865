"""CPU cost of vpnd's UDP data path per segment, without namespaces (a profile-first microbench).

    python -m bench.bench_udp_path [--rounds 300] [--cipher chacha20-poly1305] [--profile send|recv]

Two datagram-mode `Connection`s are put through the handshake in memory; then a 64 KiB TCP
super-packet as the TUN hands it (virtio header, IPv4, TCP with timestamps, MSS 1,348 for the
default `mtu 1400`) goes through the same steps as in the daemon:

* send: `gso.split` -> `Connection.send_packets` -> `datagrams_to_send` -> `UdpEndpoint.send`
  (a real GSO `sendmsg` to a socket on 127.0.0.1, read back and thrown away outside the clock);
* receive: the datagrams (index stripped, as `_on_udp_server` does) -> `receive_datagrams` ->
  `gso.coalesce`.

It prints microseconds per segment for each step and the total (20th percentile of `rounds`),
and checks that what comes out of coalesce is the super-packet that went in. Figures move with
the load of the machine (printed); compare runs made one after the other.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import socket
import struct
import sys
import time

from vpnd_runtime.io import gso
from vpnd_runtime.io.udp import UdpEndpoint
from vpnd_runtime.proto.connection import INDEX_LEN, Connection, Params
from vpnd_runtime.proto.events import Packets

PSK = bytes(range(32))
WALL = 1_700_000_000.0
MTU = 1400
MSS = MTU - 40 - 12  # TCP timestamps


def super_packet(payload: int = 65536 - 40 - 32 - 256, mss: int = MSS, seq: int = 1000) -> bytes:
    """An IPv4 TCP TSO super-packet with a timestamps option, as a TUN with offload gives it."""
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)
    thl = 20 + len(opts)
    src, dst = bytes([198, 19, 0, 2]), bytes([198, 19, 0, 1])
    # The TCP checksum field holds the pseudo-header sum (NEEDS_CSUM), as the kernel leaves it.
    partial = gso._fold(gso._sum16(src + dst) + 6 + thl + payload)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 987654321, (thl // 4) << 4, 0x18, 512,
                      partial, 0) + opts  # fmt: skip
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + thl + payload, 7, 0x4000, 64, 6, 0,
                               src, dst))  # fmt: skip
    gso._ip4_csum(ip, 20)
    vnet = gso.VNET.pack(gso.F_NEEDS_CSUM, gso.GSO_TCPV4, 20 + thl, mss, 20, 16)
    return vnet + bytes(ip) + tcp + os.urandom(payload)


def established(cipher: str) -> tuple[Connection, Connection]:
    """An initiator and a responder in datagram mode, handshake done, as the daemon sets them."""
    params = Params(cipher=cipher, datagram=True, sendbuf=MTU + 10 + 4, keepalive=1e6, keyttl=1e6)
    i = Connection("initiator", PSK, params, os.urandom, 0.0, wall=WALL, index=0x1111)
    r = Connection("responder", PSK, params, os.urandom, 0.0, wall=WALL, index=0x2222)
    i.start(0.0)
    for src, dst in ((i, r), (r, i), (i, r)):
        dst.receive_datagrams([d[INDEX_LEN:] for d in src.datagrams_to_send()], 0.0)
    return i, r


def _low_us(samples: list[int], n: int) -> float:
    """The 20th percentile in µs per segment: on a shared machine the low end of the
    distribution is the code's cost, the rest is other jobs taking the CPU."""
    return sorted(samples)[len(samples) // 5] / n / 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_udp_path")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--cipher", default="chacha20-poly1305")
    ap.add_argument("--profile", choices=("send", "recv"), help="cProfile one side instead")
    args = ap.parse_args(argv)
    sender, receiver = established(args.cipher)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sink.setblocking(False)
    endpoint = UdpEndpoint(("127.0.0.1", 0))
    addr = sink.getsockname()
    seq = [1000]

    def drain() -> None:
        while True:
            try:
                sink.recv(65536)
            except BlockingIOError:
                return

    def send_side(pkt: bytes) -> tuple[list[int], list[bytes]]:
        t0 = time.perf_counter_ns()
        segs = gso.split(pkt)
        t1 = time.perf_counter_ns()
        sender.send_packets(segs, 0.0)
        grams = sender.datagrams_to_send()
        t2 = time.perf_counter_ns()
        endpoint.send(grams, addr)
        t3 = time.perf_counter_ns()
        drain()
        return [t1 - t0, t2 - t1, t3 - t2], grams

    def recv_side(grams: list[bytes]) -> tuple[list[int], list[bytes]]:
        views = [memoryview(g)[INDEX_LEN:] for g in grams]
        t0 = time.perf_counter_ns()
        events = receiver.receive_datagrams(views, 0.0)
        t1 = time.perf_counter_ns()
        packets = [p for e in events if isinstance(e, Packets) for p in e.packets]
        out = gso.coalesce(packets)
        t2 = time.perf_counter_ns()
        return [t1 - t0, t2 - t1], out

    def one() -> tuple[list[int], list[int], int]:
        pkt = super_packet(seq=seq[0])
        seq[0] += 65536
        s, grams = send_side(pkt)
        r, out = recv_side(grams)
        if len(out) != 1 or out[0] != pkt:
            raise SystemExit(f"coalesce(open(seal(split(p)))) != p ({len(out)} packets)")
        return s, r, len(grams)

    for _ in range(20):
        one()
    if args.profile:
        prof = cProfile.Profile()
        for _ in range(args.rounds):
            pkt = super_packet(seq=seq[0])
            seq[0] += 65536
            if args.profile == "send":
                prof.enable()
                send_side(pkt)
                prof.disable()
            else:
                _, grams = send_side(pkt)
                prof.enable()
                recv_side(grams)
                prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return 0
    sends: list[list[int]] = [[], [], []]
    recvs: list[list[int]] = [[], []]
    n = 0
    for _ in range(args.rounds):
        s, r, n = one()
        for col, v in zip(sends, s, strict=True):
            col.append(v)
        for col, v in zip(recvs, r, strict=True):
            col.append(v)
    tot_s = _low_us(list(map(sum, zip(*sends, strict=True))), n)
    tot_r = _low_us(list(map(sum, zip(*recvs, strict=True))), n)

    def row(name: str, col: list[int]) -> str:
        return f"  {name:<34} {_low_us(col, n):6.2f}"

    print(f"{args.cipher}, {n} segments of {MSS} B per 64 KiB super-packet, load {_load()}")
    print("send (µs per segment)")
    print(row("gso.split", sends[0]))
    print(row("send_packets + datagrams_to_send", sends[1]))
    print(row("UdpEndpoint.send (GSO sendmsg)", sends[2]))
    print(f"  {'total':<34} {tot_s:6.2f}")
    print("receive (µs per segment)")
    print(row("receive_datagrams", recvs[0]))
    print(row("gso.coalesce", recvs[1]))
    print(f"  {'total':<34} {tot_r:6.2f}")
    print(f"send {endpoint.send_calls} sendmsg calls for {endpoint.sent} datagrams")
    return 0


def _load() -> str:
    return open("/proc/loadavg").read().split()[0]


if __name__ == "__main__":
    sys.exit(main())
