"""A small UDP sender/receiver pair for the WAN emulator's tests (run inside namespaces).

    python udp_probe.py recv ADDR PORT IDLE TOTAL   # prints "ready", then one JSON line
    python udp_probe.py send ADDR PORT COUNT SIZE INTERVAL

Each datagram carries its sequence number; the receiver reports, in arrival order, the sequence
numbers and arrival times (seconds since the first one), ending IDLE seconds after the last
datagram (or TOTAL seconds after start). INTERVAL 0 sends as fast as the socket takes them.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

SEQ = struct.Struct("!I")


def receive(addr: str, port: int, idle: float, total: float) -> None:
    """Count datagrams until `idle` seconds pass without one (or `total` seconds in all)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 32 * 1024 * 1024)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
    sock.bind((addr, port))
    print("ready", flush=True)
    seqs: list[int] = []
    times: list[float] = []
    nbytes = 0
    start = time.monotonic()
    first = 0.0
    while True:
        now = time.monotonic()
        left = start + total - now
        if seqs:
            left = min(left, times[-1] + first + idle - now)
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        now = time.monotonic()
        if not seqs:
            first = now
        seqs.append(SEQ.unpack_from(data)[0])
        times.append(round(now - first, 6))
        nbytes += len(data)
    print(json.dumps({"seqs": seqs, "times": times, "bytes": nbytes}), flush=True)


def send(addr: str, port: int, count: int, size: int, interval: float) -> None:
    """Send `count` datagrams of `size` bytes, `interval` seconds apart (0: back to back)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = b"\0" * (size - SEQ.size)
    start = time.monotonic()
    for seq in range(count):
        if interval:
            pause = start + seq * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing, not waiting for a condition
        sock.sendto(SEQ.pack(seq) + pad, (addr, port))


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        receive(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
             float(sys.argv[6]))  # fmt: skip
