"""Throughput of the protocol core's data path, without any I/O.

Run: `python -m bench.bench_core [--repeat N]` (each figure: best of N windows of ~16 MB).

For each cipher and payload size it measures, in MB/s of packet payload:
- seal+frame: `send_packets([pkt]) + data_to_send()`: one packet per call, as the daemon does for
  a GSO super-packet (64 KiB) or a plain MTU-sized read (1,400 bytes);
- seal+frame batched (1,400 only): 46 packets per call, one frame per sendbuf (64 KiB);
- unframe+open: `receive_data(frame)` on the peer, delivering the packets;
- the bare AEAD `encrypt` on the same size, as the ceiling the Python work is compared with.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from vpnd_runtime.proto import Connection, LinkUp, Params
from vpnd_runtime.proto.session import make_aead

CIPHERS = ["chacha20-poly1305", "aes-256-gcm", "aes-128-gcm"]
SIZES = [1400, 65536]
PSK = os.urandom(32)


def established(cipher: str) -> tuple[Connection, Connection]:
    """Two connected endpoints (in memory) using `cipher`; huge keyttl so no rekey interferes."""
    p = Params(cipher=cipher, keyttl=1e9, keepalive=1e9)
    wall = time.time()
    i = Connection("initiator", PSK, p, os.urandom, 0.0, wall=wall)
    r = Connection("responder", PSK, p, os.urandom, 0.0, wall=wall)
    i.start(0.0)
    r.receive_data(i.data_to_send(), 0.0)
    i.receive_data(r.data_to_send(), 0.0)
    events = r.receive_data(i.data_to_send(), 0.0)
    assert any(isinstance(e, LinkUp) for e in events)
    return i, r


def best_rate(fn: Callable[[], object], ops: int, payload: int, repeat: int) -> float:
    """Best of `repeat` windows of `ops` calls (as timeit: the least disturbed run); MB/s."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(ops):
            fn()
        best = min(best, time.perf_counter() - start)
    return ops * payload / best / 1e6


def measure(cipher: str, size: int, batch: int, repeat: int) -> tuple[float, float, float]:
    """(seal+frame MB/s, unframe+open MB/s, bare AEAD encrypt MB/s) for `batch` packets per call."""
    packets = [os.urandom(size) for _ in range(batch)]
    payload = size * batch
    ops = max(50, int(16e6 / payload))

    sender, receiver = established(cipher)

    def seal() -> bytes:
        sender.send_packets(packets, 0.0)
        return sender.data_to_send()

    frames = [seal() for _ in range(ops * (repeat + 1))]  # also the input of the open test
    seal_rate = best_rate(seal, ops, payload, repeat)

    feed = iter(frames)
    receive = receiver.receive_data
    open_rate = best_rate(lambda: receive(next(feed), 0.0), ops, payload, repeat)

    aead = make_aead(cipher, os.urandom(32))
    nonce = bytes(12)
    plain = b"".join(packets)
    aead_rate = best_rate(lambda: aead.encrypt(nonce, plain, b"header"), ops, payload, repeat)
    return seal_rate, open_rate, aead_rate


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed windows per figure (best kept)")
    args = ap.parse_args(argv)
    rows = []
    for cipher in CIPHERS:
        for size, batch in [(1400, 1), (1400, 46), (65536, 1)]:
            seal, open_, aead = measure(cipher, size, batch, args.repeat)
            rows.append((cipher, size, batch, seal, open_, aead))
    head = f"{'cipher':<18} {'payload':>8} {'pkts/call':>9} {'seal+frame':>11} {'unframe+open':>13}"
    head += f" {'bare AEAD':>10} {'seal/AEAD':>9}"
    print(head)
    print("-" * len(head))
    for cipher, size, batch, seal, open_, aead in rows:
        print(
            f"{cipher:<18} {size:>8} {batch:>9} {seal:>8.0f} MB/s {open_:>10.0f} MB/s"
            f" {aead:>5.0f} MB/s {seal / aead:>9.2f}"
        )
    print("(MB/s of packet payload, 1 MB = 10^6 bytes; one core; no I/O)")


if __name__ == "__main__":
    main()
