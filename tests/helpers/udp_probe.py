"""A small UDP sender/receiver pair for the WAN emulator's tests (run inside namespaces).

    python udp_probe.py recv ADDR PORT IDLE TOTAL   # prints "ready", then one JSON line
    python udp_probe.py send ADDR PORT COUNT SIZE INTERVAL [GSO]

Each datagram carries its sequence number; the receiver reports, in arrival order, the sequence
numbers and arrival times (kernel receive stamps, seconds since the first one), ending IDLE
seconds after the last datagram (or TOTAL seconds after start). INTERVAL 0 sends as fast as the
socket takes them. GSO > 1 hands the kernel GSO datagrams at a time in one send (UDP_SEGMENT):
the wire then carries UDP GSO super-packets, each datagram still numbered on its own.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

SEQ = struct.Struct("!I")
SO_TIMESTAMPNS = 35  # arrival times stamped by the kernel: a late wake-up here does not skew them
TIMESPEC = struct.Struct("qq")
UDP_SEGMENT = 103


def receive(addr: str, port: int, idle: float, total: float) -> None:
    """Count datagrams until `idle` seconds pass without one (or `total` seconds in all)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 32 * 1024 * 1024)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind((addr, port))
    print("ready", flush=True)
    seqs: list[int] = []
    times: list[float] = []
    nbytes = 0
    start = time.monotonic()
    first = 0.0
    first_stamp = 0.0
    while True:
        now = time.monotonic()
        left = start + total - now
        if seqs:
            left = min(left, times[-1] + first + idle - now)
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(65536, 64)
        except TimeoutError:
            break
        now = time.monotonic()
        stamp = now
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = TIMESPEC.unpack_from(value)
                stamp = sec + nsec / 1e9
        if not seqs:
            first, first_stamp = now, stamp
        seqs.append(SEQ.unpack_from(data)[0])
        times.append(round(stamp - first_stamp, 9))
        nbytes += len(data)
    print(json.dumps({"seqs": seqs, "times": times, "bytes": nbytes}), flush=True)


def send(addr: str, port: int, count: int, size: int, interval: float, *, gso: int = 1) -> None:
    """Send `count` datagrams of `size` bytes, `interval` seconds apart (0: back to back), `gso`
    of them per system call as one UDP GSO super-packet when `gso` > 1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if gso > 1:
        sock.setsockopt(socket.SOL_UDP, UDP_SEGMENT, size)
    pad = b"\0" * (size - SEQ.size)
    start = time.monotonic()
    for first in range(0, count, gso):
        if interval:
            pause = start + first * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing, not waiting for a condition
        batch = range(first, min(first + gso, count))
        sock.sendto(b"".join(SEQ.pack(seq) + pad for seq in batch), (addr, port))


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        receive(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
             float(sys.argv[6]), gso=int(sys.argv[7]) if len(sys.argv) > 7 else 1)  # fmt: skip
